"""A small real run of the trainer on this machine's CPU: a narrow SD1-layout teacher (random
weights) and a synthetic set of latents and text contexts, step 1 (BK-SDM Base) then step 2
(M2 assembly, teacher blocks frozen), through the same code as `python -m asdm.training`.

    python scripts/train_demo.py [--dir /tmp/asdm-train-demo] [--steps1 300] [--steps2 100]
"""
import argparse
import os
import sys

import safetensors.torch
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from asdm import assembly  # noqa: E402
from asdm.harness import host  # noqa: E402
from asdm.harness import models as tm  # noqa: E402
from asdm.training import trainer  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/asdm-train-demo")
    ap.add_argument("--steps1", type=int, default=300)
    ap.add_argument("--steps2", type=int, default=100)
    a = ap.parse_args()
    host.boot()
    os.makedirs(a.dir, exist_ok=True)
    teacher = tm.sd_model(tm.TINY_SD1, seed=0)
    assembly.save_unet(teacher, os.path.join(a.dir, "teacher.safetensors"))
    g = torch.Generator().manual_seed(0)
    safetensors.torch.save_file({"latents": torch.randn(64, 4, 8, 8, generator=g),
                                 "context": torch.randn(64, 77, 768, generator=g)},
                                os.path.join(a.dir, "data.safetensors"))
    common = 'batch = 8\nlr = 1e-3\nlog_every = 25\nsave_every = 100\n[teacher]\nunet = "teacher.safetensors"\n' \
             '[data]\nlatents = "data.safetensors"\n'
    steps = {"step1": (a.steps1, '[student]\nkind = "compress"\nlayout = "base"\n'),
             "step2": (a.steps2, '[student]\nkind = "assemble"\ncompressed = "step1/unet.safetensors"\nrecipe = "M2"\n')}
    for name, (n, student) in steps.items():
        path = os.path.join(a.dir, f"{name}.toml")
        with open(path, "w") as f:
            f.write(f'out = "{name}"\nsteps = {n}\n' + common + student)
        print(f"== {name}: python -m asdm.training {path}", flush=True)
        trainer.train(trainer.load_config(path))


if __name__ == "__main__":
    main()
