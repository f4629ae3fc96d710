"""GRI attention speed on the real SD1.5 topology (random weights), against the plain model, with
ComfyUI's built-in ToMe (ratio 0.5) and HyperTile (its defaults) in the same run.

Per latent size, every variant's UNet call is timed interleaved with the plain call, round by
round (benchmarks/common.py: median ratio plain / variant with its spread, lowest-highest
round; plain against itself is the first row and must read 1.00x within its spread). From the
same calls, the time spent inside the level-0 attention units (dn0.*.A, up3.*.A: forward hooks
around each unit) gives the units' own ratio. The attention core (attn1's softmax(QK^T)V on
the q, k, v those units see in a plain call) is timed separately, host attention against GRI.
Beside each ratio its FLOP bound (plain FLOPs / variant FLOPs: the UNet counted on one forward
by asdm/evaluation/flops.py, attention matmuls analytically; ToMe's bound counts its halved
queries in attn1, HyperTile's the range of the tilings it draws at random).

    python benchmarks/gri.py [--sizes 64,96] [--rounds 2] [--core-rounds 5] [--batch 2]
                             [--settings 16x4,32x4,16x2] [--host-attention]
    python benchmarks/gri.py --core-only 64:640:10   # the attention core alone: SDXL's level 1 at 1024 px

Plain attention is PyTorch's scaled_dot_product_attention (ComfyUI's
--use-pytorch-cross-attention, its default on GPUs); --host-attention keeps what the host
picks by itself (on a CPU its sub-quadratic attention).
"""
import argparse
import logging
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Ratio, device_name, host, interleaved, sync  # noqa: E402
from asdm import compat, gri  # noqa: E402
from asdm.evaluation import flops  # noqa: E402
from asdm.harness import models as tm  # noqa: E402

