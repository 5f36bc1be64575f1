#!/usr/bin/env python3
"""Checks our tokenizer (engine/src/tokenizer.rs, through `cargo moe-gate tokenize`) against llama.cpp's
on the same GGUF file, string by string: the ids must be equal, and decoding them must give the text back.

The strings (at least 2000, from a fixed seed) cover code, whitespace runs, digits, CJK, emoji, other
scripts, contractions, special tokens written in the text and random code points; invalid UTF-8 inputs
must be refused by ours with a clear error (llama.cpp accepts any bytes, so there is nothing to compare).

Needs llama-cpp-python (PyPI; it builds llama.cpp from source):
    python3 -m venv target/llama-venv && target/llama-venv/bin/pip install llama-cpp-python
    target/llama-venv/bin/python scripts/check_tokenizer.py            # synth:tiny, Qwen3's vocabulary
    target/llama-venv/bin/python scripts/check_tokenizer.py --model path/to/Qwen3-30B-A3B-Q4_K_M.gguf

Prints one line per mismatch (the first 20), then `N passed, M failed`; exits 1 on any failure.
"""

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CODE = [
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "fn main() {\n\tlet x: Vec<u32> = (0..10).map(|i| i * i).collect();\n\tprintln!(\"{x:?}\");\n}\n",
    "#include <stdio.h>\nint main(void) { printf(\"%d\\n\", 42); return 0; }",
    "for (int i = 0; i < n; ++i) {\r\n    sum += a[i] * b[i];\r\n}\r\n",
    "SELECT id, name FROM users WHERE age >= 18 ORDER BY name DESC;",
    "const f = async (x) => { await fetch(`/api/${x}`); };",
    "    # indented comment\n\n\n    x = {'a': 1, \"b\": [1, 2, 3]}  # trailing\n",
    "<div class=\"c\"><a href='https://example.com/?q=1&r=2'>link</a></div>",
    "$ cargo test -p moe-engine --test tokenizer -- --nocapture 2>&1 | tail -n 20",
    "x+=1;y-=2;z*=3;w/=4;v%=5;u**=6;t//=7;s>>=8;r<<=9;q&=10;p|=11;o^=12",
]
WORDS = [
    "the", "The", "THE", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "Hello", "world",
    "tokenizer", "Qwen", "mixture-of-experts", "don't", "I'm", "we'll", "they've", "she'd", "IT'S",
    "naïve", "café", "Straße", "Ångström", "œuvre", "façade", "2+2=", "def", "return", "π", "∑", "∞",
]
CJK = [
    "你好，世界！", "机器学习是人工智能的一个分支。", "日本語のテキストです。", "カタカナとひらがな",
    "한국어 문장입니다.", "漢字とかな交じり文", "中文English混合mixed", "繁體中文測試",
]
EMOJI = [
    "😀", "👍🏽", "👨‍👩‍👧‍👦", "🇯🇵🇺🇸", "❤️", "🧑‍💻 coding", "🎉🎉🎉", "✅ done", "🤖🦀🐍", "a😀b",
]
OTHER_SCRIPTS = [
    "مرحبا بالعالم", "שלום עולם", "नमस्ते दुनिया", "สวัสดีชาวโลก", "Привет, мир!", "Γειά σου Κόσμε",
    "Ελληνικά και русский", "ქართული", "Tiếng Việt có dấu",
]
SPECIAL = [
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>", "<think>\nreasoning\n</think>\n\nanswer", "<tool_call>{\"name\": \"f\"}</tool_call>",
    "<|fim_prefix|>def f(<|fim_suffix|>):\n<|fim_middle|>", "text<|im_end|>more", "<|im_start|><|im_start|>",
    "< |im_start| >", "<|im_start", "<think", "</think>x</think>",
]


def whitespace(r: random.Random) -> str:
    parts = [" ", "  ", "\t", "\n", "\r\n", "\n\n", "   ", "\u00a0", "\u3000", "\r", "\f", "\v"]
    return "".join(r.choice(parts) for _ in range(r.randint(1, 8)))


def digits(r: random.Random) -> str:
    forms = [
        lambda: str(r.randint(0, 10 ** r.randint(1, 20))),
        lambda: f"{r.uniform(-1e6, 1e6):.{r.randint(0, 8)}f}",
        lambda: f"{r.randint(1900, 2100)}-{r.randint(1, 12):02d}-{r.randint(1, 28):02d}",
        lambda: f"{r.randint(0, 255)}.{r.randint(0, 255)}.{r.randint(0, 255)}.{r.randint(0, 255)}",
        lambda: f"{r.random():e}",
        lambda: "".join(r.choice("0123456789") for _ in range(r.randint(1, 40))),
        lambda: "١٢٣٤٥ ۶۷۸ ०१२ ①②③ ¹²³ Ⅻ",
    ]
    return r.choice(forms)()


def random_code_points(r: random.Random) -> str:
    out = []
    for _ in range(r.randint(1, 12)):
        cp = r.choice([r.randint(0x20, 0x7E), r.randint(0xA0, 0x2FFF), r.randint(0x3000, 0x9FFF),
                       r.randint(0xAC00, 0xD7A3), r.randint(0xE000, 0xFFFD), r.randint(0x10000, 0x10FFFF)])
        if 0xD800 <= cp <= 0xDFFF:
            cp = 0x41
        out.append(chr(cp))
    return "".join(out)


def mixture(r: random.Random) -> str:
    pools = [CODE, WORDS, CJK, EMOJI, OTHER_SCRIPTS, SPECIAL]
    pieces = []
    for _ in range(r.randint(2, 7)):
        k = r.randint(0, 9)
        if k < 6:
            pieces.append(r.choice(pools[k]))
        elif k == 6:
            pieces.append(whitespace(r))
        elif k == 7:
            pieces.append(digits(r))
        else:
            pieces.append(random_code_points(r))
        if r.random() < 0.5:
            pieces.append(r.choice(["", " ", "\n", ", ", ". ", "'s ", "'LL ", "!!", "..."]))
    return "".join(pieces)


def texts(n: int, seed: int) -> list:
    r = random.Random(seed)
    fixed = CODE + WORDS + CJK + EMOJI + OTHER_SCRIPTS + SPECIAL + [" ", "\n", "  \n  ", "a", "1", "12", "123"]
    out = list(fixed)
    makers = [whitespace, digits, random_code_points, mixture, mixture, mixture]
    while len(out) < n:
        maker = makers[len(out) % len(makers)]
        out.append(maker(r))
        if len(out) % 7 == 0:
            out.append(" ".join(r.choice(WORDS) for _ in range(r.randint(1, 12))))
    return out


INVALID_UTF8 = ["ff", "c0af", "e282", "f08f8080", "80", "41e2", "eda080", "f4908080", "616263ff646566"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a GGUF file (default: synth:tiny written by `cargo moe-gate synth`)")
    ap.add_argument("--count", type=int, default=2400, help="how many strings (default 2400)")
    ap.add_argument("--seed", type=int, default=12)
    ap.add_argument("--gate", default=None, help="the cargo-moe-gate binary (default: `cargo run`)")
    args = ap.parse_args()

    try:
        import llama_cpp  # noqa: PLC0415
    except ImportError:
        print("check_tokenizer: needs llama-cpp-python (pip install llama-cpp-python)", file=sys.stderr)
        return 2

    gate = [args.gate] if args.gate else ["cargo", "run", "--quiet", "--package", "cargo-moe-gate", "--"]
    work = Path(tempfile.mkdtemp(prefix="check_tokenizer_"))
    model = args.model
    if model is None:
        model = str(work / "tiny.gguf")
        subprocess.run(gate + ["synth", "--model", "synth:tiny", "--out", model], check=True, cwd=ROOT)

    strings = texts(args.count, args.seed)
    inputs = work / "inputs.jsonl"
    with inputs.open("w", encoding="utf-8") as f:
        for s in strings:
            f.write(json.dumps({"text": s}) + "\n")
        for h in INVALID_UTF8:
            f.write(json.dumps({"hex": h}) + "\n")
    run = subprocess.run(gate + ["tokenize", "--model", model, "--jsonl", str(inputs)],
                         check=True, cwd=ROOT, capture_output=True, text=True)
    # Split on "\n" only: decoded texts may hold U+2028 and other characters that splitlines() breaks on.
    ours = [json.loads(line) for line in run.stdout.split("\n") if line]
    if len(ours) != len(strings) + len(INVALID_UTF8):
        print(f"check_tokenizer: {len(ours)} answers for {len(strings) + len(INVALID_UTF8)} inputs", file=sys.stderr)
        return 1

    llm = llama_cpp.Llama(model_path=model, vocab_only=True, verbose=False)
    passed, failed, shown = 0, 0, 0

    def fail(msg: str) -> None:
        nonlocal failed, shown
        failed += 1
        if shown < 20:
            print(msg)
            shown += 1

    for s, got in zip(strings, ours):
        want = llm.tokenize(s.encode("utf-8"), add_bos=True, special=True)
        if "ids" not in got:
            fail(f"MISMATCH {s!r}: ours refused it: {got.get('error')}")
        elif got["ids"] != want:
            fail(f"MISMATCH {s!r}:\n  ours      {got['ids']}\n  llama.cpp {want}")
        elif got.get("text") != s:
            fail(f"ROUND TRIP {s!r}: ours decodes {got.get('text')!r}")
        elif llm.detokenize(want, special=True) != s.encode("utf-8"):
            fail(f"ROUND TRIP {s!r}: llama.cpp decodes {llm.detokenize(want, special=True)!r}")
        else:
            passed += 1
    for h, got in zip(INVALID_UTF8, ours[len(strings):]):
        err = got.get("error", "")
        if "ids" in got or "not valid UTF-8" not in err:
            fail(f"INVALID UTF-8 {h}: expected a refusal naming invalid UTF-8, got {got}")
        else:
            passed += 1

    print(f"tokenizer vs llama.cpp ({llama_cpp.__version__}) on {model}: {len(strings)} strings, "
          f"{len(INVALID_UTF8)} invalid UTF-8 inputs")
    print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
