"""A-SDM Auto Cache on a real ComfyUI: exactness (speed 1, the calibration run, reuse at an unchanged
input), the FLOP ratio it reaches, one depth per sampler step, state and profiles (a raising run,
bad profiles, one profile per model / schedule / size), every layout, and stacking."""
import gc
import json
import logging
import os

import pytest
import torch

from conftest import ksample, unload_all
from asdm import assembly, compat, costs, hooks
from asdm import autocache as ac
from asdm.harness import models as tm

# Relative tolerance for runs that differ only by float summation order (batched vs split UNet
# calls take different BLAS paths; a wrapper around the same operations). Measured differences
# are ~1e-6; reuse itself changes outputs by > 1e-3.
REL_TOL = 1e-4
STEPS = 8


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    """ComfyUI's user directory, for this test only (both hosts read the module attribute)."""
    import folder_paths
    monkeypatch.setattr(folder_paths, "user_directory", str(tmp_path))
    return tmp_path


def auto(N, model, speed=2.0, calibration="auto", start=0.0, end=1.0):
    return compat.call_node(N["ASDMAutoCache"], model=model, speed=speed, start_percent=start, end_percent=end,
                            calibration=calibration)[0]


def holder(model):
    return hooks.holder_of(model, ac.AutoCacheHolder)


def counted(model, conds, **kw):
    """(samples, UNet FLOPs of the whole sampling run)."""
    with costs.counting(model.model.diffusion_model) as flops:
        out = ksample(model, conds, steps=kw.pop("steps", STEPS), **kw)
    return out, sum(flops.values())


def profiles(user_dir):
    folder = os.path.join(str(user_dir), *ac.PROFILE_FOLDER)
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def test_speed_one_is_the_model_itself(N, tiny, conds, user_dir):
    assert auto(N, tiny, 1.0) is tiny
    assert profiles(user_dir) == []


@pytest.mark.parametrize("speed", [1.5, 3.0])
def test_calibration_run_is_full_compute_and_later_runs_meet_the_target(N, tiny, conds, user_dir, speed):
    plain, full_flops = counted(tiny, conds)
    m = auto(N, tiny, speed)
    first, _ = counted(m, conds)
    assert torch.equal(first, plain)                      # the calibration run computes fully
    h = holder(m)
    assert h.last_run.record is None and set(h.last_run.depths.values()) == {ac.FULL}
    (name,) = profiles(user_dir)
    with open(os.path.join(str(user_dir), *ac.PROFILE_FOLDER, name)) as f:
        stored = json.load(f)
    assert stored["key"]["steps"] == STEPS and stored["key"]["sampler"] == "sample_euler"
    assert len(stored["profile"]["probes"]) == len(stored["profile"]["groups"])
    second, flops = counted(m, conds)
    assert h.last_run.plan is not None and profiles(user_dir) == [name]   # used, not rewritten
    ratio = full_flops / flops
    # the plan reaches the target; its last move saved at most one step of the largest group
    assert speed <= ratio <= STEPS / (STEPS / speed - max(h.last_run.share.values()))
    assert any(d >= 0 for d in h.last_run.depths.values()) and torch.isfinite(second).all()
    assert rel_err(second, plain) > 1e-4                  # float noise between equal runs is ~1e-6
    unload_all()


@pytest.mark.parametrize("speed", [1.5, 3.0])
def test_runtime_rule_meets_the_target(N, tiny, conds, user_dir, speed):
    plain, full_flops = counted(tiny, conds)
    m = auto(N, tiny, speed, "off")
    out, flops = counted(m, conds)
    assert profiles(user_dir) == []                       # no calibration, nothing written
    ratio = full_flops / flops
    assert speed <= ratio <= STEPS / (STEPS / speed - max(holder(m).last_run.share.values()))
    assert rel_err(out, plain) > 1e-4


def _apply(model, x, t, ctx):
    return model.model.apply_model(x, t, c_crossattn=ctx)


