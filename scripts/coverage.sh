#!/usr/bin/env bash
# Line coverage of server/ by the test suite, with gcov and gcovr (Debian packages gcc and
# gcovr). Not part of scripts/test.sh: CI's time is limited, and an instrumented build plus a
# run of the suite costs as much again.
#
#   scripts/coverage.sh                  unit, kernel and end-to-end tests
#   scripts/coverage.sh 'unit\.|kernel\.' only the tests whose ctest name matches
#
# Builds build-coverage (--coverage, -O0; the benchmarks and fuzzers left out), runs the tests
# (as root, or the kernel and end-to-end tests skip), and prints gcovr's per-file table of
# server/ and its total; the HTML report is build-coverage/coverage/index.html.
set -euo pipefail
cd "$(dirname "$0")/.."
tests=${1:-'^(unit|kernel|e2e)\.'}

if ! command -v gcovr >/dev/null; then
  if [[ $(id -u) -ne 0 ]]; then
    echo "coverage: gcovr is missing: apt-get install gcovr" >&2
    exit 1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends gcovr >/dev/null
fi

dir=build-coverage
export CCACHE_BASEDIR=$PWD
cmake -S . -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=Debug -DCMAKE_CXX_COMPILER_LAUNCHER=ccache \
  -DCMAKE_CXX_FLAGS="--coverage -O0" -DCMAKE_EXE_LINKER_FLAGS=--coverage \
  -DVMNET_BUILD_BENCH=OFF >/dev/null
cmake --build "$dir" -j "$(nproc)"
find "$dir" -name '*.gcda' -delete  # counts of an earlier run
ctest --test-dir "$dir" -R "$tests" -j 1 --output-on-failure || echo "coverage: some tests failed" >&2
mkdir -p "$dir/coverage"
gcovr --root . --filter 'server/' --exclude '.*\.pb\.(h|cc)$' --object-directory "$dir" \
  --html-details "$dir/coverage/index.html" --print-summary --txt "$dir/coverage/summary.txt" \
  "$dir"
cat "$dir/coverage/summary.txt"
