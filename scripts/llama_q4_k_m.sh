#!/usr/bin/env bash
# llama.cpp's own Q4_K_M of the production shape, and the contract of record on it (issue 12 item 4).
#
# The file is made by llama.cpp's quantiser, not ours: `llama-quantize` built from the llama.cpp source
# that the llama-cpp-python sdist on PyPI vendors (the version pinned below), run on the F16 file that
# `cargo moe-gate synth` writes. Then the gate runs the contract of record on it with `--model`, and the
# tensor types of both files (llama.cpp's mix and ours, `synth:...:q4_k_m`) are counted and compared
# name by name.
#
# Steps (each can be run alone; later steps reuse what earlier ones left in $WORK):
#   scripts/llama_q4_k_m.sh prepare    here, with PyPI reachable: the trimmed llama.cpp source
#                                      (target/llama-q4km/llama.cpp-src.tar.gz, ~10 MB) and the release
#                                      gate binary (target/release/cargo-moe-gate)
#   scripts/llama_q4_k_m.sh build      on the GPU machine: cmake + ninja build of llama-quantize (CPU only)
#   scripts/llama_q4_k_m.sh synth      the F16 production-shape file (about 61 GB)
#   scripts/llama_q4_k_m.sh quantize   llama-quantize F16 -> Q4_K_M (about 17 GB), in the background
#                                      (setsid; poll with `status`), since it can outlast one command
#   scripts/llama_q4_k_m.sh status     whether quantize finished, and its log's tail
#   scripts/llama_q4_k_m.sh mix        tensor type counts of llama.cpp's file and of ours, and every
#                                      tensor whose type differs
#   scripts/llama_q4_k_m.sh gate       the contract of record on llama.cpp's file, on the GPU
#
# On the GPU machine: carry target/llama-q4km and target/release/cargo-moe-gate, and put $WORK where the
# F16 and Q4_K_M files fit (about 80 GB: WORK=/dev/shm/llama-q4km on a machine with the memory, or a disk
# that large). The machine needs CMake, ninja and a C++ compiler (the GPU image has them) and python3
# with numpy (for `mix`, through the vendored gguf-py).
set -euo pipefail
cd "$(dirname "$0")/.."

LLAMA_CPP_PYTHON_VERSION=0.3.36
SRC_TAR=target/llama-q4km/llama.cpp-src.tar.gz
WORK=${WORK:-target/llama-q4km/work}
MODEL=synth:qwen3-coder-30b-a3b
CONTRACT=${CONTRACT:-qwen3-moe-forward-gpu-v1}
GATE=${GATE:-target/release/cargo-moe-gate}

# Each file can live elsewhere (F16=..., Q4KM=..., OURS=...): the F16 file in memory (/dev/shm) and the
# others on disk, for example, when neither holds all three.
F16=${F16:-$WORK/qwen3-coder-30b-a3b.f16.gguf}
Q4KM=${Q4KM:-$WORK/qwen3-coder-30b-a3b.llama-q4_k_m.gguf}
OURS=${OURS:-$WORK/qwen3-coder-30b-a3b.ours-q4_k_m.gguf}
QUANTIZE=$WORK/llama.cpp/build/bin/llama-quantize

say() { echo "llama_q4_k_m: $*" >&2; }

prepare() {
  mkdir -p target/llama-q4km
  local dl=target/llama-q4km/sdist
  mkdir -p "$dl"
  python3 -m pip download --quiet --no-deps --no-binary llama-cpp-python \
    "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$dl"
  local sdist="$dl/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz"
  rm -rf "$dl/x" && mkdir -p "$dl/x"
  tar xzf "$sdist" -C "$dl/x" "llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp"
  # Only what the CPU build of llama-quantize configures and compiles (and gguf-py for `mix`): no vocab
  # models, docs, tests, examples or other GPU backends, to stay well under the 64 MiB a call carries.
  tar czf "$SRC_TAR" -C "$dl/x/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp" \
    --exclude=./models --exclude=./docs --exclude=./media --exclude=./examples --exclude=./tests \
    --exclude=./.devops --exclude=./ggml/src/ggml-vulkan --exclude=./ggml/src/ggml-sycl \
    --exclude=./ggml/src/ggml-cann --exclude=./ggml/src/ggml-metal --exclude=./ggml/src/ggml-opencl \
    --exclude=./ggml/src/ggml-webgpu --exclude=./tools/server/public .
  rm -rf "$dl/x"
  say "wrote $SRC_TAR ($(du -h "$SRC_TAR" | cut -f1)) from llama-cpp-python $LLAMA_CPP_PYTHON_VERSION"
  cargo build --release -p cargo-moe-gate
  say "built $GATE (CUDA by default)"
}

build() {
  [ -f "$SRC_TAR" ] || { say "$SRC_TAR is missing: run \`$0 prepare\` where PyPI is reachable, carry target/llama-q4km"; exit 1; }
  mkdir -p "$WORK/llama.cpp"
  tar xzf "$SRC_TAR" -C "$WORK/llama.cpp"
  cmake -S "$WORK/llama.cpp" -B "$WORK/llama.cpp/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=ON -DGGML_CUDA=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=ON >"$WORK/cmake.log"
  cmake --build "$WORK/llama.cpp/build" --target llama-quantize -j "$(nproc)" >"$WORK/build.log"
  say "built $QUANTIZE"
}

synth() {
  mkdir -p "$WORK" "$(dirname "$F16")" "$(dirname "$OURS")"
  "$GATE" synth --model "$MODEL:f16" --out "$F16"
  "$GATE" synth --model "$MODEL:q4_k_m" --out "$OURS"
}

quantize() {
  [ -x "$QUANTIZE" ] || { say "no $QUANTIZE: run \`$0 build\` first"; exit 1; }
  [ -f "$F16" ] || { say "no $F16: run \`$0 synth\` first"; exit 1; }
  rm -f "$WORK/quantize.done"
  setsid bash -c "'$QUANTIZE' '$F16' '$Q4KM' Q4_K_M $(nproc) >'$WORK/quantize.log' 2>&1; echo \$? >'$WORK/quantize.done'" \
    </dev/null >/dev/null 2>&1 &
  say "quantising in the background; \`$0 status\` says when it is done"
}

status() {
  if [ -f "$WORK/quantize.done" ]; then
    say "quantize exited with $(cat "$WORK/quantize.done")"
  else
    say "quantize still running"
  fi
  tail -n 5 "$WORK/quantize.log" 2>/dev/null || true
}

mix() {
  PYTHONPATH="$WORK/llama.cpp/gguf-py" python3 scripts/gguf_type_counts.py "$Q4KM" "$OURS"
}

gate() {
  mkdir -p "$WORK/gate"
  set -o pipefail
  "$GATE" --contract "$CONTRACT" --model "$Q4KM" --require-cuda --report-dir "$WORK/gate" 2>&1 \
    | tee "$WORK/gate/log.txt"
}

case "${1:-}" in
  prepare | build | synth | quantize | status | mix | gate) "$1" ;;
  *) sed -n '2,30p' "$0" >&2; exit 2 ;;
esac
