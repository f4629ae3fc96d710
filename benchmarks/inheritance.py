"""Feature inheritance speed on the real SD1.5 topology (random weights), against the plain model.

Per preset and reuse mode, the UNet time of the whole Pn and Pn† schedule (default P5 and P5†,
50 steps, the last 10 full, as the paper) is composed from single UNet calls timed interleaved with plain calls (a
storing full step, a reusing step, a plain step), over rounds, in one process:
asdm/evaluation/speed.py, the main job's method. DeepCache (the project's baseline,
asdm/evaluation/deepcache.py) at the given depths and intervals, the same way. Median ratio with
its spread (lowest-highest round), beside the FLOP bound of the same schedule, counted on the
calls as they run. Plain against itself is the first row: 1.00x within its spread.

    python benchmarks/inheritance.py [--size 16] [--steps 50] [--period 5] [--rounds 3] [--presets CO6,EX3]
        [--modes residual,output,output+forecast] [--deepcache 2:5,3:5]
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import device_name  # noqa: E402
from asdm import inheritance  # noqa: E402
from asdm import topology  # noqa: E402
from asdm.evaluation import speed  # noqa: E402
from asdm.evaluation import strategies  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=16, help="latent side (16 = 128 px images, 64 = 512 px)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--period", type=int, default=5, help="n of Pn and Pn†")
    ap.add_argument("--tail", type=float, default=0.2, help="final full steps of Pn† (0.2 = 10 of 50)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--presets", default="", help="comma-separated subset (default: all)")
    ap.add_argument("--modes", default="residual",
                    help="reuse modes: residual, output, with +forecast (e.g. residual,output,output+forecast)")
    ap.add_argument("--deepcache", default="", help="DeepCache depth:interval pairs, e.g. 2:5,3:5")
    a = ap.parse_args()
    presets = [p.strip() for p in a.presets.split(",") if p.strip()] or list(topology.PRESETS)
    modes = [(m.split("+")[0], m.endswith("+forecast")) for m in a.modes.split(",") if m.strip()]
    dc = [tuple(int(v) for v in pair.split(":")) for pair in a.deepcache.split(",") if pair.strip()]
    full = strategies.Strategy("full", "plain", "plain", "plain")
    n = a.period
    fi = [strategies.Strategy(f"{p}-{r}{f}-{m}", p, m, "fi", preset=p, period=n, tail=tail, reuse=r, forecast=f)
          for p in presets for r, f in modes for m, tail in ((f"P{n}", 0.0), (f"P{n}†", a.tail))]
    caches = [strategies.Strategy(f"dc-{d}-{n}", f"DeepCache depth {d}, interval {n}", "dc", "deepcache", depth=d, period=n)
              for d, n in dc]
    res = speed.measure([full] + fi + caches, a.steps, a.size, a.rounds,
                        progress=lambda d, n: print(f"\r{d}/{n} calls", end="", file=sys.stderr, flush=True))
    k = inheritance.Schedule(n, a.tail).tail_steps(a.steps)
    print(f"\n\nSD1.5 topology (random weights), latent {speed.CFG_BATCH}x4x{a.size}x{a.size}, {a.steps} steps, "
          f"{device_name()}, {a.rounds} rounds; plain against itself: {res['full']['ratio']}\n")
    print(f"| preset | reuse | FLOPs skipped per reusing step | P{n} measured | P{n} bound | "
          f"P{n}† (last {k} full) measured | P{n}† bound |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for p in presets:
        for r, f in modes:
            r5, r5d = res[f"{p}-{r}{f}-P{n}"], res[f"{p}-{r}{f}-P{n}†"]
            print(f"| {p} | {strategies.reuse_label(r, f)} | {r5['skipped']:.1%} | {r5['ratio']} | {r5['bound']:.2f}x | "
                  f"{r5d['ratio']} | {r5d['bound']:.2f}x |")
    if caches:
        print("\n| baseline | FLOPs skipped per cached step | measured | bound |\n| --- | ---: | ---: | ---: |")
        for s in caches:
            r = res[s.name]
            print(f"| {s.label} | {r['skipped']:.1%} | {r['ratio']} | {r['bound']:.2f}x |")


if __name__ == "__main__":
    main()
