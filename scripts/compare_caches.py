"""Auto Cache against every alternative at equal work: fidelity on the embedded model, speed at
SD1.5 width. Writes cache-comparison.md, cache-comparison.png and cache-comparison.json to --out
(default out/cache-comparison, which git ignores); --publish also copies them to docs/report.

1. Fidelity (the embedded model, real captions, ``--captions`` x ``--seeds`` images, ``--steps``
   steps euler, cfg 4): PSNR / SSIM against full compute with the same seeds, adherence (the
   attribute checker), and the FLOP ratio counted with the evaluation's FLOP counter over the
   whole sampling runs (full compute's FLOPs over the method's, all captions together). Methods,
   at each target FLOP ratio (``--targets``):
   * Auto Cache, calibrated: calibrated once on a caption outside the evaluated ones (the
     calibration run is checked against full compute bit for bit; its FLOPs and time against a
     plain run are reported), then run on every caption;
   * Auto Cache, run-time rule (calibration off);
   * the best fixed setting: every preset / reuse mode / forecast / period / final-full tail of
     A-SDM Feature Inheritance in PRESETS, and the project's DeepCache (depths 2, 3, every
     interval), whose FLOP ratio (composed from per-call counts) lies within WINDOW of the target,
     screened on ``--screen`` captions, the ``--confirm`` best then run on all; the best one is
     also compared with Auto Cache run at its own measured ratio (equal work exactly);
   * ComfyUI's EasyCache (current ComfyUI only), its reuse threshold bisected until its measured
     FLOP ratio on the screening captions matches the target. ComfyUI 0.3.64's EasyCache fails
     on a batch of more than one image per prompt (it adds each prompt's cached difference to the
     whole batch), so it samples one image at a time, from that image's slice of the batch's
     noise, and is compared with full compute sampled the same way.
2. Speed at SD1.5 width: the project-made random-weight SD1.5 UNet at latent ``--sd15-size``
   (cond + uncond batch), each method's calls over its runs (the kinds of call the embedded runs
   made, step by step) composed from single calls timed interleaved with plain calls over
   ``--rounds`` rounds (asdm/evaluation/timing.py), beside the FLOP bound counted on the same
   calls. Plain against plain is the check: 1.00x within its spread. EasyCache's skipped steps
   are counted as free (its own subsampling is left out).

    python scripts/compare_caches.py [--captions 8] [--seeds 2] [--steps 20] [--targets 1.5,2,3]
        [--sd15-size 32] [--rounds 3] [--threads 1] [--publish]
"""
import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from asdm import autocache, compat, embedded, hooks, inheritance  # noqa: E402
from asdm.errors import InheritanceError  # noqa: E402
from asdm.evaluation import checker, deepcache, flops, metrics, report, speed, strategies, timing  # noqa: E402
from asdm.harness import host  # noqa: E402
from asdm.training import shapes  # noqa: E402

ROOT = host.REPO_ROOT
EVAL_SEED = 20261123        # the main job's evaluation captions
CALIBRATION_SEED = 777      # the caption Auto Cache calibrates on: not among the evaluated ones
CFG = 4.0
PRESETS = ("EX1", "EX2", "EX3", "CO1", "CO2", "CO3", "CO4", "CO6", "DE2", "DE3", "LI1")
REUSES = (("residual", False), ("residual", True), ("output", False), ("output", True))
PERIODS = tuple(range(2, 9))
TAILS = (0.0, 0.2)
DEEPCACHE_DEPTHS = (2, 3)
WINDOW = (0.98, 1.15)       # fixed settings compared at a target: FLOP ratio within these factors of it
OUTPUTS = ("cache-comparison.md", "cache-comparison.png", "cache-comparison.json")


