"""ComfyUI entry point of the Concept Erasure node pack.

ComfyUI imports this folder as a package named after the folder (users clone it under any name), so everything
below is imported relatively. The nodes live in ``nodes/`` (the only code that imports ComfyUI); the algorithms live
in the host-independent ``erasure/`` library. Outside ComfyUI (``pip install -e .``, pytest) this file is not
imported as a package and registers nothing.
"""

from __future__ import annotations


async def comfy_entrypoint():
    from .nodes.extension import ErasureExtension

    return ErasureExtension()
