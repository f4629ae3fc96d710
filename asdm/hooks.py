"""Sampling hooks: which sampling run and which sampler step a UNet call belongs to, and a
wrapper around every UNet call of a MODEL.

Every capability that acts per step (feature inheritance, the UNet switch, GRI attention's
step range) holds its per-run state in a ``RunHolder``: an object shared by all clones of one
patched MODEL (``__deepcopy__`` returns itself, since ``ModelPatcher.clone()`` deep-copies the
model options where the hooks live). The hooks call ``start_run(total)`` when a sampling run
begins, set ``run.step`` as the sampler advances, and call ``end_run(run)`` when the run ends
or fails; ``current_run(holder)`` tells a UNet call its run and step.

Steps are sampler steps of the schedule being sampled, not model calls: heun, dpm_2,
dpmpp_2s_ancestral, dpmpp_sde and uni_pc call the model several times per step, CFG batches
or splits cond and uncond, and none of that shifts a step. How each host reports the step is
a host difference and lives in ``compat``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

from . import compat


@dataclass
class Run:
    """One sampling run as the hooks see it: its length in sampler steps (None when unknown)
    and the sampler step now being computed. Holders subclass it to keep their own state."""
    total: int | None
    step: int = 0


class RunHolder(Protocol):
    """The contract between the sampling hooks and a capability's per-run state."""
    run: Run | None

    def start_run(self, total: int | None) -> Run:
        """A sampling run of ``total`` sampler steps begins; return its fresh state."""

    def end_run(self, run: Run) -> None:
        """The run ended (normally or by an error): drop what it held."""


class HolderBase:
    """A RunHolder shared by every clone of one patched MODEL (``ModelPatcher.clone()`` deep-
    copies the model options; the object patches and wrappers must agree on one holder)."""
    run: Run | None = None

    def __deepcopy__(self, memo):
        return self


def track_steps(model, holder: RunHolder) -> None:
    """Lets ``current_run(holder)`` tell the run and sampler step of every UNet call that
    ``model`` (or a MODEL that carries its sampling wrappers) makes."""
    compat.add_step_tracking(model, holder)


def current_run(holder: RunHolder) -> Run | None:
    """The run a UNet call belongs to, with ``run.step`` set; None when this host and sampler
    give no step (the caller then computes fully: slower, never wrong)."""
    return compat.current_run(holder)


# A UNet call wrapper: fn(call, x, timestep, c) -> output, where c holds the call's keyword
# arguments (c_crossattn, control, transformer_options with cond_or_uncond, ...) and
# call.next(x, timestep, c) runs the rest of the call (other wrappers, then the UNet).
UNetWrapper = Callable[["compat.UNetCall", object, object, dict], object]


def wrap_unet_calls(model, key: str, fn: UNetWrapper) -> None:
    """Runs ``fn`` around every UNet call of ``model``, stacked with every other wrapper (this
    pack's, the host's, other packs')."""
    compat.add_unet_wrapper(model, key, fn)


def chunk_keys(c: dict) -> tuple:
    """One key per conditioning chunk of a batched UNet call: the cond's uuid where the host
    gives one, else (cond_or_uncond, n-th chunk with that value in this call)."""
    to = c.get("transformer_options", {})
    cou = list(to.get("cond_or_uncond") or [0])
    uuids = to.get("uuids")
    if uuids is not None and len(uuids) == len(cou):
        return tuple(uuids)
    seen: dict = {}
    keys = []
    for k in cou:
        keys.append((k, seen.get(k, 0)))
        seen[k] = seen.get(k, 0) + 1
    return tuple(keys)
