"""The memory feature inheritance holds (asdm/inheritance.py): the bytes of stored features are
counted exactly per mode and said in each run's log line, they are freed when a run ends or
fails, and features_on = offload keeps them in system memory. Graphs that set reuse / forecast /
features_on through the executor give exactly what the node gives called directly. (The
figures per mode at SD1.5 and SDXL sizes: docs/memory.md, from scripts/feature_memory.py.)"""
import gc
import logging
import os
import re
import weakref

import pytest
import torch

from conftest import holder_of, ksample
from asdm import compat
from asdm import topology
from asdm.harness.host import Runner

SIZE = 16   # latent side: the tiny UNet's levels are 16, 8, 4, 2 tokens wide


def patch(N, model, units, period, reuse="residual", forecast=False, features_on="compute"):
    return compat.call_node(N["ASDMFeatureInheritance"], model=model, preset="custom", units=units, period=period,
                            final_full_steps=0.0, reuse=reuse, forecast=forecast, features_on=features_on)[0]


def output_bytes(model, paths, batch=2):
    """path -> bytes of that module's output in one UNet call of ``batch`` latents (cond + uncond),
    and the outputs themselves' (shape, dtype)."""
    unet = model.model.diffusion_model
    got = {}
    handles = [unet.get_submodule(p).register_forward_hook(
        lambda m, i, o, p=p: got.__setitem__(p, (o.numel() * o.element_size(), tuple(o.shape), o.dtype)))
        for p in paths]
    g = torch.Generator().manual_seed(0)
    try:
        with torch.no_grad():
            unet(torch.randn(batch, 4, SIZE, SIZE, generator=g), timesteps=torch.full((batch,), 500.0),
                 context=torch.randn(batch, 77, 64, generator=g))
    finally:
        for h in handles:
            h.remove()
    return got


SETS = {n: ", ".join(topology.PRESETS[n][0](4)) for n in ("LI1", "EX3", "CO3")}   # on SD1.5's 4 levels


@pytest.mark.parametrize("reuse,units,features_on", [("residual", "LI1", "compute"), ("output", "EX3", "compute"),
                                                    ("output", "CO3", "compute"), ("residual", "LI1", "offload")])
def test_stored_bytes_are_the_stored_outputs_exactly(N, tiny, conds, reuse, units, features_on, caplog):
    """Residual reuse stores each unit's residual branch (its output's shape), span-output reuse
    each boundary module's output, both for the whole CFG batch; forecast keeps two full steps'
    worth. The count is exact (bytes), the log line says it, and a step whose cond and uncond
    run in separate calls holds the same."""
    unet = tiny.model.diffusion_model
    chosen = topology.parse_unit_spec(SETS[units], topology.describe(unet))
    if reuse == "residual":
        stored_paths, skipped = [u.path for u in chosen], []
    else:
        skipped, stored_paths = topology.span_plan(unet, chosen)
    out = output_bytes(tiny, list(stored_paths) + list(skipped))
    want = sum(out[p][0] for p in stored_paths)
    # output mode: one zero tensor per distinct (shape, dtype) of the skipped modules' outputs
    fillers = sum(next(b for b, s, d in out.values() if (s, d) == key)
                  for key in {(out[p][1], out[p][2]) for p in skipped})
    caplog.set_level(logging.INFO, logger="A-SDM")
    for forecast, steps, factor in ((False, 4, 1), (True, 4, 2)):   # period 2: full steps 0, 2 store
        p = patch(N, tiny, SETS[units], 2, reuse, forecast, features_on)
        ksample(p, conds, steps=steps, size=SIZE)
        gc.collect()
        run = holder_of(p).last_run
        assert (run.peak_bytes, run.peak_filler_bytes) == (factor * want, fillers)
        assert run.stored_bytes == 0 and run.features == {}
        where = " on the offload device (cpu)" if features_on == "offload" else ""
        line = f"stored features peaked at {factor * want / 2**20:.1f} MiB{where}"
        assert any(line in r.getMessage() for r in caplog.records if "(custom P2" in r.getMessage())
        caplog.clear()
    split = patch(N, tiny, SETS[units], 2, reuse, False, features_on)
    split.add_object_patch("memory_required", lambda *a, **k: 1e30)   # one call per chunk
    ksample(split, conds, steps=4, size=SIZE)
    gc.collect()
    run = holder_of(split).last_run
    assert len(run.calls) == 8 and run.peak_bytes == want


def _weakrefs(run, into):
    for levels in run.features.values():
        for lv in levels:
            into += [weakref.ref(t) for t in (lv["whole"][1], *lv["chunks"].values(), *lv["sources"].values())]
    into += [weakref.ref(t) for t in run.fillers.values()]


