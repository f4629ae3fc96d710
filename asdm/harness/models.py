"""Project-made models for tests, the main job and benchmarks: no downloads.

Random-init UNets of the SD1.5 topology (real shapes, keys and speed) or a tiny SD-like width
(fast tests), with weights filled from a seed: ComfyUI builds layers uninitialised, so every
parameter is filled explicitly. Not for images: these weights produce noise.
"""
from __future__ import annotations

import hashlib
import json
import math
import os

import torch

from .. import compat
from ..assembly import compress, save_unet
from ..host_models import SD15_UNET_CONFIG
from ..unet_files import write_safetensors
from . import host

SD15_UNET = SD15_UNET_CONFIG

# Same layout, narrow: 4 levels, 2 layers per down block, 3 per up block, A units where SD has them.
TINY_UNET = dict(SD15_UNET, model_channels=32, context_dim=64)
# The same narrow UNet with SD1's text context (768), for the nodes that check the family.
TINY_SD1 = dict(TINY_UNET, context_dim=768)

# The SDXL family's UNets as the host describes them (its model_detection configs): SDXL (and its
# fine-tunes), and the block-removed students the host loads natively. Three levels, no
# attention at level 0, a class embedding (label_emb) of SDXL's y: pooled text + size (2816).
_SDXL_COMMON = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
    "model_channels": 320, "channel_mult": [1, 2, 4], "use_linear_in_transformer": True,
    "context_dim": 2048, "num_head_channels": 64, "use_temporal_attention": False, "use_temporal_resblock": False,
}
SDXL_UNETS = {
    "sdxl": dict(_SDXL_COMMON, num_res_blocks=[2, 2, 2], transformer_depth=[0, 0, 2, 2, 10, 10],
                 transformer_depth_middle=10, transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10]),
    "ssd-1b": dict(_SDXL_COMMON, num_res_blocks=[2, 2, 2], transformer_depth=[0, 0, 2, 2, 4, 4],
                   transformer_depth_middle=-1, transformer_depth_output=[0, 0, 0, 1, 1, 2, 10, 4, 4]),
    "vega": dict(_SDXL_COMMON, num_res_blocks=[2, 2, 2], transformer_depth=[0, 0, 1, 1, 2, 2],
                 transformer_depth_middle=-1, transformer_depth_output=[0, 0, 0, 1, 1, 1, 2, 2, 2]),
    "koala-700m": dict(_SDXL_COMMON, num_res_blocks=[1, 1, 1], transformer_depth=[0, 2, 5],
                       transformer_depth_middle=-2, transformer_depth_output=[0, 0, 2, 2, 5, 5]),
    "koala-1b": dict(_SDXL_COMMON, num_res_blocks=[1, 1, 1], transformer_depth=[0, 2, 6],
                     transformer_depth_middle=6, transformer_depth_output=[0, 0, 2, 2, 6, 6]),
}
# The same topologies, narrow (32 channels, 16-wide heads, a 64-wide text context) for fast
# tests; the y embedding keeps SDXL's 2816 (pooled text 1280 + six size embeddings of 256).
TINY_SDXL = {name: dict(cfg, model_channels=32, num_head_channels=16, context_dim=64)
             for name, cfg in SDXL_UNETS.items()}
SDXL_POOLED = 1280   # the pooled text width in SDXL's y


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


