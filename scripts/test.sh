#!/usr/bin/env bash
# The whole test suite, from a fresh Debian 12 machine: installs what is
# missing, builds once, runs every test (unit, kernel, end to end), then the
# slower jobs: the suite again under AddressSanitizer+UndefinedBehaviorSanitizer
# and the threaded parts under ThreadSanitizer.
#
#   scripts/test.sh            everything
#   scripts/test.sh --quick    the main build's suite only
#
# Kernel and end-to-end tests need root (they create network namespaces and
# never touch the machine's own); without it they skip and say why, and ctest
# lists them as skipped. As root, which is how CI runs, no test may skip: a
# test that cannot run fails, and a run in which ctest reports any test
# skipped fails too (checked_ctest below).
set -euo pipefail
cd "$(dirname "$0")/.."

quick=0
[[ "${1:-}" == "--quick" ]] && quick=1
jobs=$(nproc)

scripts/install-deps.sh

# Namespaces a killed earlier run left behind: only ours (vmnt-*), and only
# those whose owning process is gone.
if [[ $(id -u) -eq 0 ]]; then
  /usr/bin/python3 tests/e2e/lab.py cleanup || true
fi

section() { printf '\n==== %s ====\n' "$*"; }

# ctest, then, as root, a failure when ctest reports a skipped test (the
# "(Skipped)" lines of its summary): a skip must never pass for green on CI.
checked_ctest() {  # checked_ctest ctest-args...
  local log status=0
  log=$(mktemp)
  ctest "$@" 2>&1 | tee "$log" || status=$?
  if [[ $(id -u) -eq 0 ]]; then
    local skipped
    skipped=$(sed -nE 's/^[[:space:]]*[0-9]+ - (.*) \(Skipped\)$/\1/p' "$log")
    if [[ -n $skipped ]]; then
      printf 'test.sh: run as root, where no test may skip, these skipped:\n%s\n' "$skipped" >&2
      status=1
    fi
  fi
  rm -f "$log"
  return "$status"
}

# ccache keeps the objects of earlier runs (paths relative to this tree, so
# another checkout shares them); a fresh machine builds everything once.
export CCACHE_BASEDIR=$PWD
build() {  # build DIR [cmake args...]
  local dir=$1
  shift
  cmake -S . -B "$dir" -G Ninja -DCMAKE_CXX_COMPILER_LAUNCHER=ccache "$@" >/dev/null
  cmake --build "$dir" -j "$jobs"
}

section "build"
build build
section "tests"
checked_ctest --test-dir build --output-on-failure -j 1

if ((quick)); then exit 0; fi

section "AddressSanitizer + UndefinedBehaviorSanitizer"
build build-asan -DVMNET_SANITIZE=address -DCMAKE_BUILD_TYPE=Debug
# (The Dockerfile's build is checked once, above: under the sanitizers it
# would build the same image again.)
# (The kill -9 rounds of e2e.crash run 10 times there, not 50.)
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  VMNET_CRASH_ROUNDS=10 checked_ctest --test-dir build-asan --output-on-failure -j 1 -E 'deploy\.dockerfile_build'

section "ThreadSanitizer (the threaded parts: reconciler, announcer, event log, metrics, the agent end to end)"
build build-tsan -DVMNET_SANITIZE=thread -DCMAKE_BUILD_TYPE=Debug
TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1 suppressions=$PWD/tests/tsan.supp" \
  checked_ctest --test-dir build-tsan --output-on-failure -j 1 \
  -R 'unit\.(Reconciler|PortSecurity|AnnounceTest|EventLog|Metrics)|kernel\.(Announcer|NftKernel)|e2e\.(host_routed|paging|hostile|drift)'

section "libFuzzer: request validation, netlink parsing, state file (${FUZZ_SECONDS:-45} s each)"
scripts/fuzz.sh "${FUZZ_SECONDS:-45}"
