"""A CLIP-format BPE tokenizer built from the lab's own vocabulary.

The files (``vocab.json``, ``merges.txt``) are the same format as Stable Diffusion's CLIP tokenizer, so the lab
model loads through ``transformers.CLIPTokenizer`` exactly like a real checkpoint and every code path of the
library (token positions of a word, padding with the end token, causal text encoding) is exercised for real.

Every lab word becomes a single token; any other text still tokenizes, through CLIP's byte-level fallback into
characters, so user prompts never fail on the lab model.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..clip_tokenizer import BOS, EOS, bytes_to_unicode


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one pre-tokenized word (lowest-rank adjacent pair first)."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(parts, parts[1:], strict=False))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        a, b = parts[i], parts[i + 1]
        merged, j = [], 0
        while j < len(parts):
            if j < len(parts) - 1 and parts[j] == a and parts[j + 1] == b:
                merged.append(a + b)
                j += 2
            else:
                merged.append(parts[j])
                j += 1
        parts = merged
    return parts


def build_merges(words: list[str]) -> list[tuple[str, str]]:
    """Merges that turn every word into one token, found by simulating BPE and appending what is missing."""
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for _ in range(64):
        done = True
        for w in words:
            parts = _bpe(w, ranks)
            while len(parts) > 1:
                done = False
                pair = (parts[0], parts[1])
                if pair not in ranks:
                    ranks[pair] = len(merges)
                    merges.append(pair)
                parts = [parts[0] + parts[1]] + parts[2:]
        if done:
            return merges
    raise RuntimeError("BPE merges did not converge")  # pragma: no cover


def write_tokenizer(folder: Path, words: list[str], max_length: int) -> None:
    """Write a CLIPTokenizer folder (vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json)."""
    folder.mkdir(parents=True, exist_ok=True)
    byte_chars = list(bytes_to_unicode().values())
    vocab_list = byte_chars + [c + "</w>" for c in byte_chars]
    words = sorted({w.lower() for w in words if w.strip()})
    merges = build_merges(words)
    vocab_list += [a + b for a, b in merges]
    vocab_list += [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": max_length,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
        "do_lower_case": True,
        "errors": "replace",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
