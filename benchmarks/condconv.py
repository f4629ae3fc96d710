"""ME-CondConv overhead on the real BK-SDM Small and Tiny topologies, against the plain UNet in
the same process. The goal (A-SDM §IV-B, "without sacrificing speed"): at most 5 % slower than
plain at N = 2.

Experts are initialised 'paper' (random), so cond and uncond route differently and the
per-sample grouped convolution runs, as in a trained model. N = 1 is the plain convolution.
The FLOP bound column is the extra work of mixing the kernels (N x kernel size per sample and
conv), relative to the UNet's FLOPs.

    python benchmarks/condconv.py [--size 16] [--batch 2] [--reps 5]
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Bench, device_name, engine  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=16, help="latent side (16 = 128 px, 64 = 512 px)")
    ap.add_argument("--batch", type=int, default=2, help="UNet batch (2 = cond + uncond)")
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()

    b = Bench(a.batch, a.size, a.reps)
    tm, asm, cc, flops = (engine(n) for n in ("harness.models", "assembly", "condconv", "evaluation.flops"))
    mm, call_time = b.mm, b.call_time

    rows = []
    with torch.no_grad():
        sd = tm.sd_model(tm.SD15_UNET, seed=0)
        for layout in ("small", "tiny"):
            plain = asm.compress(sd, layout)
            unet = plain.model.diffusion_model
            total = sum(flops.count(unet, lambda: b.call(plain)).values())
            paths = cc.select_convs(unet, cc.DEFAULT_UNITS)
            kernel = sum(unet.get_submodule(p).weight.numel() for p in paths)
            for n in (2, 4):
                patched = cc.apply_condconv(plain, cc.make_experts(unet, paths, n, "paper", seed=0))
                t_plain = call_time(plain)
                t_me = call_time(patched)
                mix = 2 * a.batch * n * kernel   # multiply-adds of the kernel mixing
                rows.append((layout.capitalize(), n, len(paths), t_plain, t_me, 1 + mix / total))
                print(f"{layout} N={n}: plain {t_plain*1e3:.0f} ms, ME {t_me*1e3:.0f} ms", file=sys.stderr, flush=True)
                mm.unload_all_models()
            del plain

    devname = device_name()
    print(f"\nRandom-weight BK-SDM UNets (real topology), latent {a.batch}x4x{a.size}x{a.size}, {devname}, "
          f"torch {torch.__version__}; every 3x3 conv of the down/up R units is ME-CondConv\n")
    print("| UNet | N | convs | plain | ME-CondConv | overhead | FLOP bound (extra work) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, n, convs, tp, tm_, fb in rows:
        print(f"| {name} | {n} | {convs} | {tp*1e3:.0f} ms | {tm_*1e3:.0f} ms | {tm_/tp - 1:+.1%} | {fb - 1:+.2%} |")
    print("\nN = 1 is the plain convolution (the node returns the MODEL unchanged): overhead 0.")


if __name__ == "__main__":
    main()
