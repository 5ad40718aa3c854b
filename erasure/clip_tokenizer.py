"""CLIP tokenizers for single-file checkpoints, which carry none: from a user's folder or from the vendored BPE.

Stable Diffusion 1.x, 2.x and XL all tokenize with OpenAI CLIP's byte-pair encoding (49,408 tokens, 77 positions).
They differ only in the padding token: SD1.x's CLIP-L pads with the end token, while the OpenCLIP encoders (SD2.x, and
SDXL's second encoder) pad with id 0 (``"!"``), as ComfyUI and the diffusers model folders do.

Nothing is downloaded: ``tokenizer_from_folder`` reads ``vocab.json`` + ``merges.txt`` (a diffusers model's
``tokenizer/`` folder, ComfyUI's ``comfy/sd1_tokenizer``); ``builtin_clip_tokenizer`` rebuilds the same two files from
``assets/clip_bpe_merges.txt.gz`` (provenance and licence in ``assets/clip_bpe_merges.NOTICE.txt``).
"""

from __future__ import annotations

import atexit
import gzip
import json
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"

MERGES_FILE = Path(__file__).parent / "assets" / "clip_bpe_merges.txt.gz"
#: the size of CLIP's vocabulary: 256 byte tokens, their 256 end-of-word forms, 48,894 merges, 2 special tokens
VOCAB_SIZE = 49408
#: the padding tokens by encoder family (``None``: pad with the end token)
PAD_END, PAD_ZERO = EOS, "!"


@lru_cache
def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible byte -> printable unicode map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=False))


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """CLIP's vocabulary and merges, built the way OpenAI's ``SimpleTokenizer`` builds them from the BPE file."""
    merges = [m for m in gzip.decompress(MERGES_FILE.read_bytes()).decode("utf-8").split("\n") if m]
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE or len(merges) != VOCAB_SIZE - 512 - 2:
        raise RuntimeError(f"{MERGES_FILE} is damaged ({len(merges)} merges, {len(vocab)} tokens; expected "
                           f"{VOCAB_SIZE - 514} and {VOCAB_SIZE}): reinstall the package")
    return vocab, merges


def write_clip_tokenizer_files(folder: Path) -> None:
    """Write ``vocab.json`` and ``merges.txt`` in Hugging Face's format (as in openai/clip-vit-large-patch14)."""
    vocab, merges = clip_vocab_and_merges()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def _load(folder: Path, max_length: int, pad_token: str):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True, model_max_length=max_length,
                                         bos_token=BOS, eos_token=EOS, unk_token=EOS, pad_token=pad_token)


@lru_cache(maxsize=1)
def _builtin_folder() -> Path:
    """The vendored tokenizer written out once per process (transformers 4.x and 5.x both read it from files)."""
    d = Path(tempfile.mkdtemp(prefix="erasure-clip-tok-"))
    atexit.register(shutil.rmtree, d, ignore_errors=True)
    write_clip_tokenizer_files(d)
    return d


def builtin_clip_tokenizer(max_length: int = 77, pad_token: str = PAD_END):
    """CLIP's tokenizer from the vendored BPE merges (no network, no user files)."""
    return _load(_builtin_folder(), max_length, pad_token)


def tokenizer_from_folder(folder: str | Path, max_length: int = 77, pad_token: str = PAD_END):
    """CLIP's tokenizer from a folder holding ``vocab.json`` and ``merges.txt``; ``max_length`` and the padding token
    are the model's (a folder's own config may say otherwise: ComfyUI's says 8192 positions)."""
    folder = Path(folder).expanduser()
    missing = [n for n in ("vocab.json", "merges.txt") if not (folder / n).is_file()]
    if missing:
        raise ValueError(f"--tokenizer {folder}: {' and '.join(missing)} not found there; give a folder with "
                         "vocab.json and merges.txt (a diffusers model's tokenizer/ folder, or ComfyUI's "
                         "comfy/sd1_tokenizer), or leave --tokenizer out to use the built-in CLIP tokenizer")
    tok = _load(folder, max_length, pad_token)
    if len(tok) != VOCAB_SIZE:
        raise ValueError(f"--tokenizer {folder}: {len(tok)} tokens, but Stable Diffusion's CLIP tokenizer has "
                         f"{VOCAB_SIZE}; give a CLIP tokenizer folder or leave --tokenizer out")
    return tok
