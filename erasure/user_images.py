"""User-supplied images and masks for MACE's stage 1, read from a folder (``python -m erasure mace --image-dir``).

Layout, one sub-folder per concept, named exactly as the concept (letter case ignored)::

    DIR/<concept>/NAME.png          an image of the concept (.png, .jpg, .jpeg or .webp)
    DIR/<concept>/NAME.mask.png     optional: where the concept is, white = concept, black = not (any of the same
                                    formats; grey is thresholded at 50%). No mask: the whole image (as for styles).

Images are centre-cropped to a square and resized to the model's resolution, then encoded with the model's VAE (the
mean of its latent distribution, times its scaling factor); pixel-space models (the lab) use the pixels themselves.
Masks go through the same crop and are reduced to the latent grid by area averaging, then thresholded. Concepts
without a folder get MACE's generated images as usual; a folder that matches no concept is an error (likely a typo).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import BadInputError
from .progress import Progress, as_progress

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
MASK_TAG = ".mask"


def _image_files(folder: Path) -> tuple[dict[str, Path], dict[str, Path]]:
    """``(images, masks)`` by stem, with a clear error for anything ambiguous."""
    images: dict[str, Path] = {}
    masks: dict[str, Path] = {}
    for f in sorted(folder.iterdir()):
        if f.name.startswith(".") or not f.is_file() or f.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        stem = f.name[: -len(f.suffix)]
        is_mask = stem.lower().endswith(MASK_TAG)
        key = stem[: -len(MASK_TAG)] if is_mask else stem
        target = masks if is_mask else images
        if key in target:
            raise BadInputError(f"{folder}: two {'masks' if is_mask else 'images'} named {key!r} "
                                 f"({target[key].name}, {f.name}); keep one")
        target[key] = f
    orphans = sorted(set(masks) - set(images))
    if orphans:
        raise BadInputError(f"{masks[orphans[0]]} has no image beside it (expected {orphans[0]}.png or .jpg); a mask "
                             f"is named after its image: NAME.png + NAME{MASK_TAG}.png")
    if not images:
        raise BadInputError(f"{folder} has no images ({', '.join(IMAGE_SUFFIXES)}); put the concept's images there, "
                             f"each with an optional NAME{MASK_TAG}.png mask")
    return images, masks


def find_user_images(root: str | Path, concepts: list[str]) -> dict[str, list[tuple[Path, Path | None]]]:
    """``{concept: [(image, mask or None), ...]}`` for the concepts that have a folder under ``root``."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise BadInputError(f"--image-dir {root} is not a folder; it should hold one folder per concept "
                             f"(DIR/<concept>/NAME.png, optional DIR/<concept>/NAME{MASK_TAG}.png)")
    by_name = {c.strip().lower(): c for c in concepts}
    out: dict[str, list[tuple[Path, Path | None]]] = {}
    loose = [f.name for f in root.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]
    if loose:
        raise BadInputError(f"--image-dir {root} holds images directly ({loose[0]}, ...); put them in a folder named "
                             f"after their concept: {root}/<concept>/NAME.png")
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        concept = by_name.get(d.name.strip().lower())
        if concept is None:
            raise BadInputError(f"{d} matches no concept of --concepts ({', '.join(concepts)}); name each folder "
                                 "exactly as its concept, or remove it")
        images, masks = _image_files(d)
        out[concept] = [(images[k], masks.get(k)) for k in sorted(images)]
    if not out:
        raise BadInputError(f"--image-dir {root} has no concept folders; expected {root}/<concept>/NAME.png for one of "
                             f"{', '.join(concepts)}")
    return out


def _square(img):
    """Centre crop to the largest square."""
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return img.crop((left, top, left + s, top + s))


def _open(path: Path, mode: str):
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            return ImageOps.exif_transpose(im).convert(mode)
    except Exception as e:  # PIL raises many types for unreadable files
        raise BadInputError(f"could not read {path} as an image ({e})") from e


def load_pair(image: Path, mask: Path | None, resolution: int, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pixels [3, R, R] in [-1, 1], mask [grid, grid] in {0, 1})`` for one image and its optional mask."""
    import numpy as np
    from PIL import Image

    img = _open(image, "RGB")
    x = _square(img).resize((resolution, resolution), Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.asarray(x, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1
    if mask is None:
        return pixels, torch.ones(grid, grid)
    m = _open(mask, "L")
    if m.size != img.size:
        raise BadInputError(f"{mask} is {m.size[0]}x{m.size[1]} but its image {image.name} is "
                             f"{img.size[0]}x{img.size[1]}; a mask must have its image's size")
    small = _square(m).resize((grid, grid), Image.Resampling.BOX)  # area average over each latent cell
    return pixels, (torch.from_numpy(np.asarray(small, dtype=np.float32).copy()) >= 127.5).float()


@torch.no_grad()
def encode_images(backbone, pixels: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
    """Clean latents ``[N, C, h, w]`` of images ``[N, 3, R, R]`` in [-1, 1]: the VAE's mean latent times its scaling
    factor (deterministic), or the pixels themselves for a pixel-space model."""
    if getattr(backbone, "latent_only", False):
        raise BadInputError("--image-dir needs the model's VAE to encode the images, and this model has none in the "
                             "standard layout; use a checkpoint with its VAE, or a diffusers folder with vae/")
    vae = getattr(backbone, "vae", None)
    if vae is None:
        return pixels.to(backbone.dtype)
    out = []
    for i in range(0, len(pixels), batch_size):
        x = pixels[i : i + batch_size].to(vae.device, vae.dtype)
        out.append(vae.encode(x).latent_dist.mean.float().cpu() * vae.config.scaling_factor)
    return torch.cat(out)


def load_user_data(backbone, root: str | Path, concepts: list[str],
                   progress: Progress | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{concept: (latents [N, C, h, w], masks [N, h, w])}`` for MACE's ``user_data``, at the model's default
    resolution (the resolution MACE trains and captures attention at)."""
    found = find_user_images(root, concepts)
    channels, h, w = backbone.latent_shape()
    resolution = h * backbone.vae_scale
    out = {}
    for concept, pairs in found.items():
        loaded = [load_pair(img, mask, resolution, h) for img, mask in pairs]
        masks = torch.stack([m for _, m in loaded])
        if not masks.any():
            raise BadInputError(f"every mask of {concept!r} is black, so nothing would be erased; white marks the "
                                 f"concept (or remove the masks to use whole images)")
        latents = encode_images(backbone, torch.stack([p for p, _ in loaded]))
        if latents.shape[1:] != (channels, h, w) and getattr(backbone, "vae", None) is None:
            raise BadInputError(f"the model has {channels}-channel latents but no VAE to encode images into them; give "
                                 "a model with its VAE (a diffusers folder with vae/, or a checkpoint that has one)")
        if latents.shape[1:] != (channels, h, w):
            raise BadInputError(f"images of {concept!r} encode to {tuple(latents.shape[1:])}, but the model expects "
                                 f"latents {(channels, h, w)}")
        n_masks = sum(m is not None for _, m in pairs)
        as_progress(progress).say(f"{concept!r}: {len(pairs)} images from {pairs[0][0].parent} ({n_masks} with "
                                  f"masks), {resolution} px")
        out[concept] = (latents, masks)
    return out
