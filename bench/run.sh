#!/usr/bin/env bash
# Runs the vmnet benchmarks in a namespace lab and prints the table (see bench/run.py):
#   bench/run.sh [--vms N] [--quick] [--json FILE] [--profile DIR]
# Needs root, Debian's python3, build/server/vmnetd and build/bench/vmnet_* (or VMNETD and
# VMNET_BENCH_BIN pointing at them).
set -euo pipefail
exec /usr/bin/python3 "$(dirname "$(readlink -f "$0")")/run.py" "$@"
