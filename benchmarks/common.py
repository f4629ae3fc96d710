"""What the benchmark scripts share: the host, one fixed UNet input, and a timer that loads the
MODEL through the host's model manager and times single UNet calls."""
import logging
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from asdm.harness import host  # noqa: E402


engine = host.engine


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"


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

    def call_time(self, model) -> float:
        """Median seconds of one UNet call, after a warm-up."""
        self.mm.load_models_gpu([model])
        self.call(model)
        samples = []
        for _ in range(self.reps):
            sync(); t0 = time.perf_counter()
            self.call(model)
            sync(); samples.append(time.perf_counter() - t0)
        return statistics.median(samples)
