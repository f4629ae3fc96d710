"""GRI attention on a real ComfyUI: exactness where it claims (whole-grid regions, outside the
step range, unpatching), steps and shifts under multi-call samplers and split cond / uncond, odd
sizes, stacking, the bare-UNet form, errors. (The attention's math alone: tests/unit.)

The tiny UNet's level-0 attention units (dn0, up3) see 16x16 = 256 tokens at 16x16 latents,
level 1 (dn1, up2) 8x8: windows of 4 and pools of 2 give several regions there."""
import pytest
import torch

from conftest import ksample, unload_all
from asdm import compat
from asdm import condconv
from asdm import gri
from asdm import topology
from asdm.harness import models as tm
from asdm.training import distill
from references import full_attention, qkv
from asdm import hooks
from asdm.inheritance import InheritanceHolder


# Relative tolerance for results that differ only by float summation order: SDPA over a masked,
# concatenated key set against an explicit softmax, or batched against split UNet calls
# (measured differences ~5e-7 in float32); GRI itself changes outputs by > 1e-3.
REL_TOL = 1e-5


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def patch(N, model, units="dn0, up3", window=4, pool=2, start=0.0, end=1.0):
    return compat.call_node(N["ASDMGRIAttention"], model=model, units=units, window=window, pool=pool, start=start,
                            end=end)[0]


def holder_of(model):
    return hooks.holder_of(model, gri.GRIHolder)


def sample(model, conds, shape, sampler="euler", steps=6, cfg=5.0):
    import nodes
    pos, neg = conds
    lat = {"samples": torch.zeros(*shape)}
    return nodes.KSampler().sample(model, 0, steps, cfg, sampler, "normal", pos, neg, lat)[0]["samples"]


# ---------------------------------------------------------------------------------------------
# The attention itself (its math alone: tests/unit/test_gri_attention.py)
# ---------------------------------------------------------------------------------------------

def test_region_covering_the_grid_is_full_attention():
    q, k, v = qkv(2, 6 * 5, 8)
    # the GRI computation itself: every global key is masked (nothing lies outside the region)
    assert rel_err(gri.gri_attention(q, k, v, 2, (6, 5), 6, 2, True), full_attention(q, k, v, 2)) < REL_TOL
    # the replace patch takes the host's own attention there: bit for bit
    holder = gri.GRIHolder(gri.Settings(6, 2), [], "test")
    site = gri.Site(gri.Unit("dn0.0.A", "input_blocks.1.1", "A", "dn0"), 0, 0, 0)
    extra = {"n_heads": 2, "dim_head": 4, "attn_precision": None, "original_shape": [2, 4, 6, 5]}
    assert torch.equal(holder.attn1_patch(site, None)(q, k, v, extra), gri.host_attention(q, k, v, extra))


def test_a_layers_own_attention_preference_reaches_the_hosts_attention(tiny, monkeypatch):
    """Newer hosts give each CrossAttention its own attention preference (``comfy_attention``),
    which CrossAttention passes as ``preferred_attention``; a replace patch's extra options do not
    carry it, so where GRI computes the host's attention it passes the layer's own. (The tested
    hosts have none: the preference is put on the module here.)"""
    import comfy.ldm.modules.attention as attention
    unet = tiny.model.diffusion_model
    marker = object()
    attn1 = unet.get_submodule("input_blocks.1.1").transformer_blocks[0].attn1
    monkeypatch.setattr(attn1, "comfy_attention", marker, raising=False)
    topo = topology.describe(unet)
    site = gri.sites(unet, topo, gri.resolve_units(topo, "dn0.0.A"))[0]
    seen = []
    monkeypatch.setattr(attention, "optimized_attention",
                        lambda q, k, v, heads, **kw: seen.append(kw.get("preferred_attention")) or q)
    holder = gri.GRIHolder(gri.Settings(4, 2, 0.5, 1.0), [site], "test")   # step 0 is outside the range
    holder.call = gri.CallState(False, 0, None)
    q, k, v = qkv(1, 16, 8)
    holder.attn1_patch(site, None)(q, k, v, {"n_heads": 2, "dim_head": 4, "attn_precision": None})
    holder.call = None
    assert seen == [marker]


