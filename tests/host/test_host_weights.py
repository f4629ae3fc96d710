"""Weights as the host applies them, and the step as the host hands it.

A GPU that cannot hold the whole UNet makes ComfyUI load it partially: the layers that do not fit
keep their stored (unpatched) weights, and a LoRA on them is applied as each layer casts its
weight (``comfy.ops.cast_bias_weight``). Every node that returns a MODEL must then sample exactly
what the same MODEL samples fully loaded: bit for bit, since both paths run the same patch
arithmetic (``comfy.lora.calculate_weight``) on the same fp32 weights. The partial load is the
host's own (``LoadedModel.model_load`` with a small budget, what ``load_models_gpu`` gives on a
small GPU); a CPU never gets one by itself, so the budget is forced here.

The sampler step comes from what the host hands each call (the sigma against the schedule);
the sampler loop's frames only refine schedule points, so a UNet call on another thread than
the sampler's keeps its step.
"""
import contextlib
import os
import threading

import pytest
import torch

from conftest import ksample, model_folder, unload_all
from asdm import assembly, autocache, compat, condconv, hooks
from asdm.harness import models as tm

BUDGET = 64 * 1024   # bytes: a few small layers load, the rest stay partially loaded


@contextlib.contextmanager
def partially_loaded():
    """Every model the host loads while the block runs is loaded partially (its low-VRAM path)."""
    import comfy.model_management as mm
    load = mm.LoadedModel.model_load
    seen = []

    def model_load(self, lowvram_model_memory=0, force_patch_weights=False):
        out = load(self, BUDGET, force_patch_weights=force_patch_weights)
        seen.append(self.model.model.model_lowvram)
        return out

    unload_all()
    mm.LoadedModel.model_load = model_load
    try:
        yield seen
    finally:
        mm.LoadedModel.model_load = load
        unload_all()


def lora(model, scale=0.02, seed=1, strength=1.0):
    """A LoRA-like weight patch on every weight of the UNet (a clone; ComfyUI's own patch path)."""
    m = model.clone()
    g = torch.Generator().manual_seed(seed)
    patches = {}
    for k, p in m.model.diffusion_model.named_parameters():
        if k.endswith(".weight") and p.ndim >= 2:
            patches["diffusion_model." + k] = (scale * torch.randn(p.shape, generator=g),)
    m.add_patches(patches, strength)
    return m


def both_ways(model, conds, **kw):
    unload_all()
    full = ksample(model, conds, **kw)
    with partially_loaded() as seen:
        part = ksample(model, conds, **kw)
    assert seen and all(seen), "the model was not loaded partially: the test would prove nothing"
    return full, part


def node(N, name, **inputs):
    return compat.call_node(N[name], **inputs)[0]


MODEL_NODES = {
    "ASDMAutoCache": lambda N, m: node(N, "ASDMAutoCache", model=m, speed=2.0, start_percent=0.0,
                                       end_percent=1.0, calibration="off"),
    "ASDMFeatureInheritance2": lambda N, m: node(N, "ASDMFeatureInheritance2", model=m, preset="EX2", period=2,
                                                 units="", reuse="output", forecast=False,
                                                 final_full_fraction=0.0, features_on="compute"),
    "ASDMFeatureInheritance": lambda N, m: node(N, "ASDMFeatureInheritance", model=m, preset="CO6", units="",
                                                period=2, final_full_steps=0.0, reuse="residual",
                                                forecast=False, features_on="compute"),
    "ASDMMECondConv": lambda N, m: node(N, "ASDMMECondConv", model=m, weights="none", units=condconv.DEFAULT_UNITS,
                                        experts=2, init="paper", seed=0),
    "ASDMGRIAttention": lambda N, m: node(N, "ASDMGRIAttention", model=m, units="auto", window=2, pool=2,
                                          start=0.0, end=1.0),
    "ASDMUNetSwitch": lambda N, m: node(N, "ASDMUNetSwitch", unit="steps", model_1=lora(assembly.compress(m, "base"), seed=3),
                                        start_1=0.0, end_1=3.0, model_2=m, start_2=3.0, end_2=-1.0),
}


