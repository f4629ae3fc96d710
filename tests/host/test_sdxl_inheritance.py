"""Feature inheritance and the DeepCache baseline on an SDXL-topology UNet (the host's SDXL
config, narrow): the exactness the SD1.5 path has (test_inheritance.py, test_inheritance_modes.py,
test_stacking.py), on three levels with no attention at level 0 and SDXL's y embedding."""
import gc

import pytest
import torch

from conftest import holder_of, ksample, unload_all
from asdm import compat
from asdm.evaluation import deepcache
from asdm.harness import models as tm

MODES = [("residual", False), ("output", True)]   # the paper's, and a new node's default
MODE_IDS = ["residual", "output-forecast"]
modes = pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
PRESET = "EX2"   # on SDXL: dn1, dn2, mid, up0, up1 (the deep part, 93 % of its work at 1024 px)
REL_TOL = 1e-4   # batched against split calls: float summation order only (see test_inheritance.py)


@pytest.fixture(scope="module")
def sdxl():
    return tm.sd_model(tm.TINY_SDXL["sdxl"], seed=0)


@pytest.fixture(scope="module")
def xconds():
    return (tm.conditioning(64, 1, pooled=tm.SDXL_POOLED), tm.conditioning(64, 2, pooled=tm.SDXL_POOLED))


def patch(N, model, preset=PRESET, units="", period=2, tail=0, mode=MODES[0]):
    """The node a user places (ASDMFeatureInheritance2); a ``tail`` of whole steps (patched units
    that never inherit) needs the earlier node, which takes a count."""
    if tail >= 1:
        return compat.call_node(N["ASDMFeatureInheritance"], model=model, preset=preset, units=units,
                                period=period, final_full_steps=tail, reuse=mode[0], forecast=mode[1])[0]
    return compat.call_node(N["ASDMFeatureInheritance2"], model=model, preset=preset, period=period, units=units,
                            reuse=mode[0], forecast=mode[1], final_full_fraction=tail)[0]


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@modes
def test_period_one_empty_set_and_full_steps_are_bit_exact(N, sdxl, xconds, mode):
    base = ksample(sdxl, xconds, steps=6)
    assert torch.equal(ksample(patch(N, sdxl, period=1, mode=mode), xconds, steps=6), base)
    assert torch.equal(ksample(patch(N, sdxl, "custom", "", period=3, mode=mode), xconds, steps=6), base)
    every_step_full = patch(N, sdxl, period=5, tail=100, mode=mode)
    assert torch.equal(ksample(every_step_full, xconds, steps=6), base)
    assert {m for _, m in holder_of(every_step_full).last_run.calls} == {"full"}


@modes
def test_cond_uncond_split_matches_batched(N, sdxl, xconds, mode):
    batched = patch(N, sdxl, period=2, mode=mode)
    out_b = ksample(batched, xconds, steps=6)
    split = patch(N, sdxl, period=2, mode=mode)
    split.add_object_patch("memory_required", lambda *a, **k: 1e30)   # one call per chunk
    out_s = ksample(split, xconds, steps=6)
    calls_b, calls_s = holder_of(batched).last_run.calls, holder_of(split).last_run.calls
    assert len(calls_s) == 2 * len(calls_b) and sorted(set(calls_s)) == sorted(set(calls_b))
    assert rel_err(out_s, out_b) < REL_TOL
    assert rel_err(out_b, ksample(sdxl, xconds, steps=6)) > 1e-3   # inheritance acts


@pytest.mark.parametrize("sampler", ["heun", "dpmpp_2s_ancestral", "uni_pc"])
def test_refresh_pattern_counts_sampler_steps(N, sdxl, xconds, sampler):
    p = patch(N, sdxl, period=3, mode=("output", True))
    ksample(p, xconds, sampler=sampler, steps=7, size=8)
    calls = holder_of(p).last_run.calls
    per_step = [[m for s, m in calls if s == i] for i in range(7)]
    assert "".join("I" if c[0] == "inherit" else "F" for c in per_step) == "FIIFIIF"
    assert all(len(set(c)) == 1 for c in per_step)   # every call of a step agrees


