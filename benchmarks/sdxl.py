"""Speed at SDXL widths: the SDXL family's UNets of the real widths (random weights), each
strategy's UNet time composed from single UNet calls timed interleaved with the plain SDXL UNet
(asdm/evaluation/speed.py, the main job's method), median ratio with its spread over the rounds,
beside two FLOP bounds: counted on the calls as they run at the measured latent, and estimated
at 1024 px (latent 128, the family's own size; asdm/topology.py's per-atom estimate, which the
tests check against counted FLOPs). Plain SDXL against itself is the first row: 1.00x within its
spread.

Strategies: feature inheritance (presets in each reuse mode, Pn), the project's DeepCache
baseline (depth:interval), each student alone, the paper's S1 switching for SDXL (the student
for the first 40 % of the steps, SDXL for the rest), students with ME-CondConv (N = 2, random
experts and router: cond and uncond route differently, as when trained) and SDXL assembled
with a student by a recipe (M2: the student's two shallowest level pairs).

    python benchmarks/sdxl.py [--size 32] [--steps 20] [--rounds 2] [--dtype bf16]
        [--presets EX3,EX2,DE2] [--modes residual,output,output+forecast] [--period 3]
        [--deepcache 2:3] [--students ssd-1b] [--condconv ssd-1b] [--assemble M2:ssd-1b]
        [--device cpu]

Every UNet named stays in memory while the calls interleave (bf16: SDXL ~5 GB, SSD-1B ~2.6 GB,
an assembled UNet about SDXL's): on a 24 GB machine time the students a few at a time.
On a GPU: ``--dtype fp16`` (the calls are timed by CUDA events there).
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import device_name  # noqa: E402
from asdm import assembly, inheritance, topology  # noqa: E402
from asdm.evaluation import speed, strategies  # noqa: E402
from asdm.harness import host  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LATENT_1024 = 128


def macs_1024(model) -> float:
    """Multiply-accumulates of one image at 1024 px (latent 128), with ME-CondConv's kernel mixing."""
    return sum(topology.atom_macs(model.model.diffusion_model, LATENT_1024).values()) + speed.mixing_macs(model)


def bound_1024(s, steps: int, models) -> float:
    """The FLOP bound of a strategy's schedule at 1024 px."""
    plain_unet, plain_macs = models.sd.model.diffusion_model, macs_1024(models.sd)
    if s.kind == "plain":
        return 1.0
    if s.kind == "unet":
        return plain_macs / macs_1024(models.unet(s.unet))
    if s.kind == "switch":
        work = sum(n * (plain_macs if m == "full" else macs_1024(models.unet(m))) for m, n in s.ranges)
        return steps * plain_macs / work
    topo = topology.describe(plain_unet)
    if s.kind == "deepcache":   # its shallow branch: input blocks 0..depth, the mirrored output blocks, out
        macs = topology.atom_macs(plain_unet, LATENT_1024)
        n_out = len(plain_unet.output_blocks)
        kept = [p for p in macs if p == topology.OUT or any(
            p.startswith(f"{side}.{i}.") for side, idx in (("input_blocks", range(s.depth + 1)),
                                                          ("output_blocks", range(n_out - 1 - s.depth, n_out)))
            for i in idx)]
        share = sum(macs[p] for p in kept) / plain_macs
        full = len(range(0, steps, s.period))
    else:
        units, _ = inheritance.resolve_units(topo, s.preset, "")
        share, _ = inheritance.inheriting_share(plain_unet, units, s.reuse, LATENT_1024)
        full = inheritance.Schedule(s.period, s.tail).pattern(steps).count("F")
    return steps / (full + (steps - full) * share)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=32, help="latent side (32 = 256 px; 128 = SDXL's 1024 px)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    ap.add_argument("--presets", default="EX3,EX2,DE2")
    ap.add_argument("--modes", default="residual,output,output+forecast")
    ap.add_argument("--period", type=int, default=3)
    ap.add_argument("--deepcache", default="2:3", help="DeepCache depth:interval pairs")
    ap.add_argument("--students", default="ssd-1b", help="of ssd-1b, vega, koala-700m, koala-1b: alone and in S1")
    ap.add_argument("--condconv", default="ssd-1b", help="students timed with ME-CondConv (N = 2) on their R units")
    ap.add_argument("--assemble", default="M2:ssd-1b", help="recipe:student pairs, SDXL assembled with the student")
    ap.add_argument("--device", default="", help="cpu: compute on the CPU even where a GPU is")
    a = ap.parse_args()
    if a.device == "cpu":
        import comfy.cli_args   # late: set before the host starts
        comfy.cli_args.args.cpu = True
    host.boot(pytorch_attention=True)
    split = lambda text: [v.strip() for v in text.split(",") if v.strip()]   # noqa: E731
    presets, students, condconv = split(a.presets), split(a.students), split(a.condconv)
    assembled = [pair.split(":") for pair in split(a.assemble)]
    modes = [(m.split("+")[0], m.endswith("+forecast")) for m in split(a.modes)]
    S = strategies.Strategy
    k = max(1, round(0.4 * a.steps))
    runs = [S("full", "SDXL (again)", "plain", "plain")]
    runs += [S(f"{p}-{r}{'+f' if f else ''}", f"{p} P{a.period}, {strategies.reuse_label(r, f)}", "fi", "fi",
               preset=p, period=a.period, reuse=r, forecast=f) for p in presets for r, f in modes]
    runs += [S(f"dc-{d}-{n}", f"DeepCache depth {d}, interval {n}", "dc", "deepcache", depth=int(d), period=int(n))
             for d, n in (pair.split(":") for pair in split(a.deepcache))]
    runs += [S(st, st, "student", "unet", unet=st) for st in students]
    runs += [S(f"S1-{st}", f"S1: {st} {k} + SDXL {a.steps - k} steps", "switch", "switch",
               ranges=[(st, k), ("full", a.steps - k)]) for st in students]
    runs += [S(f"{st}-condconv", f"{st} + ME-CondConv (N = 2)", "student", "unet", unet=f"{st}-condconv")
             for st in condconv]
    runs += [S(f"{r}+{st}", f"{r}: SDXL with {st}'s parts ({assembly.recipe_spec(r)})", "assembled", "unet",
               unet=f"{r}+{st}") for r, st in assembled]
    models = speed.Models("sdxl", DTYPES[a.dtype])
    res = speed.measure(runs, a.steps, a.size, a.rounds, models=models,
                        progress=lambda d, n: print(f"\r{d}/{n} calls", end="", file=sys.stderr, flush=True))
    print(f"\n\nSDXL family, real widths (random weights), {a.dtype}, latent {speed.CFG_BATCH}x4x{a.size}x{a.size} "
          f"({a.size * 8} px), {a.steps} steps, {device_name()}, {a.rounds} rounds; SDXL against itself: "
          f"{res['full']['ratio']}\n")
    print(f"| strategy | UNet-time ratio (latent {a.size}) | FLOP bound (latent {a.size}) | "
          "measured / bound | FLOP bound at 1024 px |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for s in runs:
        r = res[s.name]
        if "refused" in r:
            print(f"| {s.label} | refused on SDXL | | | |")
            continue
        reached = r["ratio"].median / r["bound"]
        print(f"| {s.label} | {r['ratio']} | {r['bound']:.2f}x | {reached:.0%} | "
              f"{bound_1024(s, a.steps, models):.2f}x |")


if __name__ == "__main__":
    main()