@pytest.mark.parametrize("name", sorted(MODEL_NODES))
def test_a_partially_loaded_lora_model_samples_as_fully_loaded(N, tiny, conds, name):
    """The node's MODEL with a LoRA under it (and, for the patch nodes, over it), loaded partially
    and fully: the same samples, bit for bit, and the LoRA acts."""
    under = MODEL_NODES[name](N, lora(tiny))
    over = lora(MODEL_NODES[name](N, tiny), seed=2)
    for m in (under, over):
        full, part = both_ways(m, conds, steps=6)
        assert torch.equal(full, part), name
    assert not torch.equal(ksample(under, conds, steps=6), ksample(MODEL_NODES[name](N, tiny), conds, steps=6))


def test_loaders_and_assembly_take_a_lora_partially_loaded(N, tmp_path, conds768):
    """Load Compressed UNet gives a MODEL a LoRA acts on alike either way; Assemble reads its sources' weights as they apply them (a LoRA'd source partially loaded
    gives the UNet the same source fully loaded gives)."""
    sd = tm.sd_model(tm.TINY_SD1, seed=0)
    base = assembly.compress(sd, "base")
    assembly.save_unet(base, str(tmp_path / "base.safetensors"))
    with model_folder(compat.unet_folder(), tmp_path):
        loaded = node(N, "ASDMLoadCompressedUNet", unet_name="base.safetensors", prediction="auto", zsnr=False)
    full, part = both_ways(lora(loaded), conds768, steps=4)
    assert torch.equal(full, part)
    # Assemble refuses weight-patched sources (it builds a new UNet), so its sources are plain here:
    # partially loaded, they give the UNet they give fully loaded.
    unload_all()
    want = assembly.assemble(sd, base, "M2").model.diffusion_model.state_dict()
    with partially_loaded():
        for m in (sd, base):
            m.patch_model(lowvram_model_memory=BUDGET)
        got = assembly.assemble(sd, base, "M2").model.diffusion_model.state_dict()
        for m in (sd, base):
            m.unpatch_model()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_the_embedded_model_takes_a_lora_partially_loaded(N):
    import nodes
    model, clip, _ = compat.call_node(N["ASDMLoadEmbeddedModel"])
    pos = nodes.CLIPTextEncode().encode(clip, "a red circle")[0]
    neg = nodes.CLIPTextEncode().encode(clip, "")[0]
    m = lora(model)
    size = 8   # the embedded model's 64 px
    full, part = both_ways(m, (pos, neg), steps=4, size=size)
    assert torch.equal(full, part)
    assert not torch.equal(full, ksample(model, (pos, neg), steps=4, size=size))


def test_save_unet_writes_the_patched_weights_of_a_partially_loaded_model(N, tiny, tmp_path):
    import comfy.model_management as mm
    import safetensors.torch
    m = lora(tiny)
    unload_all()
    mm.load_models_gpu([m])
    want = {k: v.clone() for k, v in m.model.diffusion_model.state_dict().items()}   # fully loaded: patched
    unload_all()
    with partially_loaded():
        m.patch_model(lowvram_model_memory=BUDGET)   # a partial load already in place, as a GPU leaves it
        assert m.model.model_lowvram
        assembly.save_unet(m, str(tmp_path / "u.safetensors"))
        m.unpatch_model()
    got = safetensors.torch.load_file(str(tmp_path / "u.safetensors"))
    assert all(torch.equal(got[k], want[k]) for k in want)
    bare = tiny.model.diffusion_model.state_dict()
    patched = [k[len("diffusion_model."):] for k in m.patches]
    assert patched and all(not torch.equal(got[k], bare[k]) for k in patched)   # the LoRA is in the file


def test_a_lora_change_recalibrates_auto_cache(N, tiny, conds, tmp_path, monkeypatch):
    """The profile key holds the sampled MODEL's weight patches: a LoRA added, re-weighted or
    removed gives another key (a calibration run), the same LoRA loaded again the same key, and
    one MODEL has one key whether the host loaded it fully or partially."""
    monkeypatch.setattr(compat, "user_directory", lambda: str(tmp_path))
    m = node(N, "ASDMAutoCache", model=tiny, speed=2.0, start_percent=0.0, end_percent=1.0, calibration="auto")
    holder = hooks.holder_of(m, autocache.AutoCacheHolder)

    def key(model, partial=False):
        before = len(os.listdir(autocache.profile_folder())) if os.path.isdir(autocache.profile_folder()) else 0
        with (partially_loaded() if partial else contextlib.nullcontext()):
            ksample(model, conds, steps=6)
        return holder.last_run.key["weights"], len(os.listdir(autocache.profile_folder())) > before   # calibrated

    plain, calibrated = key(m)
    assert calibrated
    assert key(m) == (plain, False)                      # the profile is used
    with_lora = lora(m)
    k1, calibrated = key(with_lora)
    assert k1 != plain and calibrated                    # a LoRA: recalibrates
    assert key(with_lora, partial=True) == (k1, False)   # partially loaded: the same key
    assert key(lora(m))[0] == k1                         # the same LoRA again: the same key
    assert key(lora(m, strength=0.5))[0] not in (plain, k1)   # the LoRA at another strength
    unload_all()


