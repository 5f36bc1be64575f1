#!/usr/bin/env bash
# Runs the prebuilt fuzz binaries (docs/reliability.md, issue 13) on every core of a machine without Rust,
# until each target has run RUNS executions (10 million by default) or its time cap is spent.
#
#   scripts/fuzz_remote.sh [--runs N] [--seconds S] [--workers W] [--flavour F] [TARGET...]
#
# TARGETs: gguf trace report contract (default: all four, one after another, each on W workers; S,
# default 240, caps each).
# Binaries: .devbin/fuzz/F/TARGET (F = none, the default: no sanitizer, debug assertions on; or asan),
# built by scripts/fuzz_bundle.sh. Inputs: fuzz/corpus/TARGET and fuzz/regressions/TARGET (read only).
# Output, under $OUT/fuzz (OUT defaults to ./fuzz-out): TARGET/log (libFuzzer's), TARGET/artifacts/
# (crash-*, timeout-*, oom-* inputs), TARGET/corpus/ (the new units), and counts.tsv: per target the
# executions libFuzzer counted (the `#N` of its last status line: finished jobs only, so a lower bound),
# the seconds, the exit status and the artifact files.
#
# libFuzzer's fork mode (-fork=W) runs W child processes and merges their corpora; the parent stops
# after -runs executions in all (counted when jobs finish) or -max_total_time seconds. In fork mode
# timeouts and OOMs are ignored unless told otherwise, so -ignore_timeouts=0 -ignore_ooms=0: a hang or an
# allocation blow-up stops the run like a crash, with the same limits as `cargo xtask fuzz`.
#
# Exit status: 0 every target ran RUNS executions and nothing failed; 1 a crash, hang or OOM (its input
# is under TARGET/artifacts/); 3 no failure, but a target stopped at its time cap short of RUNS; 2 a
# usage or setup error.
set -u

usage() { sed -n '4,9p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

root=$(cd "$(dirname "$0")/.." && pwd)
runs=10000000
seconds=240
workers=$(nproc)
flavour=none
targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --runs) runs=${2:?--runs needs a number}; shift 2 ;;
    --seconds) seconds=${2:?--seconds needs a number}; shift 2 ;;
    --workers) workers=${2:?--workers needs a number}; shift 2 ;;
    --flavour) flavour=${2:?--flavour needs none or asan}; shift 2 ;;
    gguf|contract|trace|report) targets+=("$1"); shift ;;
    -h|--help) usage ;;
    *) echo "fuzz_remote: unknown argument \`$1\`" >&2; usage ;;
  esac
done
[ ${#targets[@]} -eq 0 ] && targets=(gguf trace report contract)
for n in "$runs" "$seconds" "$workers"; do
  case "$n" in ''|*[!0-9]*) echo "fuzz_remote: \`$n\` is not a whole number" >&2; exit 2 ;; esac
done

bin=${FUZZ_BIN:-$root/.devbin/fuzz/$flavour}
out=${OUT:-$root/fuzz-out}/fuzz
mkdir -p "$out" || { echo "fuzz_remote: cannot create $out" >&2; exit 2; }
for t in "${targets[@]}"; do
  if [ ! -x "$bin/$t" ]; then
    echo "fuzz_remote: no binary $bin/$t: build them with scripts/fuzz_bundle.sh and carry .devbin/fuzz" >&2
    exit 2
  fi
  if [ ! -d "$root/fuzz/corpus/$t" ]; then
    echo "fuzz_remote: no seed corpus $root/fuzz/corpus/$t (run from a checkout of the repository)" >&2
    exit 2
  fi
done

{
  echo "# fuzz_remote.sh $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname): $(nproc) cores, $workers workers, flavour $flavour"
  echo "# $(uname -srm); $(ldd --version 2>&1 | head -1)"
  printf 'target\texecutions\tseconds\texit\tverdict\tartifacts\n'
} > "$out/counts.tsv"

failed=0
short=0
for t in "${targets[@]}"; do
  dir=$out/$t
  mkdir -p "$dir/corpus" "$dir/artifacts"
  inputs=("$dir/corpus" "$root/fuzz/corpus/$t")
  [ -d "$root/fuzz/regressions/$t" ] && inputs+=("$root/fuzz/regressions/$t")
  echo "fuzz_remote: $t: -fork=$workers until $runs executions or $seconds s"
  start=$(date +%s)
  "$bin/$t" -fork="$workers" -runs="$runs" -max_total_time="$seconds" \
    -rss_limit_mb=2048 -malloc_limit_mb=1024 -timeout=10 -max_len=65536 \
    -ignore_crashes=0 -ignore_timeouts=0 -ignore_ooms=0 \
    -artifact_prefix="$dir/artifacts/" -print_final_stats=1 \
    "${inputs[@]}" > "$dir/log" 2>&1
  rc=$?
  elapsed=$(( $(date +%s) - start ))
  # The parent's status lines: `#N: cov: .. ft: .. corp: .. exec/s: .. oom/timeout/crash: a/b/c time: Ts job: J ..`.
  last=$(grep -E '^#[0-9]+: cov:' "$dir/log" | tail -1)
  count=$(printf '%s' "$last" | sed -E 's/^#([0-9]+):.*/\1/')
  [ -z "$count" ] && count=0
  faults=$(printf '%s' "$last" | sed -nE 's#.*oom/timeout/crash: ([0-9]+/[0-9]+/[0-9]+).*#\1#p')
  artifacts=$(cd "$dir/artifacts" && ls -A | tr '\n' ' ')
  if [ "$rc" -ne 0 ] || [ -n "$artifacts" ] || { [ -n "$faults" ] && [ "$faults" != "0/0/0" ]; }; then
    verdict=FAILED
    failed=1
  elif [ "$count" -lt "$runs" ]; then
    verdict=SHORT
    short=1
  else
    verdict=ok
  fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$t" "$count" "$elapsed" "$rc" "$verdict" "${artifacts:--}" >> "$out/counts.tsv"
  echo "fuzz_remote: $t: $count executions in $elapsed s, exit $rc, oom/timeout/crash ${faults:-?}: $verdict"
  [ "$verdict" = FAILED ] && tail -40 "$dir/log" >&2
done

echo "fuzz_remote: counts in $out/counts.tsv"
cat "$out/counts.tsv"
[ $failed -ne 0 ] && exit 1
[ $short -ne 0 ] && exit 3
exit 0
