"""Tuning-free feature inheritance (A-SDM §V).

A unit's output is ``identity(x) + F(x)``. On a *full* step every chosen unit computes ``F``
and, when a later step will inherit, stores it; on an *inheriting* step it computes only
``identity(x)`` (the 1x1 skip conv of a ResBlock where channels change, plain ``x`` for an
attention unit) and adds the stored ``F``. Everything outside the chosen units always runs.

Sampling modes: ``Pn`` is a full step then n-1 inheriting steps, repeating; ``Pn†`` is the same
with the last steps all full (``tail``: a fraction of the run's steps, or a count). Step 0 of a run is always full. Steps are sampler steps
of the schedule being sampled (``hooks``), so multi-call samplers, CFG and cond/uncond
splitting do not shift the pattern.

Two ways to reuse (``reuse``):

* ``residual`` (the paper's): as above; the current latent still flows through every inherited
  unit's identity path, with stale corrections.
* ``output`` (span-output reuse, as DeepCache reuses its deep branch): the chosen units are not
  run at all. Where their outputs are read outside the chosen set (the span's boundary: the
  features entering the first computed block after it, and the skip connections leaving it),
  those outputs are stored on full steps and reused whole (``topology.span_plan``). A set that
  is one span (EX presets) reuses one tensor, the deep part's output at its skip junction; a
  set of scattered units (LI presets) reuses each unit's output.

``forecast``: on an inheriting step, a first-order forecast F1 + (F1 - F2) * (s - s1) / (s1 - s2)
from the last two full steps (s1, s2) replaces F1, in either mode. It extrapolates in sampler
steps, not in sigma: the samplers space their steps as even progress through the denoising,
while sigma spans orders of magnitude (14.6 to 0.03 in a 20-step SD run), so a line in sigma
overshoots early in the run. Until two full steps are stored it reuses F1. Memory: one more
stored tensor per stored feature.

Stored features are keyed by unit and by conditioning chunk, and live in a per-run
``RunState`` that is dropped when the run ends or fails, or a new run starts. The run counts the
bytes they hold (now and at its peak, said in its log line; docs/memory.md gives the figures per
mode). ``features_on``: ``compute`` keeps them where the UNet computes (today's behaviour, no
transfers); ``offload`` keeps them on the host's offload device (system memory) and moves each
back to the UNet's device when an inheriting step reuses it, for users short of VRAM: the
values are the same, the copies cost time.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from . import hooks
from .errors import InheritanceError, TopologyError
from .switch import refuse_switch
from .topology import (PRESETS, Topology, Unit, atom_macs, atom_sides, describe, module_macs, parse_unit_spec,
                       preset_spec, reaches_output, span_plan)

log = logging.getLogger("A-SDM")
REUSE = ("residual", "output")
FEATURES_ON = ("compute", "offload")   # where stored features live (see the module's docstring)
# What a new node starts with: EX3 P3 with span-output reuse and forecast, DeepCache's work at
# depth 2, interval 3 (the same FLOPs: the deep span's output reused whole on two of every three
# steps), the closest to full compute of the settings compared at that work when it was chosen
# (docs/report/report.md and docs/benchmarks.md hold the current figures).
DEFAULTS = dict(preset="EX3", period=3, final_full_steps=0.0, reuse="output", forecast=True)



@dataclass(frozen=True)
class Schedule:
    period: int    # n of Pn
    tail: float    # Pn†: the last steps that are all full; below 1 a fraction of the run's steps
                   # (0.2 = the paper's 10 of 50), 1 or more a count of steps

    def __post_init__(self):
        if not isinstance(self.period, int) or self.period < 1:
            raise InheritanceError(f"period must be an integer >= 1 (got {self.period!r}); 1 means every step is full")
        if not isinstance(self.tail, (int, float)) or self.tail < 0 or (self.tail >= 1 and self.tail != int(self.tail)):
            raise InheritanceError(
                f"final_full_steps must be a fraction of the schedule below 1 (0.2 = the last 20 % of "
                f"the steps) or a whole number of steps (got {self.tail!r})")

    def tail_steps(self, total: int | None) -> int:
        if self.tail >= 1:
            return int(self.tail)
        return 0 if total is None else int(self.tail * total + 0.5)

    def is_full(self, step: int, total: int | None) -> bool:
        if total is not None and step >= total - self.tail_steps(total):
            return True
        return step % self.period == 0

    def stores(self, step: int, total: int | None) -> bool:
        """A full step stores its features only when the next step inherits them."""
        return self.is_full(step, total) and not self.is_full(step + 1, total)

    def pattern(self, total: int) -> str:
        """'F' for full, 'I' for inheriting, per step: the refresh pattern a run follows."""
        return "".join("F" if self.is_full(s, total) else "I" for s in range(total))


@dataclass
class RunState(hooks.Run):
    """Everything one sampling run holds; dropped as a whole when the run ends."""
    features: dict = field(default_factory=dict)   # path -> stored features, newest full step first
    shapes: dict = field(default_factory=dict)     # output mode: skipped path -> (shape[1:], dtype)
    fillers: dict = field(default_factory=dict)    # output mode: (shape, dtype, device) -> what skipped paths return
    calls: list = field(default_factory=list)      # (step, mode) per model call, for reports and tests
    fallbacks: int = 0                             # inheriting calls that had to compute fully
    shape: tuple | None = None                     # (shape, dtype, device) of the model input
    path_bytes: dict = field(default_factory=dict)  # path -> bytes its stored features hold
    stored_bytes: int = 0                          # bytes all stored features hold now
    peak_bytes: int = 0                            # the most they held at once in this run
    filler_bytes: int = 0                          # output mode: bytes the fillers hold now
    peak_filler_bytes: int = 0

    def forget(self) -> None:
        """Drops every stored feature and filler (the counts follow; the peaks stay)."""
        self.features.clear()
        self.path_bytes.clear()
        self.shapes.clear()
        self.fillers.clear()
        self.stored_bytes = self.filler_bytes = 0


@dataclass
class CallContext:
    mode: str                 # "full", "store" or "inherit"
    keys: tuple               # one key per conditioning chunk in the batch, in batch order
    run: RunState
    step: int = 0


class InheritanceHolder(hooks.Holder):
    """Shared by the unit forwards and the sampling hooks of one patched MODEL."""
    KEY = "asdm_feature_inheritance"
    RUN = RunState

    def __init__(self, units: list[Unit], schedule: Schedule, label: str, reuse: str = "residual",
                 forecast: bool = False, span: tuple[tuple, tuple] = ((), ()), unet=None,
                 store_device=None):
        super().__init__()
        self.units = units
        self.schedule = schedule
        self.label = label
        self.reuse = reuse
        self.forecast = forecast
        self.skipped, self.boundary = span   # output mode: atoms not run / whose outputs are stored
        self.unet = unet                     # for the share an inheriting step computes (the log line)
        self.store_device = store_device     # None: features stay where computed; else kept there
        self._shares: dict = {}              # latent side -> the share an inheriting step computes

    def finish_run(self, run: RunState) -> None:
        run.forget()
        n = len({s for s, m in run.calls})
        inh = len({s for s, m in run.calls if m == "inherit"})
        if n:
            where = "" if self.store_device is None else f" on the offload device ({self.store_device})"
            fillers = (f" (and {_mib(run.peak_filler_bytes)} of zeros standing for skipped modules)"
                       if run.peak_filler_bytes else "")
            log.info("A-SDM feature inheritance (%s): %d of %d sampler steps inherited %d units%s; stored "
                     "features peaked at %s%s%s%s", self.label, inh, n, len(self.units),
                     self._work(run, n, inh), _mib(run.peak_bytes), where, fillers,
                     f"; {run.fallbacks} calls computed fully for lack of stored features" if run.fallbacks else "")

    def _work(self, run: RunState, steps: int, inherited: int) -> str:
        """The UNet work the run saved, as a FLOP ratio (full compute over this run's)."""
        if self.unet is None or run.shape is None or not inherited:
            return ""
        h, w = run.shape[0][-2:]
        side = (h * w) ** 0.5
        if side not in self._shares:   # counting walks every module: once per size, not every run
            self._shares[side] = inheriting_share(self.unet, self.units, self.reuse, side)[0]
        share = self._shares[side]
        return f"; UNet FLOPs {steps / (steps - inherited + inherited * share):.2f}x fewer"

    def begin_call(self, run: RunState | None, x: torch.Tensor, keys: tuple) -> CallContext | None:
        """Marks the call with its step mode: full, store or inherit."""
        if run is None:
            return None
        sig = (tuple(x.shape[1:]), x.dtype, x.device)
        if run.shape != sig:  # new resolution/dtype/device: nothing stored can be reused
            run.forget()
            run.shape = sig
        step, total = run.step, run.total
        if not self.schedule.is_full(step, total):
            mode = "inherit"
            if self.reuse == "output" and not self._can_skip(run, keys, x.shape[0]):
                # Skipped atoms feed each other, so the span is run whole or not at all.
                run.fallbacks += 1
                mode = "store"
        elif self.schedule.stores(step, total):
            mode = "store"
        else:
            mode = "full"
            run.features.clear()  # no later step needs what is stored
            run.path_bytes.clear()
            run.stored_bytes = 0
        run.calls.append((step, mode))
        return CallContext(mode, keys, run, step)

    def _can_skip(self, run: RunState, keys: tuple, batch: int) -> bool:
        ctx = CallContext("inherit", keys, run, run.step)
        return (all(p in run.shapes for p in self.skipped)
                and all(_stored(ctx, p, batch) is not None for p in self.boundary))

    # -- unit forwards ----------------------------------------------------------------------
    def unit_forward(self, module: torch.nn.Module, unit: Unit, inner):
        """residual mode: the forward that replaces ``module.forward`` (object patch); ``inner``
        is the one it replaces (the class's forward, or an earlier patch)."""
        path = unit.path
        if unit.kind == "R":
            identity = module.skip_connection
            last = module.out_layers[-1]  # ResBlock returns skip_connection(x) + out_layers[-1](...)
        else:
            identity = None               # SpatialTransformer returns x + F(x)
            last = None
        holder = self

        def forward(x, *args, **kwargs):
            call = holder.call
            if call is None:
                return inner(x, *args, **kwargs)
            if call.mode == "inherit":
                f = holder._reuse(call, path, x)
                if f is not None:
                    return (x if identity is None else identity(x)) + f
                call.run.fallbacks += 1
                return inner(x, *args, **kwargs)
            if call.mode == "full":
                return inner(x, *args, **kwargs)
            # store: keep F exactly as the unit computed it
            if last is None:
                out = inner(x, *args, **kwargs)
                f = out - x
            else:
                captured = []
                handle = last.register_forward_hook(lambda m, i, o: captured.append(o))
                try:
                    out = inner(x, *args, **kwargs)
                finally:
                    handle.remove()
                f = captured[-1]
            holder._save(call, path, f)
            return out

        return forward

    def span_forward(self, path: str, inner):
        """output mode: the forward of an atom of the span (``topology.span_plan``)."""
        holder = self
        boundary = path in self.boundary

        def forward(x, *args, **kwargs):
            call = holder.call
            if call is None or call.mode == "full":
                return inner(x, *args, **kwargs)
            if call.mode == "inherit":
                if boundary:
                    return holder._reuse(call, path, x, copy=True)
                shape, dtype = call.run.shapes[path]
                # Read only by other skipped modules (and ComfyUI's skip list and in-place
                # ControlNet adds between them): any tensor of the right shape will do, so one
                # per shape serves every skipped module of the run, allocated once.
                key = ((x.shape[0],) + shape, dtype, x.device)
                filler = call.run.fillers.get(key)
                if filler is None:
                    run = call.run
                    filler = run.fillers[key] = x.new_zeros(key[0], dtype=dtype)
                    run.filler_bytes += filler.numel() * filler.element_size()
                    run.peak_filler_bytes = max(run.peak_filler_bytes, run.filler_bytes)
                return filler
            out = inner(x, *args, **kwargs)
            if boundary:
                holder._save(call, path, out, copy=True)   # ComfyUI adds ControlNet in place to what we return
            else:
                call.run.shapes[path] = (tuple(out.shape[1:]), out.dtype)
            return out

        return forward

    # -- stored features ----------------------------------------------------------------------
    def _save(self, call: CallContext, path: str, f: torch.Tensor, copy: bool = False) -> None:
        if self.store_device is not None:
            f = f.to(self.store_device, copy=True)
        elif copy:
            f = f.clone()
        save_feature(call, path, f, keep=2 if self.forecast else 1)
        run = call.run
        # What the path holds now: each stored call's tensor once (a chunk is a view of its call's
        # tensor; an earlier call of the step is held while one of its chunks is still kept).
        held = {id(t): t.numel() * t.element_size()
                for lv in run.features[path] for t in (lv["whole"][1], *lv["sources"].values())}
        now = sum(held.values())
        run.stored_bytes += now - run.path_bytes.get(path, 0)
        run.path_bytes[path] = now
        run.peak_bytes = max(run.peak_bytes, run.stored_bytes)

    def _reuse(self, call: CallContext, path: str, x: torch.Tensor, copy: bool = False) -> torch.Tensor | None:
        """What an inheriting call uses for ``path``: the stored feature, or its forecast."""
        f = reuse_feature(call, path, x.shape[0], self.forecast, copy, device=x.device)
        if f is None or (self.reuse == "residual" and (f.shape[2:] != x.shape[2:] or f.dtype != x.dtype)):
            return None
        return f


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


# Stored features, shared with Auto Cache (``autocache``): ``call`` is any object with ``run``
# (holding ``features``: path -> stored levels, newest full step first), ``keys`` (one per
# conditioning chunk of the call) and ``step``.

def save_feature(call, path: str, f: torch.Tensor, keep: int) -> None:
    """Stores ``f`` as ``path``'s feature of ``call``'s step, keeping the ``keep`` newest steps."""
    # Per chunk (so a step whose cond and uncond run in separate calls is fully stored), plus
    # the whole call's tensor for the common case where the next calls batch the same chunks.
    # Calls of one step (multi-call samplers, split chunks) update that step's entry; a new
    # full step pushes the previous one back (kept only for the forecast).
    levels = call.run.features.setdefault(path, [])
    if not levels or levels[0]["step"] != call.step:
        levels.insert(0, {"step": call.step, "whole": None, "chunks": {}, "sources": {}})
        del levels[keep:]
    level = levels[0]
    level["whole"] = (call.keys, f)
    n = f.shape[0] // len(call.keys)
    for i, k in enumerate(call.keys):
        level["chunks"][k] = f[i * n:(i + 1) * n]
        level["sources"][k] = f   # the tensor a chunk is a view of: what holds its memory


def reuse_feature(call, path: str, batch: int, forecast: bool, copy: bool = False,
                  level: int = 0, device=None) -> torch.Tensor | None:
    """``path``'s stored feature for ``call`` (None when a chunk of it is missing), or with
    ``forecast`` the line through the two newest stored steps, evaluated at ``call.step``;
    ``level`` 1: the stored step before the newest, as it was stored. ``device``: where the
    caller computes (offloaded features come back there)."""
    f1 = _stored(call, path, batch, level)
    if f1 is None:
        return None
    levels = call.run.features[path]
    if forecast and not level and len(levels) > 1:
        f2 = _stored(call, path, batch, level=1)
        if f2 is not None and f2.shape == f1.shape:
            s1, s2 = levels[0]["step"], levels[1]["step"]
            # lerp(f2, f1, w) = f1 + (f1 - f2) * (w - 1): the line through both, one kernel
            return torch.lerp(f2.to(device or f2.device), f1.to(device or f1.device), 1.0 + (call.step - s1) / (s1 - s2))
    here = f1 if device is None else f1.to(device)
    return here.clone() if copy and here is f1 else here


def _stored(call: CallContext, path: str, batch: int, level: int = 0) -> torch.Tensor | None:
    levels = call.run.features.get(path)
    if not levels or len(levels) <= level:
        return None
    keys, f = levels[level]["whole"]
    if keys != call.keys:
        parts = [levels[level]["chunks"].get(k) for k in call.keys]
        if any(p is None for p in parts):
            return None
        f = torch.cat(parts) if len(parts) > 1 else parts[0]
    return f if f.shape[0] == batch else None


# ---------------------------------------------------------------------------------------------
# Applying it to a MODEL
# ---------------------------------------------------------------------------------------------

def resolve_units(topo: Topology, preset: str, units: str) -> tuple[list[Unit], list[str]]:
    """Unit set for a preset name (or 'custom') plus an optional extra spec.

    Returns the units and the preset tokens this UNet does not have (to report)."""
    skipped: list[str] = []
    chosen: list[Unit] = []
    if preset != "custom":
        if preset not in PRESETS:
            raise InheritanceError(
                f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)} or 'custom'", input="preset")
        for tok in preset_spec(preset, topo).split(", "):
            hit = parse_unit_spec(tok, topo, strict=False)
            if not hit:
                skipped.append(tok)
            chosen += hit
    if units.strip():
        try:
            chosen += parse_unit_spec(units, topo, strict=True)
        except TopologyError as e:
            e.input = "units"
            raise
    names = {u.name for u in chosen}
    return [u for u in topo.units if u.name in names], skipped