# ---------------------------------------------------------------------------------------------
# A MODEL through the stock sampler
# ---------------------------------------------------------------------------------------------

def test_units_resolve_to_attention_keys(tiny):
    unet = tiny.model.diffusion_model
    topo = gri.describe(unet)
    units = gri.resolve_units(topo, "dn0, up3, mid")
    assert [u.name for u in units] == ["dn0.0.A", "dn0.1.A", "mid.A", "up3.0.A", "up3.1.A", "up3.2.A"]
    assert [gri.attention_key(u) for u in units] == [("input", 1), ("input", 2), ("middle", 0),
                                                     ("output", 9), ("output", 10), ("output", 11)]
    assert [gri.level_of(topo, u.block) for u in units] == [0, 0, 3, 0, 0, 0]


def test_window_covering_the_grid_samples_bit_exact(N, tiny, conds):
    # 16x16 latents: level 0 is 16x16 tokens, level 1 8x8: window 16 covers both
    p = patch(N, tiny, "dn0, dn1, up2, up3", window=16, pool=2)
    assert torch.equal(ksample(p, conds), ksample(tiny, conds))
    run = holder_of(p).last_run
    assert run.gri == 0 and run.exact > 0 and not run.fallbacks


@pytest.mark.parametrize("start,end", [(0.5, 0.5), (0.95, 1.0), (0.0, 0.0)])
def test_outside_the_step_range_is_bit_exact(N, tiny, conds, start, end):
    p = patch(N, tiny, start=start, end=end)
    assert torch.equal(ksample(p, conds, steps=10), ksample(tiny, conds, steps=10))
    if start != end:   # patched, and no step of the 10 is in [0.95, 1)
        run = holder_of(p).last_run
        assert [a for _, a in run.calls] == [False] * 10 and run.gri == 0


def test_unet_call_without_a_sampler(N, tiny):
    """No sampler, no step: GRI only where the range is the whole schedule."""
    import comfy.model_management as mm
    g = torch.Generator().manual_seed(3)
    x, ctx, t = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 64, generator=g), torch.tensor([5.0, 5.0])
    outs = {}
    for name, m in (("plain", tiny), ("all", patch(N, tiny)), ("part", patch(N, tiny, end=0.5))):
        mm.load_models_gpu([m])   # the MODEL's options reach the UNet as the sampler passes them
        outs[name] = m.model.apply_model(x, t, c_crossattn=ctx, transformer_options=compat.unet_options(m))
    assert torch.equal(outs["part"], outs["plain"])
    assert rel_err(outs["all"], outs["plain"]) > 1e-3
    unload_all()


def test_inside_the_range_changes_the_output(N, tiny, conds):
    base = ksample(tiny, conds, steps=10)
    assert rel_err(ksample(patch(N, tiny), conds, steps=10), base) > 1e-3
    half = patch(N, tiny, end=0.5)
    out = ksample(half, conds, steps=10)
    assert rel_err(out, base) > 1e-3
    assert [a for _, a in holder_of(half).last_run.calls] == [True] * 5 + [False] * 5


def _record_shifts(monkeypatch):
    seen = []
    real = gri.gri_attention

    def spy(*args, shift=False, **kwargs):
        seen.append(shift)
        return real(*args, shift=shift, **kwargs)
    monkeypatch.setattr(gri, "gri_attention", spy)
    return seen


@pytest.mark.parametrize("sampler", ["euler", "heun", "uni_pc"])
def test_steps_and_shifts_follow_sampler_steps(N, tiny, conds, monkeypatch, sampler):
    steps = 6
    p = patch(N, tiny, "dn0", start=0.0, end=0.5)   # dn0: two transformer blocks per call
    seen = _record_shifts(monkeypatch)
    out = ksample(p, conds, sampler=sampler, steps=steps, size=8)
    assert torch.isfinite(out).all()
    calls = holder_of(p).last_run.calls
    per_step = [[a for s, a in calls if s == i] for i in range(steps)]
    assert [len(c) for c in per_step] == ([2] * (steps - 1) + [1] if sampler == "heun" else [1] * steps)
    assert [c[0] for c in per_step] == [True] * 3 + [False] * 3 and all(len(set(c)) == 1 for c in per_step)
    # 8x8 latents, window 4: per active call, dn0.0.A then dn0.1.A, shifted when step + k is odd
    active_steps = [s for s, a in calls if a]
    assert seen == [bool((s + k) % 2) for s in active_steps for k in (0, 1)]


