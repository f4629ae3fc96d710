"""ME-CondConv's math as plain torch: the cost model between its two paths, caches that follow
in-place changes, gradients through each path. (On a MODEL through the host's samplers:
tests/host/test_condconv.py.)"""
import copy

import pytest
import torch

from asdm import condconv
from references import condconv_reference as reference


# Both paths compute the same sum as the reference in another order (kernel mix: one grouped
# conv with per-sample kernels; stacked: the plain conv plus a matmul of the other experts over
# the unfolded input, then a weighted sum): fp32 rounding only, well under 1e-5 of the output scale.
TOL = 1e-5


def test_cost_model_takes_stacked_on_small_maps_and_mix_on_large():
    choose = condconv.choose_path
    sd_kernel = 1280 * 1280 * 9
    assert choose(2, 2 * 2, 2, sd_kernel) == "stacked"        # SD's deepest level at latent 16
    assert choose(2, 64 * 64, 2, 320 * 320 * 9) == "mix"      # SD's top level at latent 64
    # fewer outputs never move a conv from stacked to mix; more experts never the other way
    for k in (320 * 320 * 9, 640 * 640 * 9, sd_kernel):
        for n in (2, 3, 4, 8):
            picks = [choose(2, hw * hw, n, k) for hw in (1, 2, 4, 8, 16, 32, 64)]
            assert picks == sorted(picks, key=lambda p: p == "mix"), (k, n, picks)
            assert all(choose(2, hw * hw, n + 1, k) == "mix" for hw, p in zip((1, 2, 4, 8, 16, 32, 64), picks)
                       if p == "mix")
    assert choose(2, 4, 1, sd_kernel) == "mix"                # one expert: nothing to stack
    assert choose(2, 4, 2, sd_kernel, "cuda", 2) == "stacked"


def test_cached_experts_follow_in_place_changes():
    """MEForward caches the placed experts (a converted copy in another dtype) and the
    shared-routing flag: a trainer's in-place updates, and expert 0 changed behind autograd's
    back (ComfyUI's ``param.data.copy_``, no version bump), still show in the next call."""
    g = torch.Generator().manual_seed(5)
    conv = torch.nn.Conv2d(8, 6, 3, padding=1)
    me = condconv.MEExperts(3, 6, 8, 3)
    with torch.no_grad():
        me.router.weight.zero_()                                   # shared routing first
        me.router.bias.copy_(torch.tensor([2.0, -1.0, 0.5]))
        me.experts.normal_(0, 0.1, generator=g)
    fwd = condconv.MEForward(conv, me)
    changes = [lambda: me.experts.mul_(-2),                        # a trainer's in-place step
               lambda: me.router.weight.normal_(0, 0.5, generator=g),   # routing now per sample
               lambda: conv.weight.data.copy_(torch.randn(conv.weight.shape, generator=g)),
               lambda: me.router.weight.zero_()]                   # shared again
    for dtype in (torch.float32, torch.float64):                   # float64: a converted copy
        x = torch.randn(2, 8, 5, 5, generator=g, dtype=dtype)
        with torch.no_grad():
            for change in [lambda: None] + changes:
                change()
                got = fwd(x)
                want = reference(x, copy.deepcopy(conv).to(dtype), copy.deepcopy(me).to(dtype))
                assert got.dtype == dtype and (got - want).abs().max() <= TOL * want.abs().max()


@pytest.mark.parametrize("path", ["mix", "stacked"])
def test_experts_and_router_train_through_each_path(path, monkeypatch):
    g = torch.Generator().manual_seed(6)
    conv = torch.nn.Conv2d(8, 6, 3, padding=1)
    me = condconv.MEExperts(2, 6, 8, 3)
    with torch.no_grad():
        me.router.weight.normal_(0, 0.5, generator=g)
        me.experts.normal_(0, 0.1, generator=g)
    x = torch.randn(2, 8, 6, 6, generator=g)
    params = [me.experts, me.expert_bias, me.router.weight, me.router.bias, conv.weight, conv.bias]
    want = torch.autograd.grad(reference(x, conv, me).square().sum(), params)
    monkeypatch.setattr(condconv, "PATH", path)
    fwd = condconv.MEForward(conv, me)
    for _ in range(2):   # the second call must not reuse anything of the first's graph
        got = torch.autograd.grad(fwd(x).square().sum(), params)
        for a, b in zip(got, want):
            assert (a - b).abs().max() <= 1e-4 * b.abs().max()
