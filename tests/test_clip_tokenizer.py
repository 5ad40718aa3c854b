"""The built-in CLIP tokenizer (vendored BPE merges) tokenizes exactly as Stable Diffusion's CLIP tokenizer."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from erasure.clip_tokenizer import (
    PAD_ZERO,
    builtin_clip_tokenizer,
    tokenizer_from_folder,
    write_clip_tokenizer_files,
)

# ids from ComfyUI 0.8.0's comfy/sd1_tokenizer (= openai/clip-vit-large-patch14) through transformers' CLIPTokenizer
KNOWN = {
    "a photo of a cat": [49406, 320, 1125, 539, 320, 2368, 49407],
    "Van Gogh, Starry Night!!": [49406, 2451, 19697, 267, 30963, 930, 748, 49407],
    "naked woman on a beach": [49406, 11478, 2308, 525, 320, 2117, 49407],
    "Émile Zola's café — 東京 🙂": [49406, 3459, 6243, 46105, 568, 15304, 2005, 48338, 21078, 361, 14860, 49407],
    "a  photo   of\tthe  Eiffel-Tower, 8k, (masterpiece:1.2)":
        [49406, 320, 1125, 539, 518, 29720, 268, 4730, 267, 279, 330, 267, 263, 12066, 281, 272, 269, 273, 264, 49407],
    "": [49406, 49407],
}


def test_known_token_ids():
    tok = builtin_clip_tokenizer()
    assert len(tok) == 49408 and tok.model_max_length == 77
    for prompt, ids in KNOWN.items():
        assert tok(prompt).input_ids == ids, prompt


def test_padding_by_encoder_family():
    sd1, sd2 = builtin_clip_tokenizer(), builtin_clip_tokenizer(77, PAD_ZERO)
    a = sd1("a cat", padding="max_length", max_length=77).input_ids
    b = sd2("a cat", padding="max_length", max_length=77).input_ids
    assert a[:4] == b[:4] == [49406, 320, 2368, 49407] and len(a) == len(b) == 77
    assert set(a[4:]) == {49407} and set(b[4:]) == {0}  # CLIP-L pads with the end token, OpenCLIP with "!"


def test_tokenizer_folder(tmp_path):
    write_clip_tokenizer_files(tmp_path / "tok")
    tok = tokenizer_from_folder(tmp_path / "tok", 77, PAD_ZERO)
    assert tok("a photo of a cat").input_ids == KNOWN["a photo of a cat"] and tok.pad_token_id == 0
    with pytest.raises(ValueError, match="vocab.json and merges.txt not found"):
        tokenizer_from_folder(tmp_path)
    small = tmp_path / "small"
    small.mkdir()
    (small / "vocab.json").write_text(json.dumps({"a</w>": 0, "<|startoftext|>": 1, "<|endoftext|>": 2}))
    (small / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(ValueError, match="3 tokens"):
        tokenizer_from_folder(small)


def _comfy_tokenizer_dir() -> Path | None:
    d = Path(os.environ.get("COMFYUI_PATH", Path.home() / "ComfyUI")).expanduser() / "comfy" / "sd1_tokenizer"
    return d if (d / "vocab.json").is_file() else None


@pytest.mark.skipif(_comfy_tokenizer_dir() is None, reason="no ComfyUI (COMFYUI_PATH or ~/ComfyUI) to compare with")
def test_files_and_tokens_equal_comfyui(tmp_path):
    comfy = _comfy_tokenizer_dir()
    write_clip_tokenizer_files(tmp_path)
    assert json.loads((tmp_path / "vocab.json").read_text()) == json.loads((comfy / "vocab.json").read_text())
    ours = (tmp_path / "merges.txt").read_text(encoding="utf-8").split("\n")
    theirs = (comfy / "merges.txt").read_text(encoding="utf-8").split("\n")
    assert [m for m in ours if m] == [m for m in theirs if m]
    a, b = builtin_clip_tokenizer(), tokenizer_from_folder(comfy)
    for p in [*KNOWN, "portrait of Scarlett Johansson by Greg Rutkowski, trending on artstation", "1girl, solo"]:
        assert a(p).input_ids == b(p).input_ids, p
