#!/usr/bin/env bash
# The testbed (docs/DESIGN §6): two "hosts" as network namespaces joined by N veth pairs,
# one per NIC, each optionally shaped with tc (tbf) on both directions' egress.
#
#   testbed.sh iperf           [OPTIONS]      iperf3 over every lane at once: the ceiling
#   testbed.sh bench-transport [OPTIONS]      iperf3, then `ferry bench transport` over the
#                                             same links, and the ratio ferry/iperf3
#   testbed.sh migrate [OPTIONS] [-- FERRY-MIGRATE-ARGS]
#                                             iperf3, then a live migration of a running VM
#                                             (`vm run` in the source namespace, `listen` on
#                                             every lane address in the destination) over
#                                             the same links, and the ratios to iperf3
#   testbed.sh exec [OPTIONS] -- CMD [ARG]... run CMD (in the root namespace) with the
#                                             testbed described by environment variables
# Options:
#   --lanes N          veth pairs / lanes (default 2, at most 64)
#   --rate R           per-link rate in each direction, tc units (1gbit, 200mbit, 500kbit);
#                      0 or none = unshaped (default none)
#   --burst BYTES      the shaper's bucket (default: 4 ms at the rate, at least 64 KiB);
#                      what a link sends at veth speed after it has been idle
#   --duration S       seconds per measurement, a whole number (default 3)
#   --message-size SZ  ferry's message size (default: ferry's, 1M)
#   --window N         ferry's window per lane (default: ferry's)
#   --port P           first TCP port used (default 7979 for ferry, 5201.. for iperf3)
#   --csv FILE         also append the result as a CSV row (header written if new)
#   --mem SIZE         migrate: guest memory (default 2G)
#   --workload W       migrate: guest workload (default idle; fill is mixed)
#
# Lane i is 198.18.i.1/24 on "ln$i" in ferry-src-$$ and 198.18.i.2/24 on "ln$i" in
# ferry-dst-$$ (198.18.0.0/15: the benchmarking range, never a private one). `exec` exports
# FERRY_SRC_NS, FERRY_DST_NS, FERRY_LANES ("198.18.0.1=198.18.0.2 198.18.1.1=198.18.1.2"),
# FERRY_DST_ADDRS ("198.18.0.2 198.18.1.2"), FERRY_RATE, FERRY_TMP (a scratch directory
# removed afterwards) and, if found, FERRY (the binary); its exit status is CMD's.
# Results (iperf, bench-transport) are one JSON object on stdout, with the command line.
#
# Needs root, iproute2 and iperf3 (scripts/setup.sh). The ferry binary is $FERRY, else
# target/release/ferry, else target/debug/ferry. On exit, error or signal the script kills
# the processes it started (by PID) and deletes both namespaces, which removes the veths.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
COMMAND=$(printf '%q ' "$0" "$@")
COMMAND=${COMMAND% }

die() {
  echo "testbed: $*" >&2
  exit 1
}
note() { echo "testbed: $*" >&2; }

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2
  exit 2
}

# ---- arguments -------------------------------------------------------------------------

(($#)) || usage
SUB=$1
shift
case $SUB in
  iperf | bench-transport | migrate | exec) ;;
  -h | --help | help) usage ;;
  *) die "unknown subcommand '$SUB' (iperf, bench-transport, migrate, exec; --help)" ;;
esac

LANES=2 RATE=none BURST='' DURATION=3 CSV='' MSG_SIZE='' WINDOW='' PORT='' MEM=2G WORKLOAD=idle
CMD=()
while (($#)); do
  case $1 in
    --lanes | --rate | --burst | --duration | --csv | --message-size | --window | --port | --mem | --workload)
      (($# >= 2)) || die "$1 needs a value"
      case $1 in
        --lanes) LANES=$2 ;;
        --rate) RATE=$2 ;;
        --burst) BURST=$2 ;;
        --duration) DURATION=$2 ;;
        --csv) CSV=$2 ;;
        --message-size) MSG_SIZE=$2 ;;
        --window) WINDOW=$2 ;;
        --port) PORT=$2 ;;
        --mem) MEM=$2 ;;
        --workload) WORKLOAD=$2 ;;
      esac
      shift 2
      ;;
    --)
      shift
      CMD=("$@")
      break
      ;;
    -h | --help) usage ;;
    *) die "unknown option '$1' (--help)" ;;
  esac
done

