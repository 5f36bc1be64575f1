#!/usr/bin/env python3
"""Writes Qwen3's BPE vocabulary and merges from a Hugging Face `tokenizer.json` into the two text files
the synthetic models carry (engine/src/synth/qwen3_vocab/README.md says where the JSON comes from).

usage: extract_qwen3_vocab.py TOKENIZER_JSON OUT_DIR
"""

import json
import sys
from pathlib import Path


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    tok = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
    model = tok["model"]
    if model.get("type") != "BPE":
        print(f"{sys.argv[1]}: model type {model.get('type')!r}, expected BPE", file=sys.stderr)
        return 1
    by_id = sorted((i, s) for s, i in model["vocab"].items())
    if [i for i, _ in by_id] != list(range(len(by_id))):
        print("the vocabulary's ids are not 0..n-1", file=sys.stderr)
        return 1
    merges = [m if isinstance(m, list) else m.split(" ") for m in model["merges"]]
    for text in [s for _, s in by_id] + [p for m in merges for p in m]:
        if any(c in text for c in " \r\n"):
            print(f"token {text!r} holds a space or line break; not a byte-level vocabulary", file=sys.stderr)
            return 1
    if any(len(m) != 2 for m in merges):
        print("a merge is not a pair", file=sys.stderr)
        return 1
    out = Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokens.txt").write_text("".join(s + "\n" for _, s in by_id), encoding="utf-8")
    (out / "merges.txt").write_text("".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    print(f"{len(by_id)} tokens, {len(merges)} merges -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
