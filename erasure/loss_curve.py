"""A training run's loss history: kept (binned to at most ``CURVE_POINTS`` values) in the result's metadata, so that
a cached result or a file still shows it, and drawn as a PNG (the command line writes one beside each LoRA; the
nodes hand the history to ComfyUI's "Plot Loss Graph" as a ``LOSS_MAP``)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from .files import atomic_write_png

CURVE_KEY = "erasure.loss_curve"  # metadata key: JSON {"loss": [...], "steps": N, "segments": [[label, start], ...]}
CURVE_POINTS = 256


def binned(losses: Sequence[float], points: int = CURVE_POINTS) -> list[float]:
    """At most ``points`` values: the means of equal runs of consecutive steps (the curve's shape, 4 digits)."""
    n = len(losses)
    if n <= points:
        return [float(f"{v:.4g}") for v in losses]
    edges = [round(i * n / points) for i in range(points + 1)]
    return [float(f"{sum(losses[a:b]) / (b - a):.4g}") for a, b in zip(edges, edges[1:], strict=False) if b > a]


def curve_metadata(losses: Sequence[float], segments: Sequence[tuple[str, int]] = ()) -> dict[str, str]:
    """The metadata entry for a run's losses; ``segments`` are (label, first step) of each concept's part."""
    return {CURVE_KEY: json.dumps({"loss": binned(losses), "steps": len(losses),
                                   "segments": [[label, int(start)] for label, start in segments]})}


def joined_curve(parts: Sequence[tuple[str, Sequence[float]]]) -> dict[str, str]:
    """The metadata entry for several concepts trained one after another: their losses end to end, a segment each."""
    losses: list[float] = []
    segments = []
    for label, part in parts:
        segments.append((label, len(losses)))
        losses.extend(part)
    return curve_metadata(losses, segments if len(parts) > 1 else ())


def curve_from_metadata(meta: dict[str, str] | None) -> dict | None:
    """The stored curve, or None when the metadata holds none (a LoRA from elsewhere)."""
    raw = (meta or {}).get(CURVE_KEY)
    if not raw:
        return None
    try:
        curve = json.loads(raw)
    except ValueError:
        return None
    return curve if isinstance(curve, dict) and isinstance(curve.get("loss"), list) else None


def draw(losses: Sequence[float], title: str, segments: Sequence[tuple[str, int]] = (), steps: int | None = None,
         size: tuple[int, int] = (800, 420)):
    """The loss against the training step, with its range on the axis and a line where each concept's part starts.
    ``steps`` is the number of steps the values stand for when they are binned."""
    from PIL import Image, ImageDraw

    w, h = size
    left, right, top, bottom = 70, 20, 36, 40
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    d.text((left, 10), title, fill="black")
    d.rectangle([left, top, w - right, h - bottom], outline="black")
    vals = [v for v in losses if math.isfinite(v)]
    steps = steps or len(losses)
    if not vals:
        d.text((left + 10, top + 10), "no finite loss values", fill="black")
        return img
    lo, hi = min(vals), max(vals)
    if hi - lo < 1e-12 * max(1.0, abs(hi)):
        lo, hi = lo - 0.5 * max(abs(lo), 1e-6), hi + 0.5 * max(abs(hi), 1e-6)
    pw, ph = w - left - right, h - top - bottom
    n = max(len(losses) - 1, 1)

    def xy(i: float, v: float) -> tuple[float, float]:
        return left + pw * i / n, top + ph * (1 - (v - lo) / (hi - lo))

    for label, start in segments:
        if 0 < start < steps:
            x = left + pw * start / steps
            d.line([(x, top), (x, h - bottom)], fill=(200, 200, 200))
        d.text((left + pw * start / max(steps, 1) + 3, top + 3), str(label)[:24], fill=(90, 90, 90))
    pts = [xy(i, v) for i, v in enumerate(losses) if math.isfinite(v)]
    if len(pts) == 1:
        d.ellipse([pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2], fill=(30, 90, 200))
    else:
        d.line(pts, fill=(30, 90, 200), width=2)
    d.text((4, top - 4), f"{hi:.4g}", fill="black")
    d.text((4, h - bottom - 8), f"{lo:.4g}", fill="black")
    d.text((left, h - bottom + 6), "0", fill="black")
    d.text((w - right - 60, h - bottom + 6), f"step {steps}", fill="black")
    d.text((left + pw // 2 - 40, h - bottom + 20), "training step", fill="black")
    return img


def write_png(path: str | Path, losses: Sequence[float], title: str, segments: Sequence[tuple[str, int]] = (),
              steps: int | None = None) -> Path:
    """Draw the curve and write it atomically."""
    path = Path(path)
    atomic_write_png(path, draw(losses, title, segments, steps))
    return path


def png_beside(lora_path: str | Path) -> Path:
    """Where the command line writes a LoRA's loss curve: ``NAME.loss.png`` next to ``NAME.safetensors``."""
    p = Path(lora_path)
    return p.with_name(p.name.removesuffix(".safetensors") + ".loss.png")
