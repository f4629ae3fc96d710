"""Loading SD- and SDXL-family UNets of any block layout from safetensors (BK-SDM §3.1, A-SDM §IV).

Two layouts are read:

* **diffusers** (``conv_in.weight``, ``down_blocks.0.resnets.0...``): BK-SDM Base / Small /
  Tiny, v1 and v2, their ``-2m`` retrains, Segmind's small/tiny SD, SDXL, SSD-1B, Vega, KOALA. The block layout is
  inferred from the keys (layers per block, attention per layer, middle block or none, number
  of levels), because the ``config.json`` of a block-removed UNet may still describe the
  teacher, and the host's own diffusers path only matches a fixed list of configs.
* **ldm / ComfyUI** (``input_blocks.0.0.weight``, optionally under ``model.diffusion_model.``):
  the host's ``detect_unet_config`` reads any layer-count mix already.

Either way the result is ldm keys plus a ComfyUI ``unet_config``; the MODEL is built from the
SD1.x (context 768), SD2.x (context 1024, linear projections) or SDXL (its y: pooled text and
size embeddings, 2816 wide) model class, so it works with the CLIP and VAE of that family.
SDXL's family holds SDXL itself, its block-removed students (SSD-1B, Vega, KOALA-700M / 1B) and
any layer and depth mix the host's UNet can hold, the class embedding (``label_emb``) included. Every key must be used and every parameter filled: a file
that does not fit is an error, never a silently half-loaded model. Files that store only what
they add to another UNet file are read whole by ``derived_files``.
"""
from __future__ import annotations

import hashlib
import os
import re
from collections import defaultdict

import safetensors
import safetensors.torch
import torch

from . import host_models
from .errors import UNetFileError

PICKLE_EXTENSIONS = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
LDM_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
ASDM_FORMAT = "asdm-unet-v1"   # metadata "asdm.format" of UNets this pack saves


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------

def read_safetensors(path: str) -> tuple[dict, dict]:
    """(state dict, metadata) of a safetensors file; pickles and unreadable files are errors."""
    name = os.path.basename(path)
    if path.lower().endswith(PICKLE_EXTENSIONS):
        raise UNetFileError(
            f"{name} is a pickle checkpoint; A-SDM loads safetensors only, because a pickle can "
            "run code when it is opened. Convert it once with a trusted tool (e.g. "
            "safetensors.torch.save_file) and load the .safetensors file")
    if not os.path.isfile(path):
        raise UNetFileError(f"{path} does not exist")
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # SafetensorError, OSError, ...: say which file and what to do
        raise UNetFileError(
            f"could not read {name} as safetensors ({type(e).__name__}: {e}); the file is "
            "corrupt, truncated or not a safetensors file — re-download or re-save it") from None
    if meta.get(STORAGE) == INT8:
        sd = dequantize_int8(sd, name)
    return sd, meta


def write_safetensors(sd: dict, path: str, metadata: dict | None = None, int8: bool = False) -> None:
    """Writes a safetensors file atomically: to a temporary name beside it, then renamed, so a
    crash leaves the old file or the new one, never half of one. ``int8``: store its weights as
    int8 codes (``quantize_int8``); ``read_safetensors`` gives them back as fp16."""
    metadata = dict(metadata or {})
    metadata.pop(STORAGE, None)
    if int8:
        sd = quantize_int8(sd)
        metadata[STORAGE] = INT8
    tmp = path + ".tmp"
    safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, tmp,
                                metadata={k: str(v) for k, v in metadata.items()})
    os.replace(tmp, path)


# Storage in int8, for the pack's own embedded family (it ships in the repository, so its size
# matters; SD-sized user files are never written this way). Each float weight of 2+ dimensions
# and 1024+ values is stored as int8 codes q and a float32 scale s per output channel (symmetric:
# s = max|w| / 127 over the channel), taken from its fp16 value; reading gives fp16(q * s). The
# weight moves by at most s / 2 (half a code): far less than what separates two family members
# (docs/embedded-model.md gives the images' difference).
STORAGE = "asdm.storage"
INT8 = "int8-per-output-channel"
INT8_SCALE = ".int8_scale"   # the scale of tensor K is stored as K + INT8_SCALE


