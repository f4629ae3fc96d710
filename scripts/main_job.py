"""The main job: A-SDM's experiments in miniature, on the embedded model (weights/embedded).

Runs the bundled workflows (workflows/api/) headless through ComfyUI's own executor, with the
checkpoint loader swapped for A-SDM Load Embedded Model: full compute; feature inheritance with
every preset at P5, P5† and P2†; multi-UNet switching S1/S2/S3; the compressed (Base, Small,
Tiny), assembled (M2) and ME-CondConv models. Each run samples the same captions and seeds.
Writes to --out: grid.png (images), plot.png (speedup against PSNR), report.md (the table),
results.json.

    python scripts/main_job.py [--prompts 8] [--batch 4] [--steps 20] [--quick]

Speedup: wall time of the whole workflow run (sampling, decode, save) of full compute over the
run's, summed over the captions, in one process; FLOP bound: the UNet FLOP ratio over the run.
"""
import argparse
import copy
import glob
import json
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from asdm.harness import graphs, host  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVAL_SEED = 20261123      # the evaluation captions (not in the training set's seed)
REFERENCE_SEED = 2        # dataset images for the Fréchet distance


E = host.engine


class Job:
    def __init__(self, a):
        self.a = a
        self.runner = host.Runner()
        self.embedded = E("embedded")
        self.fam = E("embedded").family_name

    # -- prompts from the bundled workflows --------------------------------------------------
    def _common(self, api, caption, j, prefix, sampler):
        api["1"] = {"class_type": "ASDMLoadEmbeddedModel", "inputs": {}}
        api["2"]["inputs"]["text"] = caption
        api["3"]["inputs"]["text"] = ""
        api["4"]["inputs"].update(width=64, height=64, batch_size=self.a.batch)
        api[sampler]["inputs"].update(seed=j, steps=self.a.steps, cfg=self.a.cfg, sampler_name="euler",
                                      scheduler="normal")
        save = next(k for k, v in api.items() if v["class_type"] == "SaveImage")
        api[save]["inputs"]["filename_prefix"] = prefix
        return api

    def prompt(self, run, caption, j, prefix):
        kind = run["kind"]
        if kind in ("plain", "fi"):
            api = self._common(graphs.load_api_workflow("feature_inheritance_sd15.json"), caption, j, prefix, "6")
            if kind == "plain":
                del api["5"]
                api["6"]["inputs"]["model"] = ["1", 0]
            else:
                api["5"]["inputs"].update(preset=run["preset"], units="", period=run["period"],
                                          final_full_steps=run["tail"])
            return api
        if kind == "switch":
            api = self._common(graphs.load_api_workflow("switch_s1_sd15.json"), caption, j, prefix, "7")
            api["5"]["inputs"].update(unet_name=self.fam("base"), prediction="auto")
            src = {"base": ["5", 0], "full": ["1", 0]}
            (m1, e1), (m2, _) = run["ranges"]
            api["6"]["inputs"].update(unit="steps", model_1=src[m1], start_1=0.0, end_1=float(e1),
                                      model_2=src[m2], start_2=float(e1), end_2=-1.0)
            return api
        # a compressed / assembled UNet, optionally with its ME-CondConv experts
        api = self._common(graphs.load_api_workflow("assembly_m2_sd15.json"), caption, j, prefix, "7")
        for k in ("6", "10"):
            del api[k]
        api["5"]["inputs"].update(unet_name=self.fam(run["unet"]), prediction="auto")
        api["7"]["inputs"]["model"] = ["5", 0]
        if run.get("experts"):
            api["11"] = {"class_type": "ASDMMECondConv",
                         "inputs": {"model": ["5", 0], "weights": self.fam(run["unet"]),
                                    "units": "dn*.*.R, up*.*.R", "experts": 2, "init": "identity", "seed": 0}}
            api["7"]["inputs"]["model"] = ["11", 0]
        return api

    def execute(self, run, captions, seed0=1000):
        """Runs every caption; returns (seconds, [P*B, H, W, 3] uint8)."""
        from PIL import Image
        total, images = 0.0, []
        for j, c in enumerate(captions):
            prefix = f"main/{run['name']}/p{j:02d}"
            p = self.prompt(run, c, seed0 + j, prefix)
            t0 = time.perf_counter()
            self.runner.run(p)
            total += time.perf_counter() - t0
            files = sorted(glob.glob(os.path.join(host.workdir(), "output", prefix + "_*.png")))
            if len(files) != self.a.batch:
                raise RuntimeError(f"{run['name']}: expected {self.a.batch} images for caption {j}, found {len(files)}")
            images += [np.asarray(Image.open(f).convert("RGB")) for f in files]
            for f in files:
                os.remove(f)
        return total, np.stack(images)


