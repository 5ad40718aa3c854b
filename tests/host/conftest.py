"""Host tests: the pack inside a real ComfyUI, run in-process (ComfyUI as a library, no server).

They need ComfyUI's source (``COMFYUI_PATH``, default ``~/ComfyUI``) and an interpreter that can run it (torchvision
and ComfyUI's requirements: ``~/comfy-venv``, see docs/development.md#host-tests). When either is missing every host
test is skipped and the run says so loudly in its summary.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
COMFY = Path(os.environ.get("COMFYUI_PATH", "~/ComfyUI")).expanduser()


def _why_unavailable() -> str | None:
    if not (COMFY / "comfy").is_dir() or not (COMFY / "nodes.py").is_file():
        return f"no ComfyUI at {COMFY} (set COMFYUI_PATH)"
    try:
        import torchvision  # noqa: F401
        import yaml  # noqa: F401
    except ImportError:
        return (f"this interpreter ({sys.executable}) cannot run ComfyUI: use the ComfyUI venv, e.g. "
                "~/comfy-venv/bin/python -m pytest tests/host")
    return None


REASON = _why_unavailable()


def pytest_collection_modifyitems(config, items):
    if REASON:
        mark = pytest.mark.skip(reason=f"HOST TESTS SKIPPED: {REASON}")
        for item in items:
            if "tests/host" in str(item.fspath).replace("\\", "/"):
                item.add_marker(mark)


def pytest_terminal_summary(terminalreporter):
    if REASON:
        terminalreporter.write_sep("!", f"HOST TESTS SKIPPED: {REASON}", red=True, bold=True)


class StubServer:
    """What ComfyUI's executor needs from its server; records every event."""

    def __init__(self) -> None:
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.events: list[tuple[str, object]] = []

    def send_sync(self, event, data, sid=None) -> None:
        self.events.append((event, data))

    def queue_updated(self) -> None:
        pass


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    """ComfyUI imported in-process with this pack loaded; model folders in a temporary directory."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if str(COMFY) not in sys.path:
        sys.path.insert(0, str(COMFY))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import folder_paths
    import utils.extra_config  # noqa: F401  (ComfyUI's nodes.py expects these imported first)
    import utils.install_util  # noqa: F401

    root = tmp_path_factory.mktemp("comfy-models")
    for kind in ("checkpoints", "loras"):
        (root / kind).mkdir()
        folder_paths.add_model_folder_path(kind, str(root / kind), is_default=True)
    folder_paths.set_output_directory(str(root / "output"))
    folder_paths.set_temp_directory(str(root / "temp"))
    import nodes

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    assert asyncio.run(nodes.load_custom_node(str(REPO))), "the pack failed to load"
    return {"root": root, "nodes": nodes, "folder_paths": folder_paths}


@pytest.fixture(scope="session")
def tiny_ckpt(comfy):
    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_checkpoint import build_tiny_sd15

    return build_tiny_sd15(comfy["root"] / "checkpoints" / "tiny-sd15.safetensors").name


@pytest.fixture(scope="session")
def loaded(comfy, tiny_ckpt):
    """(MODEL, CLIP, VAE) of the tiny checkpoint, loaded as a prompt would (inside inference mode)."""
    import torch

    with torch.inference_mode():
        return comfy["nodes"].CheckpointLoaderSimple().load_checkpoint(tiny_ckpt)


def _install_progress_hook(server: StubServer) -> None:
    """What ComfyUI's main.py installs (``hijack_progress``): ProgressBar updates become "progress" events."""
    import comfy.model_management
    import comfy.utils
    from comfy_execution.progress import get_progress_state
    from comfy_execution.utils import get_executing_context

    def hook(value, total, preview_image, prompt_id=None, node_id=None):
        ctx = get_executing_context()
        prompt_id = prompt_id or (ctx.prompt_id if ctx else None)
        node_id = node_id or (ctx.node_id if ctx else None)
        comfy.model_management.throw_exception_if_processing_interrupted()
        get_progress_state().update_progress(node_id, value, total, preview_image)
        server.send_sync("progress", {"value": value, "max": total, "prompt_id": prompt_id, "node": node_id})

    comfy.utils.set_progress_bar_global_hook(hook)


def run_prompt(prompt: dict, server: StubServer | None = None):
    """Validate and execute an API-format prompt in ComfyUI's real executor."""
    import execution

    server = server or StubServer()
    _install_progress_hook(server)
    valid = asyncio.run(execution.validate_prompt("test", prompt, None))
    assert valid[0], f"prompt invalid: {valid[1]} {valid[3]}"
    ex = execution.PromptExecutor(server, cache_type=execution.CacheType.CLASSIC, cache_args={"lru": 0, "ram": 0})
    ex.execute(prompt, "test", {"client_id": None}, valid[2])
    return ex, server