def quantize_int8(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        if k.endswith(INT8_SCALE):
            raise UNetFileError(f"tensor name {k} ends with {INT8_SCALE}, which int8 storage reserves")
        if not (v.is_floating_point() and v.dim() >= 2 and v.numel() >= 1024):
            out[k] = v
            continue
        w = v.detach().cpu().half().float().reshape(v.shape[0], -1)
        s = (w.abs().amax(1) / 127).clamp_min(torch.finfo(torch.float32).tiny)
        out[k] = torch.round(w / s[:, None]).clamp_(-127, 127).to(torch.int8).reshape(v.shape)
        out[k + INT8_SCALE] = s
    return out


def dequantize_int8(sd: dict, name: str = "the file") -> dict:
    out = {k: v for k, v in sd.items() if not k.endswith(INT8_SCALE)}
    for k, v in out.items():
        s = sd.get(k + INT8_SCALE)
        if v.dtype != torch.int8 and s is None:
            continue
        if v.dtype != torch.int8 or s is None or s.dim() != 1 or s.shape[0] != v.shape[0]:
            raise UNetFileError(f"{name} is stored in int8 but its tensor {k} has no matching per-channel "
                                "scale; the file is damaged — restore it from the pack")
        out[k] = (v.float().reshape(v.shape[0], -1) * s.float()[:, None]).reshape(v.shape).half()
    stray = [k for k in sd if k.endswith(INT8_SCALE) and k[:-len(INT8_SCALE)] not in out]
    if stray:
        raise UNetFileError(f"{name} holds int8 scales for missing tensors ({stray[0]}); the file is "
                            "damaged — restore it from the pack")
    return out


UNET_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def tensor_digest(sd: dict, keys=None) -> str:
    """sha256 over the names, dtypes, shapes and bytes of ``sd``'s tensors (``keys``: those only),
    in name order: equal digests, equal tensors."""
    h = hashlib.sha256()
    for k in sorted(sd if keys is None else keys):
        v = sd[k].detach().cpu().contiguous()
        h.update(f"{k}:{v.dtype}:{tuple(v.shape)};".encode())
        h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()


def check_weights(sd: dict) -> None:
    """Refuses weights a UNet cannot use: non-float dtypes (int8 and other quantized formats
    this loader does not dequantize) and non-finite values (one NaN makes every image NaN)."""
    for k, v in sd.items():
        if v.dtype not in UNET_DTYPES:
            raise UNetFileError(f"tensor {k} is {str(v.dtype).replace('torch.', '')}; a UNet needs "
                                "float16, bfloat16 or float32 weights (this file is quantized or not a UNet)")
    for k, v in sd.items():
        bad = int((~torch.isfinite(v)).sum())
        if bad:
            raise UNetFileError(f"tensor {k} holds {bad} NaN/Inf values; the file is damaged — "
                                "re-download or re-save it")


def layout_of(sd: dict) -> str:
    if any(p + "input_blocks.0.0.weight" in sd for p in ("",) + LDM_PREFIXES):
        return "ldm"
    if "conv_in.weight" in sd and any(k.startswith("down_blocks.") for k in sd):
        return "diffusers"
    hint = _what_is_it(sd)
    raise UNetFileError(
        "this file holds no SD-style UNet (no 'input_blocks.*' or 'conv_in' + 'down_blocks.*' "
        f"keys){hint}; choose a UNet file (diffusers 'unet/diffusion_pytorch_model.safetensors' "
        "or a ComfyUI/ldm UNet)")


def _what_is_it(sd: dict) -> str:
    keys = list(sd)[:2000]
    if any("lora_" in k or ".lora." in k for k in keys):
        return "; it looks like a LoRA"
    if any(k.startswith(("encoder.", "decoder.", "first_stage_model.")) for k in keys):
        return "; it looks like a VAE"
    if any("text_model" in k or k.startswith(("cond_stage_model.", "transformer.")) for k in keys):
        return "; it looks like a text encoder"
    return ""


def to_ldm(sd: dict) -> dict:
    """ldm-layout UNet keys (no prefix) from either layout."""
    if layout_of(sd) == "diffusers":
        return diffusers_to_ldm(sd)
    for p in LDM_PREFIXES:
        if p + "input_blocks.0.0.weight" in sd:
            return {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}
    return dict(sd)


# ---------------------------------------------------------------------------------------------
# diffusers -> ldm, with the layout read from the keys
# ---------------------------------------------------------------------------------------------

_DIFF_RE = re.compile(r"^(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.*)$")
_MID_RE = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)\.(.*)$")
_TB_RE = re.compile(r"^transformer_blocks\.(\d+)\.")


def _resnet_map() -> dict:
    import comfy.utils   # late: the host's modules exist once it runs (compat.start_host)
    return {d: l for l, d in comfy.utils.UNET_MAP_RESNET.items()}  # diffusers suffix -> ldm


