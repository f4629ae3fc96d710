"""Training of the embedded model (``asdm.embedded``) from the procedural scenes of
``asdm.training.shapes``: ``python scripts/train_embedded.py`` (CPU).

Stages, each written to ``weights/embedded/`` and skipped when its file exists (``--force``):

1. ``vae``: the AutoencoderKL on the scene images (L1 + L2 reconstruction, shape pixels weighted
   up, a small KL term), then
   rescaled exactly (encoder mean x c, log-variance + 2 ln c, decoder input / c) so that its
   latents x 0.18215 have unit standard deviation, as SD1.5's do.
2. ``unet``: UNet and text encoder together from scratch on the VAE's latent means and the
   captions of ``UNET_SCENES`` scenes, SD's objective (noise prediction, DDPM schedule of the
   SD1.5 model config) weighted min-SNR-5, 10 % of captions dropped to "" so that
   classifier-free guidance works, a layout read-out on the text encoder and two-shape-heavy
   batches so that each shape is bound to its place (see ``train_text_to_image``); EMA weights
   are saved.
3. ``family``: BK-SDM Base / Small / Tiny from the UNet, M2 (Base's shallow blocks in the UNet,
   the UNet's blocks frozen), ME-CondConv experts trained on Small and Tiny (the UNets frozen, so
   those members' UNet files derive from Small's / Tiny's), all with the project's trainer
   (``asdm.training.trainer``).

(The evaluation's attribute checker is trained on the same scenes by the same script:
``asdm.evaluation.checker``.)

Every random draw comes from generators seeded by (seed, step): the same seed gives the same
weights on the same machine and thread count.
"""
from __future__ import annotations

import functools
import json
import math
import os
import shutil
import time

import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F

from .. import assembly, derived_files, embedded, host_models, unet_files
from . import distill, shapes
from . import trainer as train
from .steps import set_cosine_lr, step_generator

N_SCENES = 4000          # the VAE's, the checker's and the family's scenes
UNET_SCENES = 16000      # the text-to-image stage's: more layouts per caption, less memorised
MIN_SNR = 5.0            # min-SNR loss weighting (Hang et al., 2023), see train_text_to_image
LAYOUT_WEIGHT = 0.05     # the text encoder's layout read-out, see train_text_to_image
TWO_SHAPE_SHARE = 0.75   # of each UNet-stage batch
EOS_TOKEN = 49407        # CLIP's end of text


def init_(module: torch.nn.Module, zero_out: tuple[str, ...] = ()) -> torch.nn.Module:
    """PyTorch's default init for the host's layers (which it builds uninitialised), and zero
    for the residual output layers SD zero-initialises."""
    bases = (torch.nn.Conv2d, torch.nn.Conv1d, torch.nn.Linear, torch.nn.GroupNorm, torch.nn.LayerNorm,
             torch.nn.Embedding)
    for name, m in module.named_modules():
        base = next((b for b in bases if isinstance(m, b)), None)
        if base is not None:
            base.reset_parameters(m)
            if name.endswith(zero_out):
                torch.nn.init.zeros_(m.weight)
                if getattr(m, "bias", None) is not None:
                    torch.nn.init.zeros_(m.bias)
    return module


def images_tensor(scenes) -> torch.Tensor:
    """[N, 3, H, W] in [-1, 1], the VAE's input convention."""
    x = torch.from_numpy(np.stack([s.image for s in scenes])).float() / 127.5 - 1
    return x.permute(0, 3, 1, 2).contiguous()


# ---------------------------------------------------------------------------------------------
# 1. VAE
# ---------------------------------------------------------------------------------------------

