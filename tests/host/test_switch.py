"""Multi-UNet switching on the real host, against the stock two-KSamplerAdvanced chain."""
import pytest
import torch

from conftest import holder_of, unload_all
from sdxl_family import family_model, sdxl_conds
from asdm import compat
from asdm import hooks
from asdm.switch import UNetSwitch

STEPS, BOUNDARY = 8, 3


@pytest.fixture(scope="module")
def models(sd_and_base):
    return sd_and_base


def adv(model, conds, start, end, add_noise=True, leftover=False, latent=None, sampler="euler", steps=STEPS):
    import nodes
    pos, neg = conds
    lat = latent or {"samples": torch.zeros(1, 4, 16, 16)}
    return nodes.KSamplerAdvanced().sample(
        model, "enable" if add_noise else "disable", 7, steps, 5.0, sampler, "normal", pos, neg, lat,
        start, end, "enable" if leftover else "disable")[0]


def single(model, conds, sampler="euler", steps=STEPS):
    return adv(model, conds, 0, 10000, sampler=sampler, steps=steps)["samples"]


def chain(m1, m2, conds, sampler="euler", steps=STEPS, boundary=BOUNDARY):
    first = adv(m1, conds, 0, boundary, leftover=True, sampler=sampler, steps=steps)
    return adv(m2, conds, boundary, 10000, add_noise=False, latent=first, sampler=sampler, steps=steps)["samples"]


def switch(N, models, ends, unit="steps"):
    kw = {}
    start = 0
    for i, (m, e) in enumerate(zip(models, ends), start=1):
        kw.update({f"model_{i}": m, f"start_{i}": float(start), f"end_{i}": float(e)})
        start = e
    return compat.call_node(N["ASDMUNetSwitch"], unit=unit, **kw)[0]


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_same_model_everywhere_equals_single_run(N, models, conds768, sampler):
    sd = models[0]
    out = single(switch(N, [sd, sd], [BOUNDARY, -1]), conds768, sampler)
    assert torch.equal(out, single(sd, conds768, sampler))


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_switch_equals_two_sampler_chain(N, models, conds768, sampler):
    sd, base = models
    # The chain's own round-trip error: a one-model chain against that model's single run
    # (the latent is scaled out of and back into the sampler between the two nodes).
    roundtrip = (chain(base, base, conds768, sampler) - single(base, conds768, sampler)).abs().max().item()
    sw = switch(N, [base, sd], [BOUNDARY, -1])
    got = single(sw, conds768, sampler)
    want = chain(base, sd, conds768, sampler)
    diff = (got - want).abs().max().item()
    assert diff <= max(4 * roundtrip, 1e-5 * want.abs().max().item()), (diff, roundtrip)
    # and it really switched: not the single run of either model
    assert (got - single(sd, conds768, sampler)).abs().max() > 100 * max(diff, 1e-6)
    assert (got - single(base, conds768, sampler)).abs().max() > 100 * max(diff, 1e-6)
    h = hooks.holder_of(sw, UNetSwitch)
    per_step = {}
    for step, i in h.last_run.calls:
        per_step.setdefault(step, set()).add(i)
    assert per_step == {s: {0 if s < BOUNDARY else 1} for s in range(STEPS)}


@pytest.mark.parametrize("student", ["ssd-1b", "koala-700m"])
def test_sdxl_with_its_student_equals_two_sampler_chain(N, student):
    """The paper's S1 for SDXL: its student early, SDXL late. The host names their classes
    differently (SSD1B or KOALA_700M, SDXL); they share the latent format, text context and y
    encoding, so they switch. Fewer steps than above: SDXL's UNet is the slow one here."""
    steps, boundary = 4, 2
    sdxl, small = family_model("sdxl", 0), family_model(student, 4)
    assert type(sdxl.model.model_config).__name__ != type(small.model.model_config).__name__
    conds = sdxl_conds()
    alone = single(small, conds, steps=steps)
    roundtrip = (chain(small, small, conds, steps=steps, boundary=boundary) - alone).abs().max().item()
    sw = switch(N, [small, sdxl], [boundary, -1])
    got = single(sw, conds, steps=steps)
    want = chain(small, sdxl, conds, steps=steps, boundary=boundary)
    diff = (got - want).abs().max().item()
    assert diff <= max(4 * roundtrip, 1e-5 * want.abs().max().item()), (diff, roundtrip)
    assert (got - alone).abs().max() > 100 * max(diff, 1e-6)   # SDXL computed the late steps
    per_step = {}
    for step, i in hooks.holder_of(sw, UNetSwitch).last_run.calls:
        per_step.setdefault(step, set()).add(i)
    assert per_step == {s: {0 if s < boundary else 1} for s in range(steps)}
    unload_all()


def test_fraction_ranges_and_model_management(N, models, conds768):
    import comfy.model_management as mm
    sd, base = models
    sw = switch(N, [base, sd], [BOUNDARY / STEPS, -1], unit="fraction")
    assert torch.equal(single(sw, conds768), single(switch(N, [base, sd], [BOUNDARY, -1]), conds768))
    # the second model was loaded through the host's model manager, like any model
    assert any(lm.model is sd for lm in mm.current_loaded_models)


