"""Write docs/nodes.md from the nodes' own schemas (names, inputs, defaults, ranges, tooltips, outputs), so that the
page cannot drift from the code: the host test ``tests/host/test_node_docs.py`` renders it again and compares.

Run in ComfyUI's environment: ``COMFYUI_PATH=~/ComfyUI ~/comfy-venv/bin/python scripts/node_docs.py``."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "nodes.md"
#: the pack's node modules, in the order the page lists them
MODULES = ("erasure_nodes", "settings_nodes", "audit_nodes", "legacy_nodes")
#: combo inputs whose options are the user's files, not part of the node
FILE_LISTS = {"lora_name": "a file in models/loras"}
WIDGETS = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}

HEADER = """# Nodes

Every node of the pack, generated from the nodes' own definitions by `scripts/node_docs.py` (do not edit by hand:
`tests/host/test_node_docs.py` fails when this page and the code differ). Widgets are the values set on the node;
sockets are inputs connected from other nodes. Hover over an input in ComfyUI to see the same tooltip.

How the erase nodes and their settings nodes work together: the erase node holds what a user decides (concept,
preset, steps, seed); connect an **ANT Settings** / **MACE Settings** node to its `settings` socket to change
anything else. A settings node passes on only the values you changed from its defaults, so a preset keeps every value
you did not touch. The nodes marked *deprecated* are the first published layout, kept so that saved workflows load.
"""


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _default(typ: object, opts: dict) -> str:
    if "default" not in opts:
        return ""
    d = opts["default"]
    if isinstance(d, str):
        return f"`{d}`" if d else "(empty)"
    return f"`{d:g}`" if isinstance(d, float) else f"`{d}`"


def _range(name: str, typ: object, opts: dict) -> str:
    if name in FILE_LISTS:
        return FILE_LISTS[name]
    options = typ if isinstance(typ, list) else opts.get("options")
    if options is not None:
        return ", ".join(f"`{o}`" for o in options) if len(options) <= 8 else (
            f"`{options[0]}`, `{options[1]}` ... `{options[-1]}` ({len(options)} choices)")
    if "min" in opts or "max" in opts:
        lo, hi = opts.get("min"), opts.get("max")
        fmt = (lambda v: f"{v:g}") if typ == "FLOAT" else str
        return f"{fmt(lo) if lo is not None else ''} to {fmt(hi) if hi is not None else ''}"
    return ""


def render(mappings: dict, display: dict) -> str:
    """The page for the pack's nodes among ComfyUI's ``NODE_CLASS_MAPPINGS``."""
    ours = [(k, v) for k, v in mappings.items() if v.__module__.rsplit(".", 1)[-1] in MODULES
            and ".nodes." in f".{v.__module__}"]
    ours.sort(key=lambda kv: (MODULES.index(kv[1].__module__.rsplit(".", 1)[-1]), bool(kv[1].DEPRECATED)))
    lines = [HEADER]
    lines.append("| Node | Category | What it does |\n|---|---|---|")
    for node_id, cls in ours:
        name = display.get(node_id, node_id) + (" *(deprecated)*" if cls.DEPRECATED else "")
        lines.append(f"| [{_cell(name)}](#{node_id.lower()}) | {cls.CATEGORY} | "
                     f"{_cell(cls.DESCRIPTION.split('. ')[0].rstrip('.'))}. |")
    for node_id, cls in ours:
        lines.append(f"\n## {display.get(node_id, node_id)}"
                     + (" *(deprecated)*" if cls.DEPRECATED else "")
                     + f'\n<a id="{node_id.lower()}"></a>\n')
        lines.append(f"Node id `{node_id}`, category `{cls.CATEGORY}`"
                     + (", an output node" if getattr(cls, "OUTPUT_NODE", False) else "") + ".\n")
        lines.append(cls.DESCRIPTION + "\n")
        spec = cls.INPUT_TYPES()
        rows = []
        for section in ("required", "optional"):
            for name, (typ, *rest) in spec.get(section, {}).items():
                opts = rest[0] if rest else {}
                widget = isinstance(typ, list) or typ in WIDGETS
                kind = ("widget" if widget else "socket") + (", optional" if section == "optional" else "")
                typ_name = "COMBO" if isinstance(typ, list) else typ
                rows.append(f"| `{name}` | {typ_name} | {kind} | {_default(typ, opts)} | "
                             f"{_cell(_range(name, typ, opts))} | {_cell(opts.get('tooltip', ''))} |")
        if rows:
            lines.append("| Input | Type | Kind | Default | Range | What it is |\n|---|---|---|---|---|---|")
            lines.extend(rows)
        outs = list(zip(cls.RETURN_TYPES, cls.RETURN_NAMES or cls.RETURN_TYPES,
                        getattr(cls, "OUTPUT_TOOLTIPS", None) or [""] * len(cls.RETURN_TYPES), strict=False))
        if outs:
            lines.append("\n| Output | Type | What it is |\n|---|---|---|")
            lines.extend(f"| {_cell(n)} | {t} | {_cell(tip or '')} |" for t, n, tip in outs)
    return "\n".join(lines).rstrip() + "\n"


def load_comfy(comfy_path: Path) -> tuple[dict, dict]:
    """ComfyUI imported in-process (CPU) with this pack loaded: its node and display-name mappings."""
    sys.path.insert(0, str(comfy_path))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import utils.extra_config  # noqa: F401  (ComfyUI's nodes.py expects these imported first)
    import utils.install_util  # noqa: F401

    import nodes

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    assert asyncio.run(nodes.load_custom_node(str(REPO))), "the pack failed to load"
    return nodes.NODE_CLASS_MAPPINGS, nodes.NODE_DISPLAY_NAME_MAPPINGS


if __name__ == "__main__":
    mappings, display = load_comfy(Path(os.environ.get("COMFYUI_PATH", "~/ComfyUI")).expanduser())
    OUT.write_text(render(mappings, display))
    print("wrote", OUT)
