#!/usr/bin/env python3
"""Pages sent and guest writes onto sent pages per second, forecast by forecast, from a
migration's debug log (`RUST_LOG=ferry_engine::source=debug`, as the matrix's `--reports`
keeps them in `log-*.txt`).

Between two `forecast` lines: pages sent = the fall in `never_sent` (the first pass), writes
onto sent pages = the rise in `unharvested` (the pages the dirty log shows written since
their send and not harvested yet). Only the intervals of the first pass are printed.

    python3 benches/scripts/log_rates.py docs/results/bandwidth-logs/*/log-seq-128M-mplm-*.txt
"""
import re
import sys

LINE = re.compile(r"forecast t=(\d+)ms never_sent=(\d+) dirty=\d+ hot=\d+ unharvested=(\d+)")

for path in sys.argv[1:]:
    prev, cells = None, []
    for line in open(path):
        m = LINE.search(line)
        if not m:
            continue
        t, never_sent, unharvested = (int(x) for x in m.groups())
        if prev and never_sent > 0 and t > prev[0]:
            dt = (t - prev[0]) / 1e3
            sent = (prev[1] - never_sent) / dt
            writes = (unharvested - prev[2]) / dt
            cells.append(f"{t}:{sent / 1e3:.0f}k/{writes / 1e3:.0f}k")
        prev = (t, never_sent, unharvested)
    print(path, " ".join(cells))
