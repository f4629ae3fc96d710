"""The main job's metrics and the attribute checker on cases with a known answer."""
import math

import numpy as np
import pytest

import asdm.evaluation.checker as C
import asdm.evaluation.metrics as M
import asdm.training.shapes as shapes
from asdm import embedded


def _images(seed=0, n=4):
    return np.random.default_rng(seed).uniform(0.1, 0.9, (n, 32, 32, 3))


def test_psnr_known_answers():
    a = _images()
    assert M.psnr(a, a) == math.inf
    assert M.psnr(a, a + 0.1) == pytest.approx(20.0, abs=1e-5)       # MSE 0.01 -> 10 log10(100)
    assert M.psnr(a, a - 0.01) == pytest.approx(40.0, abs=1e-4)   # float32 images


def test_ssim_known_answers():
    a = _images()
    assert M.ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    # constant images: no variance, so SSIM is the luminance term (2 mu_a mu_b + C1) / (mu_a^2 + mu_b^2 + C1)
    x, y = np.full((1, 16, 16, 3), 0.5), np.full((1, 16, 16, 3), 0.6)
    c1 = 0.01 ** 2
    assert M.ssim(x, y) == pytest.approx((2 * 0.5 * 0.6 + c1) / (0.25 + 0.36 + c1), abs=1e-7)   # float32 pixels
    # structure destroyed: noise against an unrelated noise image is far below a mild blur of itself
    assert M.ssim(a, _images(1)) < 0.1 < 0.9 < M.ssim(a, a * 0.98 + 0.01)


def test_frechet_known_answers():
    f = np.random.default_rng(0).normal(size=(500, 8))
    assert M.frechet_distance(f, f) == pytest.approx(0.0, abs=1e-8)
    v = np.arange(8) / 4
    assert M.frechet_distance(f, f + v) == pytest.approx((v ** 2).sum(), rel=1e-8)
    # covariance scaled by c: (1 - sqrt(c))^2 tr(S)
    c, mu = 4.0, f.mean(0)
    g = mu + math.sqrt(c) * (f - mu)
    tr = np.trace(np.cov(f, rowvar=False))
    assert M.frechet_distance(f, g) == pytest.approx((1 - math.sqrt(c)) ** 2 * tr, rel=1e-6)


@pytest.fixture(scope="module")
def checker():
    return C.load_checker(embedded.path("checker"))


def test_checker_reads_dataset_scenes(checker):
    """Held-out scenes (a seed the checker never saw): it reads >= 97 % of their attributes."""
    scenes = shapes.generate(300, 64, seed=99)
    imgs = np.stack([s.image for s in scenes]) / 255.0
    assert C.adherence(checker, imgs, scenes) >= 0.97
    # the same images scored against captions with every colour changed: colours all wrong
    other = {c: list(shapes.COLORS)[(i + 1) % len(shapes.COLORS)] for i, c in enumerate(shapes.COLORS)}
    wrong = [tuple(shapes.Item(it.shape, other[it.color], it.region) for it in s.items) for s in scenes]
    assert C.adherence(checker, imgs, wrong) <= 0.52


def test_checker_feature_distance(checker):
    """Two samples of the dataset are close in checker space; blank images are far."""
    a = np.stack([s.image for s in shapes.generate(400, 64, seed=5)]) / 255.0
    b = np.stack([s.image for s in shapes.generate(400, 64, seed=6)]) / 255.0
    blank = np.full_like(a, 0.9) + np.random.default_rng(0).normal(0, 0.02, a.shape)
    fa, fb, fblank = (C.features(checker, x) for x in (a, b, blank))
    assert M.frechet_distance(fa, fb) * 10 < M.frechet_distance(fa, fblank)