@dataclass
class Method:
    name: str
    label: str
    family: str                      # "auto", "auto-off", "fixed", "deepcache", "easycache"
    make: object = None              # model -> patched model
    strategy: object = None          # fixed / deepcache: a strategies.Strategy (for the SD1.5 timing)
    target: float = 0.0
    composed: float = 0.0            # fixed / deepcache: the FLOP ratio composed from per-call counts
    result: dict = field(default_factory=dict)


class Bench:
    """The embedded model, the captions, and sampling with the FLOPs counted."""

    def __init__(self, a):
        import nodes   # late: the host's modules exist once it runs (host.boot)
        self.nodes = nodes
        self.a = a
        self.model, clip, self.vae = embedded.load()
        self.unet = self.model.model.diffusion_model
        self.scenes = shapes.generate(a.captions, embedded.IMAGE_SIZE, EVAL_SEED)
        encode = lambda text: nodes.CLIPTextEncode().encode(clip, text)[0]   # noqa: E731
        self.pos = [encode(s.caption) for s in self.scenes]
        self.neg = encode("")
        self.calibration_pos = encode(shapes.generate(1, embedded.IMAGE_SIZE, CALIBRATION_SEED)[0].caption)
        self.net = checker.load_checker(embedded.path("checker"))
        self.full = [self.sample(self.model, j) for j in range(a.captions)]
        self.full_one: dict = {}   # full compute one image at a time (for EasyCache)

    def sample(self, m, j, one_by_one=False):
        """(uint8 images as SaveImage writes them, UNet FLOPs, seconds, the Auto Cache run or None)
        of caption ``j`` (-1: the calibration caption). ``one_by_one``: each image of the batch in
        a run of its own, from its slice of the batch's noise (the same images, up to float
        summation order)."""
        import comfy.sample   # late: the host's modules exist once it runs (host.boot)
        pos = self.pos[j] if j >= 0 else self.calibration_pos
        side = embedded.IMAGE_SIZE // 8
        latent = {"samples": torch.zeros(self.a.seeds, 4, side, side)}
        with flops.counting(self.unet) as counted, torch.no_grad():
            t0 = time.perf_counter()
            if one_by_one:
                noise = comfy.sample.prepare_noise(latent["samples"], 1000 + j)
                lat = torch.cat([comfy.sample.sample(m, noise[i:i + 1], self.a.steps, CFG, "euler", "normal", pos,
                                                     self.neg, latent["samples"][i:i + 1], seed=1000 + j)
                                 for i in range(self.a.seeds)])
            else:
                lat = self.nodes.common_ksampler(m, 1000 + j, self.a.steps, CFG, "euler", "normal", pos, self.neg,
                                                 latent)[0]["samples"]
            seconds = time.perf_counter() - t0
            px = self.vae.decode(lat).detach().float()
        images = np.clip(255.0 * px.numpy(), 0, 255).astype(np.uint8)
        h = hooks.holder_of(m, autocache.AutoCacheHolder)
        return images, sum(counted.values()), seconds, (h.last_run if h is not None else None)

    def evaluate(self, m, captions, one_by_one=False) -> dict:
        """Per image PSNR and adherence, SSIM, the FLOP ratio, and per caption the Auto Cache
        depths (group names per step), over ``captions``; ``one_by_one`` as ``sample``, against
        full compute sampled the same way."""
        items = [s.items for s in self.scenes]
        psnr, adh, full_f, own_f, imgs, refs, depths = [], [], 0, 0, [], [], []
        for j in captions:
            im, f, _, run = self.sample(m, j, one_by_one)
            if one_by_one and j not in self.full_one:
                self.full_one[j] = self.sample(self.model, j, True)
            ref = (self.full_one if one_by_one else self.full)[j][0]
            full_f += (self.full_one if one_by_one else self.full)[j][1]
            own_f += f
            for i in range(len(im)):
                psnr.append(metrics.psnr(im[i:i + 1] / 255.0, ref[i:i + 1] / 255.0))
                adh.append(checker.adherence(self.net, im[i:i + 1] / 255.0, [items[j]]))
            imgs.append(im)
            refs.append(ref)
            if run is not None:
                names = [h.name for h in hooks.holder_of(m, autocache.AutoCacheHolder).groups]
                depths.append([names[run.depths[s]] if run.depths.get(s, -1) >= 0 else "full" for s in range(self.a.steps)])
        imgs, refs = np.concatenate(imgs) / 255.0, np.concatenate(refs) / 255.0
        return {"psnr_each": psnr, "psnr": float(np.mean(psnr)), "psnr_se": _se(psnr),
                "ssim": metrics.ssim(imgs, refs), "adherence": float(np.mean(adh)),
                "ratio": full_f / own_f, "depths": depths, "flops": own_f, "full_flops": full_f}


