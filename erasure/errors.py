"""The library's errors: one hierarchy that the command line and the nodes catch.

Every error an erasure raises on purpose is an :class:`ErasureError`, and also the built-in error it specialises
(``ValueError`` for bad input, ``torch.OutOfMemoryError`` for out of memory), so that code written against the
built-in types keeps working and hosts that unload models on out of memory still do.
"""

from __future__ import annotations

import torch


class ErasureError(Exception):
    """Base of every error the library raises on purpose; its message names the fix."""


class BadInputError(ErasureError, ValueError):
    """An input (concept, setting, file, LoRA) that cannot be used as given; refused before any work starts."""


class UnsupportedModelError(BadInputError):
    """The folder, file or MODEL is not a model this library can edit (only SD1.x, SD2.x and SDXL UNets are)."""


class TrainingDivergedError(ErasureError, FloatingPointError):
    """A loss or a weight became NaN/inf during training; nothing is returned."""


class ErasureOutOfMemoryError(ErasureError, torch.OutOfMemoryError):
    """Out of memory during an erasure; the message says which settings to lower."""
