"""GRI attention and ME-CondConv on an SDXL-topology UNet (the host's SDXL config, narrow): the
exactness the SD1.5 paths have (test_gri.py, test_condconv.py), on the level SDXL attends at
first (level 1: dn1, up1) and on its ResNet units."""
import pytest
import torch

from conftest import ksample, unload_all
from test_sdxl_inheritance import sdxl, xconds  # noqa: F401 (the same narrow SDXL UNet and conditioning)
from asdm import compat, condconv, gri, hooks, topology

REL_TOL = 1e-5   # batched against split UNet calls: float summation order only (test_gri.py)




def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def gri_patch(N, model, units="auto", window=4, pool=2, start=0.0, end=1.0):
    return compat.call_node(N["ASDMGRIAttention"], model=model, units=units, window=window, pool=pool, start=start,
                            end=end)[0]


def test_gri_default_units_are_the_first_level_with_attention(N, sdxl):
    holder = hooks.holder_of(gri_patch(N, sdxl), gri.GRIHolder)
    assert sorted({s.unit.block for s in holder.sites}) == ["dn1", "up1"]
    # SDXL's level 1 holds 2 transformer blocks per A unit: every one is patched
    unet = sdxl.model.diffusion_model
    t = topology.describe(unet)
    want = sum(len(unet.get_submodule(u.path).transformer_blocks) for u in t.units
               if u.kind == "A" and u.block in ("dn1", "up1"))
    assert len(holder.sites) == want == 2 * 2 + 3 * 2


def test_gri_exact_where_it_claims(N, sdxl, xconds):
    base = ksample(sdxl, xconds, steps=4)
    # level 1 of a 16x16 latent is an 8x8 grid: a window of 8 covers it (plain attention)
    assert torch.equal(ksample(gri_patch(N, sdxl, window=8), xconds, steps=4), base)
    assert torch.equal(ksample(gri_patch(N, sdxl, start=0.5, end=0.5), xconds, steps=4), base)
    inside = ksample(gri_patch(N, sdxl), xconds, steps=4)
    assert rel_err(inside, base) > 1e-4


def test_gri_split_calls_match_batched(N, sdxl, xconds):
    batched = gri_patch(N, sdxl)
    out_b = ksample(batched, xconds, steps=4)
    split = gri_patch(N, sdxl)
    split.add_object_patch("memory_required", lambda *a, **k: 1e30)   # one call per chunk
    assert rel_err(ksample(split, xconds, steps=4), out_b) < REL_TOL


def test_gri_refuses_units_the_layout_lacks(N, sdxl):
    with pytest.raises(ValueError, match=r"A-SDM GRI Attention: units: unit token 'up3' names no unit"):
        gri_patch(N, sdxl, units="dn0, up3")   # an SD1.5 graph's setting on SDXL
    with pytest.raises(ValueError, match=r"units: 'dn0' names no attention \(A\) unit.*'dn1, up1'"):
        gri_patch(N, sdxl, units="dn0")        # SDXL has no attention at level 0


def condconv_patch(N, model, **kw):
    args = dict(weights="none", units=condconv.DEFAULT_UNITS, experts=2, init="identity", seed=0)
    args.update(kw)
    return compat.call_node(N["ASDMMECondConv"], model=model, **args)[0]


def test_condconv_on_sdxl_resnet_units(N, sdxl, xconds):
    unet = sdxl.model.diffusion_model
    paths = condconv.select_convs(unet, condconv.DEFAULT_UNITS)
    r_units = [u for u in topology.describe(unet).units if u.kind == "R" and u.block != "mid"]
    assert len(paths) == 2 * len(r_units) == 2 * (6 + 9)   # both 3x3 convs of every R unit
    base = ksample(sdxl, xconds, steps=3)
    assert torch.equal(ksample(condconv_patch(N, sdxl), xconds, steps=3), base)   # identity experts
    assert rel_err(ksample(condconv_patch(N, sdxl, init="paper"), xconds, steps=3), base) > 1e-4
    unload_all()