def _se(v) -> float:
    v = [x for x in v if math.isfinite(x)]
    return statistics.stdev(v) / math.sqrt(len(v)) if len(v) > 1 else math.nan


# ---------------------------------------------------------------------------------------------
# The methods
# ---------------------------------------------------------------------------------------------

def auto(target: float, calibration: str) -> Method:
    fam = "auto" if calibration == "auto" else "auto-off"
    label = "Auto Cache" + (" (calibrated)" if calibration == "auto" else " (run-time rule)")
    return Method(f"{fam}-{target:g}", f"{label} {target:g}x", fam, target=target,
                  make=lambda m: autocache.apply_auto_cache(m, target, 0.0, 1.0, calibration))


def fixed_methods(bench: Bench) -> list[Method]:
    """Every fixed setting, with its FLOP ratio composed from one counted run per kind of call."""
    steps = bench.a.steps
    full = bench.full[0][1] / steps                       # one full call (the FLOPs of caption 0's run / steps)
    per_reuse = {}
    for p in PRESETS:
        for reuse in ("residual", "output"):
            try:
                m = inheritance.apply_inheritance(bench.model, p, "", 2, 0.0, reuse, False)
            except InheritanceError:   # refused on this layout (it would replay stored outputs)
                continue
            _, f, _, _ = bench.sample(m, 0)
            n_full = len(range(0, steps, 2))
            per_reuse[(p, reuse)] = (f - n_full * full) / (steps - n_full)
    for depth in DEEPCACHE_DEPTHS:
        _, f, _, _ = bench.sample(deepcache.apply_deepcache(bench.model, depth, 2), 0)
        n_full = len(range(0, steps, 2))
        per_reuse[("deepcache", depth)] = (f - n_full * full) / (steps - n_full)
    out = []
    for p in PRESETS:
        for reuse, fc in REUSES:
            if (p, reuse) not in per_reuse:
                continue
            for period in PERIODS:
                for tail in TAILS:
                    pattern = inheritance.Schedule(period, tail).pattern(steps)
                    cost = pattern.count("F") * full + pattern.count("I") * per_reuse[(p, reuse)]
                    mode = f"P{period}" + ("†" if tail else "")
                    s = strategies.Strategy(f"{p}-{mode}-{reuse}{'+fc' if fc else ''}",
                                            f"{p} {mode}, {strategies.reuse_label(reuse, fc)}", "fixed", "fi",
                                            preset=p, period=period, tail=tail, reuse=reuse, forecast=fc)
                    out.append(Method(s.name, s.label, "fixed", strategy=s, composed=steps * full / cost,
                                      make=lambda m, s=s: inheritance.apply_inheritance(
                                          m, s.preset, "", s.period, s.tail, s.reuse, s.forecast)))
    for depth in DEEPCACHE_DEPTHS:
        for interval in PERIODS:
            n_full = len(range(0, steps, interval))
            cost = n_full * full + (steps - n_full) * per_reuse[("deepcache", depth)]
            s = strategies.Strategy(f"deepcache-d{depth}-n{interval}", f"DeepCache depth {depth}, interval {interval}",
                                    "deepcache", "deepcache", period=interval, depth=depth)
            out.append(Method(s.name, s.label, "deepcache", strategy=s, composed=steps * full / cost,
                              make=lambda m, d=depth, n=interval: deepcache.apply_deepcache(m, d, n)))
    return out


