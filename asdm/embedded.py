"""The embedded model: a small text-to-image model the project trains itself and ships in
``weights/embedded/``, so that the main job, the tests and a user with no SD weights make real
images with no download.

* UNet: SD1.5's layout (four levels, two layers per down block, three per up block, attention
  units where SD has them, a middle block), 32 channels wide at the first level instead of 320
  and a 64-wide text context instead of 768. At 64x64 pixels its latent is 8x8, so its levels
  split the FLOPs exactly as SD1.5's do at 512x512 (each level's width^2 x pixels are SD's / 100).
* Text encoder: a 2-layer CLIP text transformer (hidden 64) behind the host's own CLIP tokenizer
  and ``SDClipModel``, so the stock ``CLIPTextEncode`` drives it. Only the token embeddings of
  the words the dataset uses are stored; every other token embeds to zero.
* VAE: the host's ``AutoencoderKL`` (32 channels) with SD's latent shape (4 channels, 1/8 of the
  side) and SD1.5's latent scale (0.18215), so EmptyLatentImage, VAEDecode and the SD1.5 latent
  format apply unchanged.

Trained on ``asdm.training.shapes`` scenes by ``scripts/train_embedded.py`` (see
``asdm.training.embedded``).
"""
from __future__ import annotations

import functools
import json
import os

import torch

from . import derived_files, host_models, unet_files
from .errors import EmbeddedModelError
from .host_models import SD15_UNET_CONFIG

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEIGHTS = os.path.join(REPO_ROOT, "weights", "embedded")
FAMILY_UNETS = os.path.join(WEIGHTS, "unet")         # compressed / assembled UNets (asdm-embedded-*)
FAMILY_EXPERTS = os.path.join(WEIGHTS, "condconv")   # their ME-CondConv experts
IMAGE_SIZE = 64
CONTEXT_DIM = 64
UNET_CONFIG = dict(SD15_UNET_CONFIG, model_channels=32, context_dim=CONTEXT_DIM)
TEXT_CONFIG = {"hidden_size": CONTEXT_DIM, "intermediate_size": 256, "num_attention_heads": 4,
               "num_hidden_layers": 2, "hidden_act": "quick_gelu", "projection_dim": CONTEXT_DIM,
               "vocab_size": 49408, "max_position_embeddings": 77, "layer_norm_eps": 1e-05,
               "bos_token_id": 49406, "eos_token_id": 49407}   # current ComfyUI reads eos_token_id
