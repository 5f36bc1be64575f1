#!/usr/bin/env python3
"""Cross-checks the GGUF files moe-gate writes against the Python `gguf` package (PyPI, from llama.cpp).

For each quant mix, a synthetic model is written and dumped by `engine/examples/dump_dequant.rs`: the file
itself, and every tensor dequantised to f32 by moe-gate's kernels. This script then reads the file with
`gguf.GGUFReader` (an independent GGUF parser), checks the metadata a loader needs, dequantises every
tensor with `gguf.quants.dequantize` and requires the result to equal ours bit for bit.

    pip install gguf numpy
    python3 scripts/check_gguf_py.py                      # synth:small in every quant
    python3 scripts/check_gguf_py.py --preset tiny --quants q4_k,q6_k
    python3 scripts/check_gguf_py.py --dump DIR           # compare an existing dump_dequant output

Exits 0 when every tensor of every file matches, 1 on any mismatch, 2 when it cannot run.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

QUANTS = ["f32", "f16", "bf16", "q8_0", "q4_k", "q5_k", "q6_k", "q4_k_m"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", help="synthetic preset (default: small)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quants", default="all", help="comma-separated quant mixes, or 'all'")
    parser.add_argument("--dump", help="compare this existing dump_dequant directory and stop")
    args = parser.parse_args()
    try:
        import gguf  # noqa: F401
        import numpy  # noqa: F401
    except ImportError as e:
        print(f"check_gguf_py: {e}; install the checker's dependencies with `pip install gguf numpy`")
        return 2

    if args.dump:
        failures = compare_dump(args.dump)
        print_summary(1, failures)
        return 0 if failures == 0 else 1

    quants = QUANTS if args.quants == "all" else args.quants.split(",")
    unknown = [q for q in quants if q not in QUANTS]
    if unknown:
        print(f"check_gguf_py: unknown quant(s) {unknown}; valid: {', '.join(QUANTS)}")
        return 2
    build = ["cargo", "build", "-q", "-p", "moe-engine", "--example", "dump_dequant"]
    if subprocess.run(build, cwd=REPO).returncode != 0:
        print("check_gguf_py: building the dump_dequant example failed")
        return 2
    exe = os.path.join(target_dir(), "debug", "examples", "dump_dequant")
    failed_files = 0
    for quant in quants:
        spec = f"synth:{args.preset}:{quant}@{args.seed}"
        with tempfile.TemporaryDirectory(prefix="check_gguf_py.") as out:
            if subprocess.run([exe, spec, out], cwd=REPO).returncode != 0:
                print(f"FAIL {spec}: dump_dequant failed")
                failed_files += 1
                continue
            failures = compare_dump(out, spec)
            failed_files += failures > 0
    print_summary(len(quants), failed_files)
    return 0 if failed_files == 0 else 1


def target_dir() -> str:
    meta = subprocess.run(
        ["cargo", "metadata", "--format-version", "1", "--no-deps"], cwd=REPO, capture_output=True, text=True, check=True
    )
    return json.loads(meta.stdout)["target_directory"]


def compare_dump(directory: str, label: str = "") -> int:
    """Compares one dump; returns the number of failed checks (0 = the file passes)."""
    import gguf
    import numpy as np

    with open(os.path.join(directory, "index.json")) as f:
        index = json.load(f)
    label = label or index["model"]
    reader = gguf.GGUFReader(index["model"])
    failures = check_metadata(reader, label)
    ours_by_name = {t["name"]: t for t in index["tensors"]}
    if len(reader.tensors) != len(index["tensors"]):
        print(f"FAIL {label}: gguf-py sees {len(reader.tensors)} tensors, moe-gate {len(index['tensors'])}")
        failures += 1
    for tensor in reader.tensors:
        ours = ours_by_name.get(tensor.name)
        if ours is None:
            print(f"FAIL {label}: tensor {tensor.name} unknown to moe-gate")
            failures += 1
            continue
        dims = [int(d) for d in tensor.shape]
        if tensor.tensor_type.name != ours["type"] or dims != ours["dims"]:
            print(f"FAIL {label}: {tensor.name} is {tensor.tensor_type.name} {dims} for gguf-py, "
                  f"{ours['type']} {ours['dims']} for moe-gate")
            failures += 1
            continue
        theirs = np.ascontiguousarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype="<f4").reshape(-1)
        mine = np.fromfile(os.path.join(directory, ours["file"]), dtype="<f4")
        if theirs.size != mine.size:
            print(f"FAIL {label}: {tensor.name}: {theirs.size} values from gguf-py, {mine.size} from moe-gate")
            failures += 1
            continue
        differ = np.flatnonzero(theirs.view("<u4") != mine.view("<u4"))
        if differ.size:
            i = int(differ[0])
            print(f"FAIL {label}: {tensor.name} ({tensor.tensor_type.name}): {differ.size} of {mine.size} values "
                  f"differ in their bits; first at flat index {i}: gguf-py {theirs[i]!r}, moe-gate {mine[i]!r}")
            failures += 1
    if failures == 0:
        types = sorted({t.tensor_type.name for t in reader.tensors})
        print(f"ok   {label}: {len(reader.tensors)} tensors ({', '.join(types)}) bit-identical to gguf-py")
    return failures


def check_metadata(reader, label: str) -> int:
    """The keys llama.cpp's loader needs for a qwen3moe model with a gpt2 vocabulary."""
    def value(key):
        field = reader.fields.get(key)
        return None if field is None else field.contents()

    failures = 0
    if value("GGUF.version") != 3:
        print(f"FAIL {label}: GGUF version {value('GGUF.version')}, expected 3")
        failures += 1
    required = ["general.architecture", "general.name", "general.file_type", "tokenizer.ggml.model",
                "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges"]
    required += [f"qwen3moe.{k}" for k in ["block_count", "context_length", "embedding_length",
                 "feed_forward_length", "attention.head_count", "attention.head_count_kv", "rope.freq_base",
                 "attention.layer_norm_rms_epsilon", "expert_count", "expert_used_count",
                 "expert_feed_forward_length"]]
    missing = [k for k in required if value(k) is None]
    if missing:
        print(f"FAIL {label}: metadata keys missing: {missing}")
        return failures + 1
    if value("general.architecture") != "qwen3moe" or value("tokenizer.ggml.model") != "gpt2":
        print(f"FAIL {label}: architecture {value('general.architecture')!r}, tokenizer {value('tokenizer.ggml.model')!r}")
        failures += 1
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    vocab = int(embd.shape[1]) if embd is not None else -1
    for key in ["tokenizer.ggml.tokens", "tokenizer.ggml.token_type"]:
        n = len(reader.fields[key].data)
        if n != vocab:
            print(f"FAIL {label}: {key} has {n} entries, token_embd.weight has {vocab} rows")
            failures += 1
    return failures


def print_summary(files: int, failed: int) -> None:
    # The closing line CI runners read.
    print(f"{files - failed} passed, {failed} failed")


if __name__ == "__main__":
    sys.exit(main())