UNITS = "dn0, up3"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="64,96", help="latent sides (64 = 512 px, 96 = 768 px)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds of UNet calls")
    ap.add_argument("--core-rounds", type=int, default=5, help="interleaved rounds of the attention core")
    ap.add_argument("--batch", type=int, default=2, help="UNet batch (2 = cond + uncond)")
    ap.add_argument("--settings", default="16x4,32x4,16x2", help="GRI window x pool settings")
    ap.add_argument("--host-attention", action="store_true",
                    help="plain attention as the host picks it (CPU: sub-quadratic) instead of PyTorch SDPA")
    ap.add_argument("--core-only", default="", metavar="GRID:CHANNELS:HEADS",
                    help="time only the attention core on a grid of that side and width (random q, k, v), "
                         "e.g. 64:640:10 = SDXL's level 1 at 1024 px (where GRI's default units sit)")
    a = ap.parse_args()
    host.boot()
    import comfy.ldm.modules.attention as attention   # late: the host's modules exist once it runs
    if not a.host_attention:
        # what --use-pytorch-cross-attention selects (the host booted with its own choice);
        # CrossAttention and GRI's outside-the-range path read this global at call time
        attention.optimized_attention = attention.optimized_attention_masked = attention.attention_pytorch
    import comfy.model_management as mm
    import nodes
    logging.getLogger().setLevel(logging.WARNING)
    N = nodes.NODE_CLASS_MAPPINGS
    dev = mm.get_torch_device()
    settings = [tuple(int(v) for v in s.split("x")) for s in a.settings.split(",") if s.strip()]

    torch.set_grad_enabled(False)
    if a.core_only:
        return core_only(a, settings, dev)
    sd = tm.sd_model(tm.SD15_UNET, seed=0)
    unet = sd.model.diffusion_model
    topo = gri.describe(unet)
    sites = gri.sites(unet, topo, gri.resolve_units(topo, UNITS))
    variants = {f"GRI window {w}, pool {p}": gri.apply_gri(sd, UNITS, w, p) for w, p in settings}
    variants["ToMe ratio 0.5"] = _call_node(compat, N["TomePatchModel"], model=sd, ratio=0.5)[0]
    variants["HyperTile (defaults)"] = _call_node(compat, N["HyperTile"], model=sd, tile_size=256, swap_size=2,
                                                  max_depth=0, scale_depth=False)[0]

    # time inside the level-0 A units, whichever clone runs them (they share the UNet's modules)
    inside = {"t": 0.0}
    starts = {}

    def enter(mod, args):
        sync()
        starts[id(mod)] = time.perf_counter()

    def leave(mod, args, out):
        sync()
        inside["t"] += time.perf_counter() - starts[id(mod)]

    for s in sites:
        m = unet.get_submodule(s.unit.path)
        m.register_forward_pre_hook(enter)
        m.register_forward_hook(leave)

    tables = []
    for size in (int(v) for v in a.sizes.split(",")):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(a.batch, 4, size, size, generator=g).to(dev)
        ctx = torch.randn(a.batch, 77, 768, generator=g).to(dev)
        t = torch.full((a.batch,), 10.0, device=dev)

        def call(model):   # one UNet call with the MODEL's options, as the sampler passes them
            return model.model.apply_model(x, t, c_crossattn=ctx, transformer_options=dict(compat.unet_options(model)))

        unit_times: dict = {}

        def caller(name, model):
            def fn():
                inside["t"] = 0.0
                call(model)
                unit_times.setdefault(name, []).append(inside["t"])
            fn.prepare = lambda: mm.load_models_gpu([model])
            return fn

        # FLOPs of the plain UNet, and the q, k, v of the level-0 self-attentions
        mm.load_models_gpu([sd])
        count = flops.count(unet, lambda: call(sd))
        total = sum(count.values())
        unit_flops = sum(v for k, v in count.items() if any(k.startswith(s.unit.path + ".") for s in sites))
        captured = []
        rec = sd.clone()
        for s in sites:
            name, number = gri.attention_key(s.unit)

            def record(q, k, v, extra, s=s):
                grid = gri.token_grid(q.shape[1], extra, s.level)
                captured.append((q, k, v, {kk: extra[kk] for kk in ("n_heads", "dim_head", "attn_precision") if kk in extra}, grid, s.order))
                return gri.host_attention(q, k, v, extra)
            rec.set_model_attn1_replace(record, name, number, s.transformer_index)
        mm.load_models_gpu([rec])
        call(rec)
        core = sum(4 * q.shape[0] * q.shape[1] * k.shape[1] * q.shape[2] for q, k, *_ in captured)

        def gri_core(w, p):
            return sum(gri.attention_flops(grid, w, p, q.shape[2], q.shape[0])[1] for q, k, v, e, grid, o in captured)

        bounds = {"plain": (1.0, 1.0, 1.0)}
        for w, p in settings:
            gc = gri_core(w, p)
            bounds[f"GRI window {w}, pool {p}"] = (total / (total - core + gc), unit_flops / (unit_flops - core + gc), core / gc)
        bounds["ToMe ratio 0.5"] = (total / (total - core / 2), unit_flops / (unit_flops - core / 2), 2.0)
        tiles = _hypertile_tilings(size)   # HyperTile's tiles split attn1's work, drawn per call
        lo, hi = min(tiles), max(tiles)

        def tiled(whole):
            return whole / (whole - core + core / lo), whole / (whole - core + core / hi)
        bounds["HyperTile (defaults)"] = (tiled(total), tiled(unit_flops), (float(lo), float(hi)))

        print(f"latent {size}: UNet calls ...", file=sys.stderr, flush=True)
        calls = {"_base": caller("_base", sd), "plain": caller("plain", sd)}
        calls.update({k: caller(k, m) for k, m in variants.items()})
        times = interleaved(calls, a.rounds)
        unit_times = {k: v[-a.rounds:] for k, v in unit_times.items()}   # the warm-up round is not timed

        # the attention core alone: host attention against GRI on the captured q, k, v
        print(f"latent {size}: attention core ...", file=sys.stderr, flush=True)

        def host_core():
            for q, k, v, e, grid, o in captured:
                gri.host_attention(q, k, v, e)

        def gri_fn(w, p):
            def fn():
                for q, k, v, e, grid, o in captured:
                    gri.gri_attention(q, k, v, e["n_heads"], grid, w, p, shift=bool(o % 2))
            return fn
        core_calls = {"_base": host_core, "plain": host_core}
        core_calls.update({f"GRI window {w}, pool {p}": gri_fn(w, p) for w, p in settings})
        core_times = interleaved(core_calls, a.core_rounds)

        rows = []
        for name in ["plain"] + list(variants):
            r_unet = Ratio.of(times["_base"], times[name])
            r_unit = Ratio.of(unit_times["_base"], unit_times[name])
            r_core = Ratio.of(core_times["_base"], core_times[name]) if name in core_times else None
            rows.append((name, sorted(times[name])[len(times[name]) // 2], r_unet, r_unit, r_core, bounds[name]))
        tables.append((size, rows, sorted(times["_base"]), sorted(core_times["_base"])))
        del captured, rec
        mm.unload_all_models()

    attn_name = attention.optimized_attention.__name__
    print(f"\nSD1.5 topology (random weights), UNet batch {a.batch}, {device_name()}, torch {torch.__version__}; "
          f"plain attention: {attn_name}; GRI in {UNITS} (the level-0 A units); "
          f"{a.rounds} interleaved rounds of UNet calls, {a.core_rounds} of the attention core\n")
    for size, rows, base, core_base in tables:
        print(f"latent {size}x{size} ({size * 8} px): plain UNet call {base[len(base) // 2]:.2f} s "
              f"(rounds {', '.join(f'{b:.2f}' for b in base)}), plain level-0 attention core "
              f"{core_base[len(core_base) // 2] * 1e3:.0f} ms\n")
        print("| variant | UNet call | UNet speed-up | bound | level-0 A units speed-up | bound | attn1 core speed-up | bound |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for name, tmed, r_unet, r_unit, r_core, b in rows:
            print(f"| {name} | {tmed:.2f} s | {r_unet} | {_bound(b[0])} | {r_unit} | {_bound(b[1])} | "
                  f"{r_core if r_core is not None else '—'} | {_bound(b[2])} |")
        print()


def core_only(a, settings, dev):
    """The attention core alone at one grid: host attention against each GRI setting, interleaved."""
    side, channels, heads = (int(v) for v in a.core_only.split(":"))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(a.batch, side * side, channels, generator=g).to(dev) for _ in range(3))
    extra = {"n_heads": heads, "dim_head": channels // heads, "attn_precision": None,
             "original_shape": [a.batch, channels, side, side]}
    calls = {"_base": lambda: gri.host_attention(q, k, v, extra), "plain": lambda: gri.host_attention(q, k, v, extra)}
    for w, p in settings:
        calls[f"GRI window {w}, pool {p}"] = (lambda w=w, p=p: gri.gri_attention(q, k, v, heads, (side, side), w, p))
    times = interleaved(calls, a.core_rounds, device=dev)
    print(f"\nattention core, grid {side}x{side}, {channels} channels in {heads} heads, batch {a.batch}, "
          f"{device_name()}, {a.core_rounds} interleaved rounds; plain "
          f"{sorted(times['_base'])[len(times['_base']) // 2] * 1e3:.0f} ms\n")
    print("| variant | speed-up | FLOP bound |\n| --- | ---: | ---: |")
    print(f"| plain | {Ratio.of(times['_base'], times['plain'])} | 1.00x |")
    for w, p in settings:
        full, fast = gri.attention_flops((side, side), w, p, channels, a.batch)
        name = f"GRI window {w}, pool {p}"
        print(f"| {name} | {Ratio.of(times['_base'], times[name])} | {full / fast:.2f}x |")


def _call_node(compat, cls, **inputs) -> tuple:
    try:
        return compat.call_node(cls, **inputs)
    except AttributeError:   # a V3 node whose execute returns a plain tuple (HyperTile on 0.3.64)
        return tuple(cls.execute(**inputs))


def _bound(b) -> str:
    if isinstance(b, tuple):
        return f"{b[0]:.2f}-{b[1]:.2f}x"
    return f"{b:.2f}x"


def _hypertile_tilings(size: int, tile_size: int = 256, swap_size: int = 2) -> list[int]:
    """The tile counts HyperTile (comfy_extras/nodes_hypertile.py, defaults) draws from at level 0:
    per axis one of the first ``swap_size`` divisors >= latent_tile_size, as value // divisor."""
    lt = max(32, tile_size) // 8
    per_axis = [size // d for d in [i for i in range(min(lt, size), size + 1) if size % i == 0][:swap_size]]
    return sorted({a * b for a in per_axis for b in per_axis})


if __name__ == "__main__":
    main()
