"""ME-CondConv overhead on the real BK-SDM Small and Tiny topologies (SD1.5 widths, random
weights), against the plain UNet in the same process. The goal (A-SDM §IV-B, "without
sacrificing speed"): at most ~10 % slower than plain at N = 2.

    python benchmarks/condconv.py --latents 16,32 --rounds 5
    python benchmarks/condconv.py --latents 64 --rounds 3        # slow on a CPU: seconds per UNet call
    python benchmarks/condconv.py --calibrate --rounds 7         # single convs: the cost model's data
    python benchmarks/condconv.py --calibrate --sdxl --rounds 3 --experts 2   # at SDXL's widths and maps

Every 3x3 conv of the down/up R units is ME-CondConv with 'paper' init (random experts and
router), so cond and uncond route differently and the per-sample paths run, as in a trained
model. Each ME-CondConv runs one of two paths (asdm/condconv.py): "kernel mix" (each sample's
kernel sum_i r_i W_i, then a grouped conv) or "stacked" (expert 0 as the plain conv, the other
experts as one matmul over the unfolded input, then each sample's weighted sum). The columns
force each path on every conv, then let the cost model choose per conv (how many convs it
gave to each path is shown).

Timing (benchmarks/common.py): per (UNet, latent) group the plain UNet and every variant take
turns round by round (A B C ... A B C ...); a cell is the median over rounds of time / plain
time, with the lowest and highest round in brackets. The group's first row is the plain UNet
timed against itself: it must read 1.00x within its spread, or the group is not to be trusted.

--calibrate times single ME-CondConvs of the SD1.5 shapes instead (batch 2, each path against
the plain conv, interleaved) and prints each path's extra time per kernel weight beside the
cost model's pick: the data the constants in asdm/condconv.py (_COST) come from.

FLOP bound: the extra arithmetic of a path relative to the plain UNet's FLOPs (asdm/evaluation/
flops.py): kernel mix 2*B*N*K per conv (mixing B kernels of K weights from N experts), stacked
(N-1) times the conv's own FLOPs (plus the weighted sum), chosen: each conv's chosen path.
"""
import argparse
import gc
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Bench, Ratio, device_name, interleaved  # noqa: E402
from asdm import assembly, condconv  # noqa: E402
from asdm.evaluation import flops  # noqa: E402
from asdm.harness import models as tm  # noqa: E402

PATHS = {"mix": "kernel mix", "stacked": "stacked", None: "chosen"}


def forced(call, path):
    """``call`` with every ME-CondConv on ``path`` (None: the cost model's choice per conv)."""
    def f():
        condconv.PATH = path
        try:
            return call()
        finally:
            condconv.PATH = None
    f.prepare = call.prepare
    return f


def conv_inputs(b, plain, unet, paths):
    """The input shape of each ME conv in one plain UNet call at this latent."""
    shapes = {}
    hooks = [unet.get_submodule(p).register_forward_hook(
        lambda m, a, o, p=p: shapes.__setitem__(p, (tuple(a[0].shape), tuple(o.shape)))) for p in paths]
    try:
        with torch.no_grad():
            b.call(plain)
    finally:
        for h in hooks:
            h.remove()
    return shapes


def flop_bounds(unet, paths, shapes, conv_flops, total, n, batch, device_type, itemsize):
    """Extra FLOPs / UNet FLOPs of the kernel mix, the stacked path and the chosen mix of both;
    and how many convs the cost model sends to the stacked path."""
    mix = stacked = chosen = 0
    n_stacked = 0
    for p in paths:
        w = unet.get_submodule(p).weight
        out = shapes[p][1]
        k = w.numel()
        e_mix = 2 * batch * n * k
        e_st = (n - 1) * conv_flops[p] + 2 * batch * n * out[1] * out[2] * out[3]
        path = condconv.choose_path(batch, out[2] * out[3], n, k, device_type, itemsize,
                              condconv.Workspace().fits(batch * k, itemsize))   # as apply_condconv runs it
        mix, stacked = mix + e_mix, stacked + e_st
        chosen += e_st if path == "stacked" else e_mix
        n_stacked += path == "stacked"
    return mix / total, stacked / total, chosen / total, n_stacked


