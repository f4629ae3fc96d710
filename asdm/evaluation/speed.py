"""The speed an SD1.5 user gets from each strategy: UNet time on SD1.5-width UNets (the
project-made random-weight SD1.5 and the BK-SDM layouts made from it), beside the FLOP bound.

Whole sampling runs of an SD-width UNet take minutes on a CPU, so each strategy's UNet time over
its schedule is composed from single UNet calls, measured with the method of ``timing``: every
round times one call of each kind (plain SD, SD again, each compressed / assembled / ME-CondConv
UNet, and per inheritance preset a storing and an inheriting call), interleaved in one process.
A round's composed time of a strategy is the sum over its schedule of the calls it makes; the
ratio is plain SD's composed time over the strategy's, per round, and the result is the median
ratio with its spread over the rounds. Plain SD against SD again is the check: 1.00x within its
spread. The FLOP bound is the same composition with FLOPs counted on one real forward.
"""
from __future__ import annotations

import torch

from .timing import Ratio, interleaved

CFG_BATCH = 2   # a cond and an uncond image per UNet call, as CFG batches them


class SD15Models:
    """SD1.5 (random weights, the harness's seeds) and the UNets the strategies derive from it,
    made when first asked for: "base", "small", "tiny", "m2", "small-condconv", "tiny-condconv"."""

    def __init__(self):
        from ..harness import models as tm
        self.sd = tm.sd_model(tm.SD15_UNET, seed=0)
        self.unets = {}

    def unet(self, name: str):
        if name not in self.unets:
            self.unets[name] = self._make(name)
        return self.unets[name]

    def _make(self, name: str):
        from .. import assembly, condconv
        from ..harness import models as tm
        if name == "base":
            base = assembly.compress(self.sd, "base")
            tm.fill_(base.model.diffusion_model, seed=11)   # a "distilled" Base: weights differ from SD's
            return base
        if name in ("small", "tiny"):
            return assembly.compress(self.sd, name)
        if name == "m2":
            return assembly.assemble(self.sd, self.unet("base"), assembly.recipe_spec("M2"))
        if name.endswith("-condconv"):
            plain = self.unet(name[:-len("-condconv")])
            unet = plain.model.diffusion_model
            experts = condconv.make_experts(unet, condconv.select_convs(unet, condconv.DEFAULT_UNITS), 2,
                                            "paper", seed=0)   # cond and uncond route differently
            return condconv.apply_condconv(plain, experts)
        raise KeyError(name)


