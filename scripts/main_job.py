"""The main job: A-SDM's experiments in miniature. Fidelity on the embedded model, speed on the
embedded model and on SD1.5- and SDXL-width UNets.

1. Fidelity and embedded-model speed: every strategy (full compute; feature inheritance with every
   preset at P5, P5† and P2†; switching S1/S2/S3; Base, Small, Tiny, M2 and ME-CondConv) samples
   the same captions and seeds through ComfyUI's own executor, from the bundled graph
   example_workflows/api/embedded_s1_inheritance.json rewired per strategy. Each caption's run is paired
   with a full-compute run of the same caption right before it (A B A B ...); a timer node before
   the sampler sums the UNet's own time (every model call, through ComfyUI's patching), and the
   executor's wall time of the graph gives the end-to-end time (sampler, decode, save; the text
   encoder is cached). Ratios: full / strategy per caption, median and spread.
2. SD1.5- and SDXL-width speed (asdm.evaluation.speed): UNet time of each strategy's schedule on
   the project-made random SD1.5 / BK-SDM UNets, and on random SDXL-family UNets (bf16, SDXL's
   block-removed students in the SD1.5 members' places: strategies.SDXL_COUNTERPARTS), composed
   from interleaved single calls, beside the FLOP bound.
3. Self-attention at 256 px (the embedded model's top level over 1024 tokens): GRI attention
   against ComfyUI's ToMe and HyperTile, each paired with full attention per caption: UNet-time
   ratio, PSNR / SSIM against full attention, adherence.
4. The family against its untrained counterparts: each member's images against full compute,
   trained and as it was before the project's trainer, same captions, seeds and sampler.

Writes report.md, grid.png, plot.png, attention.png and results.json to --out (default out/main-job, which git
ignores); --publish also copies them to docs/report for the README. The host's own log goes to
<out>/host.log.

    python scripts/main_job.py [--prompts 4] [--seeds 2] [--steps 20] [--quick] [--publish]
"""
import argparse
import gc
import glob
import json
import math
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from asdm import assembly, derived_files, embedded, topology  # noqa: E402
from asdm.evaluation import checker, deepcache, metrics, report, speed, strategies, timing  # noqa: E402
from asdm.harness import host  # noqa: E402
from asdm.training import shapes  # noqa: E402

ROOT = host.REPO_ROOT
EVAL_SEED = 20261123      # the evaluation captions (not in the training set's seed)
REFERENCE_SEED = 2        # dataset images for the Fréchet distance


