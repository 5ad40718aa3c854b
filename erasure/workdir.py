"""A resumable work directory for long many-concept runs (MACE over hundreds of concepts).

Layout::

    DIR/manifest.json              what the run is: method, settings, base model fingerprint, concepts, prior sketch
    DIR/concept-00017.safetensors  one finished concept: its weights (the LoRA), the prompt embeddings the fusion
                                   adds for it, and small facts (losses, probe) as metadata; with a content hash

Every file is written atomically (``files.py``), so a process killed at any moment leaves either a finished concept
or none; a damaged concept file (content hash wrong) counts as unfinished and is redone. A directory is tied to its
manifest: opening it with other settings, another base model, another prior or another concept list is refused
(``BadInputError``), because the finished concepts were trained for those. With several processes
(``distributed.py``) rank 0 writes the manifest and each rank writes the files of the concepts it owns (one file per
concept: no two ranks write the same file); the directory must be one that every rank sees (on several machines, a
shared filesystem). Core module: it stores tensors and facts and knows nothing of the method.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from . import distributed
from .errors import BadInputError
from .files import CACHE_HASH_KEY, atomic_write_text, content_hash, read_safetensors, save_cache
from .weights import Delta, ErasureWeights

MANIFEST = "manifest.json"
FORMAT = 1
_INFO_KEY = "erasure.workdir.info"
_TEXT_KEY = "erasure.workdir.concept"


def tensor_hash(t: torch.Tensor | None) -> str | None:
    """A short content hash of a tensor for a manifest (``None`` stays ``None``)."""
    return None if t is None else content_hash({"t": t})[:16]


#: how far two sketches of a matrix may differ (relative to their largest entry) and still be the same matrix: float
#: sums in another order (another thread count, another machine) move a Gram's sketch by about 1e-6
SKETCH_TOLERANCE = 1e-4


def matrix_sketch(t: torch.Tensor | None) -> dict[str, Any] | None:
    """What a manifest keeps of a large square float matrix (MACE's prior Gram) so that the same matrix computed
    again with float sums in another order is recognised: its content hash and ``v^T M v`` for 8 fixed random directions
    (``same_matrix`` compares them within ``SKETCH_TOLERANCE``)."""
    if t is None:
        return None
    m = t.detach().double().cpu()
    v = torch.randn(m.shape[1], 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    v = v / v.norm(dim=0)
    return {"hash": tensor_hash(t), "sketch": [float(x) for x in (v * (m @ v)).sum(0)]}


def same_matrix(old: Any, new: Any) -> bool:
    """Whether two ``matrix_sketch`` entries describe the same matrix (a manifest written before sketches holds the
    bare hash: then the hashes must agree)."""
    if old == new:
        return True
    new_hash = new.get("hash") if isinstance(new, dict) else new
    if not isinstance(old, dict) or not isinstance(new, dict):
        return (old.get("hash") if isinstance(old, dict) else old) == new_hash
    a, b = old.get("sketch") or [], new.get("sketch") or []
    scale = max([abs(x) for x in a + b] or [0.0])
    return len(a) == len(b) > 0 and all(abs(x - y) <= SKETCH_TOLERANCE * scale for x, y in zip(a, b, strict=True))


def _same_manifest(old: dict[str, Any], new: dict[str, Any]) -> bool:
    others = (set(old) | set(new)) - {"prior"}
    return all(old.get(k) == new.get(k) for k in others) and same_matrix(old.get("prior"), new.get("prior"))


def _describe_change(old: dict[str, Any], new: dict[str, Any]) -> str:
    parts = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b or (key == "prior" and same_matrix(a, b)):
            continue
        if key == "settings" and isinstance(a, dict) and isinstance(b, dict):
            parts += [f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif key == "concepts" and isinstance(a, list) and isinstance(b, list):
            first = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
            parts.append(f"the concept list ({len(a)} -> {len(b)} concepts; first difference at concept {first + 1})")
        elif key == "prior":
            parts.append("the prior (another preservation prompt set, text encoder or prior file)")
        elif key == "base_model":
            parts.append(f"the base model (fingerprint {a} -> {b})")
        else:
            parts.append(f"{key} {a!r} -> {b!r}" if len(repr(a)) + len(repr(b)) < 80 else key)
    return "; ".join(parts)


class WorkDir:
    """A work directory opened for one run (``open``); ``load`` / ``save`` a concept's files by its index."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = path
        self.manifest = manifest
        self.names = [str(c.get("text", c)) if isinstance(c, dict) else str(c) for c in manifest.get("concepts", [])]

    @classmethod
    def open(cls, path: str | Path, manifest: dict[str, Any]) -> WorkDir:
        """Create ``path`` with ``manifest``, or reopen it when its manifest is the same. A different manifest is a
        ``BadInputError`` that names what changed. Every rank checks the existing manifest before rank 0 writes a
        new one, so that all ranks refuse alike (none is left waiting)."""
        path = Path(path)
        manifest = {"format": FORMAT, **json.loads(json.dumps(manifest))}  # JSON types, as read back
        if path.exists() and not path.is_dir():
            raise BadInputError(f"work directory {path} is a file: give a directory (--work-dir)")
        file = path / MANIFEST
        if file.is_file():
            try:
                old = json.loads(file.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise BadInputError(f"work directory {path}: its {MANIFEST} cannot be read ({e}): delete the "
                                    "directory or give another one") from None
            if not _same_manifest(old, manifest):
                raise BadInputError(f"work directory {path} belongs to another run: {_describe_change(old, manifest)}."
                                    " Rerun with the settings, model, prior and concepts it was made with to resume "
                                    "it, or give a new --work-dir (or delete this one) to start afresh")
        elif path.is_dir() and any(path.glob("concept-*.safetensors")):
            raise BadInputError(f"work directory {path} holds concept files but no {MANIFEST}: give a new "
                                "--work-dir or delete this one")
        distributed.barrier()  # every rank has read the old manifest
        if distributed.is_main() and not file.is_file():
            atomic_write_text(file, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        distributed.barrier()
        return cls(path, manifest)

    def file(self, index: int) -> Path:
        return self.path / f"concept-{index:05d}.safetensors"

    def finished(self) -> list[int]:
        """Indices with a concept file (not checked; ``load`` checks)."""
        return sorted(i for i in range(len(self.names)) if self.file(i).is_file())

    def save(self, index: int, weights: ErasureWeights, embeddings: torch.Tensor | None,
             info: dict[str, Any]) -> None:
        """Write concept ``index``'s weights, the prompt embeddings the fusion adds for it (``None``: the fusion
        encodes them again) and ``info`` (JSON-able facts) atomically."""
        tensors: dict[str, torch.Tensor] = {}
        scales: dict[str, float] = {}
        for name, dl in weights.deltas.items():
            for part in ("dense", "up", "down"):
                t = getattr(dl, part)
                if t is not None:
                    tensors[f"delta/{name}/{part}"] = t.detach().cpu().contiguous()
            scales[name] = dl.scale
        if embeddings is not None:
            tensors["embeddings"] = embeddings.detach().cpu().contiguous()
        meta = {_TEXT_KEY: self.names[index],
                _INFO_KEY: json.dumps({"info": info, "scales": scales, "metadata": weights.metadata})}
        save_cache(tensors, self.file(index), meta)

    def load(self, index: int) -> tuple[ErasureWeights, torch.Tensor | None, dict[str, Any]] | None:
        """Concept ``index``'s ``(weights, embeddings, info)``, or ``None`` when it is not finished (no file, or a
        damaged one: it is redone)."""
        file = self.file(index)
        if not file.is_file():
            return None
        try:
            tensors, meta = read_safetensors(file)
        except ValueError:
            return None
        if meta.get(CACHE_HASH_KEY) != content_hash(tensors) or meta.get(_TEXT_KEY) != self.names[index]:
            return None
        stored = json.loads(meta[_INFO_KEY])
        deltas: dict[str, Delta] = {}
        for name, scale in stored["scales"].items():
            parts = {p: tensors.get(f"delta/{name}/{p}") for p in ("dense", "up", "down")}
            deltas[name] = Delta(dense=parts["dense"], up=parts["up"], down=parts["down"], scale=scale)
        return ErasureWeights(deltas, dict(stored["metadata"])), tensors.get("embeddings"), stored["info"]
