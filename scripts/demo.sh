#!/usr/bin/env bash
# The main job: on a fresh Debian 12 machine, as root, installs what is
# missing, builds vmnetd and vmnetctl, and runs the narrated demo of
# host-routed mode inside network namespaces (nothing outside them changes).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cmake -S . -B build -G Ninja >/dev/null
cmake --build build -j "$(nproc)" --target vmnetd vmnetctl
exec /usr/bin/python3 scripts/demo.py
