#!/usr/bin/env bash
# The README's second command: the whole test suite (unit, property, and integration tests
# with real KVM; needs root and /dev/kvm, and fails loudly without them).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build -q -p ferry   # the CLI tests drive the binary
cargo test --workspace -- --test-threads=2