# With span-output reuse an inheriting step computes what lies outside the reused span. The
# least a step that inherits features computes is DeepCache's shallow branch: the shallowest
# level pair around the reused deep part. A step computing under half of that pair's cost (or
# nothing that reads its input) replays stored outputs nearly whole: a different method (a
# stale-output step skip), not feature inheritance.
MIN_PAIR_SHARE = 0.5


def replay_floor(unet, topo: Topology, latent: int) -> float:
    """The least share of the UNet an inheriting step must compute with span-output reuse:
    MIN_PAIR_SHARE of what the shallowest level pair (dn0 and the last up block) costs."""
    macs = atom_macs(unet, latent)
    levels = sum(b.startswith("dn") for b in topo.blocks)
    pair = topo.entries["dn0"] + topo.entries[f"up{levels - 1}"]
    cost = sum(v for p, v in macs.items() if any(p.startswith(e + ".") for e in pair))
    return MIN_PAIR_SHARE * cost / sum(macs.values())


def reference_latent(unet) -> int:
    """The latent side the model family is made for (SD1.x/2.x: 512 px; the SDXL family, whose
    UNet takes SDXL's y embedding: 1024 px): where shares are stated."""
    return 128 if getattr(unet, "label_emb", None) is not None else 64


def layout_name(model, topo: Topology) -> str:
    levels = sum(b.startswith("dn") for b in topo.blocks)
    return (f"{type(model.model.model_config).__name__} layout with {levels} levels "
            f"({', '.join(topo.blocks)})")