def easycache(bench: Bench, target: float, screen: list[int], log) -> Method | None:
    """ComfyUI's EasyCache at the reuse threshold whose measured FLOP ratio on the screening
    captions is the target's (bisected)."""
    node = bench.nodes.NODE_CLASS_MAPPINGS["EasyCache"]

    def make(th):
        return lambda m: compat.call_node(node, model=m, reuse_threshold=th, start_percent=0.15,
                                          end_percent=0.95, verbose=False)[0]

    lo, hi, best = 0.0, 3.0, None
    for _ in range(9):
        mid = (lo + hi) / 2
        r = bench.evaluate(make(mid)(bench.model), screen, one_by_one=True)["ratio"]
        log(f"  EasyCache threshold {mid:.4f}: FLOP ratio {r:.3f}")
        if best is None or abs(r - target) < abs(best[1] - target):
            best = (mid, r)
        if abs(r - target) <= 0.01 * target:
            break
        lo, hi = (mid, hi) if r < target else (lo, mid)
    th = best[0]
    return Method(f"easycache-{target:g}", f"EasyCache {target:g}x (threshold {th:.3f})", "easycache",
                  target=target, make=make(th))


# ---------------------------------------------------------------------------------------------
# Speed at SD1.5 width
# ---------------------------------------------------------------------------------------------

class _GroupCall:
    """A call of the SD1.5 UNet that reuses one Auto Cache group (the group's output stored by
    an untimed full call before it)."""

    def __init__(self, sd, name, x, t, ctx, keys):
        self.m = autocache.apply_auto_cache(sd, 2.0)
        self.h = hooks.holder_of(self.m, autocache.AutoCacheHolder)
        self.j = [g.name for g in self.h.groups].index(name)
        self.x, self.t, self.ctx, self.keys = x, t, ctx, keys
        self.run = None

    def _apply(self):
        return self.m.model.apply_model(self.x, self.t, c_crossattn=self.ctx)

    def prepare(self):
        import comfy.model_management as mm   # late: the host's modules exist once it runs (host.boot)
        mm.load_models_gpu([self.m])
        h = self.h
        h.plan_override = ([autocache.FULL, self.j], [False, False])
        self.run = run = h.start_run(total=2)
        h.call = h.begin_call(run, self.x, self.keys)          # step 0: full, stores the group's output
        h.run_call(_Next(self.m), self.x, self.t, {"c_crossattn": self.ctx})
        run.step = 1
        h.call = h.begin_call(run, self.x, self.keys)
        assert h.call.depth == self.j

    def __call__(self):
        try:
            return self._apply()
        finally:
            self.h.call = None
            self.h.end_run(self.run)

    def flops(self) -> int:
        self.prepare()
        try:
            return sum(flops.count(self.m.model.diffusion_model, self._apply).values())
        finally:
            self.h.call = None
            self.h.end_run(self.run)


class _Next:
    def __init__(self, model):
        self.model = model

    def next(self, x, t, c):
        return self.model.model.apply_model(x, t, **c)


