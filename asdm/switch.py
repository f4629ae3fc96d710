"""Multi-UNet switching (A-SDM §IV-C): several UNets of one family share one sampling run,
each computing the sampler steps of its own range (paper S1: BK-SDM Base for the first 10 of
25 steps, SD for the last 15).

The switch is a MODEL: a clone of the first range's MODEL whose model function hands every
UNet call to the MODEL of the current step's range. Each MODEL keeps its own weight patches
(loaded through the host's model manager when its range begins), object patches and model
wrappers (feature inheritance, ME-CondConv), and its own transformer_options; what the sampler
adds to a call (cond_or_uncond, sigmas, ...) is passed on. Steps are sampler steps, reported
by the same hooks feature inheritance uses, so multi-call samplers stay in one range per step.
CFG-level options (sampler_cfg_function and the like) are the first MODEL's.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from . import compat

log = logging.getLogger("A-SDM")

TO_END = -1  # an end of -1: until the end of the schedule


class SwitchError(ValueError):
    pass


@dataclass(frozen=True)
class Range:
    start: float
    end: float  # exclusive; TO_END = the end of the schedule

    def steps(self, total: int, unit: str) -> tuple[int, int]:
        if unit == "fraction":
            s = round(self.start * total)
            e = total if self.end == TO_END else round(self.end * total)
        else:
            s, e = int(self.start), total if self.end == TO_END else int(self.end)
        return s, min(e, total)


def check_ranges(ranges: list[Range], unit: str) -> None:
    """Ranges must start at 0, touch each other, and not overlap; only the last may be open."""
    names = [f"range {i + 1}" for i in range(len(ranges))]
    for i, r in enumerate(ranges):
        if unit == "steps" and (r.start != int(r.start) or (r.end != TO_END and r.end != int(r.end))):
            raise SwitchError(f"{names[i]} ({r.start}-{r.end}) must be whole steps in unit 'steps'")
        if unit == "fraction" and not (0 <= r.start <= 1 and (r.end == TO_END or 0 <= r.end <= 1)):
            raise SwitchError(f"{names[i]} ({r.start}-{r.end}) must lie within 0-1 in unit 'fraction'")
        if r.end == TO_END and i != len(ranges) - 1:
            raise SwitchError(f"{names[i]} ends at -1 (the end of the schedule) but is not the last range")
        if r.end != TO_END and r.end <= r.start:
            raise SwitchError(f"{names[i]} is empty or reversed: start {r.start}, end {r.end}")
    if ranges[0].start != 0:
        raise SwitchError(f"range 1 starts at {ranges[0].start}; the first range must start at 0")
    for i in range(1, len(ranges)):
        prev, cur = ranges[i - 1], ranges[i]
        if cur.start < prev.end:
            raise SwitchError(f"{names[i - 1]} ({prev.start}-{prev.end}) and {names[i]} "
                              f"({cur.start}-{cur.end}) overlap; set start_{i + 1} = end_{i}")
        if cur.start > prev.end:
            raise SwitchError(f"steps {prev.end}-{cur.start} belong to no range (gap between "
                              f"{names[i - 1]} and {names[i]}); set start_{i + 1} = end_{i}")


def check_models(models: list) -> None:
    ref = models[0].model
    for i, m in enumerate(models[1:], start=2):
        for what, a, b in (
                ("latent format", type(ref.latent_format).__name__, type(m.model.latent_format).__name__),
                ("context dim", ref.model_config.unet_config.get("context_dim"),
                 m.model.model_config.unet_config.get("context_dim")),
                ("model family", type(ref.model_config).__name__, type(m.model.model_config).__name__)):
            if a != b:
                raise SwitchError(f"model_{i} does not match model_1: {what} {b} vs {a}; every model "
                                  "in a switch must be of one family (e.g. SD1.5 with BK-SDM v1)")


@dataclass
class SwitchRun:
    total: int | None
    step: int = 0
    active: int = 0                      # index of the MODEL whose weights are loaded
    calls: list = field(default_factory=list)   # (step, model index) per UNet call


class UNetSwitch:
    """Shared by the switch MODEL's wrapper and the sampling hooks (one object across clones)."""

    def __init__(self, models: list, ranges: list[Range], unit: str, own_keys: set):
        self.models, self.ranges, self.unit = models, ranges, unit
        self.own_keys = own_keys         # transformer_options keys that belong to the first MODEL
        self.run: SwitchRun | None = None
        self.last_run: SwitchRun | None = None

    def __deepcopy__(self, memo):
        return self

    def start_run(self, total):
        self.run = SwitchRun(total=total)
        return self.run

    def end_run(self, run):
        if self.run is run:
            self.run = None
        self.last_run = run

    def model_index(self, step: int, total: int) -> int:
        for i, r in enumerate(self.ranges):
            s, e = r.steps(total, self.unit)
            if s <= step < e:
                return i
        last = self.ranges[-1]
        raise SwitchError(
            f"A-SDM UNet Switch: step {step} of a {total}-step schedule is in no range (the ranges "
            f"end at {last.end}); raise the last end or set it to -1 (until the end)")

    def __call__(self, apply_model, args):
        run = compat.current_run(self)
        if run is None:
            raise SwitchError("A-SDM UNet Switch: could not tell the sampler step on this sampler / "
                              "ComfyUI version, so the switch cannot pick a model; use a k-diffusion "
                              "sampler (euler, heun, dpmpp_*) or uni_pc")
        i = self.model_index(run.step, run.total)
        run.calls.append((run.step, i))
        p = self.models[i]
        if i != run.active:
            compat.load_models([p])   # the host's model manager patches it and offloads as needed
            run.active = i
        c = dict(args["c"])
        to = {k: v for k, v in c.get("transformer_options", {}).items() if k not in self.own_keys}
        to.update(p.model_options.get("transformer_options", {}))
        c["transformer_options"] = to
        wrapper = p.model_options.get("model_function_wrapper")
        if wrapper is not None:
            return wrapper(p.model.apply_model, dict(args, c=c))
        return p.model.apply_model(args["input"], args["timestep"], **c)


def make_switch(models: list, ranges: list[Range], unit: str = "steps"):
    if unit not in ("steps", "fraction"):
        raise SwitchError(f"unit must be 'steps' or 'fraction', not {unit!r}")
    if len(models) != len(ranges) or len(models) < 2:
        raise SwitchError("give at least two models, each with its range")
    check_ranges(ranges, unit)
    check_models(models)
    out = models[0].clone()
    sw = UNetSwitch(list(models), list(ranges), unit,
                    set(models[0].model_options.get("transformer_options", {})))
    out.set_model_unet_function_wrapper(sw)
    compat.install_step_tracking(out, sw)
    compat.copy_outer_wrappers(out, models[1:])
    out.model_options.setdefault("transformer_options", {})["asdm_switch"] = sw
    return out
