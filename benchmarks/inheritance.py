"""Feature inheritance speed on the real SD1.5 topology, against the plain model, in one run.

For each preset the UNet time of a storing full step and of an inheriting step is measured
(median of --reps calls, same input, same process, interleaved with plain calls), then
composed over the 50-step refresh pattern of P5 and P5† (last 10 full). Beside it: the FLOP
bound for the same pattern, from the units' residual-branch FLOPs counted on the topology.

    python benchmarks/inheritance.py [--size 16] [--steps 50] [--reps 3] [--batch 2]
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from asdm.harness import host  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=16, help="latent side (16 = 128 px images)")
    ap.add_argument("--batch", type=int, default=2, help="UNet batch (2 = cond + uncond of one image)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--tail", type=int, default=10, help="k of P5†")
    ap.add_argument("--period", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--presets", default="", help="comma-separated subset (default: all)")
    a = ap.parse_args()

    host.boot()
    E = host.engine
    tm, inh, topology, flops = E("harness.models"), E("inheritance"), E("topology"), E("evaluation.flops")
    import comfy.model_management as mm

    base = tm.sd_model(tm.SD15_UNET, seed=0)
    unet = base.model.diffusion_model
    g = torch.Generator().manual_seed(0)
    x = torch.randn(a.batch, 4, a.size, a.size, generator=g)
    ctx = torch.randn(a.batch, 77, 768, generator=g)
    t = torch.full((a.batch,), 10.0)
    keys = tuple((i % 2, i // 2) for i in range(a.batch))

    topo = topology.describe(unet)
    counted = flops.count(unet, lambda: unet(x, t * 0 + 500, ctx))
    total = sum(counted.values())
    residual = flops.residual_flops(topo, counted)

    def timed(model, holder=None, mode_step=None):
        samples = []
        for _ in range(a.reps):
            if holder is not None:
                run = holder.start_run(total=10)
                holder.call = holder.begin_call(run, x, keys)      # step 0 stores
                if mode_step == "store":
                    t0 = time.perf_counter(); model.model.apply_model(x, t, c_crossattn=ctx); samples.append(time.perf_counter() - t0)
                else:
                    model.model.apply_model(x, t, c_crossattn=ctx)
                    run.step = 1
                    holder.call = holder.begin_call(run, x, keys)  # step 1 inherits
                    t0 = time.perf_counter(); model.model.apply_model(x, t, c_crossattn=ctx); samples.append(time.perf_counter() - t0)
                holder.call = None
                holder.end_run(run)
            else:
                t0 = time.perf_counter(); model.model.apply_model(x, t, c_crossattn=ctx); samples.append(time.perf_counter() - t0)
        return statistics.median(samples)

    import logging
    logging.getLogger("A-SDM").setLevel(logging.WARNING)
    with torch.no_grad():
        mm.load_models_gpu([base])
        timed(base)  # warm-up
        names = [p.strip() for p in a.presets.split(",") if p.strip()] or list(topology.PRESETS)
        rows = []
        for name in names:
            p = inh.apply_inheritance(base, name, "", a.period, 0)
            holder = p.model_options["transformer_options"]["asdm_inheritance"]
            t_plain = timed(base)
            mm.load_models_gpu([p])
            t_store = timed(p, holder, "store")
            t_inh = timed(p, holder, "inherit")
            mm.load_models_gpu([base])
            skipped = sum(residual[u.name] for u in holder.units)
            res = {}
            for mode, tail in (("P5", 0), ("P5†", a.tail)):
                pat = inh.Schedule(a.period, tail).pattern(a.steps)
                stores = sum(1 for s in range(a.steps) if inh.Schedule(a.period, tail).stores(s, a.steps))
                fulls = pat.count("F") - stores
                cost = fulls * t_plain + stores * t_store + pat.count("I") * t_inh
                res[mode] = (a.steps * t_plain / cost, flops.speedup_bound(total, skipped, pat))
            rows.append((name, len(holder.units), skipped / total, t_plain, t_store, t_inh, res))
            print(f"{name}: plain {t_plain*1e3:.0f} ms, store {t_store*1e3:.0f} ms, inherit {t_inh*1e3:.0f} ms", file=sys.stderr)

    dev = "GPU " + torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\nSD1.5 topology (random weights), latent {a.batch}x4x{a.size}x{a.size}, {a.steps} steps, {dev}, "
          f"torch {torch.__version__}; UNet {total/1e9:.1f} GFLOP per call\n")
    print("| preset | units | residual FLOPs skipped per inheriting step | P5 measured | P5 bound | "
          f"P5† (last {a.tail} full) measured | P5† bound |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, n, frac, tp, ts, ti, res in rows:
        print(f"| {name} | {n} | {frac:.1%} | {res['P5'][0]:.2f}x | {res['P5'][1]:.2f}x | "
              f"{res['P5†'][0]:.2f}x | {res['P5†'][1]:.2f}x |")


if __name__ == "__main__":
    main()