def _basic_map() -> dict:
    import comfy.utils   # late: the host's modules exist once it runs (compat.start_host)
    return {d: l for l, d in comfy.utils.UNET_MAP_BASIC}


def diffusers_to_ldm(sd: dict) -> dict:
    parts: dict = defaultdict(dict)   # (side, block, kind, index) -> {suffix: tensor}
    mid: dict = defaultdict(dict)
    out, unknown = {}, []
    basic = _basic_map()
    for k, v in sd.items():
        if m := _DIFF_RE.match(k):
            side, b, kind, i, rest = m.groups()
            parts[(side, int(b), kind, int(i))][rest] = v
        elif m := _MID_RE.match(k):
            mid[(m.group(1), int(m.group(2)))][m.group(3)] = v
        elif k in basic:
            out[basic[k]] = v
        else:
            unknown.append(k)
    if unknown:
        raise UNetFileError(f"{len(unknown)} keys are not part of a diffusers UNet, e.g. {unknown[:4]}")

    def count(side, b, kind):
        return len({i for (s, bb, kk, i) in parts if (s, bb, kk) == (side, b, kind)})

    n_down = 1 + max(b for (s, b, _, _) in parts if s == "down")
    n_up = 1 + max(b for (s, b, _, _) in parts if s == "up")
    if n_down != n_up:
        raise UNetFileError(f"the UNet has {n_down} down blocks but {n_up} up blocks; an SD-style "
                            "UNet has one up block per down block")
    down_layers = [count("down", b, "resnets") for b in range(n_down)]
    up_layers = [count("up", b, "resnets") for b in range(n_up)]
    for b in range(n_down):
        ub = n_down - 1 - b
        if up_layers[ub] != down_layers[b] + 1:
            raise UNetFileError(
                f"down_blocks.{b} has {down_layers[b]} layers but up_blocks.{ub} has {up_layers[ub]}; "
                "each up block needs one layer more than its mirrored down block (one per skip "
                "connection), and ComfyUI's UNet cannot hold other layouts")
        has_ds = count("down", b, "downsamplers") > 0
        has_us = count("up", b, "upsamplers") > 0
        if has_ds != (b < n_down - 1) or has_us != (b < n_up - 1):
            raise UNetFileError(f"down/up sampler layout of block {b} is not SD-style (every level "
                                "but the deepest halves the resolution)")

    resnet = _resnet_map()

    def put_resnet(src: dict, dst: str, where: str):
        for suf, v in src.items():
            if suf not in resnet:
                raise UNetFileError(f"unexpected ResNet key {where}.{suf}")
            out[f"{dst}.{resnet[suf]}"] = v

    def put_attn(src: dict, dst: str):
        for suf, v in src.items():
            out[f"{dst}.{suf}"] = v      # attention keys are the same in both layouts

    def put_sampler(src: dict, dst: str, down: bool):
        for suf, v in src.items():
            out[f"{dst}.{'op' if down else 'conv'}.{suf.split('.', 1)[1]}"] = v

    n = 1
    for b in range(n_down):
        for i in range(down_layers[b]):
            put_resnet(parts[("down", b, "resnets", i)], f"input_blocks.{n}.0", f"down_blocks.{b}.resnets.{i}")
            if ("down", b, "attentions", i) in parts:
                put_attn(parts[("down", b, "attentions", i)], f"input_blocks.{n}.1")
            n += 1
        if ("down", b, "downsamplers", 0) in parts:
            put_sampler(parts[("down", b, "downsamplers", 0)], f"input_blocks.{n}.0", True)
            n += 1
    if mid:
        # ComfyUI's middle block is ResNet, attention, ResNet, or one ResNet without attention
        # (SSD-1B, Vega: diffusers' UNetMidBlock2D without attention)
        has_attn, resnets = ("attentions", 0) in mid, len([k for k in mid if k[0] == "resnets"])
        if resnets != (2 if has_attn else 1) or any(k not in (("attentions", 0), ("resnets", 0), ("resnets", 1)) for k in mid):
            raise UNetFileError(f"the middle block holds {resnets} ResNets and {'an' if has_attn else 'no'} attention; "
                                "ComfyUI's UNet holds ResNet, attention, ResNet or a single ResNet")
        put_resnet(mid[("resnets", 0)], "middle_block.0", "mid_block.resnets.0")
        if has_attn:
            put_attn(mid[("attentions", 0)], "middle_block.1")
            put_resnet(mid[("resnets", 1)], "middle_block.2", "mid_block.resnets.1")
    n = 0
    for b in range(n_up):
        for i in range(up_layers[b]):
            put_resnet(parts[("up", b, "resnets", i)], f"output_blocks.{n}.0", f"up_blocks.{b}.resnets.{i}")
            c = 1
            if ("up", b, "attentions", i) in parts:
                put_attn(parts[("up", b, "attentions", i)], f"output_blocks.{n}.1")
                c = 2
            if i == up_layers[b] - 1 and ("up", b, "upsamplers", 0) in parts:
                put_sampler(parts[("up", b, "upsamplers", 0)], f"output_blocks.{n}.{c}", False)
            n += 1
    return out


