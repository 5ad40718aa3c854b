"""ComfyUI entry point of the Concept Erasure node pack.

ComfyUI imports this folder as a package named after the folder. The nodes live in ``nodes/`` (the only code that
imports ComfyUI); the algorithms live in the host-independent ``erasure/`` library. The node pack is not built yet
(issue #5): until then this module registers nothing, and the library is used from Python or ``python -m erasure``.
"""
