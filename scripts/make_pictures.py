"""Draw the pictures of the README and docs/ (PNG files in docs/images/).

    python scripts/make_pictures.py before-after docs/images/before-after.png [--lora FILE] [--save-lora FILE]
    python scripts/make_pictures.py workflow example_workflows/1-erase-one-concept-ant.json docs/images/workflow-1.png

``before-after``: the concept lab's model (shipped in the package) against its ANT erasure of ``circle`` at the
library's default settings (``erasure.lab.demo.erase``, the call ``python -m erasure demo`` makes), for prompts of
the erased concept, of a synonym and of unrelated concepts, with the same seeds in both halves. ``--lora`` reuses an
erasure already made (e.g. ``out/demo/erase-circle.safetensors`` from the demo); without it the erasure is trained
here (a few minutes on a CPU). The 32x32 lab images are enlarged with nearest-neighbour sampling so that their
shapes stay sharp.

``workflow``: a diagram of a ComfyUI UI-format workflow file (nodes with ``pos``/``size``/``type``/``title``/
``widgets_values``, and ``links``), drawn with matplotlib in the style of ComfyUI's editor: node boxes with their
title, input and output slots, widget names and values, and the links as curves. Widget names come from the node
schemas in ``nodes/*.py`` (read, not imported: the library's venv has no ComfyUI) and from a table of the stock
ComfyUI nodes the example workflows use; a node whose widgets cannot be named shows its values alone.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# -- before/after --------------------------------------------------------------------------------------------------

CONCEPT = "circle"
#: (group label, prompt): the erased concept, a synonym the erasure never saw, and unrelated concepts
ROWS = [
    ("erased concept", "a photo of a circle"),
    ("synonym", "a photo of a disk"),
    ("unrelated", "a photo of a square"),
    ("unrelated", "a photo of a triangle"),
    ("unrelated", "a green shape"),
    ("unrelated", "a shape in striped style"),
]
SEEDS = [1000, 1001, 1002, 1003]  # the first seeds of `lab eval`'s set
SAMPLE_STEPS, GUIDANCE = 10, 5.0  # `lab eval`'s sampler
SCALE = 4  # 32 px -> 128 px, nearest neighbour


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def before_after(out: Path, lora: Path | None, save_lora: Path | None) -> None:
    sys.path.insert(0, str(REPO))
    import torch
    from PIL import Image, ImageDraw

    from erasure.diffusers_backbone import load_diffusers
    from erasure.lab import world
    from erasure.lab.demo import erase
    from erasure.lora_files import load_lora
    from erasure.lora_files import save_lora as write_lora
    from erasure.progress import Progress
    from erasure.sampling import sample

    bb = load_diffusers("lab")
    if lora is not None:
        weights = load_lora(lora)
        how = f"the erasure in {lora.name}"
    else:
        print(f"training ANT on {CONCEPT!r} with the default settings (a few minutes on a CPU)...", flush=True)
        weights = erase(bb, CONCEPT, "ant", seed=0, progress=Progress(log=lambda s: print(s, flush=True)))
        how = "ANT, default settings, seed 0"
        if save_lora is not None:
            weights.metadata["erasure.base_model"] = bb.fingerprint()
            write_lora(weights, save_lora)
            print(f"wrote {save_lora}")
    prompts = [p for _, p in ROWS]
    with torch.no_grad():
        before = sample(bb, prompts, SEEDS, SAMPLE_STEPS, GUIDANCE).images
        with weights.applied(bb.unet()):
            after = sample(bb, prompts, SEEDS, SAMPLE_STEPS, GUIDANCE).images

    cell = world.IMAGE_SIZE * SCALE
    n = len(SEEDS)
    label_w, gap, pad, head = 300, 28, 12, 64
    width = label_w + 2 * n * cell + gap + pad
    height = head + len(ROWS) * (cell + pad) + 34
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    big, small = _font(22), _font(17)
    x0, x1 = label_w, label_w + n * cell + gap
    draw.text((x0, 8), "original model", fill="black", font=big)
    draw.text((x1, 8), f"'{CONCEPT}' erased", fill="black", font=big)
    draw.text((x0, 36), f"seeds {SEEDS[0]}-{SEEDS[-1]}", fill="#555555", font=small)
    draw.text((x1, 36), "same seeds", fill="#555555", font=small)
    for r, (group, prompt) in enumerate(ROWS):
        y = head + r * (cell + pad)
        colour = "#b00020" if group != "unrelated" else "#1b5e20"
        draw.text((8, y + cell // 2 - 26), group, fill=colour, font=small)
        draw.text((8, y + cell // 2 - 4), f'"{prompt}"', fill="black", font=small)
        for half, imgs in ((x0, before), (x1, after)):
            for j in range(n):
                img = imgs[r * n + j]
                arr = ((img.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
                tile = Image.fromarray(arr).resize((cell, cell), Image.NEAREST)
                canvas.paste(tile, (half + j * cell, y))
    draw.text((8, height - 28), f"Concept lab (32x32 px images, shown {SCALE}x); right: {how}; DDIM {SAMPLE_STEPS} "
              f"steps, guidance {GUIDANCE}.", fill="#555555", font=small)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas = canvas.convert("P", palette=Image.ADAPTIVE, colors=256)
    canvas.save(out, format="PNG", optimize=True)
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KB)")


# -- workflow diagram ------------------------------------------------------------------------------------------------

#: widget names of the stock ComfyUI nodes the example workflows use, in ``widgets_values`` order
STOCK_WIDGETS: dict[str, list[str]] = {
    "CheckpointLoaderSimple": ["ckpt_name"],
    "CLIPTextEncode": ["text"],
    "EmptyLatentImage": ["width", "height", "batch_size"],
    "KSampler": ["seed", "control_after_generate", "steps", "cfg", "sampler_name", "scheduler", "denoise"],
    "VAEDecode": [],
    "VAEEncode": [],
    "SaveImage": ["filename_prefix"],
    "PreviewImage": [],
    "LoadImage": ["image", "upload"],
    "LoraLoader": ["lora_name", "strength_model", "strength_clip"],
    "LoraLoaderModelOnly": ["lora_name", "strength_model"],
    "LoraModelLoader": ["lora", "strength_model"],
    "CLIPSetLastLayer": ["stop_at_clip_layer"],
    "LossGraphNode": ["filename_prefix"],
}
WIDGET_TYPES = {"String", "Int", "Float", "Boolean", "Combo"}
#: slot and link colours of ComfyUI's default palette
TYPE_COLOURS = {
    "MODEL": "#b39ddb", "CLIP": "#ffd500", "VAE": "#ff6e6e", "IMAGE": "#64b5f6", "LATENT": "#ff9cf9",
    "CONDITIONING": "#ffa931", "MASK": "#81c784", "LORA_MODEL": "#9ccc65", "LOSS_MAP": "#4dd0e1",
}
DEFAULT_COLOUR = "#a0a0a0"


def _const(node: ast.AST):
    try:
        return ast.literal_eval(node)
    except (ValueError, SyntaxError, TypeError):
        return None


def _input_widget(call: ast.Call, helpers: dict[str, ast.Call]) -> list[str] | None:
    """The widget names one schema input contributes: [] for a socket, None when it cannot be read."""
    if isinstance(call.func, ast.Name) and call.func.id in helpers:  # a module-level helper returning an input
        return _input_widget(helpers[call.func.id], helpers)
    if not (isinstance(call.func, ast.Attribute) and call.func.attr == "Input"):
        return None
    kind = call.func.value
    kind_name = kind.attr if isinstance(kind, ast.Attribute) else kind.id if isinstance(kind, ast.Name) else ""
    name = _const(call.args[0]) if call.args else None
    if kind_name not in WIDGET_TYPES:
        return []
    if not isinstance(name, str):
        return None
    names = [name]
    for kw in call.keywords:
        if kw.arg == "control_after_generate" and _const(kw.value):
            names.append("control_after_generate")
    return names


def schema_widgets(folder: Path) -> dict[str, list[str] | None]:
    """node_id -> widget names, read from every ``io.Schema(node_id=..., inputs=[...])`` in ``folder/*.py``."""
    found: dict[str, list[str] | None] = {}
    trees = [ast.parse(path.read_text(encoding="utf-8")) for path in sorted(folder.glob("*.py"))]
    helpers: dict[str, ast.Call] = {}  # module-level functions that return one input (shared between modules)
    for tree in trees:
        for fn in tree.body:
            if isinstance(fn, ast.FunctionDef):
                rets = [n.value for n in ast.walk(fn) if isinstance(n, ast.Return) and isinstance(n.value, ast.Call)]
                if len(rets) == 1:
                    helpers[fn.name] = rets[0]
    for tree in trees:
        for call in ast.walk(tree):
            if not (isinstance(call, ast.Call) and getattr(call.func, "attr", getattr(call.func, "id", None))
                    == "Schema"):
                continue
            kw = {k.arg: k.value for k in call.keywords}
            node_id = _const(kw["node_id"]) if "node_id" in kw else None
            if not isinstance(node_id, str):
                continue
            inputs = kw.get("inputs")
            names: list[str] | None = [] if inputs is None or isinstance(inputs, ast.List) else None
            for item in inputs.elts if isinstance(inputs, ast.List) else []:
                got = _input_widget(item, helpers) if isinstance(item, ast.Call) else None
                if got is None:
                    names = None
                    break
                names += got
            found[node_id] = names
    return found


def display_names(folder: Path) -> dict[str, str]:
    """node_id -> display_name from the node schemas (the title ComfyUI shows)."""
    out: dict[str, str] = {}
    for path in sorted(folder.glob("*.py")):
        for call in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(call, ast.Call):
                kw = {k.arg: _const(k.value) for k in call.keywords if k.arg in ("node_id", "display_name")}
                if isinstance(kw.get("node_id"), str) and isinstance(kw.get("display_name"), str):
                    out[kw["node_id"]] = kw["display_name"]
    return out


STOCK_TITLES = {"CheckpointLoaderSimple": "Load Checkpoint", "CLIPTextEncode": "CLIP Text Encode (Prompt)",
                "EmptyLatentImage": "Empty Latent Image", "VAEDecode": "VAE Decode", "SaveImage": "Save Image",
                "PreviewImage": "Preview Image", "LoraLoader": "Load LoRA", "KSampler": "KSampler",
                "LoraModelLoader": "Load LoRA Model", "LossGraphNode": "Plot Loss Graph",
                "PreviewAny": "Preview Any"}


def _value_text(v, limit: int) -> str:
    if isinstance(v, bool):
        s = "true" if v else "false"
    elif isinstance(v, float):
        s = f"{v:g}"
    else:
        s = str(v)
    first = s.split("\n", 1)[0]
    if first != s:
        first += " ..."
    return first if len(first) <= limit else first[: limit - 3] + "..."


def workflow(path: Path, out: Path, nodes: Path = REPO / "nodes") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch, PathPatch
    from matplotlib.path import Path as MPath

    wf = json.loads(path.read_text(encoding="utf-8"))
    widgets = {**STOCK_WIDGETS, **schema_widgets(nodes)}
    titles = {**STOCK_TITLES, **display_names(nodes)}
    title_h, slot_h, widget_h, margin = 30.0, 20.0, 22.0, 6.0

    boxes: dict[int, dict] = {}
    for node in wf["nodes"]:
        x, y = (float(c) for c in node["pos"])
        w, h = (float(c) for c in node.get("size", (320, 200)))
        ins, outs = node.get("inputs", []), node.get("outputs", [])
        # inputs shown as widgets in a newer UI save carry a "widget" entry: those are widgets, not sockets
        sockets = [i for i in ins if "widget" not in i]
        values = list(node.get("widgets_values") or [])
        names = widgets.get(node["type"])
        if names is None or len(names) != len(values):
            names = [i["widget"]["name"] for i in ins if "widget" in i] or None
        if names is not None and len(names) != len(values):
            names = None
        rows = max(len(sockets), len(outs))
        need = margin + rows * slot_h + len(values) * widget_h + margin
        boxes[node["id"]] = {"node": node, "x": x, "y": y, "w": w, "h": max(h, need), "sockets": sockets,
                             "outs": outs, "values": values, "names": names}

    x_min = min(b["x"] for b in boxes.values()) - 30
    x_max = max(b["x"] + b["w"] for b in boxes.values()) + 30
    y_min = min(b["y"] - title_h for b in boxes.values()) - 30
    y_max = max(b["y"] + b["h"] for b in boxes.values()) + 30
    dpi, px = 100, 1.0  # one workflow unit = one pixel, as in ComfyUI at zoom 1
    fig = plt.figure(figsize=((x_max - x_min) * px / dpi, (y_max - y_min) * px / dpi), dpi=dpi)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(x_min, x_max)
    ax.set_ylim(y_max, y_min)  # screen coordinates: y grows downwards
    ax.set_axis_off()
    fig.patch.set_facecolor("#202020")
    for gx in range(int(x_min) // 50 * 50, int(x_max) + 50, 50):  # the editor's background grid
        ax.plot([gx, gx], [y_min, y_max], color="#262626", lw=0.8, zorder=0)
    for gy in range(int(y_min) // 50 * 50, int(y_max) + 50, 50):
        ax.plot([x_min, x_max], [gy, gy], color="#262626", lw=0.8, zorder=0)
    fs = 8.5

    def slot_pos(b: dict, i: int, output: bool) -> tuple[float, float]:
        return (b["x"] + b["w"] if output else b["x"]), b["y"] + margin + slot_h * i + slot_h / 2

    for b in boxes.values():
        node, x, y, w, h = b["node"], b["x"], b["y"], b["w"], b["h"]
        ax.add_patch(FancyBboxPatch((x, y - title_h), w, h + title_h, boxstyle="round,pad=0,rounding_size=8",
                                    fc="#353535", ec="#111111", lw=1.2, zorder=2))
        ax.add_patch(FancyBboxPatch((x, y - title_h), w, title_h, boxstyle="round,pad=0,rounding_size=8",
                                    fc="#222222", ec="#111111", lw=1.2, zorder=3))
        ax.add_patch(plt.Circle((x + 14, y - title_h / 2), 5, color="#888888", zorder=4))
        title = node.get("title") or titles.get(node["type"], node["type"])
        ax.text(x + 26, y - title_h / 2, title, color="#dddddd", fontsize=fs + 1.5, va="center", zorder=4,
                fontweight="bold")
        for i, s in enumerate(b["sockets"]):
            sx, sy = slot_pos(b, i, False)
            ax.add_patch(plt.Circle((sx + 10, sy), 4.5, color=TYPE_COLOURS.get(s.get("type"), DEFAULT_COLOUR),
                                    zorder=5))
            ax.text(sx + 20, sy, s["name"], color="#bbbbbb", fontsize=fs, va="center", zorder=5)
        for i, s in enumerate(b["outs"]):
            sx, sy = slot_pos(b, i, True)
            ax.add_patch(plt.Circle((sx - 10, sy), 4.5, color=TYPE_COLOURS.get(s.get("type"), DEFAULT_COLOUR),
                                    zorder=5))
            ax.text(sx - 20, sy, s["name"], color="#bbbbbb", fontsize=fs, va="center", ha="right", zorder=5)
        wy = y + margin + max(len(b["sockets"]), len(b["outs"])) * slot_h
        chars = int((w - 40) / 6.8)  # characters that fit on a widget row at this font size
        for i, v in enumerate(b["values"]):
            ry = wy + i * widget_h
            ax.add_patch(FancyBboxPatch((x + 10, ry + 2), w - 20, widget_h - 5,
                                        boxstyle="round,pad=0,rounding_size=8", fc="#222222", ec="#555555",
                                        lw=0.6, zorder=4))
            cy = ry + widget_h / 2
            name = b["names"][i] if b["names"] else ""
            value = _value_text(v, max(6, chars - len(name) - 2))
            if name:
                ax.text(x + 20, cy, name, color="#999999", fontsize=fs, va="center", zorder=5)
                ax.text(x + w - 20, cy, value, color="#dddddd", fontsize=fs, va="center", ha="right", zorder=5)
            else:
                ax.text(x + 20, cy, value, color="#dddddd", fontsize=fs, va="center", zorder=5)

    for link in wf.get("links", []):
        _, src, src_slot, dst, dst_slot, typ = link[:6]
        if src not in boxes or dst not in boxes:
            continue
        a = slot_pos(boxes[src], src_slot, True)
        b = boxes[dst]
        # the link's target slot index counts every input; map it to the drawn sockets
        target = b["node"]["inputs"][dst_slot] if dst_slot < len(b["node"]["inputs"]) else None
        idx = b["sockets"].index(target) if target in b["sockets"] else dst_slot
        c = slot_pos(b, idx, False)
        a, c = (a[0] - 10, a[1]), (c[0] + 10, c[1])
        dx = max(40.0, abs(c[0] - a[0]) * 0.5)
        verts = [a, (a[0] + dx, a[1]), (c[0] - dx, c[1]), c]
        curve = MPath(verts, [MPath.MOVETO, MPath.CURVE4, MPath.CURVE4, MPath.CURVE4])
        ax.add_patch(PathPatch(curve, fc="none", ec=TYPE_COLOURS.get(typ, DEFAULT_COLOUR), lw=2.2, alpha=0.9,
                               zorder=1))  # behind the nodes, as in the editor
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi, facecolor=fig.get_facecolor())
    plt.close(fig)
    _shrink_png(out)
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KB) from {path}")


def _shrink_png(path: Path) -> None:
    """Re-save with a 256-colour palette (the diagram has few colours; the file shrinks several times)."""
    from PIL import Image

    with Image.open(path) as im:
        small = im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    small.save(path, format="PNG", optimize=True)


def icon(out: Path) -> None:
    """The registry icon (400 x 400): a concept's outline struck through."""
    from PIL import Image, ImageDraw

    size, back = 400, (34, 36, 44, 255)
    img = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    d = ImageDraw.Draw(img)
    d.rounded_rectangle([8, 8, size - 8, size - 8], radius=60, fill=back)
    d.ellipse([90, 90, 310, 310], outline=(120, 170, 255, 255), width=22)
    d.line([(70, 330), (330, 70)], fill=back, width=70)
    d.line([(70, 330), (330, 70)], fill=(255, 120, 110, 255), width=22)
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out, optimize=True)
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=textwrap.dedent(__doc__.split("\n\n", 1)[0]))
    sub = p.add_subparsers(dest="cmd", required=True)
    ba = sub.add_parser("before-after", help="original vs ANT-erased 'circle' on the concept lab, same seeds")
    ba.add_argument("out", type=Path, help="the PNG to write")
    ba.add_argument("--lora", type=Path, help="an erasure of 'circle' already made (e.g. by python -m erasure demo)")
    ba.add_argument("--save-lora", type=Path, help="without --lora: also save the trained erasure here")
    wf = sub.add_parser("workflow", help="a diagram of a ComfyUI UI-format workflow file")
    wf.add_argument("workflow", type=Path, help="the workflow .json")
    wf.add_argument("out", type=Path, help="the PNG to write")
    wf.add_argument("--nodes", type=Path, default=REPO / "nodes", help="the node sources whose schemas name the "
                    "widgets (default: this checkout's nodes/)")
    ic = sub.add_parser("icon", help="the registry icon (pyproject.toml [tool.comfy] Icon)")
    ic.add_argument("out", type=Path, help="the PNG to write")
    args = p.parse_args(argv)
    if args.cmd == "before-after":
        before_after(args.out, args.lora, args.save_lora)
    elif args.cmd == "icon":
        icon(args.out)
    else:
        workflow(args.workflow, args.out, args.nodes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
