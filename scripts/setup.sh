#!/usr/bin/env bash
# Installs the system packages ferry's build, demo and tests need (Debian 12, as root).
# Quiet and quick when everything is already there.
set -euo pipefail
need=(build-essential pkg-config iproute2 iperf3 python3)
# The RDMA verbs stack (ibverbs builds rdma-core from source): only for the `rdma` feature,
# which CI builds; set FERRY_RDMA=1 to install it here too.
if [ "${FERRY_RDMA:-0}" = 1 ]; then
  need+=(cmake librdmacm-dev libclang1-14 libclang-common-14-dev)
fi
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
