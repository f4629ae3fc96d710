"""Multi-UNet switching (A-SDM §IV-C): several UNets of one family share one sampling run,
each computing the sampler steps of its own range (paper S1: BK-SDM Base for the first 10 of
25 steps, SD for the last 15).

The switch is a MODEL: a clone of the first range's MODEL (its weights and object patches, its
sampler-level options) whose UNet call wrapper hands every UNet call to the MODEL of the current
step's range. What acts on one model's own UNet calls (its UNet call wrappers: feature
inheritance, EasyCache's model wrapper; its attention and block patches) is taken off the
switch and applied per call by the model it belongs to, so each model keeps its own patches in
its own range; whatever is added to the switch MODEL afterwards acts in every range. Each model
is loaded through the host's model manager (on current ComfyUI with the switch MODEL, as its
additional models) and made current when its range begins, so its weight patches (LoRA) apply.
Steps are sampler steps, reported by the sampling hooks, so multi-call samplers stay in one
range per step. CFG-level options (sampler_cfg_function and the like) are the first MODEL's.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from . import compat, hooks, host_models
from .errors import SwitchError

log = logging.getLogger("A-SDM")

TO_END = -1  # an end of -1: until the end of the schedule



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
    """Every model must sample the same LATENT and CONDITIONING as the first: the same latent
    format, text context width and y encoding (``host_models.conditioning_kind``). The host's
    class names are not compared: SDXL with SSD-1B, Vega or KOALA (the paper's S1 for SDXL) is
    one family, whatever class loaded each."""
    ref = host_models.conditioning_kind(models[0])
    for i, m in enumerate(models[1:], start=2):
        kind = host_models.conditioning_kind(m)
        for what in ref:
            if kind[what] != ref[what]:
                raise SwitchError(f"model_{i} does not match model_1: {what} {kind[what]} vs {ref[what]}; every "
                                  "model in a switch must be of one family (e.g. SD1.5 with BK-SDM v1, SDXL with "
                                  "SSD-1B, Vega or KOALA)")


@dataclass
class SwitchRun(hooks.Run):
    active: int | None = None            # index of the MODEL made current for this run
    calls: list = field(default_factory=list)   # (step, model index) per UNet call


class UNetSwitch(hooks.Holder):
    """Shared by the switch MODEL's wrapper and the sampling hooks."""
    KEY = "asdm_switch"
    RUN = SwitchRun

    def __init__(self, patchers: list, ranges: list[Range], unit: str):
        super().__init__()
        self.patchers, self.ranges, self.unit = patchers, ranges, unit

    def model_index(self, step: int, total: int) -> int:
        for i, r in enumerate(self.ranges):
            s, e = r.steps(total, self.unit)
            if s <= step < e:
                return i
        last = self.ranges[-1]
        raise SwitchError(
            f"A-SDM UNet Switch: step {step} of a {total}-step schedule is in no range (the ranges "
            f"end at {last.end}); raise the last end or set it to -1 (until the end)")

    def run_call(self, call, x, t, c):
        run = hooks.current_run(self)
        if run is None:
            raise SwitchError("A-SDM UNet Switch: could not tell the sampler step on this sampler / "
                              "ComfyUI version, so the switch cannot pick a model; use a k-diffusion "
                              "sampler (euler, heun, dpmpp_*) or uni_pc")
        i = self.model_index(run.step, run.total)
        run.calls.append((run.step, i))
        p = self.patchers[i]
        if i != run.active:
            compat.ensure_loaded(p)   # its weight patches, through the host's model manager
            run.active = i
        own = compat.unet_options(p)
        c = dict(c, transformer_options=merge_options(c.get("transformer_options", {}), own))
        return call.next_on(p, x, t, c)


def merge_options(base: dict, own: dict) -> dict:
    """``base`` (a call's transformer_options) with a model's own added: nested dicts merged,
    lists joined (``base``'s first at every level), other values taken from ``own``. Neither
    argument is changed. (Current ComfyUI's ``patcher_extension.merge_nested_dicts`` swaps its
    arguments at each nesting level, so patch lists would alternate order by depth; the early
    host has none.)"""
    out = dict(base)
    for k, v in own.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_options(out[k], v)
        elif isinstance(v, list) and isinstance(out.get(k), list):
            out[k] = out[k] + v
        else:
            out[k] = v
    return out


def switch_of(model) -> "UNetSwitch | None":
    """The switch a MODEL routes through, if it is (a clone of) an A-SDM UNet Switch's output."""
    return hooks.holder_of(model, UNetSwitch)


def refuse_switch(model, what: str) -> None:
    """For nodes that act on one UNet's weights or modules: a switch MODEL holds several."""
    sw = switch_of(model)
    if sw is not None:
        raise SwitchError(f"this MODEL is an A-SDM UNet Switch of {len(sw.patchers)} models, and {what} "
                          "acts on one UNet; connect it to the models before the switch (each one whose "
                          "range it should change)")


def make_switch(models: list, ranges: list[Range], unit: str = "steps"):
    if unit not in ("steps", "fraction"):
        raise SwitchError(f"unit must be 'steps' or 'fraction', not {unit!r}")
    if len(models) != len(ranges) or len(models) < 2:
        raise SwitchError("give at least two models, each with its range")
    check_ranges(ranges, unit)
    check_models(models)
    out = models[0].clone()
    compat.without_unet_options(out)   # the first model's own come back in its range
    sw = UNetSwitch(list(models), list(ranges), unit)
    hooks.attach(out, sw)
    compat.copy_step_tracking(out, models[1:])
    # The host loads the other models with the switch; one that shares the first model's UNet
    # (a LoRA'd copy) cannot be resident beside it and is made current when its range begins.
    extra = []
    for m in models[1:]:
        if not m.is_clone(out) and not any(m.is_clone(e) for e in extra):
            extra.append(m)
    compat.add_extra_models(out, UNetSwitch.KEY, extra)
    return out
