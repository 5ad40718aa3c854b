"""Shared fixtures: tiny diffusers models built from configs in code (no hub, no downloads)."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "2")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def lab_tokenizer_dir(tmp_path_factory):
    from erasure.lab import world
    from erasure.lab.tokenizer import write_tokenizer

    d = tmp_path_factory.mktemp("tok")
    write_tokenizer(d, world.vocabulary(), 16)
    return d


@pytest.fixture()
def tiny_backbone(lab_tokenizer_dir):
    """A randomly initialised pixel-space model with the lab's layout but tiny widths."""
    from tiny_models import tiny_lab_layout

    return tiny_lab_layout(lab_tokenizer_dir)
