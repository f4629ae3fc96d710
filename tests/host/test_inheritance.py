"""Feature inheritance on a real ComfyUI: exactness, step patterns, state lifetime, stacking."""
import gc

import pytest
import torch

from conftest import holder_of, ksample, unload_all
from asdm import compat
from asdm import inheritance



# (reuse, forecast): every requirement below holds in every mode of the node
MODES = [("residual", False), ("output", False), ("output", True), ("residual", True)]
MODE_IDS = ["residual", "output", "output-forecast", "residual-forecast"]
modes = pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
# where stored features live: the exactness requirements hold in system memory too
devices = pytest.mark.parametrize("features_on", ["compute", "offload"])


def patch(N, model, preset="LI1", units="", period=2, tail=0, mode=MODES[0], features_on="compute"):
    return compat.call_node(N["ASDMFeatureInheritance"], model=model, preset=preset, units=units, period=period,
                            final_full_steps=tail, reuse=mode[0], forecast=mode[1], features_on=features_on)[0]


def layers(mode) -> str:
    """A layer-level preset for each reuse mode: LI1 in residual reuse; with span-output reuse its
    inheriting step would compute only conv_in and up3's last layer, a replay of stored outputs
    (refused), so DE2 (the encoder below dn0 inherited)."""
    return "LI1" if mode[0] == "residual" else "DE2"


def scattered(mode) -> str:
    """A preset of many scattered units for each reuse mode: CO6 (only up3's A units compute) in
    residual reuse; with span-output reuse it would replay the stored output (refused), so CO3."""
    return "CO6" if mode[0] == "residual" else "CO3"


# Relative tolerance for comparisons that differ only by float summation order (batched vs
# split UNet calls take different BLAS paths; x + (out - x) re-rounds an attention unit's
# output). Measured differences are ~1e-6; inheritance itself changes outputs by >1e-3.
REL_TOL = 1e-4


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@devices
@modes
def test_period_one_and_empty_set_are_bit_exact(N, tiny, conds, mode, features_on):
    base = ksample(tiny, conds)
    assert torch.equal(ksample(patch(N, tiny, scattered(mode), period=1, mode=mode, features_on=features_on), conds), base)
    assert torch.equal(ksample(patch(N, tiny, "custom", "", period=5, mode=mode, features_on=features_on), conds), base)


@devices
@modes
def test_patched_units_on_full_steps_are_bit_exact(N, tiny, conds, mode, features_on):
    # every step full (tail covers the run): the patched forwards run, and must change nothing
    p = patch(N, tiny, scattered(mode), period=5, tail=100, mode=mode, features_on=features_on)
    assert torch.equal(ksample(p, conds), ksample(tiny, conds))
    assert {m for _, m in holder_of(p).last_run.calls} == {"full"}


@modes
def test_inheritance_changes_output(N, tiny, conds, mode):
    base = ksample(tiny, conds)
    out = ksample(patch(N, tiny, layers(mode), period=2, mode=mode), conds)
    assert rel_err(out, base) > 1e-3


def _apply(model, x, t, ctx):
    return model.model.apply_model(x, t, c_crossattn=ctx)


@devices
@pytest.mark.parametrize("preset,reuse", [("CO3", "residual"), ("EX3", "output"), ("CO3", "output"),
                                          ("EN2", "output"), ("DE2", "output")])
def test_reuse_at_an_unchanged_input_equals_full_compute(N, tiny, preset, reuse, features_on):
    """What a full step stored, reused at the same input, gives the full model's output: residual
    reuse to float tolerance (x + (out - x) re-rounds an attention unit's output), span-output
    reuse bit for bit (the computed modules see the same tensors)."""
    import comfy.model_management as mm
    p = patch(N, tiny, preset, period=2, mode=(reuse, False), features_on=features_on)
    holder = holder_of(p)
    mm.load_models_gpu([p])
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 16, 16, generator=g)
    x2 = torch.randn(2, 4, 16, 16, generator=g)
    ctx = torch.randn(2, 77, 64, generator=g)
    t = torch.tensor([5.0, 5.0])
    keys = ((1, 0), (0, 0))
    run = holder.start_run(total=10)
    try:
        holder.call = holder.begin_call(run, x, keys)          # step 0: full, stores
        full = _apply(p, x, t, ctx)
        run.step = 1
        holder.call = holder.begin_call(run, x, keys)          # step 1: inherits
        assert holder.call.mode == "inherit"
        inherited = _apply(p, x, t, ctx)
        other = _apply(p, x2, t, ctx)                          # inherits features of x
    finally:
        holder.call = None
        holder.end_run(run)
    if reuse == "output":
        assert torch.equal(inherited, full)
    else:
        assert rel_err(inherited, full) < 1e-5
    holder.call = None
    assert rel_err(other, _apply(p, x2, t, ctx)) > 1e-3       # and the inherited path is really used
    unload_all()