# ---------------------------------------------------------------------------------------------
# Family and MODEL
# ---------------------------------------------------------------------------------------------

def unet_config(sd_ldm: dict) -> dict:
    import comfy.model_detection   # late: the host's modules exist once it runs (compat.start_host)
    try:
        cfg = comfy.model_detection.detect_unet_config(sd_ldm, "")
    except (KeyError, IndexError) as e:
        raise UNetFileError(f"the UNet keys are incomplete (missing {e}); the file is damaged or "
                            "not an SD-style UNet") from None
    return cfg


EMBEDDED_CONTEXT = 64
SDXL_Y = 2816      # SDXL's y: pooled CLIP-G text (SDXL_POOLED) and six size embeddings of 256
SDXL_POOLED = 1280
REFINER_Y = 2560   # the SDXL Refiner's y: pooled text and an aesthetic score instead of the target size


def family_of(cfg: dict) -> str:
    """'SD1', 'SD2', 'SDXL' (SDXL and every block-removed or fine-tuned UNet with its y: SSD-1B,
    Vega, KOALA, layouts of A-SDM's) or 'embedded' from a unet_config; anything else is an
    error naming what it is."""
    ctx, linear, adm = cfg.get("context_dim"), cfg.get("use_linear_in_transformer"), cfg.get("adm_in_channels")
    if cfg.get("use_temporal_attention") or cfg.get("use_temporal_resblock"):
        raise UNetFileError("this is a video UNet (temporal layers, e.g. Stable Video Diffusion); A-SDM's "
                            "UNet nodes handle image UNets of the SD1.x, SD2.x and SDXL families")
    if cfg.get("in_channels", 4) != 4 or cfg.get("out_channels", 4) != 4:
        raise UNetFileError(f"this UNet has {cfg.get('in_channels')} input channels (an inpainting or "
                            "instruct-pix2pix variant); only plain text-to-image UNets (4 latent channels) "
                            "are supported")
    if adm == REFINER_Y:
        raise UNetFileError(f"this is the SDXL Refiner (y {REFINER_Y} wide: pooled text and an aesthetic "
                            "score, context 1280); it takes other conditioning than SDXL and its students "
                            "and refines only the last steps, so A-SDM's UNet nodes do not handle it — load "
                            "it with ComfyUI's own loaders")
    if adm == SDXL_Y and linear:
        # Real files read context 2048 (CLIP-L + CLIP-G); any other width (the tests' narrow
        # UNets) is the same family with another text encoder: the switch and assembly compare it.
        return "SDXL"
    if adm:
        raise UNetFileError(f"this UNet takes a class embedding y {adm} wide (e.g. SD2.1 unCLIP: 1536 or "
                            f"2048), which A-SDM's UNet nodes do not encode; SDXL-family UNets take {SDXL_Y}")
    if ctx == 768 and not linear:
        return "SD1"
    if ctx == 1024 and linear:
        return "SD2"
    if ctx == EMBEDDED_CONTEXT and not linear:
        return "embedded"   # the pack's own small model (asdm.embedded): SD1.5 layout, 64-wide text
    raise UNetFileError(f"unknown UNet family: context dim {ctx}, linear projections {linear}; "
                        "expected SD1.x (768, conv projections), SD2.x (1024, linear) or SDXL "
                        f"(y {SDXL_Y} wide)")


def _attention_levels(cfg: dict) -> list[bool]:
    """Per level: whether any of its down or up layers holds attention."""
    n = len(cfg["channel_mult"])
    res = cfg["num_res_blocks"]
    res = list(res) if isinstance(res, (list, tuple)) else [res] * n
    down, up = list(cfg.get("transformer_depth") or []), list(cfg.get("transformer_depth_output") or [])
    out, i, j = [], 0, 0
    for level in range(n):   # transformer_depth_output lists the levels shallow first, like transformer_depth
        out.append(any(down[i:i + res[level]]) or any(up[j:j + res[level] + 1]))
        i, j = i + res[level], j + res[level] + 1
    return out