def sd_model(unet_config: dict | None = None, seed: int = 0, dtype: torch.dtype | None = None):
    """A ComfyUI MODEL (ModelPatcher) of an SD-style UNet with seeded random weights, built with
    the host's model class for its family (SDXL's where the config has SDXL's y embedding);
    ``dtype``: its weights' and computation's dtype (default: the host's choice for the device)."""
    import comfy.model_management as mm   # late: the host's modules exist once it runs (compat.start_host)
    import comfy.model_patcher
    import comfy.supported_models as sm
    cfg = dict(unet_config or TINY_UNET)
    model_config = (sm.SDXL if cfg.get("adm_in_channels") == 2816 else sm.SD15)(cfg)
    if dtype is not None:
        model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({})
    fill_(model.diffusion_model, seed)
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def conditioning(context_dim: int, seed: int, batch: int = 1, tokens: int = 77, pooled: int = 0):
    """A CONDITIONING of random text context; ``pooled``: with a pooled output of that width
    (SDXL's y takes SDXL_POOLED)."""
    g = torch.Generator().manual_seed(seed)
    extra = {"pooled_output": torch.randn(batch, pooled, generator=g)} if pooled else {}
    return [[torch.randn(batch, tokens, context_dim, generator=g), extra]]


@torch.no_grad()  # ComfyUI's CLIP constructor writes into its own parameters
def sd15_checkpoint(path: str, seed: int = 0) -> str:
    """Writes a full SD1.5-topology checkpoint (UNet + CLIP-L + VAE, random, fp16) that the
    stock CheckpointLoaderSimple loads. Reused when present."""
    if os.path.exists(path):
        return path
    import comfy.ldm.models.autoencoder as ae   # late: the host's modules exist once it runs (compat.start_host)
    import comfy.sd1_clip
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


# ---------------------------------------------------------------------------------------------
# Project-made model files, generated once into a cache outside the clone
# ---------------------------------------------------------------------------------------------

def cache() -> str:
    """Where project-made model files are kept between runs (outside the clone)."""
    return os.environ.get("ASDM_MODEL_CACHE", os.path.expanduser("~/.cache/asdm-comfyui/models"))


def random_bksdm_unet(layout: str = "base") -> str:
    """A project-made BK-SDM UNet of the real width (random weights, fp16, ldm layout), in
    ComfyUI's UNet folder; generated once into the cache outside the clone."""
    folder = os.path.join(cache(), "unet")
    name = f"asdm-random-bk-sdm-{layout}-v1.safetensors"
    path = os.path.join(folder, name)
    if not os.path.exists(path):
        os.makedirs(folder, exist_ok=True)
        student = compress(sd_model(SD15_UNET, seed=0), layout)
        fill_(student.model.diffusion_model, seed=11)
        save_unet(student, path, dtype=torch.float16)
    host.add_model_folder(compat.unet_folder(), folder)
    return name


def random_controlnet(unet_config: dict, seed: int = 3) -> str:
    """A project-made ControlNet for a UNet of ``unet_config`` (the host's own ControlNet class,
    seeded random weights, zero convs included so it changes what it controls), in ComfyUI's
    controlnet folder; generated once into the cache outside the clone."""
    import comfy.cldm.cldm   # late: the host's modules exist once it runs (compat.start_host)
    folder = os.path.join(cache(), "controlnet")
    digest = hashlib.sha1(json.dumps(unet_config, sort_keys=True).encode()).hexdigest()[:10]
    name = f"asdm-random-controlnet-{digest}-{seed}.safetensors"
    path = os.path.join(folder, name)
    if not os.path.exists(path):
        os.makedirs(folder, exist_ok=True)
        cfg = {k: v for k, v in unet_config.items() if k != "out_channels"}
        net = fill_(comfy.cldm.cldm.ControlNet(hint_channels=3, dtype=torch.float32, **cfg), seed)
        sd = {k: v.contiguous() for k, v in net.state_dict().items()}
        write_safetensors(sd, path)
    host.add_model_folder("controlnet", folder)
    return name


def random_sd15_checkpoint() -> str:
    """The project-made SD1.5-topology checkpoint (random weights), registered with ComfyUI's
    checkpoints folder; generated once into a cache outside the clone."""
    folder = os.path.join(cache(), "checkpoints")
    name = "asdm-random-sd15-v1.safetensors"
    sd15_checkpoint(os.path.join(folder, name), seed=0)
    host.add_model_folder("checkpoints", folder)
    return name