def test_reuse_at_an_unchanged_input_equals_full_compute(N, tiny):
    """A group's output stored at one step, reused at the same input, gives full compute's output
    bit for bit: the computed modules see the very tensors they saw (for every group of the chain)."""
    import comfy.model_management as mm
    m = auto(N, tiny, 2.0)
    h = holder(m)
    mm.load_models_gpu([m])
    g = torch.Generator().manual_seed(3)
    x, x2 = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 4, 16, 16, generator=g)
    ctx = torch.randn(2, 77, 64, generator=g)
    t = torch.tensor([5.0, 5.0])
    keys = ((1, 0), (0, 0))
    for j in range(len(h.groups)):
        h.plan_override = ([ac.FULL, j], [False, False])
        run = h.start_run(total=2)
        try:
            h.call = h.begin_call(run, x, keys)       # step 0: full, stores group j's output
            full = h.run_call(_Next(m), x, t, {"c_crossattn": ctx})
            run.step = 1
            h.call = h.begin_call(run, x, keys)       # step 1: reuses it
            assert h.call.depth == j
            reused = _apply(m, x, t, ctx)
            other = _apply(m, x2, t, ctx)             # reuses x's output
        finally:
            h.call = None
            h.end_run(run)
        assert torch.equal(reused, full), h.groups[j].name
        assert rel_err(other, _apply(m, x2, t, ctx)) > 1e-4, h.groups[j].name   # and it is really reused
    unload_all()


class _Next:
    """hooks.UNetCall for a call driven by hand."""
    def __init__(self, model):
        self.model = model

    def next(self, x, t, c):
        return self.model.model.apply_model(x, t, **c)


@pytest.mark.parametrize("calibration", ["auto", "off"])
def test_cond_uncond_split_matches_batched(N, tiny, conds, user_dir, calibration):
    batched = auto(N, tiny, 2.0, calibration)
    split = auto(N, tiny, 2.0, calibration)
    split.add_object_patch("memory_required", lambda *a, **k: 1e30)   # forces one call per chunk
    for _ in range(2 if calibration == "auto" else 1):               # calibrate, then use the profile
        out_b, out_s = ksample(batched, conds), ksample(split, conds)
    rb, rs = holder(batched).last_run, holder(split).last_run
    assert len(rs.calls) == 2 * len(rb.calls)                         # really split
    assert rs.depths == rb.depths and any(d >= 0 for d in rb.depths.values())
    assert rel_err(out_s, out_b) < REL_TOL


@pytest.mark.parametrize("sampler", ["heun", "uni_pc", "dpmpp_2s_ancestral", "euler_ancestral"])
def test_one_depth_per_sampler_step(N, tiny, conds, user_dir, sampler):
    m = auto(N, tiny, 2.0)
    ksample(m, conds, sampler=sampler, steps=10, size=8)              # calibrates
    ksample(m, conds, sampler=sampler, steps=10, size=8)
    run = holder(m).last_run
    assert run.plan is not None and run.fallbacks == 0
    per_step = {}
    for s, d in run.calls:
        per_step.setdefault(s, set()).add(d)
    assert sorted(per_step) == list(range(10))
    assert all(len(v) == 1 for v in per_step.values())               # every call of a step agrees
    assert [per_step[s].pop() for s in range(10)] == run.plan         # and follows the plan
    two = {"heun": 9, "dpmpp_2s_ancestral": 9}.get(sampler, 0)        # their last step is one call
    assert len(run.calls) == 10 + two


def test_controlnet_acts_on_reusing_steps(N, conds, user_dir):
    sd = tm.sd_model(seed=0)
    cfg = dict(tm.TINY_UNET, transformer_depth=[0, 0, 1, 1, 1, 1, 0, 0])   # see test_stacking.py
    cn = compat.call_node(N["ControlNetLoader"], control_net_name=tm.random_controlnet(cfg))[0]
    hint = torch.rand(1, 128, 128, 3, generator=torch.Generator().manual_seed(1))
    pos, neg = conds
    late = compat.call_node(N["ControlNetApplyAdvanced"], positive=pos, negative=neg, control_net=cn,
                            image=hint, strength=1.0, start_percent=0.3, end_percent=1.0)
    m = auto(N, sd, 3.0)
    calibrated = ksample(m, late)
    assert torch.equal(calibrated, ksample(sd, late))                 # the calibration run, with ControlNet
    with_cn = ksample(m, late)
    run = holder(m).last_run
    assert run.plan is not None and sum(d >= 0 for d in run.depths.values()) >= 3
    without = ksample(m, conds)
    assert rel_err(with_cn, without) > 1e-3
    unload_all()


def test_run_that_raises_leaves_no_state_and_no_profile(N, tiny, conds, user_dir):
    import comfy.sample
    m = auto(N, tiny, 2.0)
    pos, neg = conds
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))

    def boom(step, *_):
        if step == 4:
            raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        comfy.sample.sample(m, noise, STEPS, 5.0, "euler", "normal", pos, neg, torch.zeros(1, 4, 16, 16),
                            callback=boom, seed=0)
    gc.collect()
    h = holder(m)
    assert h.run is None and h.last_run.features == {} and h.last_run.fillers == {}
    assert profiles(user_dir) == []                                   # half a calibration is not a profile
    assert torch.equal(ksample(m, conds), ksample(tiny, conds))       # the next run calibrates
    assert len(profiles(user_dir)) == 1