@modes
def test_other_sizes_and_a_raising_run_leave_no_state(N, sdxl, xconds, mode):
    import comfy.sample
    p = patch(N, sdxl, period=3, mode=mode)
    ksample(p, xconds, size=16, steps=6)
    assert torch.equal(ksample(p, xconds, size=8, steps=6), ksample(patch(N, sdxl, period=3, mode=mode), xconds, size=8, steps=6))
    pos, neg = xconds
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))

    def boom(step, *_):
        if step == 3:
            raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        comfy.sample.sample(p, noise, 6, 5.0, "euler", "normal", pos, neg, torch.zeros(1, 4, 16, 16),
                            callback=boom, seed=0)
    gc.collect()
    h = holder_of(p)
    assert h.run is None and h.last_run.features == {}
    assert torch.equal(ksample(p, xconds, steps=6), ksample(patch(N, sdxl, period=3, mode=mode), xconds, steps=6))


@modes
def test_lora_applies_and_unpatch_restores(N, sdxl, xconds, mode):
    before = {k: v.clone() for k, v in sdxl.model.state_dict().items()}
    p = patch(N, sdxl, period=2, mode=mode)
    key = "diffusion_model.input_blocks.1.0.in_layers.2.weight"   # dn0.0.R: computed every step
    lora = p.clone()
    w = sdxl.model.state_dict()[key]
    lora.add_patches({key: (0.05 * torch.randn(w.shape, generator=torch.Generator().manual_seed(1)),)}, 1.0)
    assert rel_err(ksample(lora, xconds, steps=6), ksample(p, xconds, steps=6)) > 1e-3
    unload_all()
    after = sdxl.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    m = sdxl.model.diffusion_model.get_submodule("input_blocks.4.0")
    assert getattr(m.forward, "__func__", None) is type(m).forward


@pytest.mark.parametrize("split", [False, True])
def test_span_output_ex3_is_the_deepcache_baseline(N, sdxl, xconds, split):
    """On SDXL EX3 leaves the shallowest pair (dn0, up2) computed: DeepCache at depth 2 (conv_in
    and dn0's two layers), bit for bit, as on SD1.5."""
    ours = patch(N, sdxl, "EX3", period=3, mode=("output", False))
    theirs = deepcache.apply_deepcache(sdxl, 2, 3)
    if split:
        for m in (ours, theirs):
            m.add_object_patch("memory_required", lambda *a, **k: 1e30)
    assert torch.equal(ksample(ours, xconds, steps=7), ksample(theirs, xconds, steps=7))
    assert {m for s, m in holder_of(ours).last_run.calls if s % 3} == {"inherit"}


def test_inherits_inside_a_switch_with_an_sdxl_student(N, sdxl, xconds):
    """SDXL with feature inheritance late, an SSD-1B-topology student early (the paper's S1 for
    SDXL): each model keeps its own patch within its range."""
    student = tm.sd_model(tm.TINY_SDXL["ssd-1b"], seed=3)
    fi = patch(N, sdxl, period=2, mode=("output", True))
    sw = compat.call_node(N["ASDMUNetSwitch"], unit="steps", model_1=student, start_1=0.0, end_1=2.0, model_2=fi,
                          start_2=2.0, end_2=-1.0)[0]
    ksample(sw, xconds, steps=6)
    modes = {s: m for s, m in holder_of(fi).last_run.calls}
    assert sorted(modes) == [2, 3, 4, 5]   # the student's steps do not reach it
    assert [modes[s] for s in (2, 3, 4, 5)] == ["store", "inherit", "store", "inherit"]


def test_controlnet_acts_on_inheriting_steps(N, sdxl, xconds):
    """A ControlNet for SDXL (the host's class, with SDXL's y embedding) reaches the image on
    inheriting steps of span-output EX3 through the computed shallow pair (dn0, up2)."""
    cn = compat.call_node(N["ControlNetLoader"],
                          control_net_name=tm.random_controlnet(dict(tm.TINY_SDXL["sdxl"])))[0]
    hint = torch.rand(1, 128, 128, 3, generator=torch.Generator().manual_seed(1))
    pos, neg = xconds
    # it starts at 30 % of the schedule, so step 0 (the only full step: period 100) runs without it
    late = compat.call_node(N["ControlNetApplyAdvanced"], positive=pos, negative=neg, control_net=cn,
                            image=hint, strength=1.0, start_percent=0.3, end_percent=1.0)
    model = patch(N, sdxl, "EX3", period=100, mode=("output", True))
    assert torch.equal(ksample(model, late, steps=1), ksample(model, xconds, steps=1))   # off at step 0
    with_cn = ksample(model, late, steps=6)
    assert {m for s, m in holder_of(model).last_run.calls if s > 0} == {"inherit"}
    assert rel_err(with_cn, ksample(model, xconds, steps=6)) > 1e-3
    unload_all()
