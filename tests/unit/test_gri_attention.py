"""GRI attention's math as plain torch: the attention against a per-query reference, pool 1 as
full attention, gradients, what a query sees of other regions, the regions and their shift,
FLOP counts. (On a MODEL through the host's samplers: tests/host/test_gri.py.)"""

import pytest
import torch

from asdm import gri
from references import full_attention, gri_reference as reference, qkv

# Relative tolerance for results that differ only by float summation order: SDPA over a masked,
# concatenated key set against an explicit softmax (measured differences ~5e-7 in float32); GRI
# itself changes outputs by > 1e-3.
REL_TOL = 1e-5


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("grid,window,pool,shift", [
    ((8, 8), 4, 2, False), ((8, 8), 4, 2, True),      # windows divide the grid
    ((7, 10), 4, 3, True), ((5, 9), 3, 2, False),     # padding, non-square, cells cut by the edge
    ((5, 9), 2, 2, True), ((9, 4), 4, 4, True),       # a region entirely of padding; one axis one region
])
def test_gri_attention_equals_per_query_reference(grid, window, pool, shift):
    q, k, v = qkv(2, grid[0] * grid[1], 8)
    got = gri.gri_attention(q, k, v, 2, grid, window, pool, shift)
    assert rel_err(got, reference(q, k, v, 2, grid, window, pool, shift)) < REL_TOL
    # pool 1: every token outside the region is its own global key with weight 1: full attention
    assert rel_err(gri.gri_attention(q, k, v, 2, grid, window, 1, shift), full_attention(q, k, v, 2)) < REL_TOL


def test_gradients_flow():
    q, k, v = (t.requires_grad_() for t in qkv(2, 7 * 10, 8))
    gri.gri_attention(q, k, v, 2, (7, 10), 4, 3, True).square().sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


def test_a_query_sees_other_regions_only_through_the_pooled_keys():
    # 8x8 grid, 4x4 regions, pool 8: one global key, the mean of all tokens. Moving two keys
    # of region (0, 0) in opposite directions leaves that mean (and every other region) as it was.
    q, k, v = qkv(1, 64, 8)
    k2 = k.clone()
    k2[:, 0] += 3.0
    k2[:, 1] -= 3.0
    base = gri.gri_attention(q, k, v, 2, (8, 8), 4, 8, False)
    moved = gri.gri_attention(q, k2, v, 2, (8, 8), 4, 8, False)
    far = [y * 8 + x for y in range(8) for x in range(8) if y >= 4 or x >= 4]
    near = [y * 8 + x for y in range(4) for x in range(4)]
    assert (moved[:, far] - base[:, far]).abs().max() < 1e-5   # float rounding of the mean only
    assert (moved[:, near] - base[:, near]).abs().max() > 1e-2


def test_attention_flops():
    full, fast = gri.attention_flops((64, 64), 16, 4, 320, batch=2)
    assert full == 4 * 2 * 4096 * 4096 * 320
    assert fast == 4 * 2 * 4096 * (256 + 256) * 320 + 2 * 2 * 4096 * 320    # 8x fewer
    assert gri.attention_flops((16, 16), 16, 4, 32) == (4 * 256 * 256 * 32,) * 2


def test_regions_split_each_axis_evenly_and_shift_by_half_a_region():
    assert gri.split(64, 16) == (4, 16) and gri.split(90, 16) == (6, 15) and gri.split(7, 16) == (1, 7)
    assert gri.covers((16, 16), 16) and not gri.covers((17, 16), 16)
    plain, shifted = gri.layout((64, 64), 16, 4, False), gri.layout((64, 64), 16, 4, True)
    assert plain.regions == (4, 4) and plain.size == (16, 16) and plain.roll == (0, 0)
    assert shifted.roll == (8, 8) and plain.global_grid == (16, 16)
    # windows that are whole regions: every query of a window sees the same keys (one mask row)
    assert plain.mask.shape == (1, 16, 1, 256 + 256)
    assert shifted.mask.shape == (1, 16, 256, 256 + 256)
    # one axis with one region is not shifted on that axis
    assert gri.layout((8, 40), 16, 2, True).roll == (0, 7)
    assert gri.layout((16, 16), 16, 4, True).whole
