"""Shared fixtures for the three tiers of tests, each marked with its tier (``pytest -m unit``):

* ``tests/unit`` (``unit``): the engine's own logic (schedules, grammars, metrics, the dataset,
  file formats, the import rules) as plain Python, ``import asdm.<module>``; no ComfyUI starts.
* ``tests/host`` (``host``): the pack loaded by a real ComfyUI (``COMFYUI_PATH``; scripts/test.sh
  runs the suite once per host) through its own custom-node loader: nodes, samplers, the
  executor. Tests import engine modules by name: the harness makes them the modules the loaded
  pack's nodes use.
* ``tests/e2e`` (``e2e``): whole programs: the web UI in a browser, the trainer command under
  torchrun, the main job.

The host starts when pytest collects ``tests/host`` or ``tests/e2e``, never for the unit tier.
"""
import contextlib
import gc
import os
import subprocess
import sys

import pytest
import safetensors.torch
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from asdm import assembly, hooks  # noqa: E402
from asdm.harness import host  # noqa: E402
from asdm.harness import models as tm  # noqa: E402
from asdm.inheritance import InheritanceHolder  # noqa: E402

TIERS = ("unit", "host", "e2e")


def pytest_collectstart(collector):
    """The host starts when the host or end-to-end tier is collected (its tests import the
    project-made models and fixtures that need it), never for the unit tier alone."""
    parts = getattr(collector, "path", None) and collector.path.parts
    if parts and any(t in parts for t in TIERS[1:]):
        host.boot()


def pytest_collection_modifyitems(config, items):
    """Each test is marked with its tier, the folder it lives in."""
    for item in items:
        tier = os.path.basename(os.path.dirname(str(item.path)))
        if tier in TIERS:
            item.add_marker(getattr(pytest.mark, tier))


@pytest.fixture(scope="session")
def N():
    host.boot()   # first: ComfyUI's own ``nodes`` module comes with the host
    import nodes
    return nodes.NODE_CLASS_MAPPINGS


@pytest.fixture(scope="session")
def tiny():
    return tm.sd_model(seed=0)


@pytest.fixture(scope="session")
def conds():
    return tm.conditioning(64, 1), tm.conditioning(64, 2)


@pytest.fixture(scope="session")
def sd_and_base():
    """A tiny SD1.x (context 768) and a BK-SDM Base made from it whose weights then differ (a
    "distilled" Base): the pair the assembly and switch tests combine."""
    sd = tm.sd_model(tm.TINY_SD1, seed=0)
    base = assembly.compress(sd, "base")
    tm.fill_(base.model.diffusion_model, seed=5)
    return sd, base


@pytest.fixture(scope="session")
def conds768():
    return tm.conditioning(768, 1), tm.conditioning(768, 2)


@pytest.fixture(scope="session")
def sd2_tiny():
    """A tiny SD2.x-family UNet (context 1024, linear projections): another family."""
    return tm.sd_model(dict(tm.TINY_SD1, context_dim=1024, use_linear_in_transformer=True), seed=1)


def ksample(model, conds, sampler="euler", steps=10, size=16, batch=1, cfg=5.0, scheduler="normal"):
    """The stock KSampler node's own code path."""
    import nodes
    pos, neg = conds
    lat = {"samples": torch.zeros(batch, 4, size, size)}
    return nodes.KSampler().sample(model, 0, steps, cfg, sampler, scheduler, pos, neg, lat)[0]["samples"]


def holder_of(model):
    return hooks.holder_of(model, InheritanceHolder)


def unload_all():
    import comfy.model_management as mm
    mm.unload_all_models()
    gc.collect()


@contextlib.contextmanager
def model_folder(kind: str, path):
    """``path`` searched first for ``kind`` models (ComfyUI's folder_paths) while the block runs;
    the registration is undone afterwards so no test sees another's files."""
    import folder_paths
    old = folder_paths.folder_names_and_paths.get(kind)
    paths, exts = old if old is not None else ([], {".safetensors"})
    folder_paths.folder_names_and_paths[kind] = ([str(path)] + list(paths), set(exts))
    cache = getattr(folder_paths, "filename_list_cache", None)
    if cache is not None:
        cache.pop(kind, None)
    try:
        yield str(path)
    finally:
        if old is None:
            folder_paths.folder_names_and_paths.pop(kind, None)
        else:
            folder_paths.folder_names_and_paths[kind] = old
        if cache is not None:
            cache.pop(kind, None)


@pytest.fixture(scope="module")
def trainer_files(tmp_path_factory):
    """A tiny SD1 teacher and random pre-encoded data for the trainer."""
    d = tmp_path_factory.mktemp("train")
    teacher = tm.sd_model(tm.TINY_SD1, seed=0)
    assembly.save_unet(teacher, str(d / "teacher.safetensors"))
    g = torch.Generator().manual_seed(0)
    safetensors.torch.save_file({"latents": torch.randn(8, 4, 8, 8, generator=g),
                                 "context": torch.randn(8, 77, 768, generator=g)}, str(d / "data.safetensors"))
    return d


def trainer_config(d, out, student='kind = "compress"\nlayout = "base"', data=None, **over):
    lines = {"out": f'"{out}"', "steps": 6, "batch": 2, "save_every": 3, "log_every": 1, "lr": 1e-3, "seed": 1}
    lines.update(over)
    text = "\n".join(f"{k} = {v}" for k, v in lines.items())
    text += f'\n[teacher]\nunet = "{d / "teacher.safetensors"}"\n'
    text += "[data]\n" + (data or f'latents = "{d / "data.safetensors"}"') + "\n"
    text += "[student]\n" + student + "\n"
    p = d / f"{os.path.basename(str(out))}.toml"
    p.write_text(text)
    return str(p)


def run_cli(args, timeout=300):
    env = dict(os.environ, PYTHONPATH=host.REPO_ROOT)
    return subprocess.run([sys.executable, *args], cwd=host.REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