def runs_list(a, presets):
    out = [{"name": "full", "label": "full compute", "kind": "plain", "group": "plain"}]
    k = max(1, round(a.steps * 0.4))
    out += [{"name": "S1", "label": f"S1 Base {k} + full {a.steps - k}", "kind": "switch", "group": "switch",
             "ranges": [("base", k), ("full", None)]},
            {"name": "S2", "label": f"S2 full {a.steps - k} + Base {k}", "kind": "switch", "group": "switch",
             "ranges": [("full", a.steps - k), ("base", None)]},
            {"name": "S3", "label": f"S3 full {k} + Base {a.steps - k}", "kind": "switch", "group": "switch",
             "ranges": [("full", k), ("base", None)]}]
    for u, lab in (("base", "Base"), ("small", "Small"), ("tiny", "Tiny"), ("m2", "M2")):
        out.append({"name": u, "label": lab, "kind": "unet", "unet": u, "group": "compressed"})
    for u, lab in (("small-condconv", "Small + ME-CondConv"), ("tiny-condconv", "Tiny + ME-CondConv")):
        out.append({"name": u, "label": lab, "kind": "unet", "unet": u, "experts": True, "group": "compressed"})
    for mode, period, tail in (("P5", 5, 0), ("P5†", 5, a.tail), ("P2†", 2, a.tail)):
        for p in presets:
            out.append({"name": f"{p}-{mode.replace('†', 'd')}", "label": f"{p} {mode}", "kind": "fi",
                        "group": mode, "preset": p, "period": period, "tail": tail})
    return out


def flop_bounds(runs, a):
    """UNet FLOP ratio full / run over the whole run, counted on the embedded UNets at 64 px."""
    import torch
    flops, inh, unet_files, condconv = E("evaluation.flops"), E("inheritance"), E("unet_files"), E("condconv")
    emb = E("embedded")
    b = 2 * a.batch
    x, t, ctx = torch.randn(b, 4, 8, 8), torch.full((b,), 500.0), torch.randn(b, 77, emb.CONTEXT_DIM)

    def cost(model):
        u = model.model.diffusion_model
        return sum(flops.count(u, lambda: u(x, t, ctx)).values())

    full_model = unet_files.load_unet(emb.path("unet"))
    unet = full_model.model.diffusion_model
    counted = flops.count(unet, lambda: unet(x, t, ctx))
    full = sum(counted.values())
    residual = flops.residual_flops(E("topology").describe(unet), counted)
    per_unet = {}
    for r in runs:
        if r["kind"] == "plain":
            r["bound"] = 1.0
        elif r["kind"] == "fi":
            p = inh.apply_inheritance(full_model, r["preset"], "", r["period"], r["tail"])
            holder = p.model_options["transformer_options"]["asdm_inheritance"]
            skipped = sum(residual[u.name] for u in holder.units)
            r["bound"] = flops.speedup_bound(full, skipped, inh.Schedule(r["period"], r["tail"]).pattern(a.steps))
        else:
            name = "base" if r["kind"] == "switch" else r["unet"]
            if name not in per_unet:
                m = unet_files.load_unet(os.path.join(emb.FAMILY_UNETS, emb.family_name(name)))
                extra = 0
                if r.get("experts"):
                    ex = condconv.load_experts(os.path.join(emb.FAMILY_EXPERTS, emb.family_name(name)),
                                               m.model.diffusion_model)
                    # mixing N expert kernels per sample (the routers are negligible)
                    extra = sum(2 * b * me.n * me.experts[0].numel() for me in ex.values())
                per_unet[name] = cost(m) + extra
            if r["kind"] == "unet":
                r["bound"] = full / per_unet[name]
            else:
                steps = {"base": 0, "full": 0}
                (m1, e1), (m2, _) = r["ranges"]
                steps[m1] += e1
                steps[m2] += a.steps - e1
                r["bound"] = a.steps * full / (steps["full"] * full + steps["base"] * per_unet["base"])
    return full


