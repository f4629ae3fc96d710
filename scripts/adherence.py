"""How well the embedded model follows held-out captions, by caption kind, and whether its UNet
binds each shape to its place (asdm/evaluation/binding.py):

    read -r PY COMFY <<<"$(bash scripts/setup_host.sh current)"
    COMFYUI_PATH="$COMFY" "$PY" scripts/adherence.py [--captions 64] [--seeds 2] [--steps 20] [--cfg 4] [--sampler euler]
                                               [--scheduler normal] [--folder out/embedded-unet/step-2800]

Samples the evaluation seed's first --captions captions (noise seed 1000 + caption index, --seeds
images each) with ComfyUI's stock nodes, full compute, and scores them with the checker; then the
UNet's x0 error with true and swapped-place captions on 96 held-out two-shape scenes. --folder
scores a snapshot of the UNet stage instead of the shipped weights.
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from asdm import embedded  # noqa: E402
from asdm.evaluation import binding, checker  # noqa: E402
from asdm.harness import host  # noqa: E402
from asdm.training import shapes  # noqa: E402

EVAL_SEED = 20261123    # the main job's and the image test's held-out captions


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--captions", type=int, default=64)
    ap.add_argument("--seeds", type=int, default=2, help="images per caption (one batch, one noise seed)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=4.0)
    ap.add_argument("--sampler", default="euler")
    ap.add_argument("--scheduler", default="normal")
    ap.add_argument("--folder", default=None, help="a weights folder as embedded.load reads it")
    a = ap.parse_args()
    log_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "out")
    os.makedirs(log_dir, exist_ok=True)
    host.boot(log_file=os.path.join(log_dir, "adherence-host.log"))   # the host's own log
    import torch
    import nodes
    N = nodes.NODE_CLASS_MAPPINGS
    model, clip, vae = embedded.load(a.folder)
    net = checker.load_checker(embedded.path("checker"))

    t0 = time.time()
    scenes = shapes.generate(a.captions, embedded.IMAGE_SIZE, EVAL_SEED)
    images = []
    with torch.inference_mode():
        neg = N["CLIPTextEncode"]().encode(clip, "")[0]
        for j, s in enumerate(scenes):
            pos = N["CLIPTextEncode"]().encode(clip, s.caption)[0]
            lat = N["EmptyLatentImage"]().generate(embedded.IMAGE_SIZE, embedded.IMAGE_SIZE, a.seeds)[0]
            sampled = N["KSampler"]().sample(model, 1000 + j, a.steps, a.cfg, a.sampler, a.scheduler, pos, neg, lat)[0]
            images.append(N["VAEDecode"]().decode(vae, sampled)[0].numpy())
    r = binding.by_kind(net, np.concatenate(images), [s.items for s in scenes for _ in range(a.seeds)])
    ones = sum(len(s.items) == 1 for s in scenes)
    print(f"adherence, {a.captions} captions x {a.seeds} seeds ({a.steps} steps {a.sampler} / {a.scheduler}, "
          f"cfg {a.cfg}): all {r['all']:.3f}; one-shape captions ({ones}) {r['one']:.3f}; two-shape "
          f"({a.captions - ones}) {r['two']:.3f}: {r['correct']} images right, {r['swapped']} swapped, "
          f"{r['other']} other  ({time.time() - t0:.0f} s)")

    two = [s for s in shapes.generate(400, embedded.IMAGE_SIZE, EVAL_SEED) if len(s.items) == 2][:96]
    sens = binding.loaded_swap_sensitivity(model, clip, vae, two)
    print("x0 error on 96 two-shape scenes, true caption vs shapes' places swapped (ratio > 1: the UNet binds):")
    for t, (true, swap) in sens.items():
        print(f"  t {t:4d}  true {true:.4f}  swapped {swap:.4f}  ratio {swap / true:.3f}")


if __name__ == "__main__":
    main()
