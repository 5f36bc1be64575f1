#!/usr/bin/env bash
# moe-gate and llama.cpp side by side on the same GGUF file, in one run (issue 9 item 6).
#
# llama.cpp is built from the source that the llama-cpp-python sdist on PyPI vendors (the version pinned
# below); the model file is written by `cargo moe-gate synth`; `llama-bench` and `cargo moe-gate bench`
# then time the same file, and one table with both engines (markdown, plus both engines' JSON) is written
# to $OUT (default target/bench-vs-llama-cpp/out). llama.cpp quantises activations to 8 bits for its
# quantised matrix products; moe-gate keeps them f32 (docs/numerics.md), so the ratio compares engines
# with different numerics, and the table says so.
#
#   scripts/bench-vs-llama-cpp.sh cpu       on this machine: prepare + build (CPU) + run on
#                                           synth:small:q4_k_m against the `cpu` backend
#   scripts/bench-vs-llama-cpp.sh cuda      on the GPU machine (after `prepare` here): build (CUDA) + run
#                                           on synth:qwen3-coder-30b-a3b:q4_k_m against the `cuda` backend
#   scripts/bench-vs-llama-cpp.sh prepare   where PyPI is reachable: the trimmed llama.cpp source
#                                           (target/bench-vs-llama-cpp/llama.cpp-src.tar.gz) and the
#                                           release gate binary
#   scripts/bench-vs-llama-cpp.sh build cpu|cuda
#   scripts/bench-vs-llama-cpp.sh run cpu|cuda
#
# The GPU machine has no network and no Rust: carry target/bench-vs-llama-cpp/llama.cpp-src.tar.gz, the
# script and the release binary (GATE=path), with CMake, ninja and nvcc there. Settings: MODEL (the synth
# spec or a .gguf path), PREFILL (default 64,512), DECODE (default 128), THREADS (llama.cpp's CPU threads,
# default all cores), WORK (where the build and the model file go).
set -euo pipefail
cd "$(dirname "$0")/.."

LLAMA_CPP_PYTHON_VERSION=0.3.36
BASE=target/bench-vs-llama-cpp
SRC_TAR=$BASE/llama.cpp-src.tar.gz
WORK=${WORK:-$BASE/work}
OUT=${OUT:-$BASE/out}
GATE=${GATE:-target/release/cargo-moe-gate}
PREFILL=${PREFILL:-64,512}
DECODE=${DECODE:-128}
THREADS=${THREADS:-$(nproc)}

say() { echo "bench-vs-llama-cpp: $*" >&2; }

prepare() {
  mkdir -p "$BASE/sdist"
  python3 -m pip download --quiet --no-deps --no-binary llama-cpp-python \
    "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$BASE/sdist"
  local dir="llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION"
  rm -rf "$BASE/sdist/x" && mkdir -p "$BASE/sdist/x"
  tar xzf "$BASE/sdist/$dir.tar.gz" -C "$BASE/sdist/x" "$dir/vendor/llama.cpp"
  # What the CPU and CUDA builds of llama-bench compile, no more: the carry to the GPU machine is small.
  tar czf "$SRC_TAR" -C "$BASE/sdist/x/$dir/vendor/llama.cpp" \
    --exclude=./models --exclude=./docs --exclude=./media --exclude=./examples --exclude=./tests \
    --exclude=./.devops --exclude=./gguf-py --exclude=./ggml/src/ggml-vulkan --exclude=./ggml/src/ggml-sycl \
    --exclude=./ggml/src/ggml-cann --exclude=./ggml/src/ggml-metal --exclude=./ggml/src/ggml-opencl \
    --exclude=./ggml/src/ggml-webgpu --exclude=./ggml/src/ggml-musa --exclude=./ggml/src/ggml-hip \
    --exclude=./tools/server/public .
  rm -rf "$BASE/sdist/x"
  say "wrote $SRC_TAR ($(du -h "$SRC_TAR" | cut -f1)) from llama-cpp-python $LLAMA_CPP_PYTHON_VERSION"
  if command -v cargo >/dev/null 2>&1; then
    cargo build --release -p cargo-moe-gate
  fi
}

# CMake and ninja from PyPI into target/ where the machine has no CMake (this one has only Rust and Python).
need_cmake() {
  command -v cmake >/dev/null 2>&1 && return 0
  local venv=$BASE/venv
  [ -x "$venv/bin/cmake" ] || { python3 -m venv "$venv" && "$venv/bin/python" -m pip install --quiet cmake ninja; }
  export PATH="$PWD/$venv/bin:$PATH"
}

