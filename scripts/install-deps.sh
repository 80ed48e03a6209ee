#!/usr/bin/env bash
# Installs the Debian 12 (bookworm) packages vmnet builds and tests with.
# Idempotent: installs only what is missing, and runs `apt-get update` first when it must install.
# Packages that ship a service (prometheus, prometheus-node-exporter) are installed without
# starting it: the tests start their own servers, inside their namespaces.
set -euo pipefail

packages=(
  # build
  cmake ninja-build g++ pkg-config
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler grpc-proto
  libabsl-dev libnl-3-dev libnl-route-3-dev prometheus-cpp-dev libsystemd-dev
  libnftnl-dev libmnl-dev libnetfilter-conntrack-dev
  # tests, fuzzing and benchmarks
  libgtest-dev libgmock-dev libbenchmark-dev clang libclang-rt-14-dev llvm ccache
  iproute2 net-tools iputils-ping nftables conntrack iperf3 curl openssl python3 python3-grpcio python3-protobuf
  python3-yaml prometheus prometheus-node-exporter
  # systemd-analyze (tests/deploy/test_deploy.py verifies the unit with it)
  systemd
)

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if ((${#missing[@]} == 0)); then
  exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
  echo "install-deps: missing packages: ${missing[*]}; run as root to install them" >&2
  exit 1
fi

echo "install-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
# Refuse service starts during the install (Debian's policy-rc.d convention), unless the
# machine already has its own policy.
policy=/usr/sbin/policy-rc.d
if [[ ! -e $policy ]]; then
  printf '#!/bin/sh\nexit 101\n' >"$policy"
  chmod 755 "$policy"
  trap 'rm -f "$policy"' EXIT
fi
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
