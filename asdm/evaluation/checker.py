"""The attribute checker: a small CNN trained on ``asdm.training.shapes`` scenes that reads, for
each region of the image, the colour and the kind of shape in it (or none).

* ``adherence``: the share of the attributes a caption states (each shape's colour and kind, at
  its region) that the checker finds in the image: the analogue of the paper's CLIP score.
* ``features``: its penultimate features, for the Fréchet distance (``metrics``) of generated
  images to dataset images: the analogue of FID (Inception features there, checker features here).

Images are float arrays/tensors in [0, 1], [N, H, W, 3] (what ComfyUI's IMAGE holds).
"""
from __future__ import annotations

import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from .. import embedded
from ..training import shapes
from ..training.embedded import N_SCENES, save_weights
from ..training.steps import set_cosine_lr, step_generator
from ..unet_files import read_safetensors
from .metrics import nchw

FEATURES = 64


class Checker(torch.nn.Module):
    """Per region: colour (none + 6) and kind (none + 3) of the shape there."""

    def __init__(self):
        super().__init__()
        chans = [3, 32, 64, 64, 64]
        self.convs = torch.nn.ModuleList(torch.nn.Conv2d(i, o, 3, stride=2, padding=1)
                                         for i, o in zip(chans, chans[1:]))
        self.fc = torch.nn.Linear(64 * 4 * 4, FEATURES)
        self.head = torch.nn.Linear(FEATURES, len(shapes.REGION_NAMES) * (len(shapes.COLOR_CLASSES) + len(shapes.KIND_CLASSES)))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, 3, 64, 64] in [0, 1] -> [N, FEATURES]."""
        x = x * 2 - 1
        for c in self.convs:
            x = F.silu(c(x))
        return F.silu(self.fc(x.flatten(1)))

    def forward(self, x):
        out = self.head(self.features(x)).view(len(x), len(shapes.REGION_NAMES), len(shapes.COLOR_CLASSES) + len(shapes.KIND_CLASSES))
        return out[..., :len(shapes.COLOR_CLASSES)], out[..., len(shapes.COLOR_CLASSES):]


def _degrade(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Blur and noise of random strength, so the checker reads imperfect generated images too."""
    sigma = float(torch.rand(1, generator=g)) * 1.5
    if sigma > 0.2:
        k = torch.exp(-(torch.arange(5.0) - 2) ** 2 / (2 * sigma ** 2))
        k = (k / k.sum()).to(x)
        x = F.conv2d(F.pad(x, (2, 2, 0, 0), mode="replicate"), k.view(1, 1, 1, 5).expand(3, 1, 1, 5), groups=3)
        x = F.conv2d(F.pad(x, (0, 0, 2, 2), mode="replicate"), k.view(1, 1, 5, 1).expand(3, 1, 5, 1), groups=3)
    return (x + 0.03 * torch.randn(x.shape, generator=g)).clamp(0, 1)


def train_checker(scenes, seed: int = 0, steps: int = 600, batch: int = 64, log=print) -> Checker:
    torch.manual_seed(seed)
    net = Checker()
    x_all = nchw(np.stack([s.image for s in scenes]).astype(np.float32) / 255.0)
    col, kind = shapes.targets(scenes)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    t0 = time.time()
    for step in range(steps):
        g = step_generator(seed, step)
        idx = torch.randint(0, len(x_all), (batch,), generator=g)
        pc, pk = net(_degrade(x_all[idx], g))
        loss = F.cross_entropy(pc.flatten(0, 1), col[idx].flatten()) + F.cross_entropy(pk.flatten(0, 1), kind[idx].flatten())
        set_cosine_lr(opt, 2e-3, step, steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 250 == 0:
            log(f"checker step {step + 1}/{steps}  loss {loss.item():.4f}  ({(time.time() - t0) / (step + 1):.3f} s/step)")
    net.eval()
    held_out = shapes.generate(500, scenes[0].image.shape[0], seed + 1)
    log(f"checker: held-out attribute accuracy {adherence(net, [s.image / 255.0 for s in held_out], held_out):.4f}")
    return net


def train_checker_file(seed: int = 0, force: bool = False, log=print) -> None:
    """Trains the checker on the embedded model's training scenes into weights/embedded
    (skipped when the file exists, unless ``force``)."""
    if os.path.exists(embedded.path("checker")) and not force:
        return
    t0 = time.time()
    net = train_checker(shapes.generate(N_SCENES, embedded.IMAGE_SIZE, seed), seed=seed, log=log)
    save_weights(net.state_dict(), embedded.path("checker"), {"asdm.format": "asdm-embedded-v1",
                                                              "asdm.seed": seed})
    log(f"checker: {time.time() - t0:.0f} s")


def load_checker(path: str) -> Checker:
    net = Checker()
    sd = {k: v.float() for k, v in read_safetensors(path)[0].items()}
    net.load_state_dict(sd)
    return net.eval()


@torch.no_grad()
def read(net: Checker, images) -> list[dict]:
    """For each image: {region: (colour, kind)} of the regions where the checker sees a shape."""
    pc, pk = net(nchw(images))
    regions, colors, kinds = shapes.REGION_NAMES, shapes.COLOR_CLASSES, shapes.KIND_CLASSES
    out = []
    for c, k in zip(pc.argmax(-1).tolist(), pk.argmax(-1).tolist()):
        out.append({regions[r]: (colors[c[r]], kinds[k[r]]) for r in range(len(regions))
                    if colors[c[r]] is not None or kinds[k[r]] is not None})
    return out


def adherence(net: Checker, images, scenes_or_items) -> float:
    """Share of the stated attributes (colour and kind of each captioned shape, at its region)
    that the checker finds. ``scenes_or_items``: per image a Scene or a tuple of shapes.Item."""
    found = read(net, images)
    hits = total = 0
    for seen, s in zip(found, scenes_or_items):
        for it in getattr(s, "items", s):
            col, kind = seen.get(it.region, (None, None))
            hits += (col == it.color) + (kind == it.shape)
            total += 2
    return hits / total


@torch.no_grad()
def features(net: Checker, images, batch: int = 256) -> np.ndarray:
    x = nchw(images)
    return torch.cat([net.features(x[i:i + batch]) for i in range(0, len(x), batch)]).numpy()
