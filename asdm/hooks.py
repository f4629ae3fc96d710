"""The sampling hook protocol: which sampling run and which sampler step a UNet call belongs to,
and a wrapper around every UNet call of a MODEL. ``compat`` implements it on each host.

Every capability that acts per step (feature inheritance, the UNet switch, GRI attention's
step range, the evaluation's DeepCache baseline) keeps its state in a ``Holder`` subclass: one
object shared by all clones of one patched MODEL, attached with ``attach(model, holder)`` and
found again with ``holder_of(model, HolderClass)``. The hooks call ``start_run(total)`` when a
sampling run begins, set ``run.step`` as the sampler advances, call the holder's ``unet_call``
around every UNet call, and ``end_run(run)`` when the run ends or fails. A subclass writes only
what is its own: its ``Run`` type, ``begin_call`` (the state one UNet call sees, as
``holder.call`` while the call runs; an outer call's state comes back after a nested one),
``run_call`` where it routes the call, and ``finish_run`` (drop what the run held, log).

Steps are sampler steps of the schedule being sampled, not model calls: heun, dpm_2,
dpmpp_2s_ancestral, dpmpp_sde and uni_pc call the model several times per step, CFG batches
or splits cond and uncond, and none of that shifts a step. How each host reports the step is
a host difference and lives in ``compat``.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, ClassVar, Protocol

from . import compat


@dataclass
class Run:
    """One sampling run as the hooks see it: its length in sampler steps (None when unknown)
    and the sampler step now being computed (None: the sampler has no fixed schedule). The
    hooks also record the schedule's sigmas, the sampler function's name and the MODEL being
    sampled (its ModelPatcher, whose weight patches may differ from the patched clone's).
    Holders subclass it to keep their own state."""
    total: int | None
    step: int | None = 0
    schedule: list | None = None
    sampler: str | None = None
    patcher: object = None
    warned: bool = False      # the run's one log line about an unusable sampler is said


class UNetCall(Protocol):
    """The rest of one UNet call, as a wrapper sees it."""

    def next(self, x, t, c: dict):
        """Runs the rest of the call: the wrappers added after this one, then the UNet."""

    def next_on(self, patcher, x, t, c: dict):
        """Runs the rest of the call ending in another MODEL's UNet, with that MODEL's own
        wrappers (what the UNet switch does for the ranges of its other models)."""


# A UNet call wrapper: fn(call, x, timestep, c) -> output, where c holds the call's keyword
# arguments (c_crossattn, control, transformer_options with cond_or_uncond, ...).
UNetWrapper = Callable[[UNetCall, object, object, dict], object]


class Holder:
    """Per-run and per-call state of one capability on one patched MODEL.

    Shared by every clone of that MODEL: ``ModelPatcher.clone()`` deep-copies the model options
    where the hooks live, and the object patches, wrappers and hooks must agree on one holder,
    so a deep copy is the holder itself."""
    KEY: ClassVar[str]            # the key of its UNet wrapper and of the holder on a MODEL
    RUN: ClassVar[type] = Run     # the Run subclass a sampling run gets

    def __init__(self):
        self.run: Run | None = None        # the run being sampled
        self.last_run: Run | None = None   # kept after the run ends, for reports and tests
        self._calls = threading.local()    # holds ``call`` per thread

    def __deepcopy__(self, memo):
        return self

    @property
    def call(self):
        """begin_call's state while a UNet call runs, per thread: the host may run the UNet calls
        of one model evaluation on several threads at once (one per device). Read by every
        patched module's forward: one attribute lookup."""
        return getattr(self._calls, "state", None)

    @call.setter
    def call(self, state) -> None:
        self._calls.state = state

    # -- driven by the hooks ----------------------------------------------------------------
    def start_run(self, total: int | None) -> Run:
        """A sampling run of ``total`` sampler steps begins; returns its fresh state."""
        self.run = self.RUN(total=total)
        return self.run

    def end_run(self, run: Run) -> None:
        """The run ended (normally or by an error)."""
        if self.run is run:
            self.run = None
        self.last_run = run
        self.finish_run(run)

    def unet_call(self, call: UNetCall, x, t, c: dict):
        """The UNet call wrapper: ``self.call`` holds this call's state while it runs."""
        state = self.begin_call(current_run(self), x, chunk_keys(c))
        outer, self.call = self.call, state
        try:
            return self.run_call(call, x, t, c)
        finally:
            self.call = outer

    # -- what a subclass writes ---------------------------------------------------------------
    def begin_call(self, run: Run | None, x, keys: tuple):
        """The state of a UNet call (``run``: None when the host gives no step; ``keys``: one
        per conditioning chunk of the batch, ``chunk_keys``)."""
        return None

    def run_call(self, call: UNetCall, x, t, c: dict):
        return call.next(x, t, c)

    def finish_run(self, run: Run) -> None:
        """Drops what the run held; says what it did."""


def attach(model, holder: Holder) -> None:
    """Hooks ``holder`` to ``model`` (a fresh clone): step tracking, its UNet call wrapper
    (stacked with every other wrapper: this pack's, the host's, other packs'), and the holder
    itself where ``holder_of`` finds it."""
    compat.add_step_tracking(model, holder)
    compat.add_unet_wrapper(model, holder.KEY, holder.unet_call, patched=True)
    model.model_options.setdefault("transformer_options", {})[holder.KEY] = holder


def holder_of(model, cls: type[Holder]) -> Holder | None:
    """The ``cls`` holder a MODEL (or a clone of it) carries, if any."""
    return model.model_options.get("transformer_options", {}).get(cls.KEY)


def wrap_unet_calls(model, key: str, fn: UNetWrapper) -> None:
    """Runs ``fn`` around every UNet call of ``model``, for a wrapper with no per-run state."""
    compat.add_unet_wrapper(model, key, fn)


def current_run(holder: Holder) -> Run | None:
    """The run a UNet call belongs to, with ``run.step`` set; None when this host and sampler
    give no step (the caller then computes fully: slower, never wrong)."""
    return compat.current_run(holder)


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
