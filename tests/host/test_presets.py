"""Presets by level role on every layout the host builds: each preset x reuse mode either runs
an inheriting step that computes a real share of the UNet and reads its input, or is refused at
the node naming the layout and a preset that fits. FLOP-counted on real forwards
(asdm/evaluation/flops.py), beside the engine's own estimate (which the node logs)."""
import pytest
import torch

from conftest import holder_of
from asdm import assembly, compat, gri, inheritance, topology
from asdm.evaluation import flops
from asdm.harness import models as tm

LAYOUTS = {
    "sd15": tm.TINY_UNET,
    "bk-sdm-tiny": "tiny",          # BK-SDM Tiny made from the SD1.5-topology UNet: 3 levels, no mid
    **{name: cfg for name, cfg in tm.TINY_SDXL.items()},
}
LATENT = 8   # 8x8: every level of a 3- or 4-level UNet still has a grid
# The engine's estimate leaves out what the FLOP counter counts besides the atoms (the time and
# class embeddings, a few linear layers once per image): a point of the share at this size.
ESTIMATE_TOL = 0.01


@pytest.fixture(scope="module")
def models():
    out = {}
    for name, cfg in LAYOUTS.items():
        if cfg == "tiny":
            out[name] = assembly.compress(tm.sd_model(tm.TINY_UNET, seed=0), "tiny")
        else:
            out[name] = tm.sd_model(cfg, seed=0)
    return out


def inputs(model, seed):
    g = torch.Generator().manual_seed(seed)
    unet = model.model.diffusion_model
    ctx_dim = model.model.model_config.unet_config["context_dim"]
    x = torch.randn(2, 4, LATENT, LATENT, generator=g)
    kw = dict(c_crossattn=torch.randn(2, 77, ctx_dim, generator=g))
    if getattr(unet, "label_emb", None) is not None:
        kw["y"] = torch.randn(2, model.model.model_config.unet_config["adm_in_channels"], generator=g)
    return x, torch.tensor([500.0, 500.0]), kw


def inheriting_call(model, x, t, kw, x_other):
    """(FLOPs of an inheriting step's UNet call, its output, the output of another input): a
    full step stores at x, then the next step inherits."""
    import comfy.model_management as mm
    mm.load_models_gpu([model])
    holder = holder_of(model)
    keys = ((0, 0), (1, 0))
    run = holder.start_run(total=10)
    try:
        holder.call = holder.begin_call(run, x, keys)
        model.model.apply_model(x, t, **kw)
        run.step = 1
        holder.call = holder.begin_call(run, x, keys)
        assert holder.call.mode == "inherit"
        counted = flops.count(model.model.diffusion_model, lambda: model.model.apply_model(x, t, **kw))
        with torch.no_grad():
            out = model.model.apply_model(x, t, **kw)
            other = model.model.apply_model(x_other, t, **kw)
    finally:
        holder.call = None
        holder.end_run(run)
    return sum(counted.values()), out, other


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_preset_and_mode_computes_a_real_share_or_is_refused(N, models, layout):
    model = models[layout]
    unet = model.model.diffusion_model
    x, t, kw = inputs(model, 0)
    x_other = inputs(model, 1)[0]
    import comfy.model_management as mm
    mm.load_models_gpu([model])
    full = sum(flops.count(unet, lambda: model.model.apply_model(x, t, **kw)).values())
    node = N["ASDMFeatureInheritance2"]
    refused, ran = [], 0
    for preset in topology.PRESETS:
        for reuse in inheritance.REUSE:
            try:
                m = compat.call_node(node, model=model, preset=preset, period=2, units="", reuse=reuse,
                                     forecast=False, final_full_fraction=0.0)[0]
            except ValueError as e:
                msg = str(e)
                assert msg.startswith("A-SDM Feature Inheritance: preset ") and " levels (" in msg, msg
                assert "nearest preset that fits is" in msg or "use reuse = residual" in msg, msg
                refused.append((preset, reuse))
                continue
            counted, out, other = inheriting_call(m, x, t, kw, x_other)
            share = counted / full
            chosen, _ = inheritance.resolve_units(topology.describe(unet), preset, "")
            estimate, depends = inheritance.inheriting_share(unet, chosen, reuse, LATENT)
            assert depends and not torch.equal(out, other), (layout, preset, reuse)   # reads its input
            if reuse == "output":   # at least half of the shallowest pair (the engine's floor, counted here)
                floor = inheritance.replay_floor(unet, topology.describe(unet), LATENT)
                assert share >= floor - ESTIMATE_TOL, (layout, preset, reuse, share, floor)
            assert abs(estimate - share) < ESTIMATE_TOL, (layout, preset, reuse, estimate, share)
            ran += 1
    assert ran > len(topology.PRESETS)   # most settings run on every layout
    if layout == "sd15":
        # the paper's layout: only span-output reuse of sets that leave no path from the input
        # to the output open is refused; every residual setting runs as before
        assert {r for _, r in refused} == {"output"}
        assert {p for p, _ in refused} == {"AI", "RI", "IN1", "IN2", "IN3", "EN3", "CO4", "CO5", "CO6",
                                           "LI1", "LI2", "LI3"}


def test_sdxl_presets_name_the_analogous_parts(models):
    t = topology.describe(models["sdxl"].model.diffusion_model)
    names = lambda p: topology.preset_spec(p, t)   # noqa: E731
    assert names("EX3") == "dn1, dn2, up1, up0, mid"     # all but the shallowest pair: DeepCache's deep branch
    assert names("EX1") == "dn2, up0, mid" and names("IN1") == "dn0, up2"
    assert names("DE2") == "dn1, dn2" and names("EN2") == "up1, up0"
    assert names("CO6") == "dn*, mid, up1, up0, up2.*.R"
    # GRI's default: the highest-resolution level with attention units (SDXL has none at level 0)
    assert gri.auto_units(t) == "dn1, up1"
    assert gri.auto_units(topology.describe(models["sd15"].model.diffusion_model)) == "dn0, up3"


def fi(N, model, preset, reuse):
    return compat.call_node(N["ASDMFeatureInheritance2"], model=model, preset=preset, period=3, units="",
                            reuse=reuse, forecast=False, final_full_fraction=0.0)


def test_a_preset_that_would_replay_the_output_names_the_layout_and_a_fix(N, models):
    with pytest.raises(ValueError) as e:   # SDXL has no A units at level 0: CO6 inherits every unit
        fi(N, models["sdxl"], "CO6", "residual")
    msg = str(e.value)
    assert "names every unit of this SDXL layout with 3 levels (dn0, dn1, dn2, mid, up0, up1, up2)" in msg
    assert "nearest preset that fits is CO5" not in msg and "nearest preset that fits is" in msg
    with pytest.raises(ValueError) as e:   # SD1.5, IN1 as span output: nothing reads the input
        fi(N, models["sd15"], "IN1", "output")
    assert "would not depend on the step's input" in str(e.value) and "use reuse = residual with IN1" in str(e.value)