@devices
@modes
def test_cond_uncond_split_matches_batched(N, tiny, conds, mode, features_on):
    batched = patch(N, tiny, layers(mode), period=2, mode=mode, features_on=features_on)
    out_b = ksample(batched, conds)
    split = patch(N, tiny, layers(mode), period=2, mode=mode, features_on=features_on)
    split.add_object_patch("memory_required", lambda *a, **k: 1e30)  # forces one call per chunk
    out_s = ksample(split, conds)
    calls_b, calls_s = holder_of(batched).last_run.calls, holder_of(split).last_run.calls
    assert len(calls_s) == 2 * len(calls_b)               # really split
    assert sorted(set(calls_s)) == sorted(set(calls_b))   # same step modes
    assert rel_err(out_s, out_b) < REL_TOL
    assert rel_err(out_b, ksample(tiny, conds)) > 1e-3


def _expected_calls(sampler, steps):
    if sampler in ("euler", "uni_pc"):
        return [1] * steps
    return [2] * (steps - 1) + [1]   # heun, dpmpp_2s_ancestral: the last step is one Euler call


@pytest.mark.parametrize("sampler", ["euler", "heun", "dpmpp_2s_ancestral", "uni_pc"])
@pytest.mark.parametrize("period,tail", [(2, 0), (5, 4)])
@modes
def test_refresh_pattern_counts_sampler_steps(N, tiny, conds, sampler, period, tail, mode):
    steps = 12
    p = patch(N, tiny, layers(mode), period=period, tail=tail, mode=mode)
    ksample(p, conds, sampler=sampler, steps=steps, size=8)
    calls = holder_of(p).last_run.calls
    expected = inheritance.Schedule(period, tail).pattern(steps)
    assert expected == ("FI" * 6 if period == 2 else "FIIIIFIIFFFF")
    per_step = [[m for s, m in calls if s == i] for i in range(steps)]
    assert [len(c) for c in per_step] == _expected_calls(sampler, steps)
    got = "".join("I" if c[0] == "inherit" else "F" for c in per_step)
    assert got == expected
    assert all(len(set(c)) == 1 for c in per_step)  # every call of a step agrees


@modes
def test_runs_with_other_sizes_use_no_stale_features(N, tiny, conds, mode):
    p = patch(N, tiny, scattered(mode), period=3, mode=mode)
    ksample(p, conds, size=16)
    out_small = ksample(p, conds, size=8)
    out_batch = ksample(p, conds, size=16, batch=2)
    assert torch.equal(out_small, ksample(patch(N, tiny, scattered(mode), period=3, mode=mode), conds, size=8))
    assert torch.equal(out_batch, ksample(patch(N, tiny, scattered(mode), period=3, mode=mode), conds, size=16, batch=2))
    gc.collect()
    h = holder_of(p)
    assert h.run is None and h.last_run.features == {}


@modes
def test_run_that_raises_leaves_no_state(N, tiny, conds, mode):
    import comfy.sample
    p = patch(N, tiny, scattered(mode), period=3, mode=mode)
    pos, neg = conds
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))

    def boom(step, *_):
        if step == 4:
            raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        comfy.sample.sample(p, noise, 10, 5.0, "euler", "normal", pos, neg,
                            torch.zeros(1, 4, 16, 16), callback=boom, seed=0)
    gc.collect()
    h = holder_of(p)
    assert h.run is None and h.last_run is not None and h.last_run.features == {}
    assert torch.equal(ksample(p, conds), ksample(patch(N, tiny, scattered(mode), period=3, mode=mode), conds))


@modes
def test_lora_patch_still_applies_and_unpatch_restores_weights(N, tiny, conds, mode):
    unet = tiny.model.diffusion_model
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    p = patch(N, tiny, layers(mode), period=2, mode=mode)
    key = "diffusion_model.input_blocks.4.0.in_layers.2.weight"   # dn1.0.R: computed every step
    key2 = "diffusion_model.input_blocks.5.0.in_layers.2.weight"  # dn1.1.R: inherited under LI1
    lora = p.clone()
    for k in (key, key2):
        w = tiny.model.state_dict()[k]
        lora.add_patches({k: (0.05 * torch.randn(w.shape, generator=torch.Generator().manual_seed(1)),)}, 1.0)
    out_p, out_l = ksample(p, conds), ksample(lora, conds)
    assert rel_err(out_l, out_p) > 1e-3
    unload_all()
    after = tiny.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    for path in ("input_blocks.5.0", "input_blocks.5.1", "output_blocks.4.0"):
        m = unet.get_submodule(path)
        assert getattr(m.forward, "__func__", None) is type(m).forward


