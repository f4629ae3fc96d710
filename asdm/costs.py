"""FLOPs of a UNet's modules, counted on real forwards: what Auto Cache budgets its reuse with
(``autocache``) and what the evaluation's FLOP bound counts (``evaluation.flops``), so the ratio
the node reports and the ratio the evaluation measures are the same count.

Counts the multiply-adds of convolutions, linear layers and attention matmuls (2 FLOPs each);
norms and pointwise ops are left out (they are a few percent and memory-bound)."""
from __future__ import annotations

import contextlib
from collections import defaultdict

import torch


def _conv_flops(m, inp, out):
    w = m.weight
    return 2 * out.numel() * (w.shape[1] * w[0, 0].numel())  # per output: Cin/groups * kh * kw MACs


def _linear_flops(m, inp, out):
    return 2 * out.numel() * m.in_features


def _attn_flops(m, args, kwargs, out):
    x = args[0]
    context = kwargs.get("context", args[1] if len(args) > 1 else None)
    m_tokens = (context if context is not None else x).shape[1]
    inner = m.to_q.out_features
    return 4 * x.shape[0] * x.shape[1] * m_tokens * inner  # QK^T and attn @ V


@contextlib.contextmanager
def counting(unet: torch.nn.Module):
    """While the block runs, every forward of ``unet``'s convolutions, linear layers and
    attention adds its FLOPs to the yielded dict (module path -> FLOPs; attention under
    ``<path>.attn``)."""
    flops: dict[str, int] = defaultdict(int)
    handles = []
    for path, m in unet.named_modules():
        kind = type(m).__name__
        if isinstance(m, torch.nn.Conv2d):
            fn = _conv_flops
        elif isinstance(m, torch.nn.Linear):
            fn = _linear_flops
        elif kind == "CrossAttention":
            handles.append(m.register_forward_hook(
                lambda mod, a, k, o, p=path: flops.__setitem__(p + ".attn", flops[p + ".attn"] + _attn_flops(mod, a, k, o)),
                with_kwargs=True))
            continue
        else:
            continue
        handles.append(m.register_forward_hook(
            lambda mod, a, o, p=path, fn=fn: flops.__setitem__(p, flops[p] + fn(mod, a, o))))
    try:
        yield flops
    finally:
        for h in handles:
            h.remove()


def count(unet: torch.nn.Module, run_forward) -> dict[str, int]:
    """FLOPs per module path (leaf ops and attention), from one call of ``run_forward()``."""
    with counting(unet) as flops, torch.no_grad():
        run_forward()
    return dict(flops)