VAE_CONFIG = {"double_z": True, "z_channels": 4, "resolution": IMAGE_SIZE, "in_channels": 3, "out_ch": 3,
              "ch": 32, "ch_mult": [1, 1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [],
              "dropout": 0.0}
FILES = {"unet": "unet/asdm-embedded-full.safetensors",   # beside its family, which derives from it
         "text": "text_encoder.safetensors", "vae": "vae.safetensors", "checker": "checker.safetensors"}
TOKEN_ROWS = "token_rows"      # which rows of the token embedding the text encoder file stores



def family_name(member: str) -> str:
    """The file name of a family member ("base", "m2", "tiny-condconv"), the same in the UNet
    folder and, for ME-CondConv members, in the experts folder."""
    return f"asdm-embedded-{member}.safetensors"


def path(part: str) -> str:
    return os.path.join(WEIGHTS, FILES[part])


def _require(p: str) -> str:
    if not os.path.isfile(p):
        raise EmbeddedModelError(f"the embedded model file {p} is missing; it ships with the pack "
                                 "(re-clone it), or rebuild it with: python scripts/train_embedded.py")
    return p


def text_config_file() -> str:
    """The host's SDClipModel reads its transformer config from a JSON file; it ships with the
    pack and must describe the embedded text encoder (TEXT_CONFIG)."""
    p = os.path.join(WEIGHTS, "text_encoder.json")
    fix = "restore it from the pack (e.g. git checkout weights/embedded/text_encoder.json)"
    try:
        with open(p) as f:
            found = json.load(f)
    except (OSError, ValueError) as e:
        raise EmbeddedModelError(f"{p} is missing or not valid JSON ({type(e).__name__}: {e}); {fix}") from None
    if found != TEXT_CONFIG:
        diff = sorted(k for k in set(found) | set(TEXT_CONFIG) if found.get(k) != TEXT_CONFIG.get(k)) \
            if isinstance(found, dict) else ["(not a JSON object)"]
        raise EmbeddedModelError(f"{p} does not describe the embedded text encoder (differs in "
                                 f"{', '.join(diff[:4])}); {fix}")
    return p


@functools.lru_cache(maxsize=None)
def _clip_classes():
    """The host's SD1 text-encoder and tokenizer classes, sized for the embedded model."""
    import comfy.sd1_clip as sd1   # late: the host's modules exist once it runs (compat.start_host)

    class EmbeddedClipL(sd1.SDClipModel):
        # current ComfyUI passes model_options here; the early host nothing more
        def __init__(self, device="cpu", dtype=None, **kw):
            super().__init__(device=device, dtype=dtype, textmodel_json_config=text_config_file(), **kw)

    class EmbeddedTextModel(sd1.SD1ClipModel):
        def __init__(self, device="cpu", dtype=None, **kw):
            super().__init__(device=device, dtype=dtype, clip_model=EmbeddedClipL, **kw)

    class EmbeddedTokenizer(sd1.SD1Tokenizer):
        def __init__(self, embedding_directory=None, **kw):
            tok = functools.partial(sd1.SDTokenizer, embedding_size=CONTEXT_DIM)
            super().__init__(embedding_directory=embedding_directory, tokenizer=tok, **kw)

    return EmbeddedTextModel, EmbeddedTokenizer


def new_clip():
    """A host CLIP object of the embedded text encoder (weights as constructed)."""
    model_cls, tok_cls = _clip_classes()
    with torch.no_grad():   # the host's CLIP constructor writes into its own parameters
        return host_models.make_clip(model_cls, tok_cls)


def text_state_dict(clip) -> dict:
    """The text encoder's weights for the file: token embedding rows of the known words only."""
    tm = text_transformer(clip)
    sd = {k: v.detach().float().clone() for k, v in tm.state_dict().items()}
    key = "text_model.embeddings.token_embedding.weight"
    rows = torch.nonzero(sd[key].abs().sum(1) > 0).flatten()
    sd[key] = sd[key][rows].contiguous()
    sd[TOKEN_ROWS] = rows.to(torch.int32)
    return sd


def load_text_state(clip, sd: dict) -> None:
    key = "text_model.embeddings.token_embedding.weight"
    if TOKEN_ROWS not in sd or key not in sd:
        raise EmbeddedModelError("the text encoder file has no token embedding rows; it is not the "
                                 "embedded model's text encoder")
    sd = dict(sd)
    full = torch.zeros(TEXT_CONFIG["vocab_size"], CONTEXT_DIM)
    full[sd.pop(TOKEN_ROWS).long()] = sd[key].float()
    sd[key] = full
    tm = text_transformer(clip)
    own = tm.state_dict()
    missing = [k for k in own if k not in sd]
    if missing or any(own[k].shape != sd[k].shape for k in own):
        raise EmbeddedModelError(f"the text encoder file does not fit the embedded text encoder "
                                 f"(missing {missing[:3]}); it is damaged or from another model")
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(sd[k])


def text_transformer(clip) -> torch.nn.Module:
    """The CLIP text transformer inside a host CLIP object."""
    return clip.cond_stage_model.clip_l.transformer


def token_ids(clip, captions: list[str]) -> torch.Tensor:
    """[N, 77] token ids exactly as CLIPTextEncode feeds them to the transformer."""
    out = []
    for c in captions:
        chunks = clip.tokenize(c)["l"]
        if len(chunks) != 1:
            raise EmbeddedModelError(f"caption longer than 75 tokens: {c!r}")
        out.append([t for t, _ in chunks[0]])
    return torch.tensor(out, dtype=torch.long)


def new_vae_model():
    """The host's AutoencoderKL in the embedded model's size (weights as constructed)."""
    import comfy.ldm.models.autoencoder as ae   # late: the host's modules exist once it runs (compat.start_host)
    return ae.AutoencoderKL(ddconfig=VAE_CONFIG, embed_dim=4)


def load(folder: str | None = None):
    """(MODEL, CLIP, VAE) of the embedded model, as the stock sampler and decode nodes take them."""
    folder = folder or WEIGHTS
    files = {k: _require(os.path.join(folder, v)) for k, v in FILES.items() if k != "checker"}
    model = derived_files.load_unet(files["unet"], "eps")
    text_config_file()   # checked before the host reads it
    clip = new_clip()
    load_text_state(clip, unet_files.read_safetensors(files["text"])[0])
    try:
        vae = host_models.make_vae(unet_files.read_safetensors(files["vae"])[0], VAE_CONFIG)
    except ValueError as e:
        raise EmbeddedModelError(f"{files['vae']}: {e}; restore the pack's own vae.safetensors") from None
    return model, clip, vae
