"""Feature inheritance speed on the real SD1.5 topology (random weights), against the plain model.

Per preset, the UNet time of the whole P5 and P5† schedule (50 steps, the last 10 full, as the
paper) is composed from single UNet calls timed interleaved with plain calls (a storing full
step, an inheriting step, a plain step), over rounds, in one process: asdm/evaluation/speed.py,
the main job's method. Median ratio with its spread (lowest-highest round), beside the FLOP
bound of the same schedule. Plain against itself is the first row: 1.00x within its spread.

    python benchmarks/inheritance.py [--size 16] [--steps 50] [--rounds 3] [--presets CO6,EX3]
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import device_name, engine  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=16, help="latent side (16 = 128 px images, 64 = 512 px)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--tail", type=float, default=0.2, help="final full steps of P5† (0.2 = 10 of 50)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--presets", default="", help="comma-separated subset (default: all)")
    a = ap.parse_args()
    st, speed = engine("evaluation.strategies"), engine("evaluation.speed")
    presets = [p.strip() for p in a.presets.split(",") if p.strip()] or list(engine("topology").PRESETS)
    full = st.Strategy("full", "plain", "plain", "plain")
    strategies = [full] + [st.Strategy(f"{p}-{m}", f"{p} {m}", m, "fi", preset=p, period=5, tail=tail)
                           for p in presets for m, tail in (("P5", 0.0), ("P5†", a.tail))]
    res = speed.measure(strategies, a.steps, a.size, a.rounds,
                        progress=lambda d, n: print(f"\r{d}/{n} calls", end="", file=sys.stderr, flush=True))
    k = engine("inheritance").Schedule(5, a.tail).tail_steps(a.steps)
    print(f"\n\nSD1.5 topology (random weights), latent {speed.CFG_BATCH}x4x{a.size}x{a.size}, {a.steps} steps, "
          f"{device_name()}, {a.rounds} rounds; plain against itself: {res['full']['ratio']}\n")
    print(f"| preset | units | FLOPs skipped per inheriting step | P5 measured | P5 bound | "
          f"P5† (last {k} full) measured | P5† bound |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for p in presets:
        r5, r5d = res[f"{p}-P5"], res[f"{p}-P5†"]
        print(f"| {p} | {r5['units']} | {r5['skipped']:.1%} | {r5['ratio']} | {r5['bound']:.2f}x | "
              f"{r5d['ratio']} | {r5d['bound']:.2f}x |")


if __name__ == "__main__":
    main()