@pytest.mark.parametrize("damage", ["text", "foreign", "stale", "shape"])
def test_bad_profile_is_recalibrated_with_a_log_line(N, tiny, conds, user_dir, caplog, damage):
    m = auto(N, tiny, 2.0)
    ksample(m, conds)
    (name,) = profiles(user_dir)
    path = os.path.join(str(user_dir), *ac.PROFILE_FOLDER, name)
    with open(path) as f:
        d = json.load(f)
    if damage == "text":
        text = '{"key": {"vers'
    elif damage == "foreign":
        text = json.dumps(dict(d, key=dict(d["key"], weights="another model")))
    elif damage == "stale":
        text = json.dumps(dict(d, key=dict(d["key"], version=0)))
    else:
        d["profile"]["grams"][0] = d["profile"]["grams"][0][:-1]
        text = json.dumps(d)
    with open(path, "w") as f:
        f.write(text)
    with caplog.at_level(logging.INFO, logger="A-SDM"):
        out = ksample(m, conds)
    word = {"text": "damaged", "foreign": "foreign", "stale": "stale", "shape": "damaged"}[damage]
    assert any(word in r.getMessage() and "recalibrates" in r.getMessage() for r in caplog.records)
    assert torch.equal(out, ksample(tiny, conds))                     # a calibration run
    ac.Profile.from_json(json.load(open(path))["profile"])            # rewritten whole
    ksample(m, conds)
    assert holder(m).last_run.plan is not None


def test_each_model_schedule_and_size_has_its_own_profile(N, tiny, conds, user_dir):
    other = tm.sd_model(seed=7)
    runs = [(tiny, dict(steps=8, size=16)), (other, dict(steps=8, size=16)), (tiny, dict(steps=10, size=16)),
            (tiny, dict(steps=8, size=8)), (tiny, dict(steps=8, size=16, scheduler="karras"))]
    patched = [(auto(N, model, 2.0), kw) for model, kw in runs]
    keys = []
    for m, kw in patched:   # interleaved: each calibrates its own
        ksample(m, conds, **kw)
        assert holder(m).last_run.plan is None
        keys.append(holder(m).last_run.key)
    assert len(profiles(user_dir)) == len(runs) == len({json.dumps(k, sort_keys=True) for k in keys})
    for m, kw in reversed(patched):   # and each later run finds its own
        ksample(m, conds, **kw)
        run = holder(m).last_run
        assert run.plan is not None and len(run.plan) == kw["steps"]
    assert len(profiles(user_dir)) == len(runs)
    unload_all()


def _layout(name):
    if name == "sd15":
        return tm.sd_model(seed=0), tm.conditioning(64, 1), tm.conditioning(64, 2)
    if name == "bk-sdm-small":
        sd = tm.sd_model(seed=0)
        return assembly.compress(sd, "small"), tm.conditioning(64, 1), tm.conditioning(64, 2)
    model = tm.sd_model(tm.TINY_SDXL["sdxl"], seed=0)
    return model, tm.conditioning(64, 1, pooled=tm.SDXL_POOLED), tm.conditioning(64, 2, pooled=tm.SDXL_POOLED)


@pytest.mark.parametrize("layout", ["sd15", "bk-sdm-small", "sdxl"])
def test_every_layout(N, user_dir, layout):
    model, pos, neg = _layout(layout)
    groups = ac.unit_groups(model.model.diffusion_model)
    names = [g.name for g in groups]
    up = [b for b in names if not b.startswith("mid")]
    assert names[0] == "mid" or layout == "bk-sdm-small"            # BK-SDM Small has no middle block
    assert len(up) == len(set(up)) and all(len(g.boundary) >= 1 for g in groups)
    plain = ksample(model, (pos, neg))
    for calibration in ("auto", "off"):
        m = auto(N, model, 2.0, calibration)
        first = ksample(m, (pos, neg))
        if calibration == "auto":
            assert torch.equal(first, plain)
            first = ksample(m, (pos, neg))
        run = holder(m).last_run
        assert any(d >= 0 for d in run.depths.values()), (layout, calibration)
        assert torch.isfinite(first).all() and rel_err(first, plain) > 1e-4
    unload_all()