@pytest.mark.parametrize("features_on", ["compute", "offload"])
@pytest.mark.parametrize("reuse,forecast", [("residual", False), ("output", True)])
@pytest.mark.parametrize("ends", ["normally", "by an error"])
def test_stored_features_are_freed_when_the_run_ends(N, tiny, conds, reuse, forecast, features_on, ends):
    import comfy.model_management as mm
    import comfy.sample
    p = patch(N, tiny, SETS["EX3"], 3, reuse, forecast, features_on)
    h = holder_of(p)
    refs = []

    def callback(step, *_):
        _weakrefs(h.run, refs)
        if step == 4 and ends == "by an error":
            raise RuntimeError("interrupted")

    pos, neg = conds
    noise = torch.randn(1, 4, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    if ends == "normally":
        comfy.sample.sample(p, noise, 8, 5.0, "euler", "normal", pos, neg, torch.zeros_like(noise), callback=callback, seed=0)
    else:
        with pytest.raises(RuntimeError, match="interrupted"):
            comfy.sample.sample(p, noise, 8, 5.0, "euler", "normal", pos, neg, torch.zeros_like(noise), callback=callback, seed=0)
    # the run held features on the chosen device while it ran
    assert refs and all(r() is None or r().device == (mm.unet_offload_device() if features_on == "offload"
                                                       else torch.device("cpu")) for r in refs)
    gc.collect()
    assert h.run is None and h.last_run.features == {} and h.last_run.peak_bytes > 0
    assert [r for r in refs if r() is not None] == []


# ---------------------------------------------------------------------------------------------
# Graphs that set reuse / forecast / features_on, through the executor
# ---------------------------------------------------------------------------------------------

def prompt(prefix, **inheritance):
    return {
        "1": {"class_type": "ASDMLoadEmbeddedModel", "inputs": {}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle on the left", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}},
        "5": {"class_type": "ASDMFeatureInheritance", "inputs": dict({"model": ["1", 0], "preset": "EX3", "units": "",
                                                                      "period": 2, "final_full_steps": 0.0}, **inheritance)},
        "6": {"class_type": "KSampler", "inputs": {"model": ["5", 0], "seed": 0, "steps": 6, "cfg": 4.0, "sampler_name": "euler",
                                                   "scheduler": "normal", "positive": ["2", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0], "denoise": 1.0}},
        "7": {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": prefix}},
    }


def read_latent(prefix):
    import folder_paths
    import safetensors.torch
    d = folder_paths.get_output_directory()
    files = sorted(f for f in os.listdir(d) if re.fullmatch(re.escape(prefix) + r"_\d{5}_\.latent", f))
    return safetensors.torch.load_file(os.path.join(d, files[-1]))["latent_tensor"]


def test_graphs_that_set_reuse_forecast_and_features_on(N):
    """A graph saved before these inputs existed (none given) samples exactly as residual reuse
    without forecast; output reuse with forecast, on either device, exactly as the node called
    directly with those settings."""
    import nodes
    runner = Runner()
    variants = {"old": {}, "residual": dict(reuse="residual", forecast=False, features_on="compute"),
                "output": dict(reuse="output", forecast=True),
                "output-offload": dict(reuse="output", forecast=True, features_on="offload")}
    for name, inputs in variants.items():
        runner.run(prompt(f"mem_{name}", **inputs))
    got = {name: read_latent(f"mem_{name}") for name in variants}
    assert torch.equal(got["old"], got["residual"])
    assert torch.equal(got["output"], got["output-offload"])
    assert not torch.equal(got["old"], got["output"])
    # the same settings, the nodes called directly
    model, clip, _ = compat.call_node(N["ASDMLoadEmbeddedModel"])
    pos = nodes.CLIPTextEncode().encode(clip, "a red circle on the left")[0]
    neg = nodes.CLIPTextEncode().encode(clip, "")[0]
    p = compat.call_node(N["ASDMFeatureInheritance"], model=model, preset="EX3", units="", period=2,
                         final_full_steps=0.0, reuse="output", forecast=True)[0]
    direct = nodes.KSampler().sample(p, 0, 6, 4.0, "euler", "normal", pos, neg,
                                     {"samples": torch.zeros(2, 4, 8, 8)})[0]["samples"]
    assert torch.equal(direct, got["output"])
    assert [m for _, m in holder_of(p).last_run.calls] == ["store", "inherit"] * 3


@pytest.mark.parametrize("reuse", ["residual", "output"])
def test_offloaded_features_sample_exactly_as_kept_ones(N, tiny, conds, reuse):
    """The values are the same wherever they are kept: moving them is a copy, not a change (with
    forecast: the forecast of two offloaded full steps; without it, test_inheritance.py)."""
    forecast = True
    kept = ksample(patch(N, tiny, SETS["EX3"], 3, reuse, forecast, "compute"), conds, steps=8, size=SIZE)
    p = patch(N, tiny, SETS["EX3"], 3, reuse, forecast, "offload")
    assert torch.equal(ksample(p, conds, steps=8, size=SIZE), kept)
    assert "".join("I" if m == "inherit" else "F" for _, m in holder_of(p).last_run.calls) == "FIIFIIFI"


def test_the_docs_count_on_the_meta_device_equals_a_real_run(N, tiny, conds):
    """scripts/feature_memory.py counts on the meta device (shapes only) what a real run
    counts: the same bytes, in every mode."""
    import importlib.util
    from asdm.harness import models as tm
    from asdm.harness.host import REPO_ROOT
    spec = importlib.util.spec_from_file_location("feature_memory", os.path.join(REPO_ROOT, "scripts", "feature_memory.py"))
    fm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fm)
    meta = fm.meta_model(tm.TINY_UNET, torch.float32)
    for reuse, forecast in fm.MODES:
        p = patch(N, tiny, SETS["EX3"], 2, reuse, forecast)
        ksample(p, conds, steps=fm.STEPS, size=SIZE)
        gc.collect()
        real = holder_of(p).last_run
        assert real.peak_bytes > 0
        got = fm.stored_bytes(meta, SIZE, 1, "custom", SETS["EX3"], reuse, forecast, dtype=torch.float32)
        assert got == (real.peak_bytes, real.peak_filler_bytes), (reuse, forecast)