def test_odd_sizes_batch_and_split_calls(N, tiny, conds):
    units = "dn0, dn1, up2, up3"
    for shape in ((1, 4, 18, 13), (2, 4, 11, 24)):
        p = patch(N, tiny, units, window=4, pool=3)
        out = sample(p, conds, shape)
        run = holder_of(p).last_run
        assert torch.isfinite(out).all() and out.shape == shape
        assert run.gri > 0 and run.exact == 0 and not run.fallbacks   # every grid was found
        assert rel_err(out, sample(tiny, conds, shape)) > 1e-3
    batched = patch(N, tiny, units, window=4, pool=3)
    out_b = sample(batched, conds, (2, 4, 18, 13))
    split = patch(N, tiny, units, window=4, pool=3)
    split.add_object_patch("memory_required", lambda *a, **k: 1e30)   # one UNet call per chunk
    out_s = sample(split, conds, (2, 4, 18, 13))
    calls_b, calls_s = holder_of(batched).last_run.calls, holder_of(split).last_run.calls
    assert len(calls_s) == 2 * len(calls_b) and sorted(set(calls_s)) == sorted(set(calls_b))
    assert rel_err(out_s, out_b) < REL_TOL


@pytest.mark.parametrize("sampler", ["heun", "uni_pc"])
def test_multi_call_samplers_at_odd_sizes(N, tiny, conds, sampler):
    out = sample(patch(N, tiny, window=5, pool=2), conds, (2, 4, 14, 19), sampler=sampler, steps=4)
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------------
# Stacking and unpatching
# ---------------------------------------------------------------------------------------------

def fi(N, model, preset="CO6", period=2):
    return compat.call_node(N["ASDMFeatureInheritance"], model=model, preset=preset, units="", period=period,
                            final_full_steps=0.0)[0]


@pytest.mark.parametrize("order", ["gri_first", "gri_last"])
def test_stacks_with_feature_inheritance(N, tiny, conds, order):
    def stack(start, end):
        if order == "gri_first":
            return fi(N, patch(N, tiny, "dn0, dn1, up2, up3", start=start, end=end), "LI1")
        return patch(N, fi(N, tiny, "LI1"), "dn0, dn1, up2, up3", start=start, end=end)
    alone = ksample(fi(N, tiny, "LI1"), conds)
    off = stack(0.95, 1.0)
    assert torch.equal(ksample(off, conds), alone)
    on = stack(0.0, 1.0)
    out = ksample(on, conds)
    assert torch.isfinite(out).all() and rel_err(out, alone) > 1e-3
    assert holder_of(on).last_run.gri > 0
    inh = hooks.holder_of(on, InheritanceHolder)
    assert "inherit" in {m for _, m in inh.last_run.calls}


def test_stacks_with_the_unet_switch(N, sd_and_base, conds768):
    sd, base = sd_and_base

    def switch(m1, m2):
        return compat.call_node(N["ASDMUNetSwitch"], unit="steps", model_1=m1, start_1=0.0, end_1=3.0, model_2=m2,
                                start_2=3.0, end_2=-1.0)[0]
    plain = ksample(switch(base, sd), conds768, steps=8)
    # GRI in the second range (SD), then in the first (the BK-SDM Base, whose dn0 / up3 have
    # one and two A units): each MODEL's patches act in its own range only. Random-weight
    # attention is close to uniform, so GRI moves these samples by ~5e-4 only: 1e-5 is still
    # far above fp32 noise (the unchanged case below is bit-exact)
    late = patch(N, sd)
    out = ksample(switch(base, late), conds768, steps=8)
    run = holder_of(late).last_run
    assert rel_err(out, plain) > 1e-5 and run.gri > 0 and {s for s, a in run.calls} == set(range(3, 8))
    early = patch(N, base)
    out = ksample(switch(early, sd), conds768, steps=8)
    run = holder_of(early).last_run
    assert rel_err(out, plain) > 1e-5 and run.gri > 0 and {s for s, a in run.calls} == {0, 1, 2}
    assert len(holder_of(early).sites) == 3
    # and outside its step range, GRI in a switch range changes nothing
    assert torch.equal(ksample(switch(base, patch(N, sd, start=0.95)), conds768, steps=8), plain)
    unload_all()


