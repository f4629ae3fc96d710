"""The project's timing method, shared by the benchmarks and the main job, and the UNet timer
node the main job puts before the sampler.

Every variant is timed in the same process, interleaved with its baseline round by round
(A B A B ...); each round gives one ratio baseline / variant, and a result is the median ratio
with its spread (lowest - highest round). The baseline is also timed against itself and must
read 1.00x within its spread, or the measurement is not to be trusted. On a shared, drifting
machine the drift then shows as spread, not as a speed-up.
"""
from __future__ import annotations

import statistics
import time
from collections import defaultdict
from dataclasses import dataclass

import torch

from .. import hooks


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"


def timed(fn, device=None) -> float:
    """Seconds ``fn()`` takes: on a CUDA device by CUDA events around it (the GPU's own clock,
    after the work queued before it), else by the wall clock."""
    if device is not None and torch.device(device).type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def interleaved(variants: dict, rounds: int, warmup: int = 1, device=None) -> dict[str, list[float]]:
    """Seconds of each callable per round; within a round they run in the given order, so a
    baseline listed first and its variants alternate (A B C A B C ...). A callable's optional
    ``prepare`` attribute runs untimed before it (e.g. making its model current). ``warmup``
    rounds are run and discarded (first-call allocations, model loading). ``device``: where the
    callables compute (CUDA: timed by CUDA events)."""
    for _ in range(warmup):
        for fn in variants.values():
            getattr(fn, "prepare", lambda: None)()
            fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for k, fn in variants.items():
            getattr(fn, "prepare", lambda: None)()
            times[k].append(timed(fn, device))
    return times


@dataclass
class Ratio:
    """baseline time / variant time over rounds: >1 means the variant is faster."""
    median: float
    low: float
    high: float

    @classmethod
    def of(cls, base: list[float], other: list[float]) -> "Ratio":
        return cls.of_ratios([b / o for b, o in zip(base, other)])

    @classmethod
    def of_ratios(cls, ratios: list[float]) -> "Ratio":
        return cls(statistics.median(ratios), min(ratios), max(ratios))

    def __str__(self) -> str:
        return f"{self.median:.2f}x ({self.low:.2f}-{self.high:.2f})"

    def holds(self, value: float) -> bool:
        return self.low <= value <= self.high

    def as_dict(self) -> dict:
        return {"median": self.median, "low": self.low, "high": self.high}


# ---------------------------------------------------------------------------------------------
# UNet time of a sampling run, measured through ComfyUI's patching: a timer node between the last
# model node and the sampler. Not part of the pack: registered only in the process that measures.
# ---------------------------------------------------------------------------------------------

KEY = "asdm_harness_unet_timer"
NODE = "ASDMHarnessUNetTimer"
SECONDS: dict[str, float] = defaultdict(float)   # tag -> UNet seconds of the runs with that tag
CALLS: dict[str, int] = defaultdict(int)


class UNetTimer:
    """MODEL in, MODEL out: the same model, every UNet call timed into SECONDS[tag]. A new tag
    per run also keeps the executor from serving the sampler's output from its cache."""
    CATEGORY = "A-SDM harness"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "tag": ("STRING", {"default": ""})}}

    def patch(self, model, tag):
        m = model.clone()

        def timed_call(call, x, t, c):
            sync()
            t0 = time.perf_counter()
            out = call.next(x, t, c)
            sync()
            SECONDS[tag] += time.perf_counter() - t0
            CALLS[tag] += 1
            return out

        hooks.wrap_unet_calls(m, KEY, timed_call)
        return (m,)


def register() -> None:
    """Registers the timer node with the host (not part of the pack: only where it measures)."""
    import nodes   # late: the host's modules exist once it runs (compat.start_host)
    nodes.NODE_CLASS_MAPPINGS[NODE] = UNetTimer
