"""Compressed and assembled UNets against SD, and the S1 switch run, on the real topologies.

Per UNet: parameters, FLOPs per call, and the median time of one UNet call measured beside SD's
in the same process (SD timed again before each model, so drift shows); the speedup is SD's
time over the model's, next to the FLOP bound (SD's FLOPs over the model's). Then one whole
sampling run through the stock KSampler node: SD for every step against S1 (BK-SDM Base for the
first 10 of 25 steps, SD for the last 15), with its FLOP bound. The paper's figure to beat: M2
22.4 % faster than SD per image (2.128 s -> 1.643 s, 1.30x) on a 2080Ti at 512 px.

    python benchmarks/compressed.py [--size 16] [--batch 2] [--reps 3] [--steps 25] [--switch-at 10]
"""
import argparse
import gc
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Bench, device_name, engine, sync  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=16, help="latent side (16 = 128 px images, 64 = 512 px)")
    ap.add_argument("--batch", type=int, default=2, help="UNet batch (2 = cond + uncond of one image)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--switch-at", type=int, default=10)
    ap.add_argument("--run-reps", type=int, default=2, help="whole runs of each, interleaved; the fastest counts")
    ap.add_argument("--bound-size", type=int, default=64,
                    help="also give the FLOP bound at this latent side (64 = SD's 512 px)")
    a = ap.parse_args()

    b = Bench(a.batch, a.size, a.reps)
    tm, asm, flops = (engine(n) for n in ("harness.models", "assembly", "evaluation.flops"))
    mm, call_time, dev, x, t, ctx = b.mm, b.call_time, b.dev, b.x, b.t, b.ctx

    def gflops(model, size=None):
        unet = model.model.diffusion_model
        xx = x if size is None else torch.zeros(1, 4, size, size, device=dev)
        run = lambda: model.model.apply_model(xx, t[:len(xx)], c_crossattn=ctx[:len(xx)])
        return sum(flops.count(unet, run).values())

    def params(model):
        return sum(p.numel() for p in model.model.diffusion_model.parameters()) / 1e6

    rows = []
    with torch.no_grad():
        sd = tm.sd_model(tm.SD15_UNET, seed=0)
        mm.load_models_gpu([sd])
        f_sd, p_sd, fb_sd = gflops(sd), params(sd), gflops(sd, a.bound_size)
        base = asm.compress(sd, "base")
        tm.fill_(base.model.diffusion_model, seed=11)

        def measure(name, make):
            model = make()
            t_sd = call_time(sd)
            t_m = call_time(model)
            f_m = gflops(model)
            rows.append((name, params(model), f_m, t_sd, t_m, fb_sd / gflops(model, a.bound_size)))
            print(f"{name}: SD {t_sd*1e3:.0f} ms, {name} {t_m*1e3:.0f} ms", file=sys.stderr, flush=True)
            mm.unload_all_models()
            del model
            gc.collect()

        measure("Base", lambda: base)
        for layout in ("small", "tiny"):
            measure(layout.capitalize(), lambda: asm.compress(sd, layout))
        for recipe in ("M1", "M2", "M3"):
            measure(recipe, lambda: asm.assemble(sd, base, asm.RECIPES[recipe][0]))

        # A whole run through the stock KSampler: SD alone vs. S1.
        import nodes
        sw = engine("switch").make_switch([base, sd], [engine("switch").Range(0, a.switch_at), engine("switch").Range(a.switch_at, -1)])
        pos = [[ctx[:1].cpu(), {}]]
        neg = [[ctx[1:2].cpu() if a.batch > 1 else ctx[:1].cpu(), {}]]
        lat = {"samples": torch.zeros(1, 4, a.size, a.size)}

        def run_time(model):
            nodes.KSampler().sample(model, 0, 2, 7.5, "euler", "normal", pos, neg, lat)   # warm-up, loads
            sync(); t0 = time.perf_counter()
            nodes.KSampler().sample(model, 0, a.steps, 7.5, "euler", "normal", pos, neg, lat)
            sync(); return time.perf_counter() - t0

        # interleaved, fastest of each: on a shared machine noise only ever adds time
        times = [(run_time(sd), run_time(sw)) for _ in range(a.run_reps)]
        run_sd, run_s1 = min(t[0] for t in times), min(t[1] for t in times)
        f_base = next(r[2] for r in rows if r[0] == "Base")
        s1_bound = a.steps * f_sd / (a.switch_at * f_base + (a.steps - a.switch_at) * f_sd)
        r_base = next(r[5] for r in rows if r[0] == "Base")   # SD / Base FLOPs at bound-size
        s1_bound_big = a.steps / (a.switch_at / r_base + (a.steps - a.switch_at))

    devname = device_name()
    print(f"\nRandom-weight UNets of the real topologies, latent {a.batch}x4x{a.size}x{a.size}, {devname}, "
          f"torch {torch.__version__}, {mm.unet_dtype()}; SD1.5: {p_sd:.1f} M parameters, {f_sd/1e9:.1f} GFLOP per call\n")
    print(f"| UNet | parameters | GFLOP per call | time per call (SD beside it) | speedup vs SD | FLOP bound | "
          f"FLOP bound at {a.bound_size}x{a.bound_size} |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, p, f, t_sd, t_m, fb in rows:
        print(f"| {name} | {p:.1f} M | {f/1e9:.1f} | {t_m*1e3:.0f} ms ({t_sd*1e3:.0f} ms) | {t_sd/t_m:.2f}x | "
              f"{f_sd/f:.2f}x | {fb:.2f}x |")
    print(f"\nWhole {a.steps}-step run (KSampler, euler, cfg 7.5, one image): SD {run_sd:.1f} s, "
          f"S1 (Base steps 0-{a.switch_at - 1}, SD after) {run_s1:.1f} s: {run_sd/run_s1:.2f}x "
          f"({1 - run_s1/run_sd:.1%} less time), FLOP bound {s1_bound:.2f}x "
          f"({s1_bound_big:.2f}x at {a.bound_size}x{a.bound_size})")


if __name__ == "__main__":
    main()
