#!/usr/bin/env bash
# The fleet lab (bench/fleet/run.py): N vmnetd agents in namespaces of their own, followed by
# one control plane, and the table of what it measured:
#   sudo bench/fleet/run.sh [--agents 50] [--vms-per-agent 200] [--time-limit S] [--json FILE]
# Needs root, Debian's python3, and build/ with vmnetd, vmnetctl and vmnet_bench built.
set -euo pipefail
exec /usr/bin/python3 "$(dirname "$(readlink -f "$0")")/run.py" "$@"