def _heads_check(cfg: dict, family: str, config: dict | None):
    """Head counts are not in the weights; the family fixes them (SD1: 8 heads, SD2 and SDXL:
    64-wide heads). A diffusers config.json that says otherwise names a UNet this loader cannot
    reproduce exactly, so it is refused rather than loaded wrong. Levels without attention
    (SDXL's first) have no heads to compare."""
    if not config or "attention_head_dim" not in config:
        return
    mc, mult = cfg["model_channels"], cfg["channel_mult"]
    heads = config.get("num_attention_heads") or config["attention_head_dim"]
    heads = list(heads if isinstance(heads, (list, tuple)) else [heads] * len(mult))[:len(mult)]
    want = [8] * len(mult) if family in ("SD1", "embedded") else [mc * m // 64 for m in mult]
    attn = _attention_levels(cfg)
    if [h for h, a in zip(heads, attn) if a] != [w for w, a in zip(want, attn) if a]:
        raise UNetFileError(f"config.json gives attention heads {heads}, but an {family}-family "
                            f"UNet of this width has {want}; this head layout is not supported")


def model_config(cfg: dict):
    """The host's model config (its model class) for a UNet of this ``unet_config``. The SDXL
    family is built with SDXL's class, as the host builds SSD-1B, Vega and KOALA (its classes
    for them differ from SDXL's only in what they match), so a layout of any layer and depth
    mix samples as SDXL does."""
    import comfy.supported_models as sm   # late: the host's modules exist once it runs (compat.start_host)
    return {"SD2": sm.SD20, "SDXL": sm.SDXL}.get(family_of(cfg), sm.SD15)(cfg)


# Keys a UNet file may hold beside its weights that say how it samples, as the host's SDXL class
# reads them (its model_type): 'v_pred' (v-prediction), 'ztsnr' (with zero terminal SNR);
# 'edm_*' mark EDM-schedule UNets (Playground v2.5, EDM v-prediction), which A-SDM does not take.
SAMPLING_MARKS = ("v_pred", "ztsnr")
EDM_MARKS = ("edm_mean", "edm_std", "edm_vpred.sigma_max", "edm_vpred.sigma_min")


def split_marks(sd: dict) -> tuple[dict, dict]:
    """(the weights, the sampling marks) of a state dict; an EDM-marked file is refused."""
    edm = [k for k in EDM_MARKS if k in sd]
    if edm:
        raise UNetFileError(f"this UNet is marked '{edm[0]}': it samples on an EDM schedule (Playground "
                            "v2.5, EDM v-prediction), which A-SDM's UNet nodes do not take; load it with "
                            "ComfyUI's own UNet loader")
    marks = {k: sd[k] for k in SAMPLING_MARKS if k in sd}
    return {k: v for k, v in sd.items() if k not in marks}, marks


def sampling_marks(prediction: str, zsnr: bool) -> dict:
    """The marks a saved SDXL-family file carries so the host's own loader samples it as this
    pack does (it reads them only for SDXL's class)."""
    marks = {}
    if prediction == "v":
        marks["v_pred"] = torch.tensor([])
        if zsnr:
            marks["ztsnr"] = torch.tensor([])
    return marks


def build_model(sd_ldm: dict, prediction: str = "eps", config: dict | None = None, zsnr: bool = False):
    """A ComfyUI MODEL (ModelPatcher) holding exactly these weights."""
    cfg = unet_config(sd_ldm)
    _heads_check(cfg, family_of(cfg), config)
    return host_models.model_from_config(model_config(cfg), sd_ldm, prediction, check_keys, zsnr)


def check_keys(unet: torch.nn.Module, sd_ldm: dict):
    own = unet.state_dict()
    missing = [k for k in own if k not in sd_ldm]
    extra = [k for k in sd_ldm if k not in own]
    if missing or extra:
        raise UNetFileError(
            f"the weights do not fit the UNet their keys describe: {len(missing)} missing "
            f"(e.g. {missing[:3]}), {len(extra)} unexpected (e.g. {extra[:3]}); the file is "
            "damaged or mixes layouts")
    bad = [k for k, v in own.items() if v.shape != sd_ldm[k].shape]
    if bad:
        k = bad[0]
        raise UNetFileError(f"{len(bad)} weights have the wrong shape, e.g. {k}: file "
                            f"{tuple(sd_ldm[k].shape)}, expected {tuple(own[k].shape)}")
