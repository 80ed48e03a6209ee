#!/usr/bin/env bash
# Builds the libFuzzer harnesses (tests/fuzz/) with clang, AddressSanitizer,
# LeakSanitizer and UndefinedBehaviorSanitizer in build-fuzz/, and runs each
# for a bounded time on a copy of its seed corpus in a temporary directory
# (nothing is written into the source tree). No network, no root.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET]     default 60
#
# Prints one line per target; exits non-zero if any target found a crash,
# leak, timeout, out-of-memory or sanitizer report, after printing the report
# and the reproducer (kept in the temporary directory). Reproduce one with:
#   build-fuzz/tests/fuzz/<target> <reproducer>
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-60}
if ! [[ "$seconds" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 [SECONDS_PER_TARGET]" >&2
  exit 2
fi
targets=(fuzz_vm_spec fuzz_netlink fuzz_state_file)
build="build-fuzz"

if ! command -v clang++ >/dev/null; then
  echo "fuzz: clang++ is missing (apt-get install clang libclang-rt-dev)" >&2
  exit 1
fi

start=$(date +%s)
cmake -S . -B "$build" -G Ninja -DCMAKE_CXX_COMPILER=clang++ -DVMNET_FUZZ=ON \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build "$build" -j "$(nproc)" --target "${targets[@]}"
echo "fuzz: build-fuzz ready in $(($(date +%s) - start)) s"

work=$(mktemp -d "${TMPDIR:-/tmp}/vmnet-fuzz.XXXXXX")
failed=()

# Ends the fuzzer we started if this script is interrupted.
fuzzer_pid=
cleanup() {
  if [[ -n "$fuzzer_pid" ]]; then kill "$fuzzer_pid" 2>/dev/null || true; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

final_stat() { sed -n "s/^stat::$2: *//p" "$1" | tail -n 1; }

export ASAN_OPTIONS=detect_leaks=1:abort_on_error=0:symbolize=1:detect_stack_use_after_return=1
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1:symbolize=1
export LSAN_OPTIONS=report_objects=0

for target in "${targets[@]}"; do
  dir=$work/$target
  mkdir -p "$dir/corpus" "$dir/artifacts"
  cp -R "tests/fuzz/corpus/$target/." "$dir/corpus/"
  seeds=$(find "$dir/corpus" -type f | wc -l)
  args=(-max_total_time="$seconds" -max_len=4096 -timeout=10 -rss_limit_mb=2048
        -detect_leaks=1 -print_final_stats=1 -artifact_prefix="$dir/artifacts/")
  dict=tests/fuzz/${target#fuzz_}.dict
  [[ -f "$dict" ]] && args+=(-dict="$dict")

  rc=0
  "$build/tests/fuzz/$target" "${args[@]}" "$dir/corpus" >"$dir/log" 2>&1 &
  fuzzer_pid=$!
  wait "$fuzzer_pid" || rc=$?
  fuzzer_pid=

  # The last status line ("#N DONE cov: C ft: F corp: U/S ...") and the
  # final stats.
  status=$(grep -E '^#[0-9]+[[:space:]]+(DONE|pulse|NEW|REDUCE|INITED)' "$dir/log" | tail -n 1 || true)
  execs=$(final_stat "$dir/log" number_of_executed_units)
  rate=$(final_stat "$dir/log" average_exec_per_sec)
  rss=$(final_stat "$dir/log" peak_rss_mb)
  cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$status")
  ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$status")
  corp=$(sed -n 's/.* corp: \([0-9]*\).*/\1/p' <<<"$status")

  # Crash, leak, timeout, OOM: libFuzzer writes the input under
  # artifact_prefix (slow-unit-* are only informative).
  artifacts=$(find "$dir/artifacts" -type f ! -name 'slow-unit-*' | sort)
  if ((rc == 0)) && [[ -z "$artifacts" ]] && ! grep -qE 'ERROR: (AddressSanitizer|LeakSanitizer|UndefinedBehaviorSanitizer|libFuzzer)|runtime error:' "$dir/log"; then
    verdict=ok
  else
    verdict=FAILED
    failed+=("$target")
  fi
  printf '%-16s %s: %s execs (%s/s) in %ss, cov %s, ft %s, corpus %s (from %s seeds), peak rss %s MB\n' \
    "$target" "$verdict" "${execs:-?}" "${rate:-?}" "$seconds" "${cov:-?}" "${ft:-?}" \
    "${corp:-?}" "$seeds" "${rss:-?}"

  if [[ "$verdict" == FAILED ]]; then
    echo "---- $target: exit status $rc; report (from $dir/log) ----"
    # From the first report line to the end, bounded.
    awk '/==[0-9]+==(ERROR|WARNING)|runtime error:|property violated|deadly signal|ERROR: libFuzzer/ {p=1} p' \
      "$dir/log" | head -n 150
    for a in $artifacts; do
      echo "---- reproducer: $a ($(wc -c <"$a") bytes)"
      echo "     run: $build/tests/fuzz/$target $a"
      od -An -tx1 -v "$a" | head -n 40
    done
    echo "---- end of $target report ----"
  fi
done

if ((${#failed[@]} > 0)); then
  echo "fuzz: FAILED: ${failed[*]} (logs, corpora and reproducers kept in $work)" >&2
  exit 1
fi
rm -rf "$work"
echo "fuzz: all ${#targets[@]} targets clean (${seconds} s each)"
