"""Compressed and assembled UNets and the S1 switch, against SD1.5, on the real topologies
(random weights).

Per UNet, the UNet time of a whole schedule (every step on that UNet; S1: BK-SDM Base for the
first 10 of 25 steps, SD after) composed from single UNet calls timed interleaved with SD's over
rounds (asdm/evaluation/speed.py, the main job's method): median ratio SD / model with its
spread, beside the FLOP bound. SD against itself is the first row: 1.00x within its spread. The
paper's figure to beat: M2 22.4 % faster than SD per image (1.30x) on a 2080Ti at 512 px.

    python benchmarks/compressed.py [--size 16] [--rounds 3] [--steps 25] [--switch-at 10]
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import device_name  # noqa: E402
from asdm.evaluation import speed  # noqa: E402
from asdm.evaluation import strategies  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=16, help="latent side (16 = 128 px images, 64 = 512 px)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--switch-at", type=int, default=10)
    a = ap.parse_args()
    n = a.switch_at
    runs = [strategies.Strategy("full", "SD1.5 (again)", "plain", "plain")]
    runs += [strategies.Strategy(u, label, "compressed", "unet", unet=u) for u, label in
                   (("base", "BK-SDM Base"), ("small", "BK-SDM Small"), ("tiny", "BK-SDM Tiny"), ("m2", "M2"))]
    runs.append(strategies.Strategy("S1", f"S1: Base {n} + SD {a.steps - n} steps", "switch", "switch",
                                  ranges=[("base", n), ("full", a.steps - n)]))
    res = speed.measure(runs, a.steps, a.size, a.rounds,
                        progress=lambda d, t: print(f"\r{d}/{t} calls", end="", file=sys.stderr, flush=True))
    print(f"\n\nRandom-weight UNets of the real topologies, latent {speed.CFG_BATCH}x4x{a.size}x{a.size}, "
          f"{a.steps} steps, {device_name()}, {a.rounds} rounds\n")
    print("| UNet | GFLOP per call | ms per call (median) | UNet-time ratio vs SD | FLOP bound |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for s in runs:
        r = res[s.name]
        key = {"plain": "sd again", "unet": s.unet}.get(s.kind)
        per_call = f"{r['call_flops'][key] / 1e9:.1f} | {r['call_seconds'][key] * 1e3:.0f}" if key else "— | —"
        print(f"| {s.label} | {per_call} | {r['ratio']} | {r['bound']:.2f}x |")


if __name__ == "__main__":
    main()
