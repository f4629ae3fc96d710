"""Span-output reuse and forecast inheritance: what they skip, exactness, and equality with the
project's DeepCache baseline (asdm/evaluation/deepcache.py) where the two are the same method.
The requirements shared with residual inheritance (reuse at an unchanged input, split, samplers,
sizes, LoRA, unpatch, stacking) are parametrized over every mode in test_inheritance.py."""
import pytest
import torch

from conftest import holder_of, ksample
from asdm import compat
from asdm import inheritance
from asdm import topology
from asdm.evaluation import deepcache


# DeepCache's shallow branch at depth d, as a unit set: depth 2 computes conv_in and dn0's two
# layers (EX3's complement); depth 3 also dn0's downsampler and up2's last layer.
DEPTH_UNITS = {2: "dn1, dn2, dn3, mid, up0, up1, up2",
               3: "dn1, dn2, dn3, mid, up0, up1, up2.0, up2.1"}


def patch(N, model, units, period, reuse="output", forecast=False, tail=0.0):
    return compat.call_node(N["ASDMFeatureInheritance"], model=model, preset="custom", units=units, period=period,
                            final_full_steps=tail, reuse=reuse, forecast=forecast)[0]


def plan(tiny, spec):
    unet = tiny.model.diffusion_model
    return topology.span_plan(unet, topology.parse_unit_spec(spec, topology.describe(unet)))


def preset(tiny, name):
    return topology.preset_spec(name, topology.describe(tiny.model.diffusion_model))


def test_span_plan_of_the_presets(tiny):
    # EX3: one span; its output is up2's upsampled features (what DeepCache caches), and dn0's
    # downsampler, read only inside the span, goes with it
    skipped, boundary = plan(tiny, preset(tiny, "EX3"))
    assert boundary == ["output_blocks.8.2"]
    assert "input_blocks.3.0" in skipped and "middle_block.1" in skipped
    assert not any(p.startswith(("input_blocks.1.", "input_blocks.2.", "output_blocks.9.")) for p in skipped)
    # DeepCache depth 3: dn0's downsampler feeds up2.2 (computed), so it runs
    skipped, boundary = plan(tiny, DEPTH_UNITS[3])
    assert boundary == ["output_blocks.7.1"] and "input_blocks.3.0" not in skipped
    # scattered layers: each one's output is reused, and the downsampler after each down layer
    # (what only they read is not run: dn0.0 feeds dn0.1 and, across the skip, up3.1, both reused)
    skipped, boundary = plan(tiny, preset(tiny, "LI1"))
    assert len(boundary) == 8 + 3 and "input_blocks.2.1" in boundary and "input_blocks.3.0" in boundary
    assert "input_blocks.1.1" in skipped
    # the decoder loop: the encoder's outputs at every skip junction
    skipped, boundary = plan(tiny, preset(tiny, "DE2"))
    assert "input_blocks.4.1" in boundary and "input_blocks.11.0" in boundary
    # CO6: only up3's A units compute, fed by up3's stored R outputs; the rest is dead
    skipped, boundary = plan(tiny, preset(tiny, "CO6"))
    assert boundary == ["output_blocks.9.0", "output_blocks.10.0", "output_blocks.11.0"]
    assert "input_blocks.0.0" in skipped   # conv_in: read only by skipped modules


@pytest.mark.parametrize("depth", [2, 3])
@pytest.mark.parametrize("sampler,split", [("euler", False), ("heun", False), ("euler", True)])
def test_output_reuse_equals_the_deepcache_baseline(N, tiny, conds, depth, sampler, split):
    """Span-output reuse of DeepCache's deep branch with a uniform period is DeepCache, bit for
    bit: the unit-set plan and the baseline's block arithmetic agree on what runs."""
    ours = patch(N, tiny, DEPTH_UNITS[depth], 3)
    theirs = deepcache.apply_deepcache(tiny, depth, 3)
    if split:   # one call per conditioning chunk
        for m in (ours, theirs):
            m.add_object_patch("memory_required", lambda *a, **k: 1e30)
    a = ksample(ours, conds, sampler=sampler, steps=8)
    b = ksample(theirs, conds, sampler=sampler, steps=8)
    assert torch.equal(a, b)
    assert {m for s, m in holder_of(ours).last_run.calls if s % 3} == {"inherit"}
    assert torch.isfinite(a).all() and not torch.equal(a, ksample(tiny, conds, sampler=sampler, steps=8))


def test_forecast_is_the_line_through_the_last_two_full_steps(N, tiny):
    holder = inheritance.InheritanceHolder([], inheritance.Schedule(5, 0), "t", "output", forecast=True)
    run = inheritance.RunState(total=20)
    keys = ((0, 0), (1, 0))
    f2, f1 = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    holder._save(inheritance.CallContext("store", keys, run, 0), "p", f2)
    holder._save(inheritance.CallContext("store", keys, run, 5), "p", f1)
    holder._save(inheritance.CallContext("store", keys[:1], run, 5), "p", f1[:1])   # a later call of step 5
    assert len(run.features["p"]) == 2                                      # still two full steps
    x = torch.zeros(2, 3, 4, 4)
    got = holder._reuse(inheritance.CallContext("inherit", keys, run, 7), "p", x)
    torch.testing.assert_close(got, f1 + (f1 - f2) * 2 / 5, rtol=1e-6, atol=1e-6)
    # two equal stored features: exactly plain reuse
    holder._save(inheritance.CallContext("store", keys, run, 10), "p", f1.clone())
    assert torch.equal(holder._reuse(inheritance.CallContext("inherit", keys, run, 13), "p", x), f1)
    # without forecast only the last full step is kept
    plain = inheritance.InheritanceHolder([], inheritance.Schedule(5, 0), "t", "output", forecast=False)
    plain._save(inheritance.CallContext("store", keys, run, 15), "q", f2)
    plain._save(inheritance.CallContext("store", keys, run, 20), "q", f1)
    assert len(run.features["q"]) == 1 and torch.equal(plain._reuse(inheritance.CallContext("inherit", keys, run, 21), "q", x), f1)


@pytest.mark.parametrize("reuse", ["residual", "output"])
def test_forecast_acts_once_two_full_steps_are_stored(N, tiny, conds, reuse):
    # period 3: steps 1-2 inherit from step 0 alone (plain reuse), from step 4 on the forecast acts
    plain = ksample(patch(N, tiny, "dn1, dn2, dn3, mid, up0, up1, up2", 3, reuse, False), conds, steps=3)
    fc = ksample(patch(N, tiny, "dn1, dn2, dn3, mid, up0, up1, up2", 3, reuse, True), conds, steps=3)
    assert torch.equal(plain, fc)
    plain = ksample(patch(N, tiny, "dn1, dn2, dn3, mid, up0, up1, up2", 3, reuse, False), conds, steps=8)
    fc = ksample(patch(N, tiny, "dn1, dn2, dn3, mid, up0, up1, up2", 3, reuse, True), conds, steps=8)
    assert not torch.equal(plain, fc) and torch.isfinite(fc).all()


def test_unknown_reuse_is_a_clear_node_error(N, tiny):
    with pytest.raises(ValueError, match=r"A-SDM Feature Inheritance \(deprecated\): reuse must be one of residual, output"):
        compat.call_node(N["ASDMFeatureInheritance"], model=tiny, preset="EX3", units="", period=5,
                         final_full_steps=0, reuse="span", forecast=False)
