"""ComfyUI MODEL, CLIP and VAE objects built from a config and weights, as the host's own
loaders build them: the compressed / assembled UNets and the embedded model use these."""
from __future__ import annotations

import copy

import torch

from . import compat
from .errors import ASDMError

# What a UNet can predict, in the words model_from_config takes ("v_prediction" is read as "v").
PREDICTIONS = ("eps", "v")

# ComfyUI's unet_config of SD1.5's UNet: 4 levels (320, 640, 1280, 1280 channels), 2 layers per
# down block and 3 per up block, attention units in the first three levels and the middle.
SD15_UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
    "context_dim": 768, "num_heads": 8, "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}


def model_from_config(model_config, sd: dict, prediction: str = "eps", check=None, zsnr: bool = False,
                      like=None):
    """ModelPatcher for ``model_config`` with the weights ``sd`` (ldm keys, no prefix).
    ``check(unet, sd)`` runs on the built UNet before the weights are loaded. ``zsnr``: it samples
    with the zero-terminal-SNR schedule (v-prediction fine-tunes trained with it). ``like``: a
    MODEL it is made from (compressed, assembled), whose weight and compute dtypes it keeps, as
    the host's model merging keeps the first model's; else the host's choice for the device."""
    check_prediction(prediction)
    import comfy.model_base   # late: the host's modules exist once it runs (compat.start_host)
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.utils
    load_device = mm.get_torch_device()
    offload_device = mm.unet_offload_device()
    dtypes = model_config.supported_inference_dtypes
    if like is not None:
        model_config.set_inference_dtype(like.model.get_dtype(), getattr(like.model, "manual_cast_dtype", None))
    else:
        unet_dtype = mm.unet_dtype(model_params=comfy.utils.calculate_parameters(sd), supported_dtypes=dtypes)
        model_config.set_inference_dtype(unet_dtype, mm.unet_manual_cast(unet_dtype, load_device, dtypes))
    mt = comfy.model_base.ModelType
    kind = {"eps": mt.EPS, "v": mt.V_PREDICTION, "v_prediction": mt.V_PREDICTION}[prediction]
    model_config.model_type = lambda *a, **k: kind   # the weights cannot tell eps from v
    model = model_config.get_model(sd, "")
    if zsnr:
        compat.zero_terminal_snr(model)
    if check is not None:
        check(model.diffusion_model, sd)
    model = model.to(offload_device)
    model.load_model_weights(dict(sd), "")
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)


def check_prediction(prediction, auto: bool = False) -> None:
    """Refuses a prediction type the host has no model type for (``auto``: "auto" is allowed too,
    the loaders' choice of what the file records)."""
    choices = (("auto",) if auto else ()) + PREDICTIONS
    if prediction not in choices and prediction != "v_prediction":
        raise ASDMError(f"prediction must be one of {', '.join(choices)} (got {str(prediction)[:40]!r}): eps "
                        "for SD1.x, BK-SDM and SD2-base UNets, v for UNets of a 768-v SD2 model",
                        input="prediction")


def empty_unet(model_config):
    """The UNet module ``model_config`` builds, on the meta device: its structure (to name its
    entries), no weights."""
    import comfy.model_base   # late: the host's modules exist once it runs (compat.start_host)
    return comfy.model_base.BaseModel(copy.deepcopy(model_config), device="meta").diffusion_model


def prediction(patcher) -> str:
    """What a MODEL's UNet predicts, in the words model_from_config takes: "eps" or "v"."""
    return "v" if "V_PREDICTION" in str(patcher.model.model_type) else "eps"


def zero_snr(patcher) -> bool:
    """Whether a MODEL samples with the zero-terminal-SNR schedule (model_from_config's ``zsnr``;
    the host's own loader sets the same setting for a file marked 'ztsnr')."""
    return bool(patcher.model.model_config.sampling_settings.get("zsnr", False))


def conditioning_kind(patcher) -> dict:
    """What sampling a MODEL needs from the graph: its latent format, the width of the text
    context its cross-attention reads, and how its class embedding ``y`` is made from the
    conditioning (the host's model class that encodes it, and its width; SDXL's: pooled text
    and six size embeddings, 2816 wide). Models that agree on all three take the same LATENT
    and CONDITIONING, whatever the host calls their classes (SDXL, SSD1B, KOALA_700M, ...)."""
    m = patcher.model
    cfg = m.model_config.unet_config
    adm = cfg.get("adm_in_channels")
    encoder = type(m).encode_adm.__qualname__.split(".")[0]   # the class whose encode_adm builds y
    return {"latent format": type(m.latent_format).__name__,
            "context width": cfg.get("context_dim"),
            "y encoding": f"{encoder}, {adm} wide" if adm else "none"}


def unet_state_dict(patcher) -> dict:
    """The UNet weights as this MODEL applies them (its own weight patches baked in), however the
    host loaded it (``compat.patched_state_dict``). Loading it through the model manager first
    unpatches any loaded clone that shares these weights (a LoRA'd copy of the same checkpoint
    elsewhere)."""
    return compat.patched_state_dict(patcher)


def make_clip(model_cls, tokenizer_cls):
    """A host CLIP object around ``model_cls`` / ``tokenizer_cls`` (SD1-style classes). Current
    ComfyUI passes extra keyword arguments (model_options, tokenizer_data) to both; the classes
    take them through ``**kw``."""
    import comfy.sd   # late: the host's modules exist once it runs (compat.start_host)
    import comfy.supported_models_base as smb
    import folder_paths
    target = smb.ClipTarget(tokenizer_cls, model_cls)
    return comfy.sd.CLIP(target, embedding_directory=folder_paths.get_folder_paths("embeddings"))


def make_vae(sd: dict, ddconfig: dict):
    """A host VAE object of an AutoencoderKL with ``ddconfig`` holding exactly ``sd``."""
    import comfy.sd   # late: the host's modules exist once it runs (compat.start_host)
    import comfy.ldm.models.autoencoder as ae
    missing = [k for k in ("encoder.conv_in.weight", "decoder.conv_out.weight") if k not in sd]
    if missing:
        raise ValueError(f"not an AutoencoderKL state dict (no {missing[0]})")
    with torch.device("meta"):   # the shapes the architecture wants, before the host loads anything
        own = ae.AutoencoderKL(ddconfig=ddconfig, embed_dim=4).state_dict()
    bad = [k for k in own if k not in sd or own[k].shape != sd[k].shape]
    if bad:   # the host loads non-strictly and only logs; a partial VAE must not pass silently
        k = bad[0]
        got = tuple(sd[k].shape) if k in sd else "missing"
        raise ValueError(f"the VAE weights do not fit the architecture ({len(bad)} tensors, e.g. {k}: "
                         f"{got}, expected {tuple(own[k].shape)}); it is another model's VAE")
    return comfy.sd.VAE(sd=sd, config={"params": {"ddconfig": ddconfig, "embed_dim": 4}})