build() { # $1: cpu | cuda
  [ -f "$SRC_TAR" ] || { say "$SRC_TAR is missing: run \`$0 prepare\` where PyPI is reachable"; exit 1; }
  need_cmake
  local src="$WORK/llama.cpp-$1"
  rm -rf "$src" && mkdir -p "$src"
  tar xzf "$SRC_TAR" -C "$src"
  local cuda=OFF
  [ "$1" = cuda ] && cuda=ON
  local gen=()
  command -v ninja >/dev/null 2>&1 && gen=(-G Ninja)
  cmake -S "$src" -B "$src/build" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DGGML_CUDA=$cuda -DCMAKE_CUDA_ARCHITECTURES=90 -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=ON >"$WORK/cmake-$1.log"
  cmake --build "$src/build" --target llama-bench -j "$(nproc)" >"$WORK/build-$1.log"
  say "built $src/build/bin/llama-bench"
}

run() { # $1: cpu | cuda
  local backend=$1 model=${MODEL:-}
  if [ -z "$model" ]; then
    case $backend in
      cpu) model=synth:small:q4_k_m ;;
      cuda) model=synth:qwen3-coder-30b-a3b:q4_k_m ;;
    esac
  fi
  local bench="$WORK/llama.cpp-$backend/build/bin/llama-bench"
  [ -x "$bench" ] || { say "no $bench: run \`$0 build $backend\` first"; exit 1; }
  mkdir -p "$WORK" "$OUT"
  local file=$model
  if [[ $model == synth:* ]]; then
    file="$WORK/$(echo "${model#synth:}" | tr ':@' '__').gguf"
    [ -f "$file" ] || "$GATE" synth --model "$model" --out "$file"
  fi
  local ngl=0
  [ "$backend" = cuda ] && ngl=99
  say "llama-bench on $file"
  "$bench" -m "$file" -p "$PREFILL" -n "$DECODE" -ngl "$ngl" -fa 1 -t "$THREADS" -r 3 -o json \
    >"$OUT/llama-bench-$backend.json" 2>"$OUT/llama-bench-$backend.log"
  say "cargo moe-gate bench on $file"
  "$GATE" bench --backend "$backend" --model "$file" --prefill "$PREFILL" --decode "$DECODE" \
    --json "$OUT/moe-gate-bench-$backend.json" >"$OUT/moe-gate-bench-$backend.txt" 2>"$OUT/moe-gate-bench-$backend.log"
  python3 - "$OUT/llama-bench-$backend.json" "$OUT/moe-gate-bench-$backend.json" "$backend" "$model" \
    "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" "$LLAMA_CPP_PYTHON_VERSION" \
    >"$OUT/table-$backend.md" <<'EOF'
import json, sys
llama_path, ours_path, backend, model, commit, version = sys.argv[1:7]
llama = json.load(open(llama_path))
ours = json.load(open(ours_path))
rows = {}
for r in llama:
    key = ("prefill", r["n_prompt"]) if r["n_prompt"] > 0 else ("decode", r["n_gen"])
    rows.setdefault(key, {})["llama"] = r["avg_ts"]
for p in ours.get("prefill", []):
    rows.setdefault(("prefill", p["tokens"]), {})["ours"] = p["tokens_per_s"]
d = ours.get("decode")
if d:
    rows.setdefault(("decode", d["tokens"]), {})["ours"] = d["tokens_per_s"]
m = ours.get("machine", {})
machine = ", ".join(str(m[k]) for k in ("cpu", "gpu") if m.get(k)) + f", {m.get('threads')} threads"
print(f"moe-gate ({commit}, `{backend}`, f32 activations) and llama.cpp (llama-cpp-python {version} sdist, "
      f"8-bit activations in its quantised products) on `{model}`, {machine}\n")
print("| work | llama.cpp tokens/s | moe-gate tokens/s | moe-gate / llama.cpp |")
print("| --- | ---: | ---: | ---: |")
for (kind, n), v in sorted(rows.items()):
    a, b = v.get("llama"), v.get("ours")
    ratio = f"{b / a:.2f}x" if a and b else "-"
    fa = f"{a:.1f}" if a else "-"
    fb = f"{b:.1f}" if b else "-"
    label = f"prefill {n}" if kind == "prefill" else f"decode {n} (batch 1)"
    print(f"| {label} | {fa} | {fb} | {ratio} |")
EOF
  cat "$OUT/table-$backend.md"
}

case "${1:-}" in
  prepare) prepare ;;
  build | run) [ -n "${2:-}" ] || { say "$1 needs cpu or cuda"; exit 2; }; "$1" "$2" ;;
  cpu) [ -f "$SRC_TAR" ] || prepare; build cpu; run cpu ;;
  cuda) build cuda; run cuda ;;
  *) sed -n '2,25p' "$0" >&2; exit 2 ;;
esac