def sd15_speed(methods: list[Method], steps: int, size: int, rounds: int, progress) -> dict:
    """name -> {"ratio": timing.Ratio, "bound": float} for every method, and the plain check."""
    import comfy.model_management as mm   # late: the host's modules exist once it runs (host.boot)
    models = speed.Models("sd15")
    inputs = speed._inputs(models.sd, size, mm.get_torch_device())
    x, t, ctx, keys = inputs.x, inputs.t, inputs.kwargs["c_crossattn"], inputs.keys

    def plain():
        fn = lambda: models.sd.model.apply_model(x, t, c_crossattn=ctx)   # noqa: E731
        fn.prepare = lambda: mm.load_models_gpu([models.sd])
        return fn

    calls = {"full": plain(), "full again": plain()}
    cost_of = {}
    group_names = sorted({d for m in methods for run in m.result.get("depths", []) for d in run} - {"full"})
    for name in group_names:
        calls[f"group:{name}"] = _GroupCall(models.sd, name, x, t, ctx, keys)
    patched = {}
    for m in methods:
        if m.strategy is not None:
            key = speed._patched_key(m.strategy)
            if key not in patched:
                patched[key] = speed._Patched(models, m.strategy, inputs, steps)
                calls[f"{key}:store"], calls[f"{key}:reuse"] = patched[key].callers()
    done, total = [0], len(calls) * (rounds + 1)
    for k, fn in list(calls.items()):
        def counted(fn=fn):
            out = fn()
            done[0] += 1
            progress(f"SD1.5 latent {size}: {done[0]}/{total} calls")
            return out
        counted.prepare = getattr(fn, "prepare", lambda: None)
        calls[k] = counted
    with torch.no_grad():
        times = timing.interleaved(calls, rounds)
        unet = models.sd.model.diffusion_model
        mm.load_models_gpu([models.sd])
        full = sum(flops.count(unet, lambda: models.sd.model.apply_model(x, t, c_crossattn=ctx)).values())
        cost_of = {"full": full, "full again": full}
        for name in group_names:
            cost_of[f"group:{name}"] = _GroupCall(models.sd, name, x, t, ctx, keys).flops()
        for key, p in patched.items():
            cost_of[f"{key}:store"] = full
            cost_of[f"{key}:reuse"] = p.flops()
    mm.unload_all_models()

    def compose(kinds: dict) -> dict:
        # speed.schedule names a plain call "sd" ("sd again" for the check)
        kinds = {{"sd": "full", "sd again": "full again"}.get(k, k): c for k, c in kinds.items()}
        n = sum(kinds.values())
        per_round = [n * times["full"][r] / sum(c * times[k][r] for k, c in kinds.items()) for r in range(rounds)]
        return {"ratio": timing.Ratio.of_ratios(per_round),
                "bound": n * full / sum(c * cost_of[k] for k, c in kinds.items())}

    out = {"plain": compose({"full again": steps})}
    for m in methods:
        r = m.result
        if m.strategy is not None:
            out[m.name] = compose(speed.schedule(m.strategy, steps))
        elif r.get("depths"):
            kinds: dict = {}
            for run in r["depths"]:
                for d in run:
                    k = "full" if d == "full" else f"group:{d}"
                    kinds[k] = kinds.get(k, 0) + 1
            out[m.name] = compose(kinds)
        elif m.family == "easycache":
            # a step either runs the whole UNet or skips it (its own subsampling left out): the
            # time of the computed steps is the FLOPs of them, so the ratio is the FLOP ratio
            out[m.name] = {"ratio": f"{r['ratio']:.2f}x (skipped steps free)", "bound": r["ratio"]}
    return out


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------

