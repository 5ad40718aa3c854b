"""Concept erasure for text-to-image diffusion models (ANT, MACE), host-independent.

The ComfyUI node pack in ``nodes/`` is a thin layer over this package; this package never imports ComfyUI.
"""

__version__ = "0.1.0"
