"""Trains the embedded model into weights/embedded/ (see asdm/training/embedded.py):

    python scripts/train_embedded.py [--stages checker,vae,unet,family,gri] [--seed 0] [--force]

Each stage is skipped when its weights exist; --force retrains. Prints each stage's time.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from asdm.evaluation import checker  # noqa: E402
from asdm.harness import host  # noqa: E402
from asdm.training import embedded as training_embedded  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", default="checker,vae,unet,family,gri")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vae-steps", type=int, default=900)
    ap.add_argument("--unet-steps", type=int, default=1800)
    ap.add_argument("--snapshot-every", type=int, default=600,
                    help="UNet stage: a loadable copy every N steps in out/embedded-unet/step-N (0: none)")
    ap.add_argument("--family-steps", type=int, default=300)
    ap.add_argument("--gri-steps", type=int, default=150, help="the GRI-attention student (256 px)")
    ap.add_argument("--force", action="store_true", help="retrain stages whose weights exist")
    a = ap.parse_args()
    host.boot(pytorch_attention=True)
    t0 = time.time()
    stages = [s.strip() for s in a.stages.split(",") if s.strip()]
    log = lambda m: print(m, flush=True)   # noqa: E731
    if "checker" in stages:   # the evaluation's attribute checker, trained on the same scenes
        checker.train_checker_file(seed=a.seed, force=a.force, log=log)
    times = training_embedded.run([s for s in stages if s != "checker"], seed=a.seed, vae_steps=a.vae_steps,
                                  unet_steps=a.unet_steps, family_steps=a.family_steps, gri_steps=a.gri_steps,
                                  snapshot_every=a.snapshot_every, force=a.force, log=log)
    print(f"done in {time.time() - t0:.0f} s: {times}")


if __name__ == "__main__":
    main()
