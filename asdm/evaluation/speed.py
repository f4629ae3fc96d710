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

from .. import assembly, condconv, hooks, inheritance
from ..harness import models as tm
from . import flops
from .deepcache import DeepCache, apply_deepcache
from .timing import Ratio, interleaved

CFG_BATCH = 2   # a cond and an uncond image per UNet call, as CFG batches them


class SD15Models:
    """SD1.5 (random weights, the harness's seeds) and the UNets the strategies derive from it,
    made when first asked for: "base", "small", "tiny", "m2", "small-condconv", "tiny-condconv"."""

    def __init__(self):
        self.sd = tm.sd_model(tm.SD15_UNET, seed=0)
        self.unets = {}

    def unet(self, name: str):
        if name not in self.unets:
            self.unets[name] = self._make(name)
        return self.unets[name]

    def _make(self, name: str):
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


def fi_key(s) -> str:
    """The measured kind of call an inheritance strategy makes (its unit set and mode)."""
    return f"{s.preset}{'+' + s.units if s.units else ''}/{s.reuse}{'+forecast' if s.forecast else ''}"


class _Patched:
    """A storing and a reusing call of one patched model (feature inheritance or the DeepCache
    baseline), driven without a sampler: the reusing call comes after the full steps it needs
    (two for a forecast). ``flops()`` counts the reusing call."""

    def __init__(self, models, s, x, t, ctx, keys, steps):
        self.x, self.t, self.ctx, self.keys, self.steps = x, t, ctx, keys, steps
        if s.kind == "deepcache":
            self.model = apply_deepcache(models.sd, s.depth, 5)
            self.holder = hooks.holder_of(self.model, DeepCache)
            self.full_steps = [0]
        else:
            self.model = inheritance.apply_inheritance(models.sd, s.preset, s.units, 5, 0, s.reuse, s.forecast)
            self.holder = hooks.holder_of(self.model, inheritance.InheritanceHolder)
            self.full_steps = [0, 5] if s.forecast else [0]
        self.units = len(getattr(self.holder, "units", ()))
        self.run = None

    def _call(self):
        return self.model.model.apply_model(self.x, self.t, c_crossattn=self.ctx)

    def _mark(self, run, step):
        run.step = step
        self.holder.call = self.holder.begin_call(run, self.x, self.keys)

    def _clear(self):
        self.holder.call = None

    def prepare(self, reuse: bool):
        import comfy.model_management as mm   # late: the host's modules exist once it runs (compat.start_host)
        mm.load_models_gpu([self.model])
        self.run = self.holder.start_run(total=self.steps)
        if reuse:
            for step in self.full_steps:    # untimed
                self._mark(self.run, step)
                self._call()
        self._mark(self.run, self.full_steps[-1] + 1 if reuse else 0)

    def timed(self):
        try:
            return self._call()
        finally:
            self._clear()
            self.holder.end_run(self.run)

    def callers(self):
        store, reuse = (lambda: self.timed()), (lambda: self.timed())
        store.prepare, reuse.prepare = (lambda: self.prepare(False)), (lambda: self.prepare(True))
        return store, reuse

    def flops(self) -> float:
        self.prepare(True)
        try:
            return sum(flops.count(self.model.model.diffusion_model, self._call).values())
        finally:
            self._clear()
            self.holder.end_run(self.run)


def measure(strategies, steps: int, size: int, rounds: int, progress=None) -> dict[str, dict]:
    """name -> {"ratio": Ratio, "bound": float} for every strategy; ``progress(done, total)`` is
    called after each timed call."""
    import comfy.model_management as mm   # late: the host's modules exist once it runs (compat.start_host)
    models = SD15Models()
    x, t, ctx, keys = _input(size, mm.get_torch_device())

    def plain_caller(m):
        fn = lambda: m.model.apply_model(x, t, c_crossattn=ctx)   # noqa: E731
        fn.prepare = lambda: mm.load_models_gpu([m])
        return fn

    calls = {"sd": plain_caller(models.sd), "sd again": plain_caller(models.sd)}
    for name in sorted({k for s in strategies for k in schedule(s, steps)} - {"sd", "sd again"}):
        if ":" not in name:
            calls[name] = plain_caller(models.unet(name))
    patched = {}
    for s in strategies:
        key = _patched_key(s)
        if key and key not in patched:
            patched[key] = _Patched(models, s, x, t, ctx, keys, steps)
            calls[f"{key}:store"], calls[f"{key}:reuse"] = patched[key].callers()

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
        cost = _flops(models, x, t, ctx, patched)
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
        key = _patched_key(s)
        if key:
            out[s.name].update(units=patched[key].units, skipped=1 - cost[f"{key}:reuse"] / cost["sd"])
    return out


def _patched_key(s) -> str:
    if s.kind == "fi":
        return fi_key(s)
    if s.kind == "deepcache":
        return f"DeepCache depth {s.depth}"
    return ""


def schedule(s, steps: int) -> dict[str, int]:
    """How many UNet calls of each measured kind one sampling run of ``s`` makes."""
    if s.kind == "plain":
        return {"sd again": steps}
    if s.kind == "unet":
        return {s.unet: steps}
    if s.kind == "switch":
        kinds: dict[str, int] = {}
        for model, n in s.ranges:
            kinds["sd" if model == "full" else model] = kinds.get("sd" if model == "full" else model, 0) + n
        return kinds
    key = _patched_key(s)
    if s.kind == "deepcache":   # uniform: every period-th step full (and cached)
        full = len(range(0, steps, s.period))
        return {f"{key}:store": full, f"{key}:reuse": steps - full}
    sched = inheritance.Schedule(s.period, s.tail)
    pattern = sched.pattern(steps)
    stores = sum(sched.stores(i, steps) for i in range(steps))
    return {"sd": pattern.count("F") - stores, f"{key}:store": stores, f"{key}:reuse": pattern.count("I")}


def _flops(models, x, t, ctx, patched) -> dict[str, float]:
    """FLOPs of each measured kind of call, counted on one forward (a storing call computes
    what a plain one does; a reusing one is counted as it runs)."""
    import comfy.model_management as mm   # late: the host's modules exist once it runs (compat.start_host)
    mm.load_models_gpu([models.sd])   # unpatched
    unet = models.sd.model.diffusion_model
    sd = sum(flops.count(unet, lambda: unet(x, t * 0 + 500, ctx)).values())
    cost = {"sd": sd, "sd again": sd}
    for key, p in patched.items():
        cost[f"{key}:store"] = sd
        cost[f"{key}:reuse"] = p.flops()
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
