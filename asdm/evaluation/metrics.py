"""Image metrics of the main job: the paper's measures in miniature.

* ``psnr`` / ``ssim``: error of an accelerated run against full-compute sampling with the same
  seed (the paper's reference is the original SD's output).
* ``Checker``: a small CNN trained on ``asdm.training.shapes`` scenes that reads, for each region of the
  image, the colour and the kind of shape in it (or none). ``adherence`` is the share of the
  attributes a caption states (each shape's colour and kind, at its region) that the checker
  finds in the image: the analogue of the paper's CLIP score.
* ``frechet_distance`` between the checker's penultimate features of generated images and of
  dataset images: the analogue of FID (Inception features there, checker features here).

Images are float arrays/tensors in [0, 1], [N, H, W, 3] (what ComfyUI's IMAGE holds).
"""
from __future__ import annotations

import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from ..training import shapes
from ..training.steps import set_cosine_lr, step_generator

REGIONS = list(shapes.REGIONS)
COLORS = [None] + list(shapes.COLORS)
KINDS = [None] + list(shapes.SHAPES)
FEATURES = 64


def _nchw(x) -> torch.Tensor:
    x = (x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))).float()
    if x.dim() == 3:
        x = x[None]
    return x.permute(0, 3, 1, 2) if x.shape[-1] == 3 else x


# ---------------------------------------------------------------------------------------------
# Full-reference error
# ---------------------------------------------------------------------------------------------

def psnr(a, b, peak: float = 1.0) -> float:
    """Mean over images of 10 log10(peak^2 / MSE); inf when every image is identical."""
    a, b = _nchw(a).double(), _nchw(b).double()
    mse = ((a - b) ** 2).flatten(1).mean(1)
    vals = [math.inf if m == 0 else 10 * math.log10(peak ** 2 / m) for m in mse.tolist()]
    return float(np.mean(vals))


def _gauss(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim(a, b, peak: float = 1.0) -> float:
    """Mean SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03), per
    channel, over the valid window positions, averaged over channels and images."""
    a, b = _nchw(a).double(), _nchw(b).double()
    c = a.shape[1]
    w = _gauss().to(a).expand(c, 1, 11, 11)
    f = lambda x: F.conv2d(x, w, groups=c)
    mu_a, mu_b = f(a), f(b)
    var_a = f(a * a) - mu_a ** 2
    var_b = f(b * b) - mu_b ** 2
    cov = f(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return float(s.mean())


# ---------------------------------------------------------------------------------------------
# Fréchet distance between two feature sets (Gaussian fits)
# ---------------------------------------------------------------------------------------------

def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(f1, f2) -> float:
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2) of [N, D] feature sets."""
    f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    r1 = _sqrt_psd(s1)
    cross = _sqrt_psd(r1 @ s2 @ r1)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(cross))


# ---------------------------------------------------------------------------------------------
# The attribute checker
# ---------------------------------------------------------------------------------------------

class Checker(torch.nn.Module):
    """Per region: colour (none + 6) and kind (none + 3) of the shape there."""

    def __init__(self):
        super().__init__()
        chans = [3, 32, 64, 64, 64]
        self.convs = torch.nn.ModuleList(torch.nn.Conv2d(i, o, 3, stride=2, padding=1)
                                         for i, o in zip(chans, chans[1:]))
        self.fc = torch.nn.Linear(64 * 4 * 4, FEATURES)
        self.head = torch.nn.Linear(FEATURES, len(REGIONS) * (len(COLORS) + len(KINDS)))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, 3, 64, 64] in [0, 1] -> [N, FEATURES]."""
        x = x * 2 - 1
        for c in self.convs:
            x = F.silu(c(x))
        return F.silu(self.fc(x.flatten(1)))

    def forward(self, x):
        out = self.head(self.features(x)).view(len(x), len(REGIONS), len(COLORS) + len(KINDS))
        return out[..., :len(COLORS)], out[..., len(COLORS):]


def targets(scenes) -> tuple[torch.Tensor, torch.Tensor]:
    col = torch.zeros(len(scenes), len(REGIONS), dtype=torch.long)
    kind = torch.zeros_like(col)
    for i, s in enumerate(scenes):
        for it in s.items:
            r = REGIONS.index(it.region)
            col[i, r], kind[i, r] = COLORS.index(it.color), KINDS.index(it.shape)
    return col, kind


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
    x_all = _nchw(np.stack([s.image for s in scenes]).astype(np.float32) / 255.0)
    col, kind = targets(scenes)
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
    from .. import embedded
    from ..training.embedded import N_SCENES, save_weights
    if os.path.exists(embedded.path("checker")) and not force:
        return
    t0 = time.time()
    net = train_checker(shapes.generate(N_SCENES, embedded.IMAGE_SIZE, seed), seed=seed, log=log)
    save_weights(net.state_dict(), embedded.path("checker"), {"asdm.format": "asdm-embedded-v1",
                                                              "asdm.seed": seed})
    log(f"checker: {time.time() - t0:.0f} s")


def load_checker(path: str) -> Checker:
    from ..unet_files import read_safetensors
    net = Checker()
    sd = {k: v.float() for k, v in read_safetensors(path)[0].items()}
    net.load_state_dict(sd)
    return net.eval()


@torch.no_grad()
def read(net: Checker, images) -> list[dict]:
    """For each image: {region: (colour, kind)} of the regions where the checker sees a shape."""
    pc, pk = net(_nchw(images))
    out = []
    for c, k in zip(pc.argmax(-1).tolist(), pk.argmax(-1).tolist()):
        out.append({REGIONS[r]: (COLORS[c[r]], KINDS[k[r]]) for r in range(len(REGIONS))
                    if COLORS[c[r]] is not None or KINDS[k[r]] is not None})
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
    x = _nchw(images)
    return torch.cat([net.features(x[i:i + batch]) for i in range(0, len(x), batch)]).numpy()