def test_lora_on_one_model_acts_only_in_its_range(N, models, conds768):
    import comfy.sample
    sd, base = models
    lora = sd.clone()
    w = sd.model.diffusion_model.state_dict()["input_blocks.1.0.in_layers.2.weight"]
    lora.add_patches({"diffusion_model.input_blocks.1.0.in_layers.2.weight":
                      (0.2 * torch.randn(w.shape, generator=torch.Generator().manual_seed(4)),)}, 1.0)

    def trace(model):
        xs = []  # the denoised prediction of each step: the output of that step's model
        pos, neg = conds768
        noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(7))
        comfy.sample.sample(model, noise, STEPS, 5.0, "euler", "normal", pos, neg, torch.zeros(1, 4, 16, 16),
                            callback=lambda i, x0, x, total: xs.append(x0.clone()), seed=7)
        return xs

    plain = trace(switch(N, [base, sd], [BOUNDARY, -1]))
    patched = trace(switch(N, [base, lora], [BOUNDARY, -1]))
    for i in range(BOUNDARY):          # steps of model_1: untouched by model_2's LoRA
        assert torch.equal(plain[i], patched[i])
    for i in range(BOUNDARY, STEPS):   # steps of model_2: the LoRA acts
        assert not torch.equal(plain[i], patched[i])
    # and the other way round: LoRA on model_1 acts from the first step
    first = trace(switch(N, [lora, base], [BOUNDARY, -1]))
    ref = trace(switch(N, [sd, base], [BOUNDARY, -1]))
    assert not torch.equal(first[0], ref[0])
    unload_all()


@pytest.mark.parametrize("reuse,forecast", [("residual", False), ("output", True)])
def test_switch_stacks_with_feature_inheritance(N, models, conds768, reuse, forecast):
    sd, base = models
    preset = "CO6" if reuse == "residual" else "CO3"   # CO6 would replay the stored output in span-output reuse
    fi = compat.call_node(N["ASDMFeatureInheritance"], model=sd, preset=preset, units="", period=2,
                          final_full_steps=0, reuse=reuse, forecast=forecast)[0]
    out = single(switch(N, [base, fi], [BOUNDARY, -1]), conds768)
    plain = single(switch(N, [base, sd], [BOUNDARY, -1]), conds768)
    assert not torch.equal(out, plain)
    holder = holder_of(fi)
    modes = {}
    for step, mode in holder.last_run.calls:
        modes[step] = mode
    # FI counts the schedule's steps; model_2 computes steps 3..7, inheriting on the odd ones
    assert sorted(modes) == list(range(BOUNDARY, STEPS))
    # (step 3 inherits, but nothing is stored yet: residual reuse computes each unit fully, output
    # reuse the whole call, and says so)
    first_computes = reuse == "output"
    assert [modes[s] == "inherit" for s in sorted(modes)] == [
        s % 2 == 1 and not (first_computes and s == BOUNDARY) for s in range(BOUNDARY, STEPS)]
    assert holder.last_run.fallbacks == (1 if first_computes else len(holder.units))


def test_switch_errors(N, models, conds768, sd2_tiny):
    sd, base = models
    node = N["ASDMUNetSwitch"]
    common = dict(model_1=base, model_2=sd)
    with pytest.raises(ValueError, match="overlap"):
        compat.call_node(node, unit="steps", **common, start_1=0.0, end_1=10.0, start_2=8.0, end_2=-1.0)
    with pytest.raises(ValueError, match="gap"):
        compat.call_node(node, unit="steps", **common, start_1=0.0, end_1=10.0, start_2=12.0, end_2=-1.0)
    with pytest.raises(ValueError, match="must start at 0"):
        compat.call_node(node, unit="steps", **common, start_1=2.0, end_1=10.0, start_2=10.0, end_2=-1.0)
    with pytest.raises(ValueError, match="whole steps"):
        compat.call_node(node, unit="steps", **common, start_1=0.0, end_1=2.5, start_2=2.5, end_2=-1.0)
    with pytest.raises(ValueError, match="within 0-1"):
        compat.call_node(node, unit="fraction", **common, start_1=0.0, end_1=10.0, start_2=10.0, end_2=-1.0)
    v2 = sd2_tiny
    with pytest.raises(ValueError, match="model_2 does not match model_1: context width 1024 vs 768"):
        compat.call_node(node, unit="steps", model_1=base, model_2=v2, start_1=0.0, end_1=3.0, start_2=3.0,
                         end_2=-1.0)
    with pytest.raises(ValueError, match="model_2 does not match model_1: latent format SDXL vs SD15"):
        compat.call_node(node, unit="steps", model_1=base, model_2=family_model("vega", 1), start_1=0.0, end_1=3.0,
                         start_2=3.0, end_2=-1.0)
    short = compat.call_node(node, unit="steps", **common, start_1=0.0, end_1=3.0, start_2=3.0, end_2=5.0)[0]
    with pytest.raises(ValueError, match="step 5 of a 8-step schedule is in no range"):
        single(short, conds768)
    unload_all()


def test_ranges_count_the_steps_the_sampler_samples(N, models, conds768):
    """With KSamplerAdvanced's start_at_step / end_at_step, the switch's step 0 is the window's
    first step (the node says so): steps 3-7 of an 8-step schedule with ranges [0, 2) and [2, end)
    run the first two of them on model_1."""
    sd, base = models
    sw = switch(N, [base, sd], [2, -1])
    adv(sw, conds768, 3, 8)
    calls = hooks.holder_of(sw, UNetSwitch).last_run.calls
    assert [(s, i) for s, i in calls] == [(0, 0), (1, 0), (2, 1), (3, 1), (4, 1)]