# -- the step from what the host hands every call ----------------------------------------------------


def _steps(run):
    steps = sorted({s for s, _ in run.calls})
    return steps, {s: {m for s2, m in run.calls if s2 == s} for s in steps}


# Samplers that evaluate the model more than once per step (or, dpm_fast, on steps of their own)
MULTI_CALL = {"heun", "heunpp2", "dpm_2", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp",
              "dpmpp_sde", "dpmpp_sde_gpu", "seeds_2", "seeds_3", "exp_heun_2_x0", "exp_heun_2_x0_sde",
              "sa_solver_pece", "dpm_fast"}


def test_the_sigma_alone_gives_the_step_of_one_call_samplers(N, tiny, conds, monkeypatch):
    """Where no sampler loop is found, the step comes from the evaluation's sigma against the
    schedule: every call gets the loop's step for every one-call sampler of the host; the
    multi-call samplers need the loop (heun's end point at least)."""
    import comfy.samplers
    from conftest import holder_of
    from test_inheritance import patch

    def calls(name):
        p = patch(N, tiny, "LI1", period=2)
        ksample(p, conds, sampler=name, steps=8, size=8)
        return holder_of(p).last_run.calls

    names = [n for n in comfy.samplers.KSampler.SAMPLERS if n != "dpm_adaptive"]
    refined = {n: calls(n) for n in names}
    monkeypatch.setattr(compat, "_sampler_loop", lambda: None)
    differ = {n for n in names if calls(n) != refined[n]}
    assert differ <= MULTI_CALL, differ
    assert "heun" in differ


def test_unet_calls_on_another_thread_keep_their_step(N, tiny, conds):
    """A wrapper that runs each UNet call on a worker thread (as per-device clones do) gives the
    same samples and the same step of every call, for a two-call sampler too."""
    from conftest import holder_of
    from test_inheritance import patch
    from concurrent.futures import ThreadPoolExecutor
    pool = ThreadPoolExecutor(1)
    threads = set()

    def elsewhere(apply_model, args):
        def run():
            threads.add(threading.get_ident())
            return apply_model(args["input"], args["timestep"], **args["c"])
        return pool.submit(run).result()

    for sampler in ("euler", "heun", "dpm_2"):
        p = patch(N, tiny, "LI1", period=2)
        here = ksample(p, conds, sampler=sampler, steps=6)
        calls = list(holder_of(p).last_run.calls)
        q = p.clone()
        q.set_model_unet_function_wrapper(elsewhere)
        there = ksample(q, conds, sampler=sampler, steps=6)
        assert torch.equal(here, there) and holder_of(q).last_run.calls == calls, sampler
    assert threading.get_ident() not in threads and threads
    pool.shutdown()


def test_a_model_the_host_rebuilt_after_patching_is_refused_with_the_fix(N, tiny, conds):
    """Newer hosts rebuild a MODEL's model object for multi-GPU work units and for torch.compile
    on dynamic VRAM, copying object patches by name; the patches still call the original
    modules, so such a run stops with what to change instead of computing wrongly. (Rebuilt here
    as those hosts do it: a clone whose model is a new object.)"""
    import copy
    own = tm.sd_model(seed=0)   # its own model: the clones below share the host's per-model state with it
    unload_all()

    def rebuild(m):
        out = m.clone()
        out.model = copy.deepcopy(m.model)
        out.object_patches_backup = {}   # the rebuilt model's own (clones share the dict)
        return out

    p = MODEL_NODES["ASDMFeatureInheritance2"](N, own)
    with pytest.raises(ValueError, match="rebuilt this MODEL"):
        ksample(rebuild(p), conds, steps=4)
    unload_all()
    assert torch.equal(ksample(rebuild(own), conds, steps=4), ksample(own, conds, steps=4))   # no A-SDM patch
    unload_all()