def pair(a: dict, b: dict) -> tuple[float, float]:
    """Mean PSNR difference a - b per image (same caption and seed), and its standard error."""
    d = [x - y for x, y in zip(a["psnr_each"], b["psnr_each"]) if math.isfinite(x) and math.isfinite(y)]
    return float(np.mean(d)), _se(d)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--captions", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--targets", default="1.5,2,3")
    ap.add_argument("--screen", type=int, default=2, help="captions the fixed settings are screened on")
    ap.add_argument("--confirm", type=int, default=3, help="fixed settings per target run on every caption")
    ap.add_argument("--sd15-size", type=int, default=32, help="latent side of the SD1.5-width timing (32 or more)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (one is steadiest on a shared CPU)")
    ap.add_argument("--out", default=os.path.join(ROOT, "out", "cache-comparison"))
    ap.add_argument("--publish", action="store_true", help="also copy the outputs to docs/report")
    a = ap.parse_args(argv)
    command = "python scripts/compare_caches.py" + "".join(
        " " + x for x in (argv if argv is not None else sys.argv[1:]) if x != "--publish")
    targets = [float(v) for v in a.targets.split(",")]
    if a.sd15_size < 32:
        ap.error("--sd15-size must be 32 or more: at smaller latents the deep blocks are memory-bound and "
                 "time runs far above the FLOP bound (docs/benchmarks.md)")
    torch.set_num_threads(a.threads)
    os.makedirs(a.out, exist_ok=True)
    t_start, load_start = time.time(), os.getloadavg()
    host.boot(pytorch_attention=True, log_file=os.path.join(a.out, "host.log"))
    import folder_paths   # late: the host's modules exist once it runs (host.boot)
    folder_paths.user_directory = tempfile.mkdtemp(prefix="asdm-autocache-")   # profiles made here, fresh

    def log(text):
        print(f"[{(time.time() - t_start) / 60:5.1f} min] {text}", flush=True)

    bench = Bench(a)
    everything = list(range(a.captions))
    screen = everything[:a.screen]
    log("full compute done")

    # the calibration run: full compute, bit for bit; its FLOPs and time against a plain run
    calib = {"equal": True, "flops": [], "time": []}
    for _ in range(3):
        folder_paths.user_directory = tempfile.mkdtemp(prefix="asdm-autocache-")
        ref = bench.sample(bench.model, -1)
        got = bench.sample(autocache.apply_auto_cache(bench.model, 2.0), -1)
        calib["equal"] &= bool(np.array_equal(ref[0], got[0]))
        calib["flops"].append(got[1] / ref[1])
        calib["time"].append(got[2] / ref[2])
    log(f"calibration run: equal to full compute {calib['equal']}, FLOPs x{statistics.median(calib['flops']):.2f}")

    results: list[Method] = []
    for target in targets:
        for cal in ("auto", "off"):
            m = auto(target, cal)
            patched = m.make(bench.model)
            if cal == "auto":
                bench.sample(patched, -1)   # uses the stored profile, or calibrates on the calibration caption
            m.result = bench.evaluate(patched, everything)
            results.append(m)
            log(f"{m.label}: {m.result['ratio']:.3f}x, {m.result['psnr']:.2f} dB")

    fixed = fixed_methods(bench)
    log(f"{len(fixed)} fixed settings composed")
    best_fixed = {}
    for target in targets:
        window = [m for m in fixed if WINDOW[0] * target <= m.composed <= WINDOW[1] * target]
        for m in window:
            if "screen" not in m.result:
                m.result["screen"] = bench.evaluate(m.make(bench.model), screen)["psnr"]
        log(f"target {target:g}: {len(window)} fixed settings screened")
        for fam in ("fixed", "deepcache"):
            pool = sorted((m for m in window if m.family == fam), key=lambda m: -m.result["screen"])
            for m in pool[:a.confirm if fam == "fixed" else 1]:
                if "psnr_each" not in m.result:
                    m.result.update(bench.evaluate(m.make(bench.model), everything))
                    log(f"{m.label}: {m.result['ratio']:.3f}x, {m.result['psnr']:.2f} dB")
                if m not in results:
                    results.append(m)
            confirmed = [m for m in pool[:a.confirm if fam == "fixed" else 1]]
            if confirmed:
                best_fixed[(target, fam)] = max(confirmed, key=lambda m: m.result["psnr"])
    for target in targets:
        e = easycache(bench, target, screen, log)
        if e is not None:
            e.result = bench.evaluate(e.make(bench.model), everything, one_by_one=True)
            results.append(e)
            log(f"{e.label}: {e.result['ratio']:.3f}x, {e.result['psnr']:.2f} dB")

    # equal work exactly: Auto Cache at the best fixed setting's own measured ratio
    matched = {}
    for target in targets:
        best = best_fixed.get((target, "fixed"))
        if best is None:
            continue
        for cal in ("auto", "off"):
            m = auto(round(best.result["ratio"], 3), cal)
            m.name += "-matched"
            patched = m.make(bench.model)
            if cal == "auto":
                bench.sample(patched, -1)
            m.result = bench.evaluate(patched, everything)
            matched[(target, cal)] = m
            log(f"{m.label} (at {best.label}'s ratio): {m.result['ratio']:.3f}x, {m.result['psnr']:.2f} dB")

    shown = {m.name for m in results if m.family in ("auto", "auto-off", "easycache")}
    shown |= {m.name for m in best_fixed.values()}
    timed = [m for m in results if m.name in shown] + list(matched.values())
    sd15 = sd15_speed(timed, a.steps, a.sd15_size, a.rounds, log)
    minutes = (time.time() - t_start) / 60
    lines = write_report(a, command, targets, results, best_fixed, matched, sd15, calib, minutes,
                         (load_start, os.getloadavg()))
    with open(os.path.join(a.out, "cache-comparison.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    plot(results, a).save(os.path.join(a.out, "cache-comparison.png"))
    with open(os.path.join(a.out, "cache-comparison.json"), "w") as f:
        json.dump([report.jsonable({"name": m.name, "label": m.label, "family": m.family, "target": m.target,
                                    "composed": m.composed, **{k: v for k, v in m.result.items() if k != "depths"},
                                    "sd15": {k: (v.as_dict() if hasattr(v, "as_dict") else v)
                                             for k, v in sd15.get(m.name, {}).items()}})
                   for m in timed], f, indent=1)
    if a.publish:
        for name in OUTPUTS:
            shutil.copy(os.path.join(a.out, name), os.path.join(ROOT, "docs", "report", name))
    print("\n".join(lines))


def write_report(a, command, targets, results, best_fixed, matched, sd15, calib, minutes, loads) -> list[str]:
    by_target = {}
    for m in results:
        by_target.setdefault(m.target, []).append(m)
    out = ["# Auto Cache against the alternatives, at equal work", "",
           f"Fidelity: the embedded model, {a.captions} captions x {a.seeds} seeds, 64x64 px, {a.steps} steps euler, "
           f"cfg {CFG:g}; PSNR / SSIM against full compute with the same seeds (PSNR: mean over images, with its "
           "standard error), adherence: the share of caption attributes the checker finds. FLOP ratio: full "
           "compute's UNet FLOPs over the method's, counted over the whole sampling runs of every caption "
           "(asdm/evaluation/flops.py). Auto Cache calibrated on a caption outside the evaluated ones. "
           f"Speed: UNet time at SD1.5 width, latent {speed.CFG_BATCH}x4x{a.sd15_size}x{a.sd15_size} "
           f"({a.sd15_size * 8} px), each method's calls composed from single calls timed interleaved with plain "
           f"calls over {a.rounds} rounds, median (lowest-highest); plain against plain: {sd15['plain']['ratio']}. "
           f"FLOP bound: the same composition of FLOPs counted on those calls.",
           "",
           f"Run on {timing.device_name()}, torch {torch.__version__}, {a.threads} torch thread(s); load average "
           f"{loads[0][0]:.1f} at the start and {loads[1][0]:.1f} at the end (the CPU was shared with other jobs); "
           f"{minutes:.0f} min. Command: `{command}`.", "",
           f"The calibration run (Auto Cache's first run with a model, sampler, schedule and size) equals full "
           f"compute bit for bit: **{'yes' if calib['equal'] else 'no'}**; it does "
           f"{statistics.median(calib['flops']):.2f}x the FLOPs of a plain run (its probe calls) and took "
           f"{statistics.median(calib['time']):.2f}x its time (median of {len(calib['time'])} pairs).", ""]
    header = ["| target | method | FLOP ratio | PSNR (dB) | SSIM | adherence | UNet time, SD1.5 width | FLOP bound, SD1.5 width |",
              "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    out += header
    for target in targets:
        rows = [m for m in results if m.target == target]
        rows += [best_fixed[(target, f)] for f in ("fixed", "deepcache") if (target, f) in best_fixed]
        for m in rows:
            r, s = m.result, sd15.get(m.name, {})
            label = ("best fixed: " if m is best_fixed.get((target, "fixed")) else
                     "DeepCache: " if m.family == "deepcache" else "") + m.label
            bound = f"{s['bound']:.2f}x" if s else "—"
            out.append(f"| {target:g}x | {label} | {r['ratio']:.2f}x | {r['psnr']:.2f} ({r['psnr_se']:.2f}) | "
                       f"{r['ssim']:.3f} | {r['adherence']:.3f} | {s.get('ratio', '—')} | {bound} |")
    out += ["", "## Equal work, exactly", "",
            "Auto Cache run at the best fixed setting's own measured FLOP ratio; PSNR difference per image "
            "(same caption and seed), with its standard error.", "",
            "| target | best fixed setting | its FLOP ratio | its PSNR | Auto Cache (calibrated) | difference | "
            "Auto Cache (run-time rule) | difference |", "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    verdicts = []
    for target in targets:
        best = best_fixed.get((target, "fixed"))
        if best is None or (target, "auto") not in matched:
            continue
        ca, off = matched[(target, "auto")], matched[(target, "off")]
        dc, sc = pair(ca.result, best.result)
        do, so = pair(off.result, best.result)
        out.append(f"| {target:g}x | {best.label} | {best.result['ratio']:.3f}x | {best.result['psnr']:.2f} | "
                   f"{ca.result['psnr']:.2f} at {ca.result['ratio']:.3f}x | {dc:+.2f} ({sc:.2f}) | "
                   f"{off.result['psnr']:.2f} at {off.result['ratio']:.3f}x | {do:+.2f} ({so:.2f}) |")
        verdicts.append((target, dc, sc, do, so))
    out += ["", "## The goals", ""]
    for target, dc, sc, do, so in verdicts:
        ec = next((m for m in results if m.family == "easycache" and m.target == target), None)
        ca = next(m for m in results if m.family == "auto" and m.target == target)
        line = (f"- {target:g}x: calibrated Auto Cache against the best fixed setting at its ratio: {dc:+.2f} dB "
                f"(standard error {sc:.2f}): **{'met' if dc >= 2 else 'missed'}** (goal: +2 dB)")
        if ec is not None:
            de, se = pair(ca.result, ec.result)
            line += (f"; against EasyCache ({ec.result['ratio']:.2f}x against {ca.result['ratio']:.2f}x): "
                     f"{de:+.2f} dB (standard error {se:.2f}): **{'met' if de >= 2 else 'missed'}**")
        line += (f"; the run-time rule against the best fixed setting: {do:+.2f} dB (standard error {so:.2f}): "
                 f"**{'met' if do >= 0 else 'missed'}** (goal: at least as close)")
        out.append(line)
    out += ["", "![PSNR against FLOP ratio](cache-comparison.png)", ""]
    return out


def plot(results, a):
    series: dict = {}
    for m in results:
        key = {"auto": "Auto Cache (calibrated)", "auto-off": "Auto Cache (run-time rule)",
               "fixed": "best fixed setting", "deepcache": "DeepCache (project's)",
               "easycache": "EasyCache (ComfyUI)"}[m.family]
        series.setdefault(key, []).append((m.result["ratio"], m.result["psnr"]))
    for k, pts in series.items():   # per family, the best at each ratio: the frontier
        pts.sort()
        series[k] = [p for i, p in enumerate(pts) if not any(q[0] >= p[0] and q[1] > p[1] for q in pts[i + 1:])]
    return report.line_plot(series, "FLOP ratio (full compute's UNet FLOPs over the method's, whole runs)",
                            "PSNR vs full compute (dB)",
                            f"Embedded model, {a.captions} captions x {a.seeds} seeds, {a.steps} steps")


if __name__ == "__main__":
    main()