def train_vae(images: torch.Tensor, steps: int, batch: int, seed: int, log=print):
    torch.manual_seed(seed)
    vae = init_(embedded.new_vae_model())
    vae.train()
    lr = 1.5e-3
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    t0 = time.time()
    for step in range(steps):
        g = step_generator(seed, step)
        x = images[torch.randint(0, len(images), (batch,), generator=g)]
        moments = vae.quant_conv(vae.encoder(x))
        mean, logvar = moments.chunk(2, 1)
        logvar = logvar.clamp(-30, 20)
        z = mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=g)
        rec = vae.decoder(vae.post_quant_conv(z))
        kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).mean()
        # shapes cover ~10 % of the pixels: weight them up so their colours are learnt early
        bg = x[:, :, :2, :2].mean((2, 3), keepdim=True)
        weight = 1 + 9 * ((x - bg).abs().sum(1, keepdim=True) > 0.3).float()
        loss = (weight * ((rec - x).abs() + (rec - x) ** 2)).mean() + 1e-4 * kl
        set_cosine_lr(opt, lr, step, steps, floor=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 50 == 0:
            log(f"vae step {step + 1}/{steps}  l1 {(rec - x).abs().mean().item():.4f}  kl {kl.item():.3f}  "
                f"({(time.time() - t0) / (step + 1):.2f} s/step)")
    vae.eval()
    return vae


@torch.no_grad()
def latent_means(vae, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Encoder means (the VAE's unscaled latent convention)."""
    return torch.cat([vae.quant_conv(vae.encoder(images[i:i + batch])).chunk(2, 1)[0]
                      for i in range(0, len(images), batch)])


@torch.no_grad()
def rescale_vae(vae, c: float) -> None:
    """Multiplies the latent by ``c`` without changing what decodes: an exact re-parametrisation."""
    w, b = vae.quant_conv.weight, vae.quant_conv.bias
    w[:4] *= c
    b[:4] *= c
    b[4:] += 2 * math.log(c)
    vae.post_quant_conv.weight /= c


# ---------------------------------------------------------------------------------------------
# 2. UNet + text encoder
# ---------------------------------------------------------------------------------------------

def _clip_layer_forward(layer, x, mask=None, optimized_attention=None):
    # the host's CLIPLayer adds its residuals in place, which autograd cannot differentiate
    x = x + layer.self_attn(layer.layer_norm1(x), mask, optimized_attention)
    return x + layer.mlp(layer.layer_norm2(x))


def new_unet_model():
    import comfy.supported_models as sm   # late: the host's modules exist once it runs (compat.start_host)
    model = sm.SD15(dict(embedded.UNET_CONFIG)).get_model({})
    init_(model.diffusion_model, zero_out=("out_layers.3", "proj_out", "out.2"))
    return model


def train_text_to_image(latents: torch.Tensor, scenes, steps: int, batch: int, seed: int,
                        lr: float = 8e-4, log=print, snapshot=None, snapshot_every: int = 0):
    """Returns (BaseModel with EMA UNet weights, host CLIP with EMA text-encoder weights), trained
    on ``latents`` and the captions of ``scenes``.

    The noise-prediction loss is weighted min(SNR, 5) / SNR per sample (min-SNR-5): the
    low-noise steps, where predicting the noise is hardest and decides only fine detail, would
    otherwise take most of the gradient; the high-noise steps, where the caption decides which
    shape goes where, get their share.

    Two additions make the model bind each shape to its place (without them the UNet learns the
    caption as a bag of colours, kinds and places and swaps two shapes' places in half of the
    two-shape images; see docs/embedded-model.md, "Where the budget went"):

    - a layout read-out: a linear head on the text encoder's state at the EOS token predicts
      each place's colour and kind (``shapes.targets``), cross-entropy added with weight
      ``LAYOUT_WEIGHT`` on the samples whose caption is not dropped. It pushes the whole layout
      into the context tokens early, before the UNet settles on reading words one by one; the
      head is thrown away (the files keep their format).
    - ``TWO_SHAPE_SHARE`` of each batch drawn from the two-shape scenes (about half otherwise).

    ``snapshot(model, clip, step)`` is called with the EMA weights swapped in every
    ``snapshot_every`` steps (to watch adherence while it trains)."""
    captions = [s.caption for s in scenes]
    torch.manual_seed(seed)
    model = new_unet_model()
    unet = model.diffusion_model
    clip = embedded.new_clip()
    te = embedded.text_transformer(clip).float()   # the host builds it in fp16 on a CPU
    ids = embedded.token_ids(clip, captions)
    uncond = embedded.token_ids(clip, [""])[0]
    used = torch.unique(torch.cat([ids.flatten(), uncond]))
    with torch.no_grad():
        init_(te)
        emb = te.text_model.embeddings
        torch.nn.init.normal_(emb.token_embedding.weight, std=0.02)
        torch.nn.init.normal_(emb.position_embedding.weight, std=0.01)
        keep = torch.zeros(emb.token_embedding.weight.shape[0], dtype=torch.bool)
        keep[used] = True
        emb.token_embedding.weight[~keep] = 0   # unknown words: zero, and never stored
    place_colour, place_kind = shapes.targets(scenes)
    eos = (ids == EOS_TOKEN).float().argmax(1)    # the first EOS; the rest of the 77 is padding
    nc, nk = len(shapes.COLOR_CLASSES), len(shapes.KIND_CLASSES)    # each with 'none'
    head = torch.nn.Linear(te.text_model.final_layer_norm.normalized_shape[0], place_colour.shape[1] * (nc + nk))
    two = torch.tensor([len(s.items) == 2 for s in scenes])
    two_idx, one_idx = torch.nonzero(two).flatten(), torch.nonzero(~two).flatten()
    n_two = int(batch * TWO_SHAPE_SHARE)
    if not len(two_idx) or not len(one_idx):
        raise ValueError("train_text_to_image: scenes must hold one-shape and two-shape scenes")
    params = list(unet.parameters()) + list(te.parameters())
    for p in params:
        p.requires_grad_(True)
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params + list(head.parameters()), lr=lr, weight_decay=0.0)
    sigmas = model.model_sampling.sigmas.float()
    x0_all = model.process_latent_in(latents)
    layers = {m: functools.partial(_clip_layer_forward, m) for m in te.modules() if type(m).__name__ == "CLIPLayer"}
    unet.train()
    t0 = time.time()
    with distill.trainable(unet), distill.replaced_forwards(layers):
        for step in range(steps):
            g = step_generator(seed, step)
            idx = torch.cat([two_idx[torch.randint(0, len(two_idx), (n_two,), generator=g)],
                             one_idx[torch.randint(0, len(one_idx), (batch - n_two,), generator=g)]])
            kept = torch.rand(batch, generator=g) >= 0.1
            tok = ids[idx].clone()
            tok[~kept] = uncond
            x_t, t, noise = distill.noised(x0_all[idx], sigmas, g)
            context = te(tok)[0]
            snr = 1.0 / sigmas[t.long()] ** 2     # alpha_bar / (1 - alpha_bar)
            weight = (snr.clamp(max=MIN_SNR) / snr).view(batch, 1, 1, 1)
            loss = (weight * (unet(x_t, timesteps=t, context=context) - noise) ** 2).mean()
            layout = head(context[torch.arange(batch), eos[idx]]).view(batch, -1, nc + nk)[kept]
            layout_loss = (F.cross_entropy(layout[..., :nc].reshape(-1, nc), place_colour[idx][kept].flatten())
                           + F.cross_entropy(layout[..., nc:].reshape(-1, nk), place_kind[idx][kept].flatten()))
            set_cosine_lr(opt, lr, step, steps, floor=0.1, warmup=100)
            opt.zero_grad(set_to_none=True)
            (loss + LAYOUT_WEIGHT * layout_loss).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            decay = min(0.995, (1 + step) / (10 + step))
            with torch.no_grad():
                for e, p in zip(ema, params):
                    e.lerp_(p.detach(), 1 - decay)
            if (step + 1) % 25 == 0:
                log(f"unet step {step + 1}/{steps}  loss {loss.item():.4f}  layout {layout_loss.item():.3f}  "
                    f"({(time.time() - t0) / (step + 1):.2f} s/step)")
            if snapshot is not None and snapshot_every and (step + 1) % snapshot_every == 0 and step + 1 < steps:
                live = [p.detach().clone() for p in params]
                _use_ema(params, ema, te, keep)
                unet.eval()
                snapshot(model, clip, step + 1)
                unet.train()
                with torch.no_grad():
                    for p, v in zip(params, live):
                        p.copy_(v)
    _use_ema(params, ema, te, keep)
    for p in params:
        p.requires_grad_(False)
    unet.eval()
    return model, clip


@torch.no_grad()
def _use_ema(params, ema, te, keep) -> None:
    for e, p in zip(ema, params):
        p.copy_(e)
    te.text_model.embeddings.token_embedding.weight[~keep] = 0


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------

def half(sd: dict) -> dict:
    return {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in sd.items()}


def save_weights(sd: dict, path: str, meta: dict, int8: bool = False) -> None:
    """Weights of the embedded model: fp16 (``int8``: stored in int8, read back as fp16; see
    ``unet_files.quantize_int8``), written atomically."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    unet_files.write_safetensors(half(sd), path, meta, int8)


def _save_teacher(model, clip, folder: str, steps: int, seed: int) -> None:
    """The trained UNet and text encoder, as the files ``embedded.load(folder)`` reads."""
    import comfy.model_patcher   # late: the host's modules exist once it runs (compat.start_host)
    unet_file = os.path.join(folder, embedded.FILES["unet"])
    os.makedirs(os.path.dirname(unet_file), exist_ok=True)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device="cpu", offload_device="cpu")
    assembly.save_unet(patcher, unet_file, dtype=torch.float16,
                       extra_meta={"asdm.embedded": "teacher", "asdm.steps": str(steps)},
                       state=model.diffusion_model.state_dict())
    save_weights(embedded.text_state_dict(clip), os.path.join(folder, embedded.FILES["text"]),
                 {"asdm.format": "asdm-embedded-v1", "asdm.seed": seed, "asdm.steps": steps})


def run(stages: list[str], seed: int = 0, vae_steps: int = 900, unet_steps: int = 1800, batch: int = 64,
        family_steps: int = 300, gri_steps: int = 150, snapshot_every: int = 0,
        force: bool = False, log=print) -> dict:
    times = {}
    record = os.path.join(embedded.WEIGHTS, "training.json")
    if os.path.exists(record):
        with open(record) as f:
            times = json.load(f)
    scenes = shapes.generate(N_SCENES, embedded.IMAGE_SIZE, seed)
    images = images_tensor(scenes)
    meta = {"asdm.format": "asdm-embedded-v1", "asdm.seed": seed}

    if "vae" in stages and (force or not os.path.exists(embedded.path("vae"))):
        t0 = time.time()
        vae = train_vae(images, vae_steps, 16, seed, log)
        lat = latent_means(vae, images)
        c = 1.0 / (0.18215 * lat.std().item())
        rescale_vae(vae, c)
        log(f"vae: latent std {lat.std().item():.3f} -> rescaled by {c:.3f} to SD1.5's scale")
        save_weights(vae.state_dict(), embedded.path("vae"), dict(meta, **{"asdm.steps": vae_steps}))
        times["vae_s"] = round(time.time() - t0, 1)

    if "unet" in stages and (force or not os.path.exists(embedded.path("unet"))):
        t0 = time.time()
        vae = host_models.make_vae(unet_files.read_safetensors(embedded.path("vae"))[0], embedded.VAE_CONFIG)
        more = shapes.generate(UNET_SCENES, embedded.IMAGE_SIZE, seed)   # the first N_SCENES are `scenes`
        lat = latent_means(vae.first_stage_model.float(), images_tensor(more))

        def snapshot(model, clip, step):   # a loadable copy: embedded.load("out/embedded-unet/step-N")
            folder = os.path.join(embedded.REPO_ROOT, "out", "embedded-unet", f"step-{step}")
            _save_teacher(model, clip, folder, step, seed)
            shutil.copy(embedded.path("vae"), os.path.join(folder, embedded.FILES["vae"]))
            shutil.copy(os.path.join(embedded.WEIGHTS, "text_encoder.json"), folder)
            log(f"unet: snapshot of step {step} in {folder}")

        model, clip = train_text_to_image(lat, more, unet_steps, batch, seed, log=log,
                                          snapshot=snapshot, snapshot_every=snapshot_every)
        _save_teacher(model, clip, embedded.WEIGHTS, unet_steps, seed)
        times["unet_and_text_s"] = round(time.time() - t0, 1)

    if "family" in stages:
        t0 = time.time()
        if train_family(scenes, images, family_steps, seed, force, log):
            times["family_s"] = round(time.time() - t0, 1)

    if "gri" in stages:
        t0 = time.time()
        if train_gri_student(gri_steps, seed, force, log):
            times["gri_s"] = round(time.time() - t0, 1)

    times["threads"] = torch.get_num_threads()
    if os.path.exists(record):    # another stage may have finished meanwhile
        with open(record) as f:
            times = dict(json.load(f), **times)
    with open(record, "w") as f:
        json.dump(times, f, indent=1)
    return times


# ---------------------------------------------------------------------------------------------
# 4. The compressed family, with the project's own trainer (asdm.train)
# ---------------------------------------------------------------------------------------------

def family_runs(steps: int) -> dict[str, dict]:
    """name -> trainer config (the TOML's tables). Step 1 (BK-SDM layouts from the teacher),
    step 2 (M2: Base's shallow blocks in the teacher, the teacher's blocks frozen), and Small /
    Tiny continued with ME-CondConv experts (identity init, 2 experts)."""
    common = {"batch": 32, "lr": 5e-4, "log_every": 50}
    short = max(1, steps // 2)
    return {
        "base": dict(common, steps=steps, student={"kind": "compress", "layout": "base"}),
        "small": dict(common, steps=steps, student={"kind": "compress", "layout": "small"}),
        "tiny": dict(common, steps=steps, student={"kind": "compress", "layout": "tiny"}),
        "m2": dict(common, steps=short, student={"kind": "assemble", "recipe": "M2", "compressed": "@base"}),
        # the experts alone train (train_unet = false), so the UNet file is Small's / Tiny's and is
        # stored as derived from it: what the member adds is its experts file
        "small-condconv": dict(common, steps=short, student={"kind": "condconv", "unet": "@small", "experts": 2,
                                                             "init": "identity", "train_unet": False}),
        "tiny-condconv": dict(common, steps=short, student={"kind": "condconv", "unet": "@tiny", "experts": 2,
                                                           "init": "identity", "train_unet": False}),
    }


def _toml(d: dict) -> str:
    flat = [f"{k} = {json.dumps(v)}" for k, v in d.items() if not isinstance(v, dict)]
    tables = [f"\n[{k}]\n" + "\n".join(f"{kk} = {json.dumps(vv)}" for kk, vv in v.items())
              for k, v in d.items() if isinstance(v, dict)]
    return "\n".join(flat) + "\n" + "\n".join(tables) + "\n"


def _train_run(cfg: dict, toml_path: str, name: str, log) -> tuple[dict, dict, dict]:
    """One fresh run of the project's trainer from ``cfg`` (written to ``toml_path``): its result,
    and the exported UNet's state dict and metadata (named as family member ``name``)."""
    with open(toml_path, "w") as f:
        f.write(_toml(cfg))
    if os.path.exists(cfg["out"]):   # a fresh run, not a resume of an older one
        shutil.rmtree(cfg["out"])
    log(f"{name}: {toml_path}")
    t0 = time.time()
    res = train.train(train.load_config(toml_path), log=log)
    sd, meta = unet_files.read_safetensors(res["unet"])
    return res, sd, dict(meta, **{"asdm.embedded": name, "asdm.train.seconds": f"{time.time() - t0:.0f}"})


# The family (compressed, assembled, ME-CondConv and GRI students) is stored in int8 so the pack's
# weights stay small (docs/embedded-model.md); the teacher, which every fidelity number is
# measured against, stays fp16. Loading gives fp16 either way.
FAMILY_INT8 = True


def family_file(name: str) -> str:
    return os.path.join(embedded.FAMILY_UNETS, embedded.family_name(name))


def train_family(scenes, images, steps: int, seed: int, force: bool, log=print) -> bool:
    work = os.path.join(embedded.REPO_ROOT, "out", "embedded-family")
    runs = family_runs(steps)
    if not force and all(os.path.exists(family_file(n)) for n in runs):
        return False
    os.makedirs(work, exist_ok=True)
    data = os.path.join(work, "data.safetensors")
    if force or not os.path.exists(data):
        _, clip, vae = embedded.load()
        lat = latent_means(vae.first_stage_model.float(), images)
        with torch.no_grad():
            ctx = torch.cat([clip.encode_from_tokens(clip.tokenize(s.caption)).float() for s in scenes])
        safetensors.torch.save_file({"latents": lat.contiguous(), "context": ctx.contiguous()}, data)
    for name, cfg in runs.items():
        out_file = family_file(name)
        if os.path.exists(out_file) and not force:
            continue
        cfg = json.loads(json.dumps(cfg))
        st = cfg["student"]
        for k in ("compressed", "unet"):
            if str(st.get(k, "")).startswith("@"):
                st[k] = family_file(st[k][1:])
        cfg.update(seed=seed, out=os.path.join(work, name), save_every=cfg["steps"])
        cfg["teacher"] = {"unet": embedded.path("unet")}
        cfg["data"] = {"latents": data}
        res, sd, meta = _train_run(cfg, os.path.join(work, f"{name}.toml"), name, log)
        # stored as what it adds to the UNet it derives from: M2 to the full UNet (whose blocks it
        # keeps frozen), an experts-only ME-CondConv member to Small / Tiny (its UNet is theirs)
        source = {"assemble": embedded.path("unet"),
                  "condconv": None if st.get("train_unet", True) else st.get("unet")}.get(st["kind"])
        # The family is stored in int8 (FAMILY_INT8); the next member trains from what is stored
        # (M2 from the stored Base, ME-CondConv from the stored Small / Tiny), so a re-run
        # reproduces the shipped files.
        if source:
            derived_files.write_unet(half(sd), meta, out_file, derive_from=source, int8=FAMILY_INT8)
        else:
            save_weights(sd, out_file, meta, int8=FAMILY_INT8)
        if res.get("experts"):
            esd, emeta = unet_files.read_safetensors(res["experts"])
            save_weights(esd, os.path.join(embedded.FAMILY_EXPERTS, os.path.basename(out_file)), emeta,
                         int8=FAMILY_INT8)
    return True


# ---------------------------------------------------------------------------------------------
# 5. A GRI-attention student (the trained variant of GRI attention), at 256 px
# ---------------------------------------------------------------------------------------------

# The settings it is tuned for, at 256 px (latent 32x32: dn0 / up3 attend over 1024 tokens): 16
# regions of 8x8 tokens plus 256 pooled global tokens. The A-SDM GRI Attention node must use the
# same settings with it (the file records them as asdm.gri).
GRI_SETTINGS = {"units": "dn0, up3", "window": 8, "pool": 2}
GRI_SIZE = 256
GRI_SCENES = 128


def train_gri_student(steps: int, seed: int, force: bool, log=print) -> bool:
    """The embedded teacher assembled with itself with dn0 and up3 trainable (recipe
    ``dn0=B, up3=B``: the rest frozen), distilled with GRI attention in those blocks from the
    full-attention teacher on 256 px scenes. Stored as what it adds to the teacher (its dn0 and
    up3 blocks), so the file is small."""
    out_file = family_file("full-gri")
    if os.path.exists(out_file) and not force:
        return False
    work = os.path.join(embedded.REPO_ROOT, "out", "embedded-gri")
    os.makedirs(work, exist_ok=True)
    data = os.path.join(work, "data.safetensors")
    if force or not os.path.exists(data):
        _, clip, vae = embedded.load()
        scenes = shapes.generate(GRI_SCENES, GRI_SIZE, seed + 1)
        lat = latent_means(vae.first_stage_model.float(), images_tensor(scenes), batch=16)
        with torch.no_grad():
            ctx = torch.cat([clip.encode_from_tokens(clip.tokenize(s.caption)).float() for s in scenes])
        safetensors.torch.save_file({"latents": lat.contiguous(), "context": ctx.contiguous()}, data)
    cfg = {"seed": seed, "steps": steps, "batch": 8, "lr": 1e-4, "log_every": 10, "save_every": steps,
           "out": os.path.join(work, "run"),
           "teacher": {"unet": embedded.path("unet")},
           "student": {"kind": "assemble", "compressed": embedded.path("unet"), "recipe": "dn0=B, up3=B"},
           "gri": dict(GRI_SETTINGS), "data": {"latents": data},
           # distillation only: the student is to match the teacher with full attention, and at
           # 256 px the teacher is outside its 64 px training, so the task term (the true noise)
           # would pull the student away from it
           "loss": {"task": 0.0}}
    _, sd, meta = _train_run(cfg, os.path.join(work, "gri.toml"), "full-gri", log)
    meta.pop("asdm.recipe", None)   # a UNet of the teacher's own layout, not an assembly to redo
    derived_files.write_unet(half(sd), meta, out_file, derive_from=embedded.path("unet"), int8=FAMILY_INT8)
    return True
