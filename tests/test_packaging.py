"""What ComfyUI's registry reads from pyproject.toml, and what ComfyUI installs from requirements.txt."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads pyproject.toml without a package")

REPO = Path(__file__).resolve().parents[1]
RAW = "https://raw.githubusercontent.com/comfyui-concept-erasure/comfyui-concept-erasure/main/"


def test_registry_fields_are_complete_and_the_icon_is_committed():
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    comfy = meta["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"] and comfy["requires-comfyui"].startswith(">=")
    assert comfy["Icon"].startswith(RAW), "the icon is served from this repository's main branch"
    icon = REPO / comfy["Icon"][len(RAW):]
    with Image.open(icon) as img:  # the registry's limit: at most 800 x 400 px
        assert img.width <= 800 and img.height <= 400
    assert meta["project"]["urls"]["Repository"].startswith("https://github.com/")


def test_requirements_add_nothing_heavy_to_comfyuis_environment():
    lines = [ln.split("#")[0].strip() for ln in (REPO / "requirements.txt").read_text().splitlines()]
    assert not {ln for ln in lines if ln} & {"torch", "diffusers", "peft", "transformers"}
