"""Project-made models for tests, the main job and benchmarks: no downloads.

Random-init UNets of the SD1.5 topology (real shapes, keys and speed) or a tiny SD-like width
(fast tests), with weights filled from a seed: ComfyUI builds layers uninitialised, so every
parameter is filled explicitly. Not for images: these weights produce noise.
"""
from __future__ import annotations

import math
import os

import torch

from ..host_models import SD15_UNET_CONFIG

SD15_UNET = SD15_UNET_CONFIG

# Same layout, narrow: 4 levels, 2 layers per down block, 3 per up block, A units where SD has them.
TINY_UNET = dict(SD15_UNET, model_channels=32, context_dim=64)
# The same narrow UNet with SD1's text context (768), for the nodes that check the family.
TINY_SD1 = dict(TINY_UNET, context_dim=768)


def fill_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Seeded init: weights N(0, 1/fan_in), norms near 1, small biases. Residual branches are
    deliberately non-zero (unlike SD's zero-initialised output convs) so that inheriting a
    stored branch is visible in the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() > 1:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return module


def sd_model(unet_config: dict | None = None, seed: int = 0):
    """A ComfyUI MODEL (ModelPatcher) of an SD1.x-style UNet with seeded random weights."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models as sm
    cfg = dict(unet_config or TINY_UNET)
    model_config = sm.SD15(cfg)
    model = model_config.get_model({})
    fill_(model.diffusion_model, seed)
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def conditioning(context_dim: int, seed: int, batch: int = 1, tokens: int = 77):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(batch, tokens, context_dim, generator=g), {}]]


@torch.no_grad()  # ComfyUI's CLIP constructor writes into its own parameters
def sd15_checkpoint(path: str, seed: int = 0) -> str:
    """Writes a full SD1.5-topology checkpoint (UNet + CLIP-L + VAE, random, fp16) that the
    stock CheckpointLoaderSimple loads. Reused when present."""
    if os.path.exists(path):
        return path
    import comfy.ldm.models.autoencoder as ae
    import comfy.sd1_clip
    from ..unet_files import write_safetensors
    sd = {}
    unet = sd_model(SD15_UNET, seed).model.diffusion_model
    sd.update({f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()})
    del unet
    clip = fill_(comfy.sd1_clip.SDClipModel(device="cpu"), seed + 1)
    for k, v in clip.state_dict().items():
        if k.startswith("transformer."):
            sd[f"cond_stage_model.{k}"] = v
    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
                "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [],
                "dropout": 0.0}
    vae = fill_(ae.AutoencoderKL(ddconfig=ddconfig, embed_dim=4), seed + 2)
    sd.update({f"first_stage_model.{k}": v for k, v in vae.state_dict().items()})
    sd = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_safetensors(sd, path)
    return path