@dataclass
class Job:
    """What one main job measures: its command line, resolved."""
    prompts: int = 4          # evaluation captions (also the timing rounds)
    seeds: int = 2            # images (seeds) per caption
    steps: int = 20
    cfg: float = 4.0
    presets: list = field(default_factory=lambda: list(topology.PRESETS))
    sd15_size: int = 32       # latent side of the SD1.5-width timing (32+: where time follows FLOPs)
    sd15_rounds: int = 3
    sdxl_size: int = 32       # latent side of the SDXL-width timing (0: no SDXL column)
    sdxl_rounds: int = 2
    attention_prompts: int = 3
    attention_steps: int = 10
    mode_presets: list = field(default_factory=lambda: ["EX3", "EX2", "CO3"])
    quick: bool = False
    out: str = os.path.join(ROOT, "out", "main-job")
    publish: bool = False
    command: str = "python scripts/main_job.py"   # as the report states it

    @classmethod
    def from_args(cls, argv=None) -> "Job":
        ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        # 4 x 2 by default: the findings' spreads are stated at that size, and it runs in under half
        # an hour on a 2-core CPU; 8 x 4 halves the spreads and takes about twice as long
        ap.add_argument("--prompts", type=int, default=cls.prompts, help="evaluation captions (also the timing rounds)")
        ap.add_argument("--seeds", type=int, default=cls.seeds, help="images (seeds) per caption")
        ap.add_argument("--steps", type=int, default=cls.steps)
        ap.add_argument("--cfg", type=float, default=cls.cfg)
        ap.add_argument("--presets", default="", help="comma-separated subset of presets (default: all)")
        ap.add_argument("--sd15-size", type=int, default=cls.sd15_size,
                        help="latent side of the SD1.5-width timing (32 = 256 px; below 32 deep blocks are "
                             "memory-bound on a CPU and ratios run above the FLOP bound)")
        ap.add_argument("--sd15-rounds", type=int, default=cls.sd15_rounds, help="timing rounds on the SD1.5-width UNets")
        ap.add_argument("--sdxl-size", type=int, default=cls.sdxl_size,
                        help="latent side of the SDXL-width timing (real SDXL widths, bf16; 0: no SDXL column)")
        ap.add_argument("--sdxl-rounds", type=int, default=cls.sdxl_rounds, help="timing rounds on the SDXL-width UNets")
        ap.add_argument("--attention-prompts", type=int, default=cls.attention_prompts,
                        help="captions (one seed each) for the self-attention section at 256 px")
        ap.add_argument("--attention-steps", type=int, default=cls.attention_steps,
                        help="sampler steps in the self-attention section (256 px runs cost ~16x a 64 px one)")
        ap.add_argument("--mode-presets", default="EX3,EX2,CO3",
                        help="presets compared in every reuse mode against DeepCache (comma-separated)")
        ap.add_argument("--quick", action="store_true", help="2 captions x 2 seeds, presets CO6,EX3,IN3, SD1.5 and SDXL latent 8, "
                        "reuse modes on EX3 at P5 against DeepCache depth 2 interval 5")
        ap.add_argument("--out", default=cls.out)
        ap.add_argument("--publish", action="store_true", help="also copy the report to docs/report (the README's)")
        a = ap.parse_args(argv)
        split = lambda text: [p.strip() for p in text.split(",") if p.strip()]   # noqa: E731
        job = cls(prompts=a.prompts, seeds=a.seeds, steps=a.steps, cfg=a.cfg, presets=split(a.presets) or list(topology.PRESETS),
                  sd15_size=a.sd15_size, sd15_rounds=a.sd15_rounds, sdxl_size=a.sdxl_size,
                  sdxl_rounds=a.sdxl_rounds, attention_prompts=a.attention_prompts,
                  attention_steps=a.attention_steps, mode_presets=split(a.mode_presets), quick=a.quick, out=a.out,
                  publish=a.publish, command="python scripts/main_job.py" + "".join(
                      " " + x for x in (argv if argv is not None else sys.argv[1:]) if x != "--publish"))
        if job.quick:
            job.prompts, job.seeds = 2, 2
            job.presets = split(a.presets) or ["CO6", "EX3", "IN3"]
            job.sd15_size, job.sd15_rounds = 8, 2
            job.sdxl_size, job.sdxl_rounds = min(job.sdxl_size, 8), 1
            job.attention_prompts = min(job.attention_prompts, 2)
        return job

    def strategies(self) -> list:
        modes = (strategies.mode_strategies(["EX3"], strategies.MODE_SCHEDULES[1:2], strategies.DEEPCACHE[1:2])
                 if self.quick else strategies.mode_strategies(self.mode_presets))
        return strategies.strategies(self.steps, self.presets) + modes


class Progress:
    """One bar over the whole job. The ETA weighs each phase's remaining items by that phase's
    own observed time per item (its calibrated estimate until the first item is done)."""

    def __init__(self, phases: dict):
        self.phases = {k: {"n": n, "done": 0, "spent": 0.0, "guess": g} for k, (n, g) in phases.items()}
        self.t0 = self.mark = time.time()

    def step(self, phase: str, label: str, done: int | None = None, total: int | None = None):
        p = self.phases[phase]
        if total is not None:
            p["n"] = total
        now = time.time()
        p["spent"] += now - self.mark
        self.mark = now
        p["done"] = p["done"] + 1 if done is None else done
        left = sum((q["n"] - q["done"]) * (q["spent"] / q["done"] if q["done"] else q["guess"])
                   for q in self.phases.values())
        done_all = sum(q["done"] for q in self.phases.values())
        total = sum(q["n"] for q in self.phases.values())
        filled = int(30 * done_all / total)
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {done_all}/{total} {label:<22} "
                         f"{(now - self.t0) / 60:5.1f} min, about {left / 60:4.1f} min left ")
        sys.stderr.flush()

    def close(self):
        sys.stderr.write("\n")


