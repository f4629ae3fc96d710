"""Reference implementations the tests compare the pack against, spelled out the slow, obvious
way (shared by the unit and host tiers)."""
import math

import torch

from asdm import gri


def condconv_reference(x, conv, me):
    """ME-CondConv as a per-sample loop: each sample's mixed kernel, one plain convolution at a time."""
    w = torch.cat([conv.weight[None], me.experts])
    b = torch.cat([conv.bias[None], me.expert_bias])
    outs = []
    for s in range(x.shape[0]):
        r = torch.sigmoid(me.router(x[s:s + 1].mean((2, 3))))[0]
        k = sum(r[n] * w[n] for n in range(len(r)))
        bias = sum(r[n] * b[n] for n in range(len(r)))
        outs.append(torch.nn.functional.conv2d(x[s:s + 1], k, bias, conv.stride, conv.padding))
    return torch.cat(outs)



def gri_reference(q, k, v, heads, grid, window, pool, shift):
    """Per query, spelled out: the tokens of its region (the offset partition a shift makes)
    plus one pooled key per global cell, weighted by the cell's tokens outside the region."""
    b, n, c = q.shape
    d, (h, w) = c // heads, grid
    (ny, wh), (nx, ww) = gri.split(h, window), gri.split(w, window)
    sy, sx = (wh // 2 if shift and ny > 1 else 0), (ww // 2 if shift and nx > 1 else 0)
    region_of = {y * w + x: ((y - sy) // wh, (x - sx) // ww) for y in range(h) for x in range(w)}
    cells: dict = {}
    for y in range(h):
        for x in range(w):
            cells.setdefault((y // pool, x // pool), []).append(y * w + x)
    qh, kh, vh = (t.view(b, n, heads, d) for t in (q, k, v))
    out = torch.zeros_like(q)
    for i in range(n):
        region = [j for j in range(n) if region_of[j] == region_of[i]]
        keys, vals, bias = [kh[:, region]], [vh[:, region]], [0.0] * len(region)
        for toks in cells.values():
            outside = sum(region_of[t] != region_of[i] for t in toks)
            keys.append(kh[:, toks].mean(1, keepdim=True))
            vals.append(vh[:, toks].mean(1, keepdim=True))
            bias.append(math.log(outside) if outside else float("-inf"))
        s = torch.einsum("bhd,bkhd->bhk", qh[:, i], torch.cat(keys, 1)) / math.sqrt(d) + torch.tensor(bias)
        out[:, i] = torch.einsum("bhk,bkhd->bhd", s.softmax(-1), torch.cat(vals, 1)).reshape(b, c)
    return out


def full_attention(q, k, v, heads):
    b, n, c = q.shape
    split = lambda t: t.view(b, -1, heads, c // heads).transpose(1, 2)  # noqa: E731
    return torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).reshape(b, n, c)


def qkv(b, n, c, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, n, c, generator=g) for _ in range(3))
