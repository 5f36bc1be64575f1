#!/usr/bin/env python3
"""Tensor type counts of GGUF files, read with gguf-py (llama.cpp's reader), and, for two files, every
tensor whose type differs between them (by name).

usage: gguf_type_counts.py FILE [OTHER]

Prints, per file, `TYPE: count (share of the file's bytes)`; with OTHER, the differing tensors (the first
40) and `N tensors differ`. Exits 1 when the two files hold different tensor names.
"""

import sys
from collections import Counter

from gguf import GGUFReader


def types(path: str) -> dict:
    reader = GGUFReader(path)
    return {t.name: (t.tensor_type.name, int(t.n_bytes)) for t in reader.tensors}


def summary(path: str, table: dict) -> None:
    counts = Counter(ty for ty, _ in table.values())
    size = Counter()
    for ty, n in table.values():
        size[ty] += n
    total = sum(size.values())
    print(f"{path}: {len(table)} tensors, {total / 2**30:.2f} GiB")
    for ty, n in sorted(counts.items()):
        print(f"  {ty}: {n} ({100 * size[ty] / total:.1f}% of the bytes)")


def main() -> int:
    if len(sys.argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        return 2
    first = types(sys.argv[1])
    summary(sys.argv[1], first)
    if len(sys.argv) == 2:
        return 0
    second = types(sys.argv[2])
    summary(sys.argv[2], second)
    if set(first) != set(second):
        only = sorted(set(first) ^ set(second))
        print(f"the files hold different tensors, e.g. {only[:10]}")
        return 1
    differ = [name for name in first if first[name][0] != second[name][0]]
    for name in differ[:40]:
        print(f"  {name}: {first[name][0]} vs {second[name][0]}")
    print(f"{len(differ)} tensors differ in type")
    return 0


if __name__ == "__main__":
    sys.exit(main())