def test_stacks_with_condconv(N, tiny, conds):
    me = compat.call_node(N["ASDMMECondConv"], model=tiny, weights="none", units=condconv.DEFAULT_UNITS, experts=2,
                          init="paper", seed=0)[0]
    alone = ksample(me, conds)
    assert torch.equal(ksample(patch(N, me, start=0.95), conds), alone)
    out = ksample(patch(N, me), conds)
    assert torch.isfinite(out).all() and rel_err(out, alone) > 1e-3
    unload_all()


def test_lora_applies_and_unpatching_restores_the_model(N, tiny, conds):
    unet = tiny.model.diffusion_model
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    base = ksample(tiny, conds)
    p = patch(N, tiny)
    out_p = ksample(p, conds)
    lora = p.clone()
    key = "diffusion_model.output_blocks.10.1.transformer_blocks.0.attn1.to_q.weight"   # up3.1.A
    w = tiny.model.state_dict()[key]
    lora.add_patches({key: (0.2 * torch.randn(w.shape, generator=torch.Generator().manual_seed(1)),)}, 1.0)
    out_l = ksample(lora, conds)
    assert torch.isfinite(out_l).all() and rel_err(out_l, out_p) > 1e-3
    unload_all()
    after = tiny.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(ksample(tiny, conds), base)          # the original samples as before
    for path in ("input_blocks.1.1", "output_blocks.10.1"):
        attn = unet.get_submodule(path).transformer_blocks[0].attn1
        assert "forward" not in attn.__dict__
    assert "patches_replace" not in tiny.model_options["transformer_options"]


def _freeu_tome(N, m, ratio=0.3):
    m = compat.call_node(N["FreeU"], model=m, b1=1.1, b2=1.2, s1=0.9, s2=0.2)[0]
    return compat.call_node(N["TomePatchModel"], model=m, ratio=ratio)[0]


@pytest.mark.parametrize("order", ["gri_first", "gri_last"])
def test_stacks_with_freeu_and_tome(N, tiny, conds, order):
    def stacked(units):
        if order == "gri_first":
            return _freeu_tome(N, patch(N, tiny, units))
        return patch(N, _freeu_tome(N, tiny), units)
    others = ksample(_freeu_tome(N, tiny), conds)
    # ToMe merges the queries of level 0 (dn0, up3): GRI keeps full attention there, so with
    # GRI in those units only the result is ToMe + FreeU's, bit for bit
    level0 = stacked("dn0, up3")
    assert torch.equal(ksample(level0, conds), others)
    run = holder_of(level0).last_run
    assert run.gri == 0 and run.fallbacks == {"dn0.0.A", "dn0.1.A", "up3.0.A", "up3.1.A", "up3.2.A"}
    # level 1, which ToMe leaves alone, gets GRI in the same stack
    both = stacked("dn0, dn1, up2, up3")
    out = ksample(both, conds)
    assert torch.isfinite(out).all() and rel_err(out, others) > 1e-3
    assert holder_of(both).last_run.gri > 0


def test_freeu_alone_stacks_exactly_outside_the_range(N, tiny, conds):
    freeu = compat.call_node(N["FreeU"], model=tiny, b1=1.1, b2=1.2, s1=0.9, s2=0.2)[0]
    alone = ksample(freeu, conds)
    assert torch.equal(ksample(patch(N, freeu, start=0.95), conds), alone)
    assert rel_err(ksample(patch(N, freeu), conds), alone) > 1e-3


