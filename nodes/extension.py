"""The pack's ComfyExtension: the list of nodes ComfyUI registers."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .audit_nodes import NODES as AUDIT_NODES
from .erasure_nodes import NODES
from .legacy_nodes import NODES as LEGACY_NODES
from .settings_nodes import NODES as SETTINGS_NODES


class ErasureExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [*NODES, *SETTINGS_NODES, *AUDIT_NODES, *LEGACY_NODES]