# (in channels, out channels, map side) of the R units' 3x3 convs of SD1.5-width UNets, latents 16-64
CALIBRATION_SHAPES = [(1280, 1280, 2), (2560, 1280, 2), (1280, 1280, 4), (2560, 1280, 4), (640, 640, 4),
                      (1280, 1280, 8), (640, 640, 8), (320, 320, 8), (1280, 1280, 16), (640, 640, 16),
                      (320, 320, 16), (640, 640, 32), (320, 320, 32), (320, 320, 64)]


# The same at SDXL's widths: its R units' 3x3 convs (up blocks: the concatenated skip inputs) on
# the maps of latent 32 (what a CPU runs here) and of latent 128 (1024 px, SDXL's own size)
SDXL_CALIBRATION_SHAPES = [(1280, 1280, 4), (2560, 1280, 4), (640, 640, 8), (1920, 640, 8), (320, 320, 16),
                           (960, 320, 16), (1280, 1280, 32), (2560, 1280, 32), (640, 640, 64), (1920, 640, 64),
                           (320, 320, 128), (960, 320, 128)]


def calibrate(batch, rounds, ns, shapes=CALIBRATION_SHAPES):
    """Single convs: each path's extra time over the plain conv, per weight of the kernel."""
    print(f"\nSingle 3x3 convs, batch {batch}, {device_name()}, torch {torch.__version__}. Cells: time / plain "
          f"conv time, median over {rounds} interleaved rounds (lowest-highest); extra ns per kernel weight.\n")
    print("| in | out | map | N | plain | kernel mix | stacked | mix ns/w | stacked ns/w | faster | model picks |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    for i, o, hw in shapes:
        conv = torch.nn.Conv2d(i, o, 3, padding=1).to(dev)
        x = torch.randn(batch, i, hw, hw, generator=g).to(dev)
        for n in ns:
            me = condconv.MEExperts(n, o, i, 3)
            with torch.no_grad():
                me.experts.normal_(0, 0.01, generator=g)
                me.router.weight.normal_(0, 0.1, generator=g)
            me.to(dev)
            reps = max(1, min(10, int(1e9 / (2 * batch * o * i * 9 * hw * hw))))   # ~1 GFLOP per timing

            def many(fn):
                return lambda: [fn() for _ in range(reps)]
            ws = condconv.Workspace()   # as a patched model runs it: the kernels written into a reused buffer
            calls = {"plain": many(lambda: conv(x)),
                     "mix": many(lambda: condconv.me_conv(x, conv, me, shared=False, path="mix", workspace=ws)),
                     "stacked": many(lambda: condconv.me_conv(x, conv, me, shared=False, path="stacked"))}
            t = interleaved(calls, rounds)
            plain = sorted(t["plain"])[rounds // 2] / reps
            cells = {k: Ratio.of(t[k], t["plain"]) for k in ("mix", "stacked")}
            per_w = {k: (cells[k].median - 1) * plain * 1e9 / conv.weight.numel() for k in cells}
            pick = condconv.choose_path(batch, hw * hw, n, conv.weight.numel(), dev, x.element_size(),
                                  ws.fits(batch * conv.weight.numel(), x.element_size()))
            print(f"| {i} | {o} | {hw}x{hw} | {n} | {plain * 1e3:.1f} ms | {cells['mix']} | {cells['stacked']} "
                  f"| {per_w['mix']:.2f} | {per_w['stacked']:.2f} | {min(per_w, key=per_w.get)} | {pick} |", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latents", default="16,32", help="latent sides, comma-separated (16 = 128 px, 64 = 512 px)")
    ap.add_argument("--batch", type=int, default=2, help="UNet batch (2 = cond + uncond)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds per group (latent 64 on a CPU: 3)")
    ap.add_argument("--experts", default="2,4", help="numbers of experts N, comma-separated")
    ap.add_argument("--layouts", default="small,tiny", help="BK-SDM layouts, comma-separated")
    ap.add_argument("--calibrate", action="store_true", help="time single convs of the SD1.5 shapes instead")
    ap.add_argument("--sdxl", action="store_true", help="with --calibrate: SDXL's conv shapes (latent 32 and 128)")
    a = ap.parse_args()
    latents = [int(s) for s in a.latents.split(",")]
    ns = [int(s) for s in a.experts.split(",")]
    if a.calibrate:
        with torch.no_grad():
            calibrate(a.batch, a.rounds, ns, SDXL_CALIBRATION_SHAPES if a.sdxl else CALIBRATION_SHAPES)
        return

    benches = {s: Bench(a.batch, s, a.rounds) for s in latents}
    mm = next(iter(benches.values())).mm
    itemsize = next(iter(benches.values())).x.element_size()

    rows = []
    with torch.no_grad():
        for layout in a.layouts.split(","):
            sd = tm.sd_model(tm.SD15_UNET, seed=0)
            plain = assembly.compress(sd, layout)
            del sd
            gc.collect()
            unet = plain.model.diffusion_model
            paths = condconv.select_convs(unet, condconv.DEFAULT_UNITS)
            patched = {n: condconv.apply_condconv(plain, condconv.make_experts(unet, paths, n, "paper", seed=0)) for n in ns}
            for size, b in benches.items():
                mm.load_models_gpu([plain])
                counted = flops.count(unet, lambda: b.call(plain))
                total = sum(counted.values())
                shapes = conv_inputs(b, plain, unet, paths)
                calls = {"_base": b.caller(plain), "plain": b.caller(plain)}
                for n in ns:
                    call = b.caller(patched[n])
                    for path in PATHS:
                        calls[(n, path)] = forced(call, path)
                print(f"{layout} latent {size}: {len(calls)} calls x {a.rounds} rounds ...", file=sys.stderr, flush=True)
                t = interleaved(calls, a.rounds)
                base_s = sorted(t["_base"])[len(t["_base"]) // 2]
                rows.append((layout.capitalize(), size, "plain vs itself", [None, None, Ratio.of(t["plain"], t["_base"])],
                             None, None, base_s))
                for n in ns:
                    bounds = flop_bounds(unet, paths, shapes, counted, total, n, a.batch, b.dev.type, itemsize)
                    cells = [Ratio.of(t[(n, path)], t["_base"]) for path in PATHS]
                    rows.append((layout.capitalize(), size, n, cells, bounds, len(paths), None))
                    print(f"  N={n}: " + ", ".join(f"{PATHS[p]} {c}" for p, c in zip(PATHS, cells)),
                          file=sys.stderr, flush=True)
            mm.unload_all_models()
            del plain, patched, unet
            gc.collect()

    print(f"\nRandom-weight BK-SDM UNets (SD1.5 widths), batch {a.batch}, {device_name()}, torch {torch.__version__}; "
          f"every 3x3 conv of the down/up R units is ME-CondConv ('paper' init). Cells: UNet time / plain "
          f"UNet time, median over {a.rounds} interleaved rounds (lowest-highest round).\n")
    print("| UNet | latent | N | kernel mix (forced) | stacked (forced) | chosen | convs stacked / all "
          "| FLOP bound: mix | stacked | chosen |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, size, n, cells, bounds, nconv, base_s in rows:
        c = [str(x) if x is not None else "" for x in cells]
        if bounds is None:
            print(f"| {name} | {size} | {n} (plain {base_s:.2f} s) | | | {c[2]} | | | | |")
        else:
            mix, st, ch, n_st = bounds
            print(f"| {name} | {size} | {n} | {c[0]} | {c[1]} | {c[2]} | {n_st} / {nconv} "
                  f"| {mix:+.2%} | {st:+.1%} | {ch:+.1%} |")
    print("\nN = 1 is the plain convolution (the node returns the MODEL unchanged): no overhead.")


if __name__ == "__main__":
    main()