def bar(i, n, name, t0):
    done = int(30 * i / n)
    eta = (time.time() - t0) / max(i, 1) * (n - i)
    sys.stderr.write(f"\r[{'#' * done}{'.' * (30 - done)}] {i}/{n} {name:<16} eta {eta / 60:4.1f} min ")
    sys.stderr.flush()


def findings(rows):
    by = {r["name"]: r for r in rows}
    mean = lambda names, key="psnr": float(np.mean([by[n][key] for n in names if n in by]))
    presets = sorted({r["preset"] for r in rows if r["kind"] == "fi"})
    out = []
    p5 = mean([f"{p}-P5" for p in presets])
    p5d = mean([f"{p}-P5d" for p in presets])
    out.append(("P5† better than P5", p5d > p5, f"mean PSNR over the {len(presets)} presets: P5† {p5d:.2f} dB, P5 {p5:.2f} dB"))
    for mode in ("P5", "P5d"):
        ext = mean([f"{p}-{mode}" for p in presets if p.startswith(("EX", "DE"))])
        inner = mean([f"{p}-{mode}" for p in presets if p.startswith(("IN", "EN"))])
        out.append((f"external/decoder loops better than inner/encoder loops ({mode.replace('d', '†')})", ext > inner,
                    f"mean PSNR EX1-3 + DE1-3 {ext:.2f} dB, IN1-3 + EN1-3 {inner:.2f} dB"))
    s1, s2, s3 = by["S1"]["psnr"], by["S2"]["psnr"], by["S3"]["psnr"]
    out.append(("S1 better than S2 and S3", s1 > max(s2, s3), f"PSNR S1 {s1:.2f}, S2 {s2:.2f}, S3 {s3:.2f} dB"))
    ad = (by["S1"]["adherence"], by["S2"]["adherence"], by["S3"]["adherence"])
    out.append(("S1 adherence >= S2 and S3", ad[0] >= max(ad[1:]), "adherence S1 {:.3f}, S2 {:.3f}, S3 {:.3f}".format(*ad)))
    out.append(("M2 closer to the full model than Base", by["m2"]["psnr"] > by["base"]["psnr"],
                f"PSNR M2 {by['m2']['psnr']:.2f} dB, Base {by['base']['psnr']:.2f} dB"))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=8, help="evaluation captions")
    ap.add_argument("--batch", type=int, default=4, help="images (seeds) per caption")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=4.0)
    ap.add_argument("--tail", type=int, default=4, help="final full steps of P5† and P2†")
    ap.add_argument("--presets", default="", help="comma-separated subset of presets (default: all)")
    ap.add_argument("--quick", action="store_true", help="2 captions x 2 images, presets CO6,EX3,IN3")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "report"))
    a = ap.parse_args()
    if a.quick:
        a.prompts, a.batch, a.presets = 2, 2, a.presets or "CO6,EX3,IN3"
    host.boot(pytorch_attention=True)
    shapes, metrics, report, topology = E("training.shapes"), E("evaluation.metrics"), E("evaluation.report"), E("topology")
    emb = E("embedded")
    presets = [p.strip() for p in a.presets.split(",") if p.strip()] or list(topology.PRESETS)
    scenes = shapes.generate(a.prompts, emb.IMAGE_SIZE, EVAL_SEED)
    captions = [s.caption for s in scenes]
    runs = runs_list(a, presets)
    full_flops = flop_bounds(runs, a)
    checker = metrics.load_checker(emb.path("checker"))
    ref = shapes.generate(1000, emb.IMAGE_SIZE, REFERENCE_SEED)
    ref_feats = metrics.features(checker, np.stack([s.image for s in ref]) / 255.0)
    job = Job(a)
    # warm-up (loads the model, first-call costs) with another seed: the executor would
    # otherwise serve the first real run from its cache
    job.execute(runs[0], captions[:1], seed0=0)
    t_start = time.time()
    results = {}
    order = runs + [runs[0]]              # full compute again at the end: the drift of the machine
    for i, r in enumerate(order):
        bar(i, len(order), r["name"], t_start)
        secs, imgs = job.execute(r, captions)
        if r["name"] in results:
            results["full"]["seconds_end"] = secs
            continue
        results[r["name"]] = dict(r, seconds=secs, images=imgs)
    bar(len(order), len(order), "done", t_start)
    sys.stderr.write("\n")
    full = results["full"]
    t_full = (full["seconds"] + full["seconds_end"]) / 2
    items = [s.items for s in scenes for _ in range(a.batch)]
    ref_imgs = full["images"] / 255.0
    rows = []
    for r in results.values():
        imgs = r["images"] / 255.0
        rows.append(dict({k: v for k, v in r.items() if k != "images"},
                         speedup=t_full / r["seconds"], psnr=metrics.psnr(imgs, ref_imgs),
                         ssim=metrics.ssim(imgs, ref_imgs), adherence=metrics.adherence(checker, imgs, items),
                         fd=metrics.frechet_distance(metrics.features(checker, imgs), ref_feats)))
    data_adh = metrics.adherence(checker, np.stack([s.image for s in scenes]) / 255.0, scenes)
    os.makedirs(a.out, exist_ok=True)
    grid_rows = [n for n in ("full", "S1", "S2", "S3", "base", "m2", "small", "small-condconv", "tiny",
                             "tiny-condconv", "CO6-P5", "CO6-P5d", "CO6-P2d", "EX3-P5d", "IN3-P5d", "LI1-P5d")
                 if n in results]
    cols = [f"caption {j + 1}" for j in range(a.prompts)]
    g = report.grid([(results[n]["label"], results[n]["images"][::a.batch]) for n in grid_rows], cols)
    g.save(os.path.join(a.out, "grid.png"))
    report.plot(rows).save(os.path.join(a.out, "plot.png"))
    import torch
    dev = "GPU " + torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    lines = [
        "# A-SDM main job: the embedded model",
        "",
        f"{a.prompts} captions x {a.batch} seeds, 64x64 px (latent 8x8), {a.steps} steps euler, cfg {a.cfg}, "
        f"P5†/P2† with the last {a.tail} steps full; {dev}, PyTorch attention; the embedded UNet "
        f"{full_flops / 2 / a.batch / 1e6:.0f} MFLOP per image per call. Full compute: {t_full:.1f} s for all "
        f"captions (start {full['seconds']:.1f} s, end {full['seconds_end']:.1f} s: the machine's drift). "
        f"Job time {time.time() - t_start:.0f} s.",
        "",
        "Speedup: whole workflow time (sampling, decode, save) of full compute over the run's; FLOP bound: "
        "UNet FLOPs of full compute over the run's. PSNR/SSIM: against full compute with the same seeds. "
        f"Adherence: share of caption attributes the checker finds (dataset images: {data_adh:.3f}). "
        "Fréchet distance: checker features of the run's images against 1000 dataset images.",
        "",
        "## Paper findings on this model",
        "",
    ]
    for claim, holds, detail in findings(rows):
        lines.append(f"- {claim}: **{'holds' if holds else 'does not hold'}** ({detail})")
    lines += ["", "## All runs", "", report.table(rows), "",
              "![grid](grid.png)", "", "![plot](plot.png)", ""]
    with open(os.path.join(a.out, "report.md"), "w") as f:
        f.write("\n".join(lines))
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump([{k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in r.items()}
                   for r in rows], f, indent=1)
    print("\n".join(lines))
    print(f"\nwritten: {a.out}/report.md, grid.png, plot.png")


if __name__ == "__main__":
    main()
