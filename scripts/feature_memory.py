"""The memory feature inheritance's stored features take, per mode, for SD1.5 at 512 px and SDXL
at 1024 px, batch 1 and 4 with CFG, in fp16: the tables of docs/memory.md.

    python scripts/feature_memory.py            # prints the tables (markdown)

How: the real-width UNet (the host's own classes, the layouts of asdm/harness/models.py) is built
on PyTorch's meta device (shapes and dtypes only: no weights, no memory, seconds), patched by the
engine itself (``inheritance.apply_inheritance``), and run for a few sampler steps at the real
latent size through the engine's holder, which counts the bytes of what it stores exactly as in a
real run (``RunState.peak_bytes``, the figure each run's log line states; tests/host/test_memory.py
checks that the meta count equals a real run's). The CFG batch is one UNet call of 2 x batch
latents, the cond and uncond chunks (split calls hold the same).
"""
from __future__ import annotations

import contextlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from asdm import hooks, inheritance  # noqa: E402
from asdm.harness import host  # noqa: E402
from asdm.harness import models as tm  # noqa: E402

MODES = [("residual", False), ("residual", True), ("output", False), ("output", True)]
MODE_NAMES = ["residual", "residual + forecast", "span output", "span output + forecast"]
STEPS = 4   # period 2: steps 0 and 2 store (forecast keeps both), 1 and 3 inherit

# (title, UNet config, latent side, [(unit set label, preset, units)])
CASES = [
    ("SD1.5 at 512 px (64x64 latents)", tm.SD15_UNET, 64, [
        ("EX3 (the node's default set)", "EX3", ""),
        ("LI1 (the layers BK-SDM removes)", "LI1", ""),
        ("CO3 (all but up3)", "CO3", ""),
        ("every unit", "custom", "dn0, dn1, dn2, dn3, mid, up0, up1, up2, up3"),
    ]),
    ("SDXL at 1024 px (128x128 latents)", tm.SDXL_UNETS["sdxl"], 128, [
        ("dn1, dn2, mid, up0, up1", "custom", "dn1, dn2, mid, up0, up1"),
        ("dn2, mid, up0 (the deepest level)", "custom", "dn2, mid, up0"),
        ("every unit", "custom", "dn0, dn1, dn2, mid, up0, up1, up2"),
    ]),
]


def meta_model(unet_config: dict, dtype=torch.float16):
    """A host MODEL of this UNet layout on the meta device."""
    import comfy.model_patcher   # late: the host's modules exist once it runs (compat.start_host)
    import comfy.supported_models as sm
    cfg = dict(unet_config)
    model_config = (sm.SDXL if cfg.get("adm_in_channels") == 2816 else sm.SD15)(cfg)
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({}, "", device="meta")
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def stored_bytes(model, latent: int, batch: int, preset: str, units: str, reuse: str, forecast: bool,
                 dtype=torch.float16, device="meta") -> tuple[int, int]:
    """(peak bytes of stored features, bytes of output mode's zero placeholders) of a run of
    ``STEPS`` steps at period 2 with CFG (2 x ``batch`` latents per UNet call)."""
    import comfy.utils   # late: the host's modules exist once it runs (compat.start_host)
    m = inheritance.apply_inheritance(model, preset, units, 2, 0.0, reuse, forecast)
    holder = hooks.holder_of(m, inheritance.InheritanceHolder)
    base = m.model
    saved = {k: comfy.utils.get_attr(base, k) for k in m.object_patches}
    for k, fn in m.object_patches.items():   # what the host's patching does when it loads the MODEL
        comfy.utils.set_attr(base, k, fn)
    unet = base.diffusion_model
    cfg = base.model_config.unet_config
    n = 2 * batch
    x = torch.zeros(n, 4, latent, latent, device=device, dtype=dtype)
    kw = dict(timesteps=torch.zeros(n, device=device), context=torch.zeros(n, 77, cfg["context_dim"], device=device, dtype=dtype))
    if cfg.get("adm_in_channels"):
        kw["y"] = torch.zeros(n, cfg["adm_in_channels"], device=device, dtype=dtype)
    keys = ((0, 0), (1, 0))   # the cond and uncond chunks of a CFG batch (hooks.chunk_keys)
    run = holder.start_run(total=STEPS)
    try:
        with torch.no_grad(), (_shape_only_attention() if x.is_meta else contextlib.nullcontext()):
            for step in range(STEPS):
                run.step = step
                holder.call = holder.begin_call(run, x, keys)
                unet(x, **kw)
    finally:
        holder.call = None
        holder.end_run(run)
        for k, v in saved.items():
            comfy.utils.set_attr(base, k, v)
    return run.peak_bytes, run.peak_filler_bytes


@contextlib.contextmanager
def _shape_only_attention():
    """The host's SDPA attention while the UNet runs on the meta device: its CPU default
    (sub-quadratic attention) sizes its chunks from the device's free memory, which a meta device
    cannot tell. The attention's output shape is the same whichever computes it."""
    import comfy.ldm.modules.attention as attention   # late: the host's modules exist once it runs (compat.start_host)
    saved = attention.optimized_attention, attention.optimized_attention_masked
    attention.optimized_attention = attention.optimized_attention_masked = attention.attention_pytorch
    try:
        yield
    finally:
        attention.optimized_attention, attention.optimized_attention_masked = saved


def mib(n: int) -> str:
    return f"{n / 2**20:,.0f}"


def table(title, unet_config, latent, sets) -> str:
    model = meta_model(unet_config)
    lines = [f"**{title}**, fp16, MiB at batch 1 / batch 4 (CFG: 2 / 8 latents per UNet call):", "",
             "| unit set | " + " | ".join(MODE_NAMES) + " | span output's zeros |",
             "| --- |" + " ---: |" * (len(MODES) + 1)]
    for label, preset, units in sets:
        cells, zeros = [], None
        for reuse, forecast in MODES:
            got = [stored_bytes(model, latent, b, preset, units, reuse, forecast) for b in (1, 4)]
            cells.append(" / ".join(mib(g[0]) for g in got))
            if reuse == "output":
                zeros = " / ".join(mib(g[1]) for g in got)
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {zeros} |")
    return "\n".join(lines)


def main():
    import logging
    host.boot(log_file=os.devnull)
    logging.getLogger("A-SDM").setLevel(logging.WARNING)
    print("\n\n".join(table(*case) for case in CASES))


if __name__ == "__main__":
    main()
