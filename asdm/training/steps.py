"""What every training loop of the project shares per step: its random draws and its learning rate."""
from __future__ import annotations

import math

import torch


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator for one training step's random draws (batch, noise, timesteps). Seeded by
    (seed, step), so a run resumed at any step draws what an uninterrupted run draws."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def set_cosine_lr(opt: torch.optim.Optimizer, base: float, step: int, steps: int,
                  floor: float = 0.0, warmup: int = 0) -> None:
    """Cosine decay from ``base`` to ``floor * base`` over ``steps``, after a linear warm-up."""
    warm = min(1.0, (step + 1) / warmup) if warmup else 1.0
    lr = base * warm * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * step / steps)))
    for group in opt.param_groups:
        group["lr"] = lr