[[ $LANES =~ ^[0-9]+$ ]] && ((LANES >= 1 && LANES <= 64)) || die "--lanes must be 1..64"
[[ $DURATION =~ ^[0-9]+$ ]] && ((DURATION >= 1)) || die "--duration must be a whole number of seconds ≥ 1"
[[ -z $PORT || $PORT =~ ^[0-9]+$ ]] || die "--port must be a number"
[[ -z $WINDOW || $WINDOW =~ ^[0-9]+$ ]] || die "--window must be a number"
[[ -z $BURST || $BURST =~ ^[0-9]+$ ]] || die "--burst must be a number of bytes"
if [[ $SUB == exec ]]; then
  ((${#CMD[@]})) || die "exec needs a command after --"
elif [[ $SUB != migrate ]] && ((${#CMD[@]})); then
  die "$SUB takes no command"
fi

# Rate in bits/s (0 = unshaped).
case ${RATE,,} in
  0 | none | '') RATE=none RATE_BPS=0 ;;
  *)
    [[ ${RATE,,} =~ ^([0-9]+)(bit|kbit|mbit|gbit|tbit)$ ]] ||
      die "--rate '$RATE': expected a number and bit, kbit, mbit, gbit or tbit (or none)"
    case ${BASH_REMATCH[2]} in
      bit) m=1 ;; kbit) m=1000 ;; mbit) m=1000000 ;; gbit) m=1000000000 ;; tbit) m=1000000000000 ;;
    esac
    RATE_BPS=$((BASH_REMATCH[1] * m))
    ((RATE_BPS > 0)) || RATE=none
    ;;
esac

((EUID == 0)) || die "must run as root (it creates network namespaces)"
for tool in ip tc ss python3; do
  command -v "$tool" >/dev/null || die "$tool is missing (run scripts/setup.sh)"
done
if [[ $SUB != exec ]]; then
  command -v iperf3 >/dev/null || die "iperf3 is missing (run scripts/setup.sh)"
fi

find_ferry() {
  local c
  for c in "${FERRY:-}" "${CARGO_TARGET_DIR:+$CARGO_TARGET_DIR/release/ferry}" \
    "$ROOT/target/release/ferry" "${CARGO_TARGET_DIR:+$CARGO_TARGET_DIR/debug/ferry}" \
    "$ROOT/target/debug/ferry"; do
    if [[ -n $c && -x $c ]]; then
      echo "$c"
      return
    fi
  done
  [[ -z ${FERRY:-} ]] || die "FERRY=$FERRY is not an executable"
}
FERRY_BIN=$(find_ferry)
if [[ ($SUB == bench-transport || $SUB == migrate) && -z $FERRY_BIN ]]; then
  die "no ferry binary: set FERRY or run cargo build --release -p ferry"
fi

# ---- setup and cleanup -----------------------------------------------------------------

SRC_NS=ferry-src-$$
DST_NS=ferry-dst-$$
PIDS=()
TMP=''

# True while process $1 exists and is not a zombie (exited, not yet reaped).
running() {
  local state
  state=$(sed -n 's/^State:[[:space:]]*\([A-Z]\).*/\1/p' "/proc/$1/status" 2>/dev/null) || return 1
  [[ -n $state && $state != Z ]]
}

