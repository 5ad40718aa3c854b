"""Whether two LoRA files hold the same tensors (bit for bit) and the same metadata.

safetensors writes metadata keys in hash-map order, so the header bytes of two files written by the same code
differ between runs; this compares what they hold.

    python scripts/same_lora.py A.safetensors B.safetensors
"""

from __future__ import annotations

import sys

import torch

from erasure.files import read_safetensors


def main(a: str, b: str) -> int:
    (ta, ma), (tb, mb) = read_safetensors(a), read_safetensors(b)
    diff = sorted(k for k in set(ta) | set(tb) if k not in ta or k not in tb or not torch.equal(ta[k], tb[k]))
    meta = sorted(k for k in set(ma) | set(mb) if ma.get(k) != mb.get(k))
    for k in diff:
        print(f"tensor differs: {k}")
    for k in meta:
        print(f"metadata differs: {k}: {ma.get(k)!r} vs {mb.get(k)!r}")
    print("same tensors and metadata" if not diff and not meta else "different")
    return 0 if not diff and not meta else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