@pytest.mark.parametrize("order", ["asdm_first", "asdm_last"])
@modes
def test_stacks_with_freeu_and_tome(N, tiny, conds, order, mode):
    def others(m):
        m = compat.call_node(N["FreeU"], model=m, b1=1.1, b2=1.2, s1=0.9, s2=0.2)[0]
        return compat.call_node(N["TomePatchModel"], model=m, ratio=0.3)[0]
    if order == "asdm_first":
        stacked = others(patch(N, tiny, layers(mode), period=2, mode=mode))
    else:
        stacked = patch(N, others(tiny), layers(mode), period=2, mode=mode)
    out = ksample(stacked, conds)
    assert torch.isfinite(out).all()
    assert rel_err(out, ksample(others(tiny), conds)) > 1e-3   # inheritance active in the stack
    assert holder_of(stacked).last_run.calls[1][1] == "inherit"


@pytest.mark.parametrize("kwargs,needle", [
    (dict(preset="LI9"), "custom (got 'LI9')"),
    (dict(preset="custom", units="dn0, dn9.1"), "'dn9.1' names no unit"),
    (dict(preset="custom", units="dn0..A"), "malformed unit token 'dn0..A'"),
    (dict(period=0), "period must be a whole number from 1 to 1000 (got 0)"),
    (dict(tail=-1), "final_full_steps must be a number from 0 to 10000 (got -1)"),
    (dict(tail=2.5), "or a whole number of steps (got 2.5)"),
])
def test_bad_input_is_a_clear_node_error(N, tiny, kwargs, needle):
    with pytest.raises(ValueError) as e:
        patch(N, tiny, **kwargs)
    msg = str(e.value)
    assert msg.startswith("A-SDM Feature Inheritance (deprecated):") and needle in msg
    if "unit" in needle:
        assert "Valid names here:" in msg and "dn0.0-1 (A/R)" in msg


def test_non_unet_model_is_a_clear_node_error(N, tiny):
    m = tiny.clone()
    m.model = type(tiny.model).__new__(type(tiny.model))
    torch.nn.Module.__init__(m.model)
    m.model.diffusion_model = torch.nn.Linear(4, 4)   # e.g. a transformer-style diffusion model
    with pytest.raises(ValueError, match="not an SD-style UNet"):
        patch(N, m)



def test_final_full_steps_hold_for_every_sampler_of_the_host(N, tiny, conds):
    """Pn† for every sampler this ComfyUI offers: the last 20 % of the sampler's own steps are
    full, and every model call of a step agrees. dpm_fast counts its own (fewer, higher-order)
    steps; dpm_adaptive picks its steps as it goes, so it computes fully (bit for bit plain)."""
    import comfy.samplers
    failures = []
    for name in comfy.samplers.KSampler.SAMPLERS:
        p = patch(N, tiny, "LI1", period=2, tail=0.2)
        out = ksample(p, conds, sampler=name, steps=10, size=8)
        # On the early host a run ends when the sampler's per-run object is freed; dpm_fast's
        # solver holds it in a reference cycle, so it is freed by the cycle collector
        gc.collect()
        run = holder_of(p).last_run
        if name == "dpm_adaptive":
            assert (run is None or run.calls == []) and torch.equal(out, ksample(tiny, conds, sampler=name, steps=10, size=8))
            continue
        if run is None:
            failures.append((name, "no run: the step was not found"))
            continue
        steps = sorted({s for s, _ in run.calls})
        modes = {s: {m for s2, m in run.calls if s2 == s} for s in steps}
        tail = inheritance.Schedule(2, 0.2).tail_steps(run.total)
        if steps != list(range(run.total)) or any(len(m) != 1 for m in modes.values()) \
                or any(modes[s] == {"inherit"} for s in steps[run.total - tail:]) \
                or not any(modes[s] == {"inherit"} for s in steps):
            failures.append((name, run.total, "".join("I" if modes[s] == {"inherit"} else "F" for s in steps)))
    assert not failures