cleanup() {
  local rc=$? pid i left ours=()
  set +e
  trap - EXIT INT TERM HUP
  # Only our children not yet reaped: a reaped PID may belong to someone else by now.
  for pid in $(jobs -p); do
    [[ " ${PIDS[*]} " == *" $pid "* ]] && ours+=("$pid")
  done
  for pid in "${ours[@]}"; do kill -TERM "$pid" 2>/dev/null; done
  for ((i = 0; i < 30; i++)); do
    left=0
    for pid in "${ours[@]}"; do running "$pid" && left=1; done
    ((left)) || break
    sleep 0.1
  done
  for pid in "${ours[@]}"; do kill -KILL "$pid" 2>/dev/null; done
  for pid in "${ours[@]}"; do wait "$pid" 2>/dev/null; done
  for ns in "$SRC_NS" "$DST_NS"; do
    if ip netns list | grep -qw "^$ns"; then
      # Whatever still runs in our namespaces was started inside them by our command (a
      # process it started and could not reap, e.g. when it was killed itself): end it.
      left=$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')
      if [[ -n $left ]]; then
        note "ending processes our command left in $ns: $left"
        # shellcheck disable=SC2086
        kill -TERM $left 2>/dev/null
        sleep 0.5
        left=$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')
        # shellcheck disable=SC2086
        [[ -z $left ]] || kill -KILL $left 2>/dev/null
      fi
      ip netns del "$ns" || note "could not delete namespace $ns"
    fi
  done
  [[ -z $TMP ]] || rm -rf "$TMP"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

# A run killed outright (SIGKILL, the machine restarting) cannot clean up: its namespaces
# outlive it. Remove those whose script is gone and in which nothing runs any more; leave,
# with a note, any that still hold a process (not ours to end).
reap_stale() {
  local ns owner left
  for ns in $(ip netns list | awk '{print $1}'); do
    [[ $ns =~ ^ferry-(src|dst)-([0-9]+)$ ]] || continue
    owner=${BASH_REMATCH[2]}
    grep -qs testbed.sh "/proc/$owner/cmdline" && continue
    left=$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')
    if [[ -n $left ]]; then
      note "namespace $ns outlived its testbed run but still holds processes $left: left alone"
      continue
    fi
    if ip netns del "$ns"; then
      note "removed namespace $ns, left by a testbed run that was killed"
    else
      note "could not remove namespace $ns, left by a testbed run that was killed"
    fi
  done
}
reap_stale

TMP=$(mktemp -d /tmp/ferry-testbed.XXXXXX)

# Burst: --burst, else 4 ms at the rate, at least 64 KiB (one GSO packet); queue: up to
# 20 ms.
shape() {
  local ns=$1 dev=$2 burst=$BURST
  [[ $RATE == none ]] && return
  if [[ -z $burst ]]; then
    burst=$((RATE_BPS / 8 / 250))
    ((burst >= 65536)) || burst=65536
  fi
  tc -n "$ns" qdisc add dev "$dev" root tbf rate "$RATE" burst "$burst" latency 20ms
}

setup() {
  local i
  ip netns add "$SRC_NS"
  ip netns add "$DST_NS"
  for ns in "$SRC_NS" "$DST_NS"; do ip -n "$ns" link set lo up; done
  LANE_PAIRS=() DST_ADDRS=()
  for ((i = 0; i < LANES; i++)); do
    local a b
    a=198.$((18 + i / 256)).$((i % 256)).1
    b=198.$((18 + i / 256)).$((i % 256)).2
    ip link add "ln$i" netns "$SRC_NS" type veth peer name "ln$i" netns "$DST_NS"
    ip -n "$SRC_NS" addr add "$a/24" dev "ln$i"
    ip -n "$DST_NS" addr add "$b/24" dev "ln$i"
    ip -n "$SRC_NS" link set "ln$i" up
    ip -n "$DST_NS" link set "ln$i" up
    shape "$SRC_NS" "ln$i"
    shape "$DST_NS" "ln$i"
    LANE_PAIRS+=("$a=$b")
    DST_ADDRS+=("$b")
  done
  note "$LANES lane(s) between $SRC_NS and $DST_NS, rate $RATE: ${LANE_PAIRS[*]}"
}

# Starts "$@" in the background and records its PID (the command itself: `ip netns exec`
# execs it).
start() {
  "$@" &
  PIDS+=($!)
  LAST_PID=$!
}

# Waits until something listens on TCP port $3 at $2 in namespace $1, or process $4 dies.
wait_listen() {
  local i
  for ((i = 0; i < 100; i++)); do
    [[ -n $(ip netns exec "$1" ss -Hltn "sport = :$3") ]] && return 0
    running "$4" || return 1
    sleep 0.05
  done
  return 1
}

# ---- measurements ----------------------------------------------------------------------

# iperf3 on every lane at once; writes $TMP/iperf-c$i.json.
run_iperf() {
  local i port servers=() clients=()
  local base=${PORT:-5201}
  for ((i = 0; i < LANES; i++)); do
    port=$((base + i))
    start ip netns exec "$DST_NS" iperf3 -s -1 -B "${DST_ADDRS[i]}" -p "$port" \
      >"$TMP/iperf-s$i.log" 2>&1
    servers+=("$LAST_PID")
    wait_listen "$DST_NS" "${DST_ADDRS[i]}" "$port" "$LAST_PID" ||
      die "iperf3 server on lane $i did not start: $(cat "$TMP/iperf-s$i.log")"
  done
  for ((i = 0; i < LANES; i++)); do
    start ip netns exec "$SRC_NS" iperf3 -c "${DST_ADDRS[i]}" -B "${LANE_PAIRS[i]%%=*}" \
      -p $((base + i)) -t "$DURATION" -J >"$TMP/iperf-c$i.json" 2>"$TMP/iperf-c$i.err"
    clients+=("$LAST_PID")
  done
  for ((i = 0; i < LANES; i++)); do
    wait "${clients[i]}" ||
      die "iperf3 client on lane $i failed: $(cat "$TMP/iperf-c$i.err" "$TMP/iperf-c$i.json")"
  done
  for pid in "${servers[@]}"; do wait "$pid" || true; done
}

# ferry bench transport over every lane; writes $TMP/ferry-c.json.
run_ferry() {
  local port=${PORT:-7979} server args=() i
  "$FERRY_BIN" key new "$TMP/key" >/dev/null 2>&1 || die "$FERRY_BIN key new failed"
  start ip netns exec "$DST_NS" "$FERRY_BIN" bench transport --server \
    --listen "0.0.0.0:$port" --key "$TMP/key" --json >"$TMP/ferry-s.out" 2>"$TMP/ferry-s.err"
  server=$LAST_PID
  wait_listen "$DST_NS" 0.0.0.0 "$port" "$server" ||
    die "ferry bench server did not start: $(cat "$TMP/ferry-s.err")"
  for ((i = 0; i < LANES; i++)); do args+=(--lane "${LANE_PAIRS[i]}:$port"); done
  [[ -z $MSG_SIZE ]] || args+=(--message-size "$MSG_SIZE")
  [[ -z $WINDOW ]] || args+=(--window "$WINDOW")
  start ip netns exec "$SRC_NS" "$FERRY_BIN" bench transport "${args[@]}" --key "$TMP/key" \
    --duration "$DURATION" --json >"$TMP/ferry-c.json" 2>"$TMP/ferry-c.err"
  wait "$LAST_PID" || die "ferry bench client failed: $(cat "$TMP/ferry-c.err")"
  wait "$server" || die "ferry bench server failed: $(cat "$TMP/ferry-s.err")"
}

# A live migration over every lane; writes $TMP/migrate.json (the report) and
# $TMP/listen.json (the destination's checks).
run_migration() {
  local port=${PORT:-7900} listens=() lanes=() i vm dst
  "$FERRY_BIN" key new "$TMP/key" >/dev/null 2>&1 || die "$FERRY_BIN key new failed"
  for ((i = 0; i < LANES; i++)); do
    listens+=(--listen "${DST_ADDRS[i]}:$port")
    lanes+=(--lane "${LANE_PAIRS[i]}:$port")
  done
  start ip netns exec "$DST_NS" "$FERRY_BIN" listen "${listens[@]}" --key "$TMP/key" \
    --json --exit-after 1 --serial /dev/null >"$TMP/listen.json" 2>"$TMP/listen.err"
  dst=$LAST_PID
  wait_listen "$DST_NS" "${DST_ADDRS[0]}" "$port" "$dst" ||
    die "ferry listen did not start: $(cat "$TMP/listen.err")"
  start ip netns exec "$SRC_NS" "$FERRY_BIN" vm run --mem "$MEM" --workload "$WORKLOAD" \
    --fill mixed --control "$TMP/vm.sock" --serial /dev/null 2>"$TMP/vm.err"
  vm=$LAST_PID
  for ((i = 0; i < 400; i++)); do
    [[ ! -S $TMP/vm.sock ]] || break
    running "$vm" || die "ferry vm run failed: $(cat "$TMP/vm.err")"
    sleep 0.05
  done
  sleep 1
  "$FERRY_BIN" migrate --control "$TMP/vm.sock" --key "$TMP/key" "${lanes[@]}" --json \
    "${CMD[@]}" >"$TMP/migrate.json" 2>"$TMP/migrate.err" ||
    die "ferry migrate failed: $(cat "$TMP/migrate.err")"
  wait "$dst" || die "ferry listen failed: $(cat "$TMP/listen.err")"
  wait "$vm" || true
}

# Prints the result JSON (and appends the CSV row) from the files in $TMP.
report() {
  python3 - "$SUB" "$TMP" "$LANES" "$RATE" "$DURATION" "$COMMAND" "$CSV" <<'EOF'
import csv, datetime, json, os, sys

sub, tmp, lanes, rate, duration, command, csv_path = sys.argv[1:]
lanes, duration = int(lanes), int(duration)
out = {
    "command": command,
    "subcommand": sub,
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "lanes": lanes,
    "rate": rate,
    "duration_s": duration,
}

per = []
for i in range(lanes):
    with open(os.path.join(tmp, f"iperf-c{i}.json")) as f:
        r = json.load(f)
    recv = r["end"]["sum_received"]
    per.append({
        "lane": i,
        "mbit_s": recv["bits_per_second"] / 1e6,
        "bytes": recv["bytes"],
        "seconds": recv["seconds"],
        "retransmits": r["end"].get("sum_sent", {}).get("retransmits"),
    })
out["iperf3"] = {"lanes": per, "aggregate_mbit_s": sum(p["mbit_s"] for p in per)}

if sub == "bench-transport":
    with open(os.path.join(tmp, "ferry-c.json")) as f:
        r = json.loads(f.read().strip().splitlines()[-1])
    out["ferry"] = {
        "lanes": [
            {
                "lane": l["lane"],
                "mbit_s": l["payload_mbit_s"],
                "frame_mbit_s": l["frame_bytes_per_s"] * 8 / 1e6,
                "payload_bytes": l["payload_bytes"],
                "messages": l["messages"],
            }
            for l in r["lanes"]
        ],
        "aggregate_mbit_s": r["aggregate"]["payload_mbit_s"],
        "aggregate_frame_mbit_s": r["aggregate"]["frame_bytes_per_s"] * 8 / 1e6,
        "message_size": r["message_size"],
        "window": r["window"],
        "seconds": r["duration_s"],
        "receiver_mbit_s": r["receiver"]["aggregate"]["payload_mbit_s"],
    }
    ceiling = out["iperf3"]["aggregate_mbit_s"]
    out["ratio"] = out["ferry"]["aggregate_mbit_s"] / ceiling if ceiling > 0 else None

if sub == "migrate":
    with open(os.path.join(tmp, "migrate.json")) as f:
        m = json.loads(f.read().strip().splitlines()[-1])
    with open(os.path.join(tmp, "listen.json")) as f:
        d = json.loads(f.read().strip().splitlines()[-1])
    ceiling_bytes_s = out["iperf3"]["aggregate_mbit_s"] * 1e6 / 8
    wire_time_ms = m["wire_bytes"] / ceiling_bytes_s * 1e3 if ceiling_bytes_s else None
    out["migration"] = m
    out["destination"] = d
    out["targets"] = {
        # total ≤ 1.1 × (wire bytes ÷ iperf3 aggregate)
        "total_over_wire_time": m["total_ms"] / wire_time_ms if wire_time_ms else None,
        # wire bytes ≤ 0.4 × memory
        "wire_over_mem": m["wire_bytes"] / m["mem_bytes"],
        "throughput_over_iperf3": m["throughput_bytes_per_s"] / ceiling_bytes_s
        if ceiling_bytes_s else None,
        "verified": m["verified"] and d.get("self_check_ok") is True,
    }
    out["ferry"] = {"aggregate_mbit_s": m["throughput_bytes_per_s"] * 8 / 1e6}
    out["ratio"] = out["targets"]["throughput_over_iperf3"]

print(json.dumps(out))
r = out.get("ratio")
msg = f"iperf3 {out['iperf3']['aggregate_mbit_s']:.1f} Mbit/s"
if "ferry" in out:
    msg += f", ferry {out['ferry']['aggregate_mbit_s']:.1f} Mbit/s, ratio {r:.3f}"
print(f"testbed: {lanes} lane(s) at {rate}: {msg}", file=sys.stderr)

if csv_path:
    fields = ["date", "subcommand", "lanes", "rate", "duration_s", "iperf3_mbit_s",
              "ferry_mbit_s", "ratio", "command"]
    row = {
        "date": out["date"], "subcommand": sub, "lanes": lanes, "rate": rate,
        "duration_s": duration,
        "iperf3_mbit_s": round(out["iperf3"]["aggregate_mbit_s"], 3),
        "ferry_mbit_s": round(out["ferry"]["aggregate_mbit_s"], 3) if "ferry" in out else "",
        "ratio": round(r, 4) if r is not None else "",
        "command": command,
    }
    new = not os.path.exists(csv_path) or os.path.getsize(csv_path) == 0
    with open(csv_path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        if new:
            w.writeheader()
        w.writerow(row)
EOF
}

# ---- main ------------------------------------------------------------------------------

setup
case $SUB in
  iperf)
    run_iperf
    report
    ;;
  bench-transport)
    run_iperf
    run_ferry
    report
    ;;
  migrate)
    run_iperf
    run_migration
    report
    ;;
  exec)
    export FERRY_SRC_NS=$SRC_NS FERRY_DST_NS=$DST_NS FERRY_LANES="${LANE_PAIRS[*]}"
    export FERRY_DST_ADDRS="${DST_ADDRS[*]}" FERRY_RATE=$RATE FERRY_TMP=$TMP
    [[ -z $FERRY_BIN ]] || export FERRY=$FERRY_BIN
    # In the background so that a signal to this script is handled at once; stdin kept.
    "${CMD[@]}" <&0 &
    PIDS+=($!)
    LAST_PID=$!
    set +e
    wait "$LAST_PID"
    rc=$?
    set -e
    exit "$rc"
    ;;
esac