def check_setting(model, topo: Topology, preset: str, chosen: list[Unit], reuse: str) -> float:
    """The share an inheriting step computes at the family's reference latent; refuses a setting
    that names no unit, every unit, or whose inheriting step would compute (almost) nothing or
    ignore its input, naming the layout and a setting that fits."""
    unet = model.model.diffusion_model
    what = f"preset {preset}" if preset != "custom" else "this unit set"
    mode = "span-output reuse" if reuse == "output" else "residual reuse"
    if not chosen or len(chosen) == len(topo.units):
        raise InheritanceError(
            f"{what} names {'no unit' if not chosen else 'every unit'} of this {layout_name(model, topo)}, so "
            f"there would be nothing {'to inherit' if not chosen else 'left to compute'}; "
            + _nearest(model, topo, preset, reuse), input="preset")
    latent = reference_latent(unet)
    share, depends = inheriting_share(unet, chosen, reuse, latent)
    floor = replay_floor(unet, topo, latent) if reuse == "output" else 0.0
    if not depends or share < floor:
        why = ("its output would not depend on the step's input: the reused outputs cover every path "
               "from the input to the output" if not depends else
               f"it would compute only {share:.0%} of the UNet, under half of what the shallowest level "
               f"pair costs ({2 * floor:.0%})")
        raise InheritanceError(
            f"{what} with {mode} on this {layout_name(model, topo)}: an inheriting step would replay the "
            f"stored outputs nearly whole instead of inheriting features, since {why}; "
            + _nearest(model, topo, preset, reuse), input="preset")
    return share


