"""The pack's ComfyExtension: the list of nodes ComfyUI registers."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .audit_nodes import NODES as AUDIT_NODES
from .erasure_nodes import NODES


class ErasureExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [*NODES, *AUDIT_NODES]
