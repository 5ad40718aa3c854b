"""docs/nodes.md is what ``scripts/node_docs.py`` renders from the nodes' own schemas: it cannot drift."""

from __future__ import annotations

import importlib.util

from .conftest import REPO


def test_node_docs_match_the_node_schemas(comfy):
    spec = importlib.util.spec_from_file_location("node_docs", REPO / "scripts" / "node_docs.py")
    node_docs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(node_docs)
    page = node_docs.render(comfy["nodes"].NODE_CLASS_MAPPINGS, comfy["nodes"].NODE_DISPLAY_NAME_MAPPINGS)
    assert "Erase Concept (ANT)" in page and "ANT Settings" in page
    assert (REPO / "docs" / "nodes.md").read_text() == page, \
        "docs/nodes.md is out of date: run COMFYUI_PATH=~/ComfyUI ~/comfy-venv/bin/python scripts/node_docs.py"