class EmbeddedRuns:
    """Runs strategies' graphs through the executor; keeps images and times per caption."""

    def __init__(self, seeds: int, steps: int, cfg: float):
        self.seeds, self.steps, self.cfg = seeds, steps, cfg
        self.runner = host.Runner()
        timing.register()
        deepcache.register()
        self.n = 0

    def run(self, s, caption: str, j: int):
        """(UNet seconds, end-to-end seconds, [seeds, H, W, 3] uint8) of one caption."""
        self.n += 1
        tag = f"{s.name}/{j}/{self.n}"          # a new tag per run: nothing served from the cache
        prefix = f"main/{s.name.replace('/', '_')}/p{j:02d}_{self.n}"
        api = strategies.graph(s, caption, 1000 + j, self.seeds, self.steps, self.cfg, prefix, tag)
        t0 = time.perf_counter()
        self.runner.run(api)
        wall = time.perf_counter() - t0
        files = sorted(glob.glob(os.path.join(host.workdir(), "output", prefix + "_*.png")))
        if len(files) != self.seeds:
            raise RuntimeError(f"{s.name}: expected {self.seeds} images for caption {j}, found {len(files)}")
        images = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
        for f in files:
            os.remove(f)
        return timing.SECONDS.pop(tag), wall, images


def paired(runs: EmbeddedRuns, base, s, captions, on_step) -> dict:
    """The project's A B A B: for each caption, a run of ``base`` right before a run of ``s``;
    the UNet-time and end-to-end ratios base / s over the captions (median and spread), the
    strategy's median UNet seconds, and both runs' images."""
    unet, wall, images = {"base": [], "s": []}, {"base": [], "s": []}, {"base": [], "s": []}
    for j, c in enumerate(captions):
        for who, strategy in (("base", base), ("s", s)):
            u, w, im = runs.run(strategy, c, j)
            unet[who].append(u)
            wall[who].append(w)
            images[who].append(im)
        on_step(s.label)
    return {"images": np.concatenate(images["s"]), "base_images": np.concatenate(images["base"]),
            "unet_ratio": timing.Ratio.of(unet["base"], unet["s"]), "e2e_ratio": timing.Ratio.of(wall["base"], wall["s"]),
            "unet_seconds": statistics.median(unet["s"]), "base_unet_seconds": statistics.median(unet["base"])}


# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------

def embedded_section(runs: EmbeddedRuns, plan: list, captions, progress) -> dict:
    """Every strategy on the embedded model, paired with full compute per caption."""
    full = plan[0]
    results = {}
    for s in plan:
        results[s.name] = r = paired(runs, full, s, captions, lambda label: progress.step("embedded", label))
        if s.name == "full":
            assert np.array_equal(r["base_images"], r["images"]), "full compute is not deterministic"
    return results


def sdxl_section(job: Job, plan: list, progress) -> dict:
    """Each strategy's UNet time on its SDXL counterpart (strategies.on_sdxl), in bf16: at real
    widths fp32 would hold twice the memory, and half precision is how SDXL checkpoints are
    shipped and run. Timed one counterpart UNet at a time, each group interleaved with SDXL
    itself as one run: together they hold more memory than a 24 GB machine has."""
    models = speed.Models("sdxl", torch.bfloat16)
    groups: dict = {}
    for s in map(strategies.on_sdxl, plan):
        members = {k for k in speed.schedule(s, job.steps) if k not in ("sd", "sd again") and ":" not in k}
        groups.setdefault(tuple(sorted(members)), []).append(s)
    out = {}
    for group in groups.values():
        out.update(speed.measure(group, job.steps, job.sdxl_size, job.sdxl_rounds, models=models,
                                 progress=lambda done, total: progress.step("sdxl", "SDXL-width calls")))
        models.unets.clear()
        gc.collect()
    return out


def fidelity(rows, results, scenes, job: Job, net, ref_feats) -> None:
    """Fidelity against full compute (same captions and seeds), per image kept for the findings'
    spreads."""
    items = [s.items for s in scenes for _ in range(job.seeds)]
    ref = results["full"]["images"] / 255.0
    for r in rows:
        imgs = results[r["name"]]["images"] / 255.0
        r["psnr_each"] = [metrics.psnr(imgs[i:i + 1], ref[i:i + 1]) for i in range(len(imgs))]
        r["adherence_each"] = [checker.adherence(net, imgs[i:i + 1], items[i:i + 1]) for i in range(len(imgs))]
        r.update(psnr=metrics.psnr(imgs, ref), ssim=metrics.ssim(imgs, ref),
                 adherence=float(np.mean(r["adherence_each"])),
                 fd=metrics.frechet_distance(checker.features(net, imgs), ref_feats))


