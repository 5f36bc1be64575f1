#!/usr/bin/env bash
# Builds the four fuzz targets (fuzz/, nightly + cargo-fuzz) as self-contained binaries for a machine
# without Rust, into .devbin/fuzz/FLAVOUR/TARGET (git-ignored), for scripts/fuzz_remote.sh:
#   none: no sanitizer, release with debug assertions (`-a`: an arithmetic overflow panics as in the gate's
#         dev profile); about 20-40x the executions per second of asan, the flavour that reaches 10 million.
#   asan: AddressSanitizer and debug assertions, as `cargo xtask fuzz` runs them.
# Debug info is stripped (symbols stay, so a crash's backtrace names its functions); both flavours
# together are about 60 MB. Each flavour has its own target directory, so neither rebuilds the other.
#
#   scripts/fuzz_bundle.sh [none|asan]...   (default: both)
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
flavours=("$@")
[ ${#flavours[@]} -eq 0 ] && flavours=(none asan)
cd "$root/fuzz"
for f in "${flavours[@]}"; do
  case "$f" in
    none) dir=target/none; args=(-s none) ;;
    asan) dir=target; args=() ;;
    *) echo "fuzz_bundle: unknown flavour \`$f\` (none or asan)" >&2; exit 2 ;;
  esac
  cargo +nightly fuzz build -a "${args[@]}" --target-dir "$dir"
  mkdir -p "$root/.devbin/fuzz/$f"
  for t in gguf contract trace report; do
    objcopy --strip-debug "$dir/x86_64-unknown-linux-gnu/release/$t" "$root/.devbin/fuzz/$f/$t"
  done
  echo "fuzz_bundle: $f: $(du -sh "$root/.devbin/fuzz/$f" | cut -f1) in .devbin/fuzz/$f"
  ldd "$root/.devbin/fuzz/$f/report"
done
