"""The speed a user gets from each strategy: UNet time on real-width UNets of a family (the
project-made random-weight SD1.5 and the BK-SDM layouts made from it; SDXL and its block-removed
students), beside the FLOP bound.

Whole sampling runs of an SD-width UNet take minutes on a CPU, so each strategy's UNet time over
its schedule is composed from single UNet calls, measured with the method of ``timing``: every
round times one call of each kind (plain, plain again, each compressed / assembled / ME-CondConv
/ student UNet, and per inheritance preset a storing and an inheriting call), interleaved in one
process. A round's composed time of a strategy is the sum over its schedule of the calls it
makes; the ratio is the plain model's composed time over the strategy's, per round, and the
result is the median ratio with its spread over the rounds. Plain against plain again is the
check: 1.00x within its spread. The FLOP bound is the same composition with FLOPs counted on one
real forward.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import assembly, condconv, errors, hooks, inheritance
from ..harness import models as tm
from . import flops
from .deepcache import DeepCache, apply_deepcache
from .timing import Ratio, interleaved

CFG_BATCH = 2   # a cond and an uncond image per UNet call, as CFG batches them
FAMILIES = {"sd15": tm.SD15_UNET, "sdxl": tm.SDXL_UNETS["sdxl"]}


class Models:
    """A family's plain UNet (random weights of the real widths, the harness's seeds) and the
    UNets the strategies derive from it, made when first asked for: on SD1.5 "base", "small",
    "tiny", "m2", "small-condconv", "tiny-condconv"; on SDXL its students by name ("ssd-1b",
    "vega", "koala-700m", "koala-1b", each with "-condconv") and SDXL assembled with one of them
    by a recipe ("M2+koala-700m": the recipe's level pairs from the student)."""

    def __init__(self, family: str = "sd15", dtype: torch.dtype | None = None):
        self.family, self.dtype = family, dtype
        self.sd = tm.sd_model(FAMILIES[family], seed=0, dtype=dtype)
        self.unets = {}

    def unet(self, name: str):
        if name not in self.unets:
            self.unets[name] = self._make(name)
        return self.unets[name]

    def _make(self, name: str):
        if name.endswith("-condconv"):
            plain = self.unet(name[:-len("-condconv")])
            unet = plain.model.diffusion_model
            experts = condconv.make_experts(unet, condconv.select_convs(unet, condconv.DEFAULT_UNITS), 2,
                                            "paper", seed=0)   # cond and uncond route differently
            return condconv.apply_condconv(plain, experts)
        if "+" in name:
            recipe, student = name.split("+", 1)
            return assembly.assemble(self.sd, self.unet(student), assembly.recipe_spec(recipe))
        if name in tm.SDXL_UNETS:
            return tm.sd_model(tm.SDXL_UNETS[name], seed=11, dtype=self.dtype)   # a "distilled" student
        if name == "base":
            base = assembly.compress(self.sd, "base")
            tm.fill_(base.model.diffusion_model, seed=11)   # a "distilled" Base: weights differ from SD's
            return base
        if name in ("small", "tiny"):
            return assembly.compress(self.sd, name)
        if name == "m2":
            return assembly.assemble(self.sd, self.unet("base"), assembly.recipe_spec("M2"))
        raise KeyError(name)


@dataclass
class Inputs:
    """One UNet call's input: a latent batch (cond and uncond), its step, its conditioning as the
    MODEL takes it (``kwargs`` of apply_model) and as the bare UNet does (``unet_kwargs``)."""
    x: torch.Tensor
    t: torch.Tensor
    kwargs: dict
    unet_kwargs: dict
    keys: tuple

    def call(self, model):
        return model.model.apply_model(self.x, self.t, **self.kwargs)

    def call_unet(self, unet):
        # the bare UNet takes its own dtype (apply_model casts; a direct call must)
        dtype = next(unet.parameters()).dtype
        kwargs = {k: v.to(dtype) for k, v in self.unet_kwargs.items()}
        return unet(self.x.to(dtype), timesteps=self.t, **kwargs)


def _inputs(model, size: int, device) -> Inputs:
    g = torch.Generator().manual_seed(0)
    cfg = model.model.model_config.unet_config
    x = torch.randn(CFG_BATCH, 4, size, size, generator=g).to(device)
    ctx = torch.randn(CFG_BATCH, 77, cfg["context_dim"], generator=g).to(device)
    t = torch.full((CFG_BATCH,), 500.0, device=device)
    kwargs, unet_kwargs = {"c_crossattn": ctx}, {"context": ctx}
    if cfg.get("adm_in_channels"):   # SDXL's y: pooled text and size embeddings
        y = torch.randn(CFG_BATCH, cfg["adm_in_channels"], generator=g).to(device)
        kwargs["y"] = unet_kwargs["y"] = y
    keys = tuple((i % 2, i // 2) for i in range(CFG_BATCH))   # cond / uncond chunks
    return Inputs(x, t, kwargs, unet_kwargs, keys)


def fi_key(s) -> str:
    """The measured kind of call an inheritance strategy makes (its unit set and mode)."""
    return f"{s.preset}{'+' + s.units if s.units else ''}/{s.reuse}{'+forecast' if s.forecast else ''}"


class _Patched:
    """A storing and a reusing call of one patched model (feature inheritance or the DeepCache
    baseline), driven without a sampler: the reusing call comes after the full steps it needs
    (two for a forecast). ``flops()`` counts the reusing call."""

    def __init__(self, models, s, inputs: Inputs, steps):
        self.inputs, self.steps = inputs, steps
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
        return self.inputs.call(self.model)

    def _mark(self, run, step):
        run.step = step
        self.holder.call = self.holder.begin_call(run, self.inputs.x, self.inputs.keys)

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


def measure(strategies, steps: int, size: int, rounds: int, progress=None, family: str = "sd15",
            dtype: torch.dtype | None = None, models: Models | None = None) -> dict[str, dict]:
    """name -> {"ratio": Ratio, "bound": float} for every strategy ({"refused": why} for a
    setting the layout refuses); ``progress(done, total)`` is
    called after each timed call. ``family``: "sd15" or "sdxl" (FAMILIES); ``dtype``: the
    UNets' (default: the host's choice for the device); ``models``: the caller's Models (to
    read the UNets afterwards), else made here."""
    import comfy.model_management as mm   # late: the host's modules exist once it runs (compat.start_host)
    models = models or Models(family, dtype)
    inputs = _inputs(models.sd, size, mm.get_torch_device())

    def plain_caller(m):
        fn = lambda: inputs.call(m)   # noqa: E731
        fn.prepare = lambda: mm.load_models_gpu([m])
        return fn

    calls = {"sd": plain_caller(models.sd), "sd again": plain_caller(models.sd)}
    for name in sorted({k for s in strategies for k in schedule(s, steps)} - {"sd", "sd again"}):
        if ":" not in name:
            calls[name] = plain_caller(models.unet(name))
    patched, refused = {}, {}
    for s in strategies:
        key = _patched_key(s)
        if key and key not in patched and key not in refused:
            try:
                patched[key] = _Patched(models, s, inputs, steps)
            except errors.ASDMError as e:   # this layout refuses the setting (docs/presets.md)
                refused[key] = str(e)
                continue
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
        cost = _flops(models, inputs, patched)   # first: a failure shows before the long timing
        times = interleaved(calls, rounds, device=inputs.x.device)
    mm.unload_all_models()

    out = {}
    for s in strategies:
        if _patched_key(s) in refused:
            out[s.name] = {"refused": refused[_patched_key(s)]}
            continue
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


def _flops(models, inputs: Inputs, patched) -> dict[str, float]:
    """FLOPs of each measured kind of call, counted on one forward (a storing call computes
    what a plain one does; a reusing one is counted as it runs)."""
    import comfy.model_management as mm   # late: the host's modules exist once it runs (compat.start_host)
    mm.load_models_gpu([models.sd])   # unpatched
    unet = models.sd.model.diffusion_model
    sd = sum(flops.count(unet, lambda: inputs.call_unet(unet)).values())
    cost = {"sd": sd, "sd again": sd}
    for key, p in patched.items():
        cost[f"{key}:store"] = sd
        cost[f"{key}:reuse"] = p.flops()
    for name, m in models.unets.items():
        u = m.model.diffusion_model
        cost[name] = sum(flops.count(u, lambda: inputs.call_unet(u)).values())
        if name.endswith("-condconv"):   # mixing 2 expert kernels per sample and conv
            cost[name] += 2 * CFG_BATCH * mixing_macs(m)
    return cost


def mixing_macs(model) -> int:
    """ME-CondConv's kernel mixing per image: N expert kernels per conv, whatever the latent."""
    unet = model.model.diffusion_model
    extra = 0
    for key, fn in model.object_patches.items():
        me = getattr(fn, "me", None)
        if me is not None:
            extra += me.n * unet.get_submodule(key[len("diffusion_model."):-len(".forward")]).weight.numel()
    return extra
