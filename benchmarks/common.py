"""What the benchmark scripts share: the host, one fixed UNet input, and the timing method of
asdm/evaluation/timing.py (also the main job's): every variant interleaved with its baseline
round by round (A B A B ...), the median ratio with its spread, the baseline against itself
reading 1.00x within its spread.
"""
from __future__ import annotations

import logging
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from asdm.evaluation.timing import Ratio, device_name, interleaved, sync, timed  # noqa: E402,F401
from asdm.harness import host  # noqa: E402


class Bench:
    """Boots the host; a seeded UNet input (latent batch x 4 x size x size, SD1 context)."""

    def __init__(self, batch: int, size: int, reps: int):
        host.boot()
        import comfy.model_management as mm
        logging.getLogger().setLevel(logging.WARNING)
        self.mm, self.reps = mm, reps
        self.dev = mm.get_torch_device()
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(batch, 4, size, size, generator=g).to(self.dev)
        self.ctx = torch.randn(batch, 77, 768, generator=g).to(self.dev)
        self.t = torch.full((batch,), 10.0, device=self.dev)

    def call(self, model):
        return model.model.apply_model(self.x, self.t, c_crossattn=self.ctx)

    def caller(self, model):
        """A callable that makes one UNet call of ``model``; its untimed ``prepare`` makes the
        model current through the model manager (clones of one UNet take turns)."""
        def call():
            return self.call(model)
        call.prepare = lambda: self.mm.load_models_gpu([model])
        return call

    def compare(self, baseline, variants: dict) -> dict[str, Ratio]:
        """UNet-call ratios baseline / variant, interleaved; includes the baseline against itself
        under the name "baseline"."""
        calls = {"_base": self.caller(baseline), "baseline": self.caller(baseline)}
        calls.update({k: self.caller(m) for k, m in variants.items()})
        t = interleaved(calls, self.reps)
        return {k: Ratio.of(t["_base"], t[k]) for k in calls if k != "_base"}