def attention_section(job: Job, captions, scenes, net, progress):
    """Self-attention accelerators (GRI, ToMe, HyperTile) on the embedded model at 256 px, where
    its top level attends over 1024 tokens: each paired with full attention per caption (A B A B),
    UNet-time ratio and fidelity against full attention. Returns (rows, grid rows)."""
    plan = strategies.attention_strategies()
    runs = EmbeddedRuns(1, job.attention_steps, job.cfg)
    n = min(job.attention_prompts, len(captions))
    results = {s.name: paired(runs, plan[0], s, captions[:n], lambda label: progress.step("attention", label))
               for s in plan}
    ref = results[plan[0].name]["images"] / 255.0
    small = lambda ims: np.stack([np.asarray(Image.fromarray(i).resize((64, 64), Image.BOX)) for i in ims]) / 255.0  # noqa: E731
    rows = []
    for s in plan:
        r = results[s.name]
        imgs = r["images"] / 255.0
        rows.append(dict(name=s.name, label=s.label, unet_ratio=r["unet_ratio"], e2e_ratio=r["e2e_ratio"],
                         seconds=r["unet_seconds"], psnr=metrics.psnr(imgs, ref), ssim=metrics.ssim(imgs, ref),
                         adherence=checker.adherence(net, small(r["images"]), scenes[:n])))
    return rows, [(s.label, results[s.name]["images"]) for s in plan]


# The family against its untrained counterparts: what each member started from before the
# project's trainer (BK-SDM layouts: the teacher's blocks removed; M2: Base's shallow blocks put in
# the teacher; ME-CondConv: identity-initialised experts, which compute exactly the UNet they extend).
UNTRAINED = {"base": "base", "small": "small", "tiny": "tiny", "m2": "m2",
             "small-condconv": "small", "tiny-condconv": "tiny"}


