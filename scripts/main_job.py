"""The main job: runs the bundled feature-inheritance workflow headless through ComfyUI's
executor on the project-made SD1.5-topology checkpoint, once plain and once per preset, and
prints each strategy's time against the plain model.

    python scripts/main_job.py [--steps 20] [--size 128] [--period 5] [--tail 4] [--presets CO6,LI1]
"""
import argparse
import copy
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from asdm import host  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=128, help="image side in pixels")
    ap.add_argument("--period", type=int, default=5)
    ap.add_argument("--tail", type=int, default=4, help="final full steps (Pn†); 0 for Pn")
    ap.add_argument("--presets", default="", help="comma-separated subset (default: all)")
    a = ap.parse_args()

    runner = host.Runner()
    import importlib
    presets = importlib.import_module(f"{host.PACK_NAME}.asdm.topology").PRESETS
    names = [p.strip() for p in a.presets.split(",") if p.strip()] or list(presets)
    api = host.load_api_workflow("feature_inheritance_sd15.json")
    api["1"]["inputs"]["ckpt_name"] = host.random_sd15_checkpoint()
    api["4"]["inputs"].update(width=a.size, height=a.size)
    api["6"]["inputs"]["steps"] = a.steps

    def timed(prompt):
        t0 = time.perf_counter()
        runner.run(prompt)
        return time.perf_counter() - t0

    plain = copy.deepcopy(api)
    plain["6"]["inputs"]["model"] = ["1", 0]
    plain["8"]["inputs"]["filename_prefix"] = "plain"
    timed(plain)                       # loads the checkpoint and encodes the prompts (cached after)
    plain["6"]["inputs"]["seed"] = 1   # a new sampler input, so the executor samples again
    t_plain = timed(plain)
    mode = f"P{a.period}" + (f"† (last {a.tail} full)" if a.tail else "")
    print(f"\n{a.steps} steps, {a.size}x{a.size} px, euler, cfg 7.5, {mode}; plain run {t_plain:.1f} s\n")
    print("| preset | time (s) | speedup vs plain |")
    print("| --- | ---: | ---: |")
    for i, name in enumerate(names):
        p = copy.deepcopy(api)
        p["5"]["inputs"].update(preset=name, period=a.period, final_full_steps=a.tail)
        p["6"]["inputs"]["seed"] = 1
        p["8"]["inputs"]["filename_prefix"] = f"asdm_{name}"
        t = timed(p)
        print(f"| {name} | {t:.1f} | {t_plain / t:.2f}x |", flush=True)
    print(f"\nimages: {host.workdir()}/output")


if __name__ == "__main__":
    main()