def _nearest(model, topo: Topology, preset: str, reuse: str) -> str:
    """A setting that fits this layout: the same preset with the other reuse mode, else the
    nearest preset of the same loop (then the external loop)."""
    unet = model.model.diffusion_model

    def fits(name, mode):
        if name not in PRESETS:
            return False
        units = parse_unit_spec(preset_spec(name, topo), topo, strict=False)
        if not units or len(units) == len(topo.units):
            return False
        latent = reference_latent(unet)
        share, depends = inheriting_share(unet, units, mode, latent)
        return depends and share >= (replay_floor(unet, topo, latent) if mode == "output" else 0.0)

    if preset != "custom" and reuse == "output" and fits(preset, "residual"):
        return f"use reuse = residual with {preset}, or a preset whose units form one span (EX1-EX3, DE1-DE3)"
    family, number = preset.rstrip("0123456789"), preset[len(preset.rstrip("0123456789")):]
    same = sorted((p for p in PRESETS if p.rstrip("0123456789") == family and p != preset),
                  key=lambda p: abs(int(p[len(family):] or 0) - int(number or 0)))
    for name in same + ["EX3", "EX2", "EX1", "DE2"]:
        if name != preset and fits(name, reuse):
            return f"the nearest preset that fits is {name}"
    return "choose another preset or reuse mode"