def family_section(job: Job, captions, scenes, results, net):
    """Each family member (trained, from the main table) and its untrained counterpart, sampled
    with the same captions, seeds and sampler, against full compute. The untrained ones are built
    in memory and sampled with ComfyUI's own KSampler code (common_ksampler), not the graph; full
    compute sampled the same way must equal the graph's images bit for bit, which the row says."""
    import nodes   # late: the host's modules exist once it runs (host.boot)
    teacher, clip, vae = embedded.load()
    trained_base = derived_files.load_unet(os.path.join(embedded.FAMILY_UNETS, embedded.family_name("base")))
    models = {"full": teacher,
              "base": assembly.compress(teacher, "base"), "small": assembly.compress(teacher, "small"),
              "tiny": assembly.compress(teacher, "tiny"),
              "m2": assembly.assemble(teacher, trained_base, assembly.recipe_spec("M2"))}
    neg = nodes.CLIPTextEncode().encode(clip, "")[0]
    images = {}
    with torch.no_grad():
        for name, m in models.items():
            out = []
            for j, c in enumerate(captions):
                pos = nodes.CLIPTextEncode().encode(clip, c)[0]
                latent = {"samples": torch.zeros(job.seeds, 4, embedded.IMAGE_SIZE // 8, embedded.IMAGE_SIZE // 8)}
                lat = nodes.common_ksampler(m, 1000 + j, job.steps, job.cfg, "euler", "normal", pos, neg, latent)[0]
                px = vae.decode(lat["samples"]).detach().float()
                out.append(np.clip(255.0 * px.numpy(), 0, 255).astype(np.uint8))   # as SaveImage
            images[name] = np.concatenate(out)
    same = bool(np.array_equal(images["full"], results["full"]["images"]))
    ref = results["full"]["images"] / 255.0
    items = [s.items for s in scenes for _ in range(job.seeds)]
    rows = []
    for member, start in UNTRAINED.items():
        if member not in results:
            continue
        untrained = images[start] if member in models else results[start]["images"]   # condconv: the trained UNet
        t, u = results[member]["images"] / 255.0, untrained / 255.0
        pt = [metrics.psnr(t[i:i + 1], ref[i:i + 1]) for i in range(len(t))]
        pu = [metrics.psnr(u[i:i + 1], ref[i:i + 1]) for i in range(len(u))]
        d = [x - y for x, y in zip(pt, pu)]
        se = statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else float("nan")
        rows.append(dict(name=f"family-{member}", member=member, start=start, graph_equal=same,
                         psnr=metrics.psnr(t, ref), psnr_untrained=metrics.psnr(u, ref),
                         diff=statistics.mean(d), se=se, ssim=metrics.ssim(t, ref), ssim_untrained=metrics.ssim(u, ref),
                         adherence=checker.adherence(net, t, items),
                         adherence_untrained=checker.adherence(net, u, items)))
    return rows, same



# ---------------------------------------------------------------------------------------------
# The report, one function per section
# ---------------------------------------------------------------------------------------------

def header_section(job: Job, rows, results, data_adh: float, minutes: float) -> list[str]:
    f_full = rows[0]
    return [
        "# A-SDM main job",
        "",
        f"Fidelity: the embedded model, {job.prompts} captions x {job.seeds} seeds, 64x64 px (latent 8x8), "
        f"{job.steps} steps euler, cfg {job.cfg}; P5† and P2† with the last 20 % of the steps full. Speed on "
        f"{timing.device_name()}, PyTorch attention; job time {minutes:.1f} min (`{job.command}`).",
        "",
        "- **UNet time, embedded**: the embedded UNet's own time over the sampling run (every model call, "
        "summed by a timer wrapper through ComfyUI's patching), full compute's over the strategy's, one pair "
        f"of runs per caption (A B A B); median (lowest-highest) over the {job.prompts} pairs. Full compute "
        f"against itself: {f_full['unet_ratio']}. One run's UNet time: "
        f"{results['full']['base_unet_seconds']:.2f} s for {job.seeds} images; the embedded UNet is too small "
        "for its time to follow its FLOPs on a CPU.",
        "- **End to end, embedded**: the executor's wall time of the graph (sampler, VAE decode, save; the "
        f"text encoder is cached), same pairs. Full compute against itself: {f_full['e2e_ratio']}.",
        f"- **UNet time, SD1.5 width**: the project-made random-weight SD1.5 / BK-SDM UNets at latent "
        f"{speed.CFG_BATCH}x4x{job.sd15_size}x{job.sd15_size} (cond + uncond, {job.sd15_size * 8} px), each strategy's "
        f"{job.steps}-step schedule composed from single UNet calls timed interleaved over {job.sd15_rounds} rounds "
        f"(asdm/evaluation/speed.py); median (lowest-highest). Full compute against itself: {f_full['sd15_ratio']}. "
        "ME-CondConv experts there are random (cond and uncond route differently, as when trained).",
        "- **FLOP bound**: UNet FLOPs of full compute over the strategy's on the same SD1.5-width UNets and "
        "schedule.",
        (f"- **UNet time, SDXL width** and its **FLOP bound**: the same on random-weight SDXL-family UNets of the "
         f"real widths in bf16 at latent {speed.CFG_BATCH}x4x{job.sdxl_size}x{job.sdxl_size} ({job.sdxl_size * 8} px), "
         f"{job.sdxl_rounds} rounds; SDXL's block-removed students stand in for the SD1.5 family's members: "
         + ", ".join(f"{k} -> {v}" for k, v in strategies.SDXL_COUNTERPARTS.items())
         + f". Full compute against itself: {f_full['sdxl_ratio']}. *refused*: the node refuses that setting "
         "on SDXL's layout (docs/presets.md). More of the SDXL family: docs/benchmarks.md (benchmarks/sdxl.py)."
         if job.sdxl_size else "- No SDXL-width timing in this run (--sdxl-size 0)."),
        "- PSNR / SSIM against full compute with the same seeds; adherence: the share of caption attributes "
        f"the checker finds (dataset images: {data_adh:.3f}); Fréchet distance: checker features against 1000 "
        "dataset images.",
        "",
    ]


def findings_section(rows, presets) -> list[str]:
    out = ["## Paper findings on this model", ""]
    for text, holds, sure, detail in findings(rows, presets):
        verdict = ("holds" if holds else "does not hold") + ("" if sure else ", within the seed-to-seed spread")
        out.append(f"- {text}: **{verdict}** ({detail})")
    return out + [""]


def runs_section(rows) -> list[str]:
    return ["## All runs", "", report.table([r for r in rows if r["group"] != "modes"]), "",
            "![grid](grid.png)", "", "![plot](plot.png)", ""]


def modes_report(rows) -> list[str]:
    return ["## Inheritance modes against DeepCache", "",
            "Feature inheritance in each reuse mode (residual: the paper's; span output: the chosen units "
            "are not run and the outputs leaving them are reused whole; + forecast: a first-order forecast "
            "from the last two full steps) against the project's DeepCache (asdm/evaluation/deepcache.py, "
            "uniform interval, skip junction of the given depth), same captions, seeds and columns as above.", ""] \
        + modes_section(rows) + [""]


def attention_report(job: Job, attn_rows, n_captions: int) -> list[str]:
    return ["## Self-attention at 256 px: GRI, ToMe, HyperTile", "",
            f"The embedded model at 256x256 px (latent 32x32: its top level, dn0 / up3, attends over 1024 "
            f"tokens), {n_captions} captions x 1 seed, {job.attention_steps} steps euler, cfg {job.cfg}; each run paired with full "
            "attention on the same caption (A B A B); UNet-time ratio median (lowest-highest). PSNR / SSIM "
            "against full attention; adherence on the images scaled to 64 px (the model was trained at "
            "64 px, so 256 px images are out of its training range for every row alike). GRI on dn0 + "
            "up3; ToMe and HyperTile are ComfyUI's own nodes (HyperTile with 128 px tiles: its default "
            "256 px tile does not split a 256 px image).", ""] \
        + attention_table(attn_rows) + ["", "![attention](attention.png)", ""]


def family_report(fam_rows, fam_same: bool) -> list[str]:
    return ["## The family against its untrained counterparts", "",
            "Each member trained from the embedded model with the project's trainer (asdm/training/"
            "embedded.py) against what it started from, same captions, seeds and sampler as above; PSNR "
            "difference per image with its standard error over the caption x seed images.", ""] \
        + family_table(fam_rows, fam_same) + [""]


def family_table(rows, same: bool) -> list[str]:
    start_label = {"base": "Base, untrained", "small": "Small, untrained", "tiny": "Tiny, untrained",
                   "m2": "M2, untrained (Base's blocks as trained in step 1)"}
    out = ["| member | untrained counterpart | PSNR vs full (dB): trained | untrained | difference (standard "
           "error) | SSIM: trained | untrained | adherence: trained | untrained | closer to the teacher |",
           "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        start = start_label[r["start"]] if r["member"] == r["start"] or r["member"] == "m2" else \
            f"trained {r['start'].capitalize()} (identity experts)"
        closer = r["diff"] > 0
        sure = r["diff"] > 2 * r["se"] if closer else r["diff"] < -2 * r["se"]
        out.append(f"| {r['member']} | {start} | {r['psnr']:.2f} | {r['psnr_untrained']:.2f} | "
                   f"{r['diff']:+.2f} ({r['se']:.2f}) | {r['ssim']:.3f} | {r['ssim_untrained']:.3f} | "
                   f"{r['adherence']:.3f} | {r['adherence_untrained']:.3f} | "
                   f"{'yes' if closer else 'no'}{'' if sure else ', within the spread'} |")
    out += ["", "Full compute sampled the same way as the untrained rows "
            + ("equals the graph's images bit for bit." if same else
               "differs from the graph's images: the untrained rows are not sampled exactly as the others.")]
    return out


def attention_table(rows) -> list[str]:
    out = ["| run | UNet time ratio | end to end | UNet s / image | PSNR vs full attention (dB) | SSIM | adherence |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        out.append(f"| {r['label']} | {r['unet_ratio']} | {r['e2e_ratio']} | {r['seconds']:.2f} | "
                   f"{report.fmt(r['psnr'])} | {r['ssim']:.3f} | {r['adherence']:.3f} |")
    return out


def compare(rows, a_names, b_names, key) -> tuple[float, float, float]:
    """Mean of ``key`` over runs a minus over runs b, per image (same caption and seed), and the
    spread of that difference over the images: (difference, its standard error, images)."""
    by = {r["name"]: r for r in rows}
    a_vals = np.mean([by[n][key + "_each"] for n in a_names if n in by], axis=0)
    b_vals = np.mean([by[n][key + "_each"] for n in b_names if n in by], axis=0)
    d = np.asarray(a_vals, dtype=float) - np.asarray(b_vals, dtype=float)
    d = d[np.isfinite(d)]
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else math.inf, len(d)


def findings(rows, presets):
    """The paper's findings on this model; each states whether the difference exceeds twice its
    standard error over the caption x seed images (the seed-to-seed spread)."""
    out = []

    def claim(text, a_names, b_names, key="psnr", unit="dB"):
        d, se, n = compare(rows, a_names, b_names, key)
        holds = d > 0
        sure = abs(d) > 2 * se
        out.append((text, holds, sure, f"difference {d:+.3f} {unit}, standard error {se:.3f} over {n} images"))

    claim("P5† closer to full compute than P5", [f"{p}-P5d" for p in presets], [f"{p}-P5" for p in presets])
    for mode in ("P5", "P5d"):
        claim(f"external/decoder loops better than inner/encoder loops ({mode.replace('d', '†')})",
              [f"{p}-{mode}" for p in presets if p.startswith(("EX", "DE"))],
              [f"{p}-{mode}" for p in presets if p.startswith(("IN", "EN"))])
    claim("S1 closer to full compute than S2", ["S1"], ["S2"])
    claim("S1 closer to full compute than S3", ["S1"], ["S3"])
    claim("S1 adherence above S2", ["S1"], ["S2"], "adherence", "")
    claim("M2 closer to the full model than Base", ["m2"], ["base"])
    return out


def modes_section(rows) -> list[str]:
    """Inheritance modes against DeepCache: the table, then each DeepCache setting against our
    closest setting at equal or less UNet work (FLOP bound at least DeepCache's; PSNR difference
    per image, with its standard error over the caption x seed images). Work, not measured time:
    at small latents on a CPU deep blocks are memory-bound and measured ratios run far above the
    FLOP bound, which a GPU user never sees."""
    modes = [r for r in rows if r["group"] == "modes"]
    out = ["| setting | UNet time, SD1.5 width | FLOP bound | PSNR vs full (dB) | SSIM | adherence | "
           "UNet time, embedded | UNet time, SDXL width | FLOP bound, SDXL |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in modes:
        out.append(f"| {r['label']} | {r['sd15_ratio']} | {r['bound']:.2f}x | {report.fmt(r['psnr'])} | "
                   f"{r['ssim']:.3f} | {r['adherence']:.3f} | {r['unet_ratio']} | {report.sdxl_cells(r)} |")
    out += ["", "At equal work (each DeepCache setting against ours whose FLOP bound is at least "
            "DeepCache's; difference per image, standard error over the images):", ""]
    ours = [r for r in modes if r["kind"] == "fi"]
    for dc in (r for r in modes if r["kind"] == "deepcache"):
        for which, pool in (("best", ours), ("best Pn†", [r for r in ours if "†" in r["label"]])):
            as_fast = [r for r in pool if r["bound"] >= dc["bound"] - 0.005]   # equal work: the same FLOPs
            if not as_fast:
                out.append(f"- {dc['label']} (FLOP bound {dc['bound']:.2f}x): no "
                           f"{which.replace('best', '').strip() or 'setting'} of ours does as little work")
                continue
            best = max(as_fast, key=lambda r: r["psnr"])
            d, se, n = compare(rows, [best["name"]], [dc["name"]], "psnr")
            verdict = "closer" if d > 2 * se else "not closer" if d < -2 * se else "as close, within the spread"
            out.append(f"- {dc['label']} (FLOP bound {dc['bound']:.2f}x, {report.fmt(dc['psnr'])} dB) vs {which}: "
                       f"{best['label']} ({best['bound']:.2f}x, {report.fmt(best['psnr'])} dB): **{verdict}** "
                       f"({d:+.2f} dB, standard error {se:.2f} over {n} images)")
    return out


def summary(rows, fam_rows, data_adh: float, minutes: float) -> list[str]:
    """What the job prints when it ends."""
    by = {r["name"]: r for r in rows}
    best = max((r for r in rows if r["kind"] == "fi"), key=lambda r: r["bound"], default=None)
    out = [f"job time {minutes:.1f} min; full compute against itself: embedded UNet {by['full']['unet_ratio']}, "
           f"SD1.5 width {by['full']['sd15_ratio']}, SDXL width {by['full']['sdxl_ratio'] or '-'}"]
    if best is not None:
        out.append(f"least work of the inheritance settings: {best['label']} {best['sd15_ratio']} (FLOP bound "
                   f"{best['bound']:.2f}x), {best['psnr']:.1f} dB, adherence {best['adherence']:.3f}")
    out.append(f"adherence: full compute {by['full']['adherence']:.3f} (dataset images {data_adh:.3f}); family "
               "closer to the teacher than untrained: " + ", ".join(f"{r['member']} {r['diff']:+.1f} dB" for r in fam_rows))
    for n in ("S1", "m2", "small-condconv"):
        if n in by:
            r = by[n]
            out.append(f"{r['label']}: SD1.5 width {r['sd15_ratio']} (FLOP bound {r['bound']:.2f}x), {r['psnr']:.1f} dB")
    return out


GRID_ROWS = ("full", "S1", "S2", "S3", "base", "m2", "small", "small-condconv", "tiny", "tiny-condconv",
             "CO6-P5", "CO6-P5d", "CO6-P2d", "EX3-P5d", "IN3-P5d", "LI1-P5d")
OUTPUTS = ("report.md", "grid.png", "plot.png", "attention.png", "results.json")


def main(argv=None):
    job = Job.from_args(argv)
    os.makedirs(job.out, exist_ok=True)
    t_start = time.time()
    host.boot(pytorch_attention=True, log_file=os.path.join(job.out, "host.log"))
    plan = job.strategies()
    scenes = shapes.generate(job.prompts, embedded.IMAGE_SIZE, EVAL_SEED)
    captions = [s.caption for s in scenes]

    runs = EmbeddedRuns(job.seeds, job.steps, job.cfg)
    t0 = time.time()
    runs.run(plan[0], captions[0], -1)                    # warm-up: loads the models
    guess = time.time() - t0
    sd15_calls = (8 + 2 * len(job.presets) + 2 * 3 * len(job.mode_presets) + 4) * (job.sd15_rounds + 1)   # refined by speed.measure's own count
    n_attn = len(strategies.attention_strategies()) * min(job.attention_prompts, job.prompts)
    progress = Progress({"embedded": (len(plan) * job.prompts, 2 * guess),
                         "sd15": (sd15_calls, 0.008 * job.sd15_size ** 2),
                         "sdxl": ((sd15_calls // (job.sd15_rounds + 1) + 12) * (job.sdxl_rounds + 1) if job.sdxl_size else 0,
                                  0.001 * job.sdxl_size ** 2),   # each counterpart's group times SDXL twice more
                         "attention": (n_attn, guess * 16 * job.attention_steps / (job.steps * job.seeds))})
    results = embedded_section(runs, plan, captions, progress)
    sd15 = speed.measure(plan, job.steps, job.sd15_size, job.sd15_rounds,
                         progress=lambda done, total: progress.step("sd15", "SD1.5-width calls", done, total))
    gc.collect()   # the SD1.5-width UNets
    sdxl = sdxl_section(job, plan, progress) if job.sdxl_size else {}
    net = checker.load_checker(embedded.path("checker"))
    attn_rows, attn_grid = attention_section(job, captions, scenes, net, progress)
    progress.close()

    ref = shapes.generate(1000, embedded.IMAGE_SIZE, REFERENCE_SEED)
    ref_feats = checker.features(net, np.stack([s.image for s in ref]) / 255.0)
    rows = [{"name": s.name, "label": s.label, "group": s.group, "kind": s.kind, "preset": s.preset,
             "unet_ratio": results[s.name]["unet_ratio"], "e2e_ratio": results[s.name]["e2e_ratio"],
             "sd15_ratio": sd15[s.name]["ratio"], "bound": sd15[s.name]["bound"],
             "sdxl_ratio": sdxl.get(s.name, {}).get("ratio"), "sdxl_bound": sdxl.get(s.name, {}).get("bound"),
             "sdxl_refused": sdxl.get(s.name, {}).get("refused")} for s in plan]
    fidelity(rows, results, scenes, job, net, ref_feats)
    data_adh = checker.adherence(net, np.stack([s.image for s in scenes]) / 255.0, scenes)
    fam_rows, fam_same = family_section(job, captions, scenes, results, net)

    labels = {s.name: s.label for s in plan}
    report.grid([(labels[n], results[n]["images"][::job.seeds]) for n in GRID_ROWS if n in results],
                captions).save(os.path.join(job.out, "grid.png"))
    report.plot([r for r in rows if r["group"] != "modes"]).save(os.path.join(job.out, "plot.png"))
    report.grid(attn_grid, captions[:len(attn_grid[0][1])], cell=128).save(os.path.join(job.out, "attention.png"))
    minutes = (time.time() - t_start) / 60
    lines = (header_section(job, rows, results, data_adh, minutes) + findings_section(rows, job.presets)
             + runs_section(rows) + modes_report(rows) + attention_report(job, attn_rows, len(attn_grid[0][1]))
             + family_report(fam_rows, fam_same))
    with open(os.path.join(job.out, "report.md"), "w") as f:
        f.write("\n".join(lines))
    with open(os.path.join(job.out, "results.json"), "w") as f:
        json.dump([report.jsonable(r) for r in rows + attn_rows]
                  + [dict(r, section="family") for r in fam_rows], f, indent=1)
    if job.publish:
        dst = os.path.join(ROOT, "docs", "report")
        os.makedirs(dst, exist_ok=True)
        for name in OUTPUTS:
            shutil.copy(os.path.join(job.out, name), os.path.join(dst, name))
    print(f"report: {os.path.join(job.out, 'report.md')} (grid.png, plot.png, results.json beside it)"
          + ("; copied to docs/report" if job.publish else ""))
    print("\n".join(summary(rows, fam_rows, data_adh, minutes)))


if __name__ == "__main__":
    main()