# ---------------------------------------------------------------------------------------------
# A bare UNet (the trainer's form)
# ---------------------------------------------------------------------------------------------

def test_bare_unet_context_matches_the_model_patch_and_trains(N, tiny):
    import comfy.model_management as mm
    g = torch.Generator().manual_seed(4)
    x, ctx, t = torch.randn(2, 4, 12, 16, generator=g), torch.randn(2, 77, 64, generator=g), torch.tensor([7.0, 7.0])
    p = patch(N, tiny, "dn0, dn1, up2, up3", window=4, pool=2)
    mm.load_models_gpu([p])
    via_model = p.model.apply_model(x, t, c_crossattn=ctx, transformer_options=compat.unet_options(p))  # step 0
    unload_all()
    unet = tiny.model.diffusion_model
    with gri.gri_unet(unet, "dn0, dn1, up2, up3", window=4, pool=2):
        bare = tiny.model.apply_model(x, t, c_crossattn=ctx)
    assert rel_err(bare, via_model) < REL_TOL
    plain = tiny.model.apply_model(x, t, c_crossattn=ctx)
    assert rel_err(bare, plain) > 1e-3
    # a window covering every grid: the original forwards, bit for bit
    with gri.gri_unet(unet, "dn0, dn1, up2, up3", window=16, pool=2):
        assert torch.equal(tiny.model.apply_model(x, t, c_crossattn=ctx), plain)
    # gradients reach the attention weights of a GRI unit and the input
    student = tm.sd_model(seed=0)
    s_unet = student.model.diffusion_model
    weight = s_unet.get_submodule("input_blocks.1.1.transformer_blocks.0.attn1.to_k").weight
    weight.requires_grad_(True)
    xg = x.clone().requires_grad_()
    # with the trainer's out-of-place transformer blocks (the early host's add in place)
    with torch.enable_grad(), distill.trainable(s_unet), \
            gri.gri_unet(s_unet, "dn0", window=4, pool=2, step=1) as handle:
        assert handle.step == 1
        loss = (student.model.apply_model(xg, t, c_crossattn=ctx) - plain.detach()).square().mean()
        loss.backward()
    assert weight.grad is not None and torch.isfinite(weight.grad).all() and weight.grad.abs().sum() > 0
    assert torch.isfinite(xg.grad).all()
    for m in s_unet.modules():
        assert "forward" not in m.__dict__ and not m._forward_pre_hooks


# ---------------------------------------------------------------------------------------------
# Node errors
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,needle", [
    (dict(units="dn0, dn9"), "units: unit token 'dn9' names no unit"),
    (dict(units="dn0..A"), "units: malformed unit token 'dn0..A'"),
    (dict(units="dn0.0.R, up3.*.R"), "names no attention (A) unit"),
    (dict(window=0), "window must be a whole number from 1 to 512 (got 0)"),
    (dict(pool=0), "pool must be a whole number from 1 to 64 (got 0)"),
    (dict(start=0.6, end=0.4), "start (0.6) is after end (0.4)"),
    (dict(start=-0.1), "start must be a number from 0 to 1 (got -0.1)"),
    (dict(end=1.5), "end must be a number from 0 to 1 (got 1.5)"),
])
def test_bad_input_is_a_clear_node_error(N, tiny, kwargs, needle):
    with pytest.raises(ValueError) as e:
        patch(N, tiny, **kwargs)
    msg = str(e.value)
    assert msg.startswith("A-SDM GRI Attention:") and needle in msg, msg
    if "unit token" in needle:
        assert "Valid names here:" in msg


def test_empty_units_and_non_unet_model(N, tiny, conds):
    assert torch.equal(ksample(patch(N, tiny, units=""), conds), ksample(tiny, conds))
    m = tiny.clone()
    m.model = type(tiny.model).__new__(type(tiny.model))
    torch.nn.Module.__init__(m.model)
    m.model.diffusion_model = torch.nn.Linear(4, 4)
    with pytest.raises(ValueError, match="A-SDM GRI Attention: .*not an SD-style UNet"):
        patch(N, m)
