#!/usr/bin/env bash
# The README's first command: build ferry and run its demo (a live migration of a running
# VM between two local processes over loopback TCP). Extra arguments go to `ferry demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release -q -p ferry
exec target/release/ferry demo "$@"