def inheriting_share(unet, units: list[Unit], reuse: str, latent: int) -> tuple[float, bool]:
    """(the share of the UNet's multiply-accumulates an inheriting step computes, at a latent of
    side ``latent``; whether its output still depends on the step's input). Residual reuse keeps
    every chosen unit's identity path; span-output reuse runs nothing of the span."""
    macs = atom_macs(unet, latent)
    total = sum(macs.values())
    if reuse == "output":
        skipped, boundary = span_plan(unet, units)
        spared = set(skipped) | set(boundary)
        return 1 - sum(macs[p] for p in spared) / total, reaches_output(unet, spared)
    sides = atom_sides(unet, latent)
    branch = 0.0
    for u in units:
        module = unet.get_submodule(u.path)
        branch += macs[u.path]
        if u.kind == "R":   # the 1x1 skip conv (identity where channels match) still runs
            branch -= module_macs(module.skip_connection, sides[u.path] ** 2)
    return 1 - branch / total, True


def apply_inheritance(model, preset: str, units: str, period: int, tail: float, reuse: str = "residual",
                      forecast: bool = False, features_on: str = "compute"):
    """Returns a clone of ``model`` (a ComfyUI ModelPatcher) with feature inheritance."""
    schedule = Schedule(period, tail)
    if reuse not in REUSE:
        raise InheritanceError(f"reuse must be one of {', '.join(REUSE)} (got {str(reuse)[:40]!r})", input="reuse")
    if features_on not in FEATURES_ON:
        raise InheritanceError(f"features_on must be one of {', '.join(FEATURES_ON)} (got {str(features_on)[:40]!r}); "
                               "offload keeps stored features in system memory", input="features_on")
    refuse_switch(model, "A-SDM Feature Inheritance")
    unet = getattr(model.model, "diffusion_model", None)
    if unet is None:
        raise InheritanceError("this MODEL has no diffusion_model; connect an SD1.x/SD2.x or SDXL-family MODEL")
    topo = describe(unet)
    chosen, skipped = resolve_units(topo, preset, units)
    if skipped:
        log.warning("A-SDM feature inheritance: preset %s names %s, which this UNet does not have; "
                    "inheriting the rest", preset, ", ".join(skipped))
    m = model.clone()
    if (preset == "custom" and not chosen) or period == 1:
        log.info("A-SDM feature inheritance: %s, so the MODEL is returned unchanged",
                 "empty unit set" if not chosen else "period 1 (every step full)")
        return m
    share = check_setting(model, topo, preset, chosen, reuse)
    label = f"{preset} P{period}" + (
        "" if not tail else f"† last {tail:.0%}" if tail < 1 else f"† last {int(tail)}")
    label += (", output reuse" if reuse == "output" else "") + (", forecast" if forecast else "")
    store_device = None
    if features_on == "offload":
        import comfy.model_management as mm   # late: the host's modules exist once it runs (compat.start_host)
        store_device = mm.unet_offload_device()
        label += ", features offloaded"
    span = span_plan(unet, chosen) if reuse == "output" else ((), ())
    holder = InheritanceHolder(chosen, schedule, label, reuse, forecast, span, unet, store_device)
    if reuse == "output":
        patched = [(p, lambda inner, p=p: holder.span_forward(p, inner)) for p in span[0] + span[1]]
    else:
        patched = [(u.path, lambda inner, u=u: holder.unit_forward(unet.get_submodule(u.path), u, inner))
                   for u in chosen]
    log.info("A-SDM feature inheritance (%s): %d units inherit (%s); an inheriting step computes %.0f %% of "
             "the UNet at %d px", label, len(chosen), _summary(chosen, topo), 100 * share,
             8 * reference_latent(unet))
    for path, make in patched:
        key = f"diffusion_model.{path}.forward"
        # what this MODEL runs there, as the host gives it: its own earlier patch, else the
        # module's own forward (the host's backup of it while the model is patched)
        m.add_object_patch(key, make(m.get_model_object(key)))
    hooks.attach(m, holder)
    return m


def _summary(units: list[Unit], topo: Topology) -> str:
    """The units as whole blocks where a block is whole, else by name."""
    names = {u.name for u in units}
    out = []
    for b in topo.blocks:
        mine = [u.name for u in topo.units if u.block == b]
        hit = [n for n in mine if n in names]
        out += [b] if hit and len(hit) == len(mine) else hit
    return ", ".join(out)
