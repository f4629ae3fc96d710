"""Image metrics of the main job: the paper's measures in miniature.

* ``psnr`` / ``ssim``: error of an accelerated run against full-compute sampling with the same
  seed (the paper's reference is the original SD's output).
* ``frechet_distance`` between two sets of image features (the attribute checker's, ``checker``):
  the analogue of FID.

Images are float arrays/tensors in [0, 1], [N, H, W, 3] (what ComfyUI's IMAGE holds).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def nchw(x) -> torch.Tensor:
    x = (x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))).float()
    if x.dim() == 3:
        x = x[None]
    return x.permute(0, 3, 1, 2) if x.shape[-1] == 3 else x


# ---------------------------------------------------------------------------------------------
# Full-reference error
# ---------------------------------------------------------------------------------------------

def psnr(a, b, peak: float = 1.0) -> float:
    """Mean over images of 10 log10(peak^2 / MSE); inf when every image is identical."""
    a, b = nchw(a).double(), nchw(b).double()
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
    a, b = nchw(a).double(), nchw(b).double()
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
