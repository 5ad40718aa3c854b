"""The Mass Erase node's own training images: a LATENT batch, MASKs, and which concept each image shows.

Pure torch (no ComfyUI import), so the rules are easy to read and to test. The node VAE-encodes nothing itself:
images arrive as a LATENT from ComfyUI's stock VAE Encode, the way ComfyUI's own trainer takes its images, so the
VAE (tiled or not) is the user's choice and the erasure node needs no VAE socket.

Rules (what the node's tooltips say):

- masks: white (1) where the concept is, as ComfyUI's MASK from Load Image's mask editor; one per image, or a single
  mask for every image; at the images' pixel size (or already at the latents' size). Without a MASK input, a mask
  set on the LATENT (Set Latent Noise Mask) is used; without either, whole images.
- concepts: ``image_concepts`` gives the concept number (1 = first line) of each image, e.g. ``1,1,2``; concepts
  without images are generated as usual. Left empty, the images are split evenly in concept order (image count a
  multiple of the concept count).
"""

from __future__ import annotations

import re

import torch
from torch.nn import functional as F

#: the SD VAEs' pixel-to-latent factor (ComfyUI's VAE Encode crops the image to a multiple of it, centred)
VAE_FACTOR = 8


def image_concept_indices(spec: str, n_images: int, n_concepts: int) -> list[int]:
    """The 0-based concept of each image, from ``image_concepts`` (1-based numbers) or the even split rule."""
    if not (spec or "").strip():
        if n_images % n_concepts:
            raise ValueError(f"{n_images} images for {n_concepts} concepts: without image_concepts the images are "
                             f"split evenly in concept order, so give a multiple of {n_concepts} images, or write "
                             "the concept number of each image in image_concepts (e.g. '1,1,2')")
        per = n_images // n_concepts
        return [i // per for i in range(n_images)]
    parts = [p for p in re.split(r"[,;\s]+", spec.strip()) if p]
    try:
        numbers = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"image_concepts {spec!r}: write one concept number per image (1 = the first concept), "
                         "comma-separated, e.g. '1,1,2'") from None
    if len(numbers) != n_images:
        raise ValueError(f"image_concepts lists {len(numbers)} numbers for {n_images} images: give one concept "
                         "number per image")
    bad = [k for k in numbers if not 1 <= k <= n_concepts]
    if bad:
        raise ValueError(f"image_concepts has {bad[0]}, but there are {n_concepts} concepts: numbers go from 1 to "
                         f"{n_concepts} (1 = the first concept line)")
    return [k - 1 for k in numbers]


def latent_masks(masks: torch.Tensor | None, n_images: int, latent_hw: tuple[int, int]) -> torch.Tensor:
    """Masks at the latents' size ``[N, h, w]`` in [0, 1] (area average of the pixels), checked against the images.

    ``None`` means whole images. Pixel-size masks are cropped like VAE Encode crops its images first.
    """
    h, w = latent_hw
    if masks is None:
        return torch.ones(n_images, h, w)
    m = masks.detach().float().cpu()
    if m.dim() == 2:
        m = m[None]
    elif m.dim() == 4 and m.shape[1] == 1:  # a LATENT's noise_mask is [B, 1, H, W]
        m = m[:, 0]
    if m.dim() != 3:
        raise ValueError(f"the masks have shape {tuple(masks.shape)}: expected a MASK batch [B, H, W]")
    if m.shape[0] not in (1, n_images):
        raise ValueError(f"{m.shape[0]} masks for {n_images} images: give one mask per image, or a single mask for "
                         "all of them")
    mh, mw = m.shape[1:]
    if (mh, mw) != (h, w):
        if (mh // VAE_FACTOR, mw // VAE_FACTOR) != (h, w):
            raise ValueError(f"the masks are {mw}x{mh} pixels but the images are {w * VAE_FACTOR}x{h * VAE_FACTOR} "
                             f"(latents {w}x{h}): give masks of the images' size (Load Image gives a 64x64 empty "
                             "mask for an image without alpha)")
        top, left = (mh % VAE_FACTOR) // 2, (mw % VAE_FACTOR) // 2
        m = m[:, top : top + h * VAE_FACTOR, left : left + w * VAE_FACTOR]
        m = F.interpolate(m[:, None], size=(h, w), mode="area")[:, 0]
    m = m.clamp(0, 1).expand(n_images, h, w).clone()
    empty = [i + 1 for i in range(n_images) if float(m[i].max()) <= 0]
    if empty:
        raise ValueError(f"mask {empty[0]} is empty (all zero), so its image would teach nothing: paint the "
                         "concept's region white in the mask editor (Load Image gives an empty mask for an image "
                         "without alpha), or leave masks unconnected to use whole images")
    return m


def user_training_data(concepts: list[str], samples: torch.Tensor | None, masks: torch.Tensor | None,
                       image_concepts: str, channels: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{concept: (latents [n, C, h, w], masks [n, h, w])}`` for the concepts that have images (empty: none).

    ``samples`` must already be in the model's latent space (ComfyUI's ``latent_format.process_in``).
    """
    if samples is None:
        if masks is not None:
            raise ValueError("masks are connected but no images: connect the images as latents (VAE Encode) too")
        if (image_concepts or "").strip():
            raise ValueError("image_concepts is set but no images are connected: connect latents or clear it")
        return {}
    if samples.dim() != 4:
        raise ValueError(f"the latents have shape {tuple(samples.shape)}: expected an image batch [B, C, h, w] "
                         "(video latents are not supported)")
    if samples.shape[1] != channels:
        raise ValueError(f"the latents have {samples.shape[1]} channels, this model's have {channels}: encode the "
                         "images with this checkpoint's VAE")
    n = samples.shape[0]
    which = image_concept_indices(image_concepts, n, len(concepts))
    m = latent_masks(masks, n, (samples.shape[2], samples.shape[3]))
    out = {}
    for k, name in enumerate(concepts):
        idx = [i for i, c in enumerate(which) if c == k]
        if idx:
            out[name] = (samples[idx].detach().float().cpu().clone(), m[idx])
    return out
