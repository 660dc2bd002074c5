#!/usr/bin/env bash
# Installs the system packages ferry's build, demo and tests need (Debian 12, as root).
# Quiet and quick when everything is already there.
set -euo pipefail
need=(build-essential pkg-config iproute2 iperf3 python3)
missing=()
for p in "${need[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "ferry setup: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if ! command -v cargo >/dev/null; then
  echo "ferry setup: cargo is missing; install Rust (rustup) first" >&2
  exit 1
fi
if [ ! -e /dev/kvm ]; then
  echo "ferry setup: /dev/kvm is missing: ferry needs KVM" >&2
  exit 1
fi
