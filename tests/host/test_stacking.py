"""Feature inheritance and the switch stacked with what else acts on a UNet call: the host's own
EasyCache (current ComfyUI's keyed wrappers) and a ControlNet through the host's own nodes."""
import pytest
import torch

from conftest import holder_of, ksample, unload_all
from asdm import assembly
from asdm import compat
from asdm.harness import models as tm


# Runs that differ only by where the same float operations happen (inside or outside another
# wrapper) are equal to this relative tolerance; inheritance itself changes outputs by > 1e-3.
REL_TOL = 1e-5


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def fi(N, model, preset="CO6", period=2, tail=0.0, reuse="residual", forecast=False):
    return compat.call_node(N["ASDMFeatureInheritance"], model=model, preset=preset, units="", period=period,
                            final_full_steps=tail, reuse=reuse, forecast=forecast)[0]


def switch(N, m1, m2, boundary):
    return compat.call_node(N["ASDMUNetSwitch"], unit="steps", model_1=m1, start_1=0.0, end_1=float(boundary),
                            model_2=m2, start_2=float(boundary), end_2=-1.0)[0]


def test_inheritance_in_a_switch_range_with_easycache(N, conds):
    sd = tm.sd_model(seed=0)
    small = assembly.compress(sd, "base")
    tm.fill_(small.model.diffusion_model, seed=5)
    inheriting = fi(N, sd)
    alone = switch(N, small, inheriting, 3)
    out_alone = ksample(alone, conds, steps=8)
    calls_alone = list(holder_of(inheriting).last_run.calls)

    def easycache(model, threshold):
        return compat.call_node(N["EasyCache"], model=model, reuse_threshold=threshold,
                                start_percent=0.0, end_percent=1.0, verbose=False)[0]

    # EasyCache set so that it never skips: inheritance alone, to float tolerance
    out = ksample(easycache(alone, 0.0), conds, steps=8)
    assert holder_of(inheriting).last_run.calls == calls_alone   # inheritance ran as before
    assert rel_err(out, out_alone) < REL_TOL
    # EasyCache that skips is really in the stack
    assert rel_err(ksample(easycache(alone, 3.0), conds, steps=8), out_alone) > 1e-3
    unload_all()


# Span-output reuse runs only what is outside the span on inheriting steps, so ControlNet acts
# there through the computed blocks' skips (EX3: dn0 / up3); CO6 would leave nothing it reaches.
@pytest.mark.parametrize("preset,reuse,forecast", [("CO6", "residual", False), ("EX3", "output", False),
                                                   ("EX3", "output", True)])
def test_controlnet_acts_on_inheriting_steps(N, conds, preset, reuse, forecast):
    import nodes
    sd = tm.sd_model(seed=0)
    # The host's ControlNet loader reads the config from the weights and assumes 64 channels per
    # attention head, so the narrow net has attention from the second level on only; its zero
    # convs still match every skip of the UNet it controls.
    cfg = dict(tm.TINY_UNET, transformer_depth=[0, 0, 1, 1, 1, 1, 0, 0])
    cn = compat.call_node(N["ControlNetLoader"], control_net_name=tm.random_controlnet(cfg))[0]
    hint = torch.rand(1, 128, 128, 3, generator=torch.Generator().manual_seed(1))
    pos, neg = conds

    def controlled(start_percent):
        return compat.call_node(N["ControlNetApplyAdvanced"], positive=pos, negative=neg, control_net=cn,
                                image=hint, strength=1.0, start_percent=start_percent, end_percent=1.0)

    # The ControlNet starts at 30 % of the schedule, so step 0 (the only full step of this
    # inheritance: period 100) runs without it and every step it acts on inherits.
    model = fi(N, sd, preset, period=100, reuse=reuse, forecast=forecast)
    late = controlled(0.3)
    assert torch.equal(ksample(model, late, steps=1), ksample(model, conds, steps=1))   # off at step 0
    with_cn = ksample(model, late, steps=8)
    assert {m for s, m in holder_of(model).last_run.calls if s > 0} == {"inherit"}
    without = ksample(model, conds, steps=8)
    assert rel_err(with_cn, without) > 1e-3
    # and it acts as it does on the plain model: inheriting changes the result, not the control
    assert rel_err(ksample(sd, late, steps=8), ksample(sd, conds, steps=8)) > 1e-3
    unload_all()