def _input(size: int, device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(CFG_BATCH, 4, size, size, generator=g).to(device)
    ctx = torch.randn(CFG_BATCH, 77, 768, generator=g).to(device)
    t = torch.full((CFG_BATCH,), 500.0, device=device)
    keys = tuple((i % 2, i // 2) for i in range(CFG_BATCH))   # cond / uncond chunks
    return x, t, ctx, keys


def measure(strategies, steps: int, size: int, rounds: int, progress=None) -> dict[str, dict]:
    """name -> {"ratio": Ratio, "bound": float} for every strategy; ``progress(done, total)`` is
    called after each timed call."""
    import comfy.model_management as mm
    from .. import inheritance
    models = SD15Models()
    x, t, ctx, keys = _input(size, mm.get_torch_device())

    def call(m):
        return m.model.apply_model(x, t, c_crossattn=ctx)

    def plain_caller(m):
        fn = lambda: call(m)   # noqa: E731
        fn.prepare = lambda: mm.load_models_gpu([m])
        return fn

    def inheritance_callers(preset):
        """A storing call (step 0 of a run) and an inheriting one (step 1, after a store)."""
        p = inheritance.apply_inheritance(models.sd, preset, "", 5, 0)
        holder = p.model_options["transformer_options"]["asdm_inheritance"]
        state = {}

        def begin(step):
            mm.load_models_gpu([p])
            run = holder.start_run(total=steps)
            if step == 1:   # store first, untimed
                holder.call = holder.begin_call(run, x, keys)
                call(p)
                run.step = 1
            holder.call = holder.begin_call(run, x, keys)
            state["run"] = run

        def timed_call():
            try:
                return call(p)
            finally:
                holder.call = None
                holder.end_run(state.pop("run"))

        store, inherit = (lambda: timed_call()), (lambda: timed_call())
        store.prepare, inherit.prepare = (lambda: begin(0)), (lambda: begin(1))
        return store, inherit, holder

    calls = {"sd": plain_caller(models.sd), "sd again": plain_caller(models.sd)}
    for name in sorted({k for s in strategies for k in schedule(s, steps)} - {"sd", "sd again"}):
        if ":" not in name:
            calls[name] = plain_caller(models.unet(name))
    holders = {}
    for preset in sorted({s.preset for s in strategies if s.kind == "fi"}):
        calls[f"{preset}:store"], calls[f"{preset}:inherit"], holders[preset] = inheritance_callers(preset)

    if progress is not None:   # count every timed call
        total, done = len(calls) * (rounds + 1), [0]
        for k, fn in list(calls.items()):
            def counted(fn=fn):
                out = fn()
                done[0] += 1
                progress(done[0], total)
                return out
            counted.prepare = getattr(fn, "prepare", None) or (lambda: None)
            calls[k] = counted
    with torch.no_grad():
        times = interleaved(calls, rounds)
        mm.load_models_gpu([models.sd])   # unpatched, for counting
        cost = _flops(models, x, t, ctx, holders)
    mm.unload_all_models()

    out = {}
    for s in strategies:
        kinds = schedule(s, steps)
        composed = [sum(n * times[k][r] for k, n in kinds.items()) for r in range(rounds)]
        baseline = [steps * v for v in times["sd"]]
        bound = steps * cost["sd"] / sum(n * cost[k] for k, n in kinds.items())
        out[s.name] = {"ratio": Ratio.of(baseline, composed), "bound": bound,
                       "call_seconds": {k: sorted(times[k])[len(times[k]) // 2] for k in kinds},
                       "call_flops": {k: cost[k] for k in kinds}}
        if s.kind == "fi":
            holder = holders[s.preset]
            out[s.name].update(units=len(holder.units), skipped=1 - cost[f"{s.preset}:inherit"] / cost["sd"])
    return out


def schedule(s, steps: int) -> dict[str, int]:
    """How many UNet calls of each measured kind one sampling step per step of ``s`` makes."""
    from ..inheritance import Schedule
    if s.kind == "plain":
        return {"sd again": steps}
    if s.kind == "unet":
        return {s.unet: steps}
    if s.kind == "switch":
        kinds: dict[str, int] = {}
        for model, n in s.ranges:
            kinds["sd" if model == "full" else model] = kinds.get("sd" if model == "full" else model, 0) + n
        return kinds
    sched = Schedule(s.period, s.tail)
    pattern = sched.pattern(steps)
    stores = sum(sched.stores(i, steps) for i in range(steps))
    return {"sd": pattern.count("F") - stores, f"{s.preset}:store": stores,
            f"{s.preset}:inherit": pattern.count("I")}


def _flops(models, x, t, ctx, holders) -> dict[str, float]:
    """FLOPs of each measured kind of call, counted on one forward (a storing call computes
    what a plain one does; an inheriting one skips its units' residual branches)."""
    from ..topology import describe
    from . import flops
    unet = models.sd.model.diffusion_model
    counted = flops.count(unet, lambda: unet(x, t * 0 + 500, ctx))
    sd = sum(counted.values())
    cost = {"sd": sd, "sd again": sd}
    residual = flops.residual_flops(describe(unet), counted)
    for preset, holder in holders.items():
        cost[f"{preset}:store"] = sd
        cost[f"{preset}:inherit"] = sd - sum(residual[u.name] for u in holder.units)
    for name, m in models.unets.items():
        u = m.model.diffusion_model
        cost[name] = sum(flops.count(u, lambda: u(x, t * 0 + 500, ctx)).values())
        if name.endswith("-condconv"):   # mixing 2 expert kernels per sample and conv
            cost[name] += _mixing_flops(m)
    return cost


def _mixing_flops(model) -> int:
    unet = model.model.diffusion_model
    extra = 0
    for key, fn in model.object_patches.items():
        me = getattr(fn, "me", None)
        if me is not None:
            extra += 2 * CFG_BATCH * me.n * unet.get_submodule(key[len("diffusion_model."):-len(".forward")]).weight.numel()
    return extra