def test_lora_weights_get_their_own_profile_and_unpatch_restores(N, tiny, conds, user_dir):
    unet = tiny.model.diffusion_model
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    m = auto(N, tiny, 2.0)
    ksample(m, conds)
    lora = m.clone()
    k = "diffusion_model.input_blocks.1.0.in_layers.2.weight"
    w = tiny.model.state_dict()[k]
    lora.add_patches({k: (0.05 * torch.randn(w.shape, generator=torch.Generator().manual_seed(1)),)}, 1.0)
    out_lora = ksample(lora, conds)                                    # other weights: calibrates
    assert holder(lora).last_run.plan is None and len(profiles(user_dir)) == 2
    assert rel_err(out_lora, ksample(m, conds)) > 1e-3
    unload_all()
    after = tiny.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    for g in ac.unit_groups(unet):
        for path in g.boundary + g.skipped:
            mod = unet.get_submodule(path)
            assert getattr(mod.forward, "__func__", None) is type(mod).forward, path


def test_in_a_switch_range_and_with_gri(N, conds, user_dir):
    sd = tm.sd_model(seed=0)
    small = assembly.compress(sd, "base")
    tm.fill_(small.model.diffusion_model, seed=5)
    cached = auto(N, sd, 2.0)
    gri = compat.call_node(N["ASDMGRIAttention"], model=cached, units="dn0, up3", window=4, pool=2,
                           start=0.0, end=1.0)[0]
    sw = compat.call_node(N["ASDMUNetSwitch"], unit="steps", model_1=small, start_1=0.0, end_1=3.0, model_2=gri,
                          start_2=3.0, end_2=-1.0)[0]
    first = ksample(sw, conds, steps=10)
    run = holder(cached).last_run
    assert sorted(run.depths) == list(range(3, 10)) and set(run.depths.values()) == {ac.FULL}
    second = ksample(sw, conds, steps=10)
    run = holder(cached).last_run
    assert run.plan is not None and any(d >= 0 for d in run.depths.values())
    assert all(run.plan[s] == ac.FULL for s in range(3))              # no records, no reuse there
    assert rel_err(second, first) > 1e-4 and torch.isfinite(second).all()
    unload_all()


def test_stacks_with_easycache(N, tiny, conds, user_dir):
    def easycache(model, threshold):
        return compat.call_node(N["EasyCache"], model=model, reuse_threshold=threshold,
                                start_percent=0.0, end_percent=1.0, verbose=False)[0]
    m = auto(N, tiny, 2.0)
    ksample(m, conds)                                                  # calibrated alone
    alone = ksample(m, conds)
    depths = dict(holder(m).last_run.depths)
    out = ksample(easycache(m, 0.0), conds)                            # an EasyCache that never skips
    assert holder(m).last_run.depths == depths and rel_err(out, alone) < REL_TOL
    assert rel_err(ksample(easycache(m, 3.0), conds), alone) > 1e-3    # one that skips is in the stack


@pytest.mark.parametrize("inputs,needle", [
    (dict(speed=0.5), "speed must be a number from 1 to 10 (got 0.5)"),
    (dict(calibration="always"), "calibration must be one of auto, off (got 'always')"),
    (dict(start_percent=0.6, end_percent=0.4), "Auto Cache: end_percent (0.4) must be above start_percent (0.6)"),
    (dict(end_percent=1.5), "end_percent must be a number from 0 to 1 (got 1.5)"),
])
def test_bad_input_is_a_clear_node_error(N, tiny, inputs, needle):
    args = dict(model=tiny, speed=2.0, start_percent=0.0, end_percent=1.0, calibration="auto")
    args.update(inputs)
    with pytest.raises(ValueError) as e:
        compat.call_node(N["ASDMAutoCache"], **args)
    assert str(e.value).startswith("A-SDM Auto Cache: ") and needle in str(e.value)


def test_window_keeps_reuse_inside_start_and_end(N, tiny, conds, user_dir):
    m = auto(N, tiny, 1.5, start=0.3, end=0.8)
    ksample(m, conds, steps=10)
    ksample(m, conds, steps=10)
    run = holder(m).last_run
    ms = tiny.model.model_sampling
    hi, lo = float(ms.percent_to_sigma(0.3)), float(ms.percent_to_sigma(0.8))
    reused = [s for s, d in run.depths.items() if d >= 0]
    assert reused and all(lo < run.sigmas[s] <= hi for s in reused)
