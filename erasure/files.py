"""Safe file I/O: atomic writes, safetensors-only reads with clear errors, and caches that check themselves.

Why this module exists: a crash, Ctrl-C or ComfyUI's Cancel in the middle of a write must never leave a truncated
LoRA, cache or report behind (everything is written to a temporary file in the target folder, flushed to disk, then
renamed over the target in one step); a damaged download or a pickle renamed to ``.safetensors`` must give a message
that says what to do, not a deserialiser traceback; and a cache is trusted only when its content hash and tensor
shapes check out, otherwise it is rebuilt.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def cache_dir() -> Path:
    """Where caches live (evaluation images, prior Gram matrices): ``$ERASURE_CACHE``, else ``~/.cache/erasure``."""
    return Path(os.environ.get("ERASURE_CACHE", Path.home() / ".cache" / "erasure"))


#: metadata key of a cache file's content hash (see :func:`save_cache`)
CACHE_HASH_KEY = "erasure.cache.sha256"


def _replace_atomically(write, path: Path) -> None:
    """``write(tmp)`` into a temporary file beside ``path``, flush it to disk, rename it over ``path``. On any error
    (KeyboardInterrupt included) the temporary file is removed and ``path`` is left as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        # mkstemp creates 0600 files; keep an existing file's mode, else the usual 0644
        os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode) if path.exists() else 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors ``save_file`` to a temporary file in the target folder, then rename: a crash never leaves a
    truncated file, and an existing file stays intact until the new one is complete."""
    _replace_atomically(lambda tmp: save_file(tensors, tmp, metadata=metadata), Path(path))


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file (reports, JSON) atomically, like :func:`atomic_save`."""
    _replace_atomically(lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), Path(path))


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a ``.safetensors`` file. Only safetensors are read (never pickles); a missing,
    damaged or mislabelled file raises ``ValueError`` with what to do. Metadata comes back as untrusted text."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path.name}: only .safetensors files are read (never pickles)")
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        with safe_open(str(path), "pt") as f:
            meta = {str(k): str(v) for k, v in (f.metadata() or {}).items()}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # SafetensorError, OSError, header errors: all mean the same to the user
        why = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise ValueError(f"{path.name} is not a valid safetensors file ({why}): it is damaged, or another format "
                         "renamed to .safetensors; download or save it again") from None
    return tensors, meta


def content_hash(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of the tensors (in name order)."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_cache(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """An atomic safetensors cache file that carries its own content hash (checked by :func:`load_cache`)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = dict(metadata or {})
    meta[CACHE_HASH_KEY] = content_hash(tensors)
    atomic_save(tensors, Path(path), meta)


def load_cache(path: Path, shapes: dict[str, tuple[int | None, ...]] | None = None) -> dict[str, torch.Tensor] | None:
    """A cache written by :func:`save_cache`, or ``None`` when it is missing, unreadable, stale or corrupt: no
    content hash, a hash that does not match, or a tensor whose shape differs from ``shapes`` (``None`` entries
    match any size). The caller rebuilds it."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        tensors, meta = read_safetensors(path)
    except ValueError:
        return None
    if meta.get(CACHE_HASH_KEY) != content_hash(tensors):
        return None
    for k, want in (shapes or {}).items():
        t = tensors.get(k)
        if t is None or t.dim() != len(want) or any(w is not None and w != s for w, s in zip(want, t.shape,
                                                                                             strict=True)):
            return None
    return tensors


def atomic_write_png(path: str | Path, image: Any) -> None:
    """Save a PIL image as PNG atomically (temporary file in the target folder, then rename), like
    ``atomic_write_text``: a crash or Cancel never leaves a truncated picture."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
