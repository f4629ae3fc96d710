"""Distillation trainer: ``python -m asdm.training CONFIG.toml`` (see docs/training.md).

Steps of A-SDM model assembly (§IV-A), as ``[student] kind``:

* ``compress``: a block-removed layout initialised from the teacher: BK-SDM's base / small / tiny
  (BK-SDM §3.1) on any teacher, KOALA's koala-700m / koala-1b on an SDXL teacher;
* ``assemble``: a recipe (M1/M2/M3/custom) of a step-1 result and the teacher, the teacher's
  blocks frozen unless ``train_original = true`` (the paper's M‡ rows);
* ``condconv``: a compressed UNet (``layout`` from the teacher, or ``unet`` = a trained file)
  with ME-CondConv experts (``experts``, ``init``, ``units``; A-SDM §IV-B) trained with it, or
  alone with ``train_unet = false``.

``[gri]`` (optional, any kind): the student trains with GRI attention (``asdm.gri``) in the A units
``units`` (default ``asdm.gri.DEFAULT_UNITS``, the highest-resolution level), regions of at most
``window`` tokens a side (default 16) and global keys pooled ``pool`` x ``pool`` (default 4), while
the teacher keeps full attention: a "tuned GRI" UNet. The training step plays the sampler step's
part in the region shift (it alternates every step), so both layouts are trained and a resume
repeats it. The settings go into the export's metadata (``asdm.gri``, JSON ``{"units", "window",
"pool"}``) and the checkpoint's; resuming a checkpoint made with other GRI settings (or without
GRI) is refused.

Data: a safetensors file of pre-encoded ``latents`` [N, 4, h, w] (as the VAE encodes them,
unscaled) and text ``context`` [N, 77, C] (``[data] latents``), and for a teacher that takes a
class embedding (the SDXL family) its input ``y`` [N, 2816] (pooled text and size embeddings, as
the host encodes them), or a folder of captioned images (``[data] images`` + ``checkpoint``).
Losses: ``asdm.training.distill``. Every key of the config is checked (type, range; an unknown
key is refused with the nearest valid one).

Checkpoints: ``<out>/checkpoint.safetensors`` holds the student, its experts, the optimizer state
and the step with a digest, committed by renames so a crash at any instant leaves a whole
checkpoint (see ``_commit``); a run with the same ``out`` resumes from it with no lost or repeated
steps. ``<out>/unet.safetensors`` (A-SDM Load Compressed UNet) and ``<out>/condconv.safetensors``
(A-SDM ME-CondConv) are exports of it. Each step draws its batch and noise from a generator seeded
by (seed, step), so a resumed run repeats an uninterrupted one bit for bit. A non-finite loss
stops the run at that step with the last good checkpoint kept.

Multi-GPU / multi-process: launch with ``torchrun --nproc_per_node N -m asdm.training CONFIG``;
PyTorch DDP averages gradients (gloo on CPU, nccl on GPUs) and each rank takes its share of the
step's batch. ``grad_accum`` micro-batches per step reach a large batch on few GPUs.
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import math
import os
import sys
import time
import tomllib
from dataclasses import dataclass

import numpy as np
import safetensors.torch
import torch
import torch.distributed as dist
from PIL import Image

from .. import assembly, compat, condconv, derived_files, gri, host_models
from ..condconv import MEForward
from ..errors import ASDMError
from ..topology import describe
from ..unet_files import SDXL_POOLED, UNetFileError, read_safetensors, tensor_digest, write_safetensors
from . import distill
from .steps import step_generator

DEFAULTS = {
    "seed": 0, "steps": 1000, "batch": 8, "grad_accum": 1, "lr": 5e-5, "save_every": 200, "log_every": 10,
    "student": {"kind": "compress", "layout": "base", "recipe": "M2", "train_original": False, "train_unet": True},
    "loss": {"task": 1.0, "out_kd": 1.0, "feat_kd": 1.0, "mid": 1.0},
}

# Every key a config may hold: section -> key -> (what it must be, the check). A key not here is
# refused (with the nearest valid key), so a typo never silently falls back to a default.
_whole = ("a whole number >= 1", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1)
_number = ("a finite number >= 0", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
           and 0 <= v < math.inf)   # TOML writes nan and inf; neither weighs a loss
_text = ("a text (a path or a name)", lambda v: isinstance(v, str) and v.strip() != "")
_flag = ("true or false", lambda v: isinstance(v, bool))


def _one_of(*choices):
    return (f"one of {', '.join(choices)}", lambda v: v in choices)


KINDS = ("compress", "assemble", "condconv")   # [student] kind: the three steps of model assembly

# The values the engine takes, from the engine's own constants.
SCHEMA = {
    "": {"out": _text, "steps": _whole, "batch": _whole, "grad_accum": _whole, "save_every": _whole,
         "log_every": _whole, "seed": ("a whole number >= 0", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0),
         "lr": ("a number > 0 (e.g. 5e-5)", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
                and 0 < v < 1e3)},
    "teacher": {"unet": _text},
    "student": {"kind": _one_of(*KINDS), "layout": _one_of(*assembly.LAYOUTS),
                "recipe": _text, "train_original": _flag, "compressed": _text, "unet": _text,
                "experts": (f"a whole number from 2 to {condconv.MAX_EXPERTS}",
                            lambda v: isinstance(v, int) and not isinstance(v, bool) and 2 <= v <= condconv.MAX_EXPERTS),
                "init": _one_of(*condconv.INIT_MODES), "units": _text, "train_unet": _flag},
    "data": {"latents": _text, "images": _text, "checkpoint": _text,
             "size": ("a whole number >= 64, a multiple of 8", lambda v: isinstance(v, int) and v >= 64 and v % 8 == 0)},
    "loss": {"task": _number, "out_kd": _number, "feat_kd": _number, "mid": _number, "perceptual": _number,
             "perceptual_weights": _text},
    "gri": {"units": ("a text naming A units, blocks or layers (e.g. 'dn0, up3')",
                      lambda v: isinstance(v, str) and v.strip() != ""),
            "window": ("a whole number >= 1 (the largest region side, in latent tokens)", _whole[1]),
            "pool": ("a whole number >= 1 (global keys pooled pool x pool)", _whole[1])},
}

# [gri]: its keys' defaults where the table is given (the GRI Attention node's defaults).
GRI_DEFAULTS = {"units": gri.DEFAULT_UNITS, "window": gri.DEFAULT_WINDOW, "pool": gri.DEFAULT_POOL}


class ConfigError(ASDMError):
    """A config that cannot be trained; the message names the key (``input``) and the fix."""


class TrainingError(RuntimeError):
    """Training had to stop (a non-finite loss); the message says where the last good checkpoint is."""


def _check_schema(path: str, raw: dict) -> None:
    for key, value in raw.items():
        section = key if isinstance(value, dict) else ""
        items = value.items() if isinstance(value, dict) else [(key, value)]
        if section and section not in SCHEMA:
            near = difflib.get_close_matches(section, [s for s in SCHEMA if s], n=1)
            raise ConfigError(f"{path}: unknown table [{section}]" + (f"; did you mean [{near[0]}]?" if near else
                              f"; tables: {', '.join('[' + s + ']' for s in SCHEMA if s)}"))
        for name, v in items:
            where = f"{section}.{name}" if section else name
            if name not in SCHEMA[section]:
                near = difflib.get_close_matches(name, list(SCHEMA[section]), n=1)
                raise ConfigError(f"{path}: unknown key '{where}'" + (
                    f"; did you mean '{(section + '.') if section else ''}{near[0]}'?" if near else
                    f"; known: {', '.join(SCHEMA[section])}"))
            what, ok = SCHEMA[section][name]
            if not ok(v):
                raise ConfigError(f"{path}: '{where}' must be {what} (got {v!r})")


def _check_writable(path: str, out: str) -> None:
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, f".asdm-write-test-{os.getpid()}")   # one per process: DDP ranks check at once
        with open(probe, "w") as f:
            f.write("")
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"{path}: 'out' = {out} cannot be written ({type(e).__name__}: {e.strerror or e}); "
                          "choose a folder you can write to") from None


def load_config(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} does not exist")
    with open(path, "rb") as f:
        try:
            raw = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML ({e})") from None
    _check_schema(path, raw)
    cfg = json.loads(json.dumps(DEFAULTS))
    for k, v in raw.items():
        if isinstance(v, dict):
            cfg.setdefault(k, {}).update(v)
        else:
            cfg[k] = v
    base = os.path.dirname(os.path.abspath(path))
    cfg["_base"] = base
    need = {"out": "where checkpoints go", "teacher.unet": "the teacher UNet file (.safetensors)"}
    data = cfg.get("data", {})
    if not data.get("latents") and not data.get("images"):
        raise ConfigError(f"{path}: 'data.latents' is missing: the pre-encoded latents/context file "
                          "(.safetensors), or give data.images (a folder of images with .txt captions) "
                          "and data.checkpoint (the SD checkpoint whose VAE and CLIP encode them)")
    if data.get("images") and not data.get("checkpoint"):
        raise ConfigError(f"{path}: data.images needs data.checkpoint (the SD checkpoint whose VAE and "
                          "text encoder encode the images and captions)")
    for key, what in need.items():
        sec, _, name = key.rpartition(".")
        val = cfg.get(sec, {}).get(name) if sec else cfg.get(name)
        if not val:
            raise ConfigError(f"{path}: '{key}' is missing: {what}")
    resolve = lambda p: p if os.path.isabs(p) else os.path.join(base, p)   # noqa: E731
    cfg["out"] = resolve(cfg["out"])
    cfg["teacher"]["unet"] = resolve(cfg["teacher"]["unet"])
    for k in ("latents", "images", "checkpoint"):
        if cfg["data"].get(k):
            cfg["data"][k] = resolve(cfg["data"][k])
    for k in ("compressed", "unet"):
        if cfg["student"].get(k):
            cfg["student"][k] = resolve(cfg["student"][k])
    if "gri" in cfg:
        cfg["gri"] = dict(GRI_DEFAULTS, **cfg["gri"])
    kind = cfg["student"]["kind"]
    if kind == "assemble" and not cfg["student"].get("compressed"):
        raise ConfigError(f"{path}: student.kind = 'assemble' needs student.compressed (the step-1 UNet)")
    _check_writable(path, cfg["out"])
    return cfg


def load_data(path: str, context_dim: int, y_dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(latents, context, y) of a data file; ``y_dim``: the width of the teacher's y (None: it
    takes none, and the file must hold none)."""
    try:
        sd, _ = read_safetensors(path)
    except UNetFileError as e:
        raise ConfigError(f"data.latents: {e}") from None
    name = os.path.basename(path)
    for k in ("latents", "context"):
        if k not in sd:
            raise ConfigError(f"data.latents: {name} has no '{k}' tensor "
                              "(expected 'latents' [N,4,h,w] and 'context' [N,77,C])")
    lat, ctx = sd["latents"].float(), sd["context"].float()
    if lat.dim() != 4 or lat.shape[1] != 4 or ctx.dim() != 3 or len(lat) != len(ctx):
        raise ConfigError(f"data.latents: shapes latents {tuple(lat.shape)}, context {tuple(ctx.shape)}; "
                          "expected [N,4,h,w] and [N,77,C] with the same N")
    if ctx.shape[2] != context_dim:
        raise ConfigError(f"data.latents: context dim {ctx.shape[2]} but the teacher takes {context_dim}; "
                          "encode the captions with the text encoder of the teacher's family")
    y = None
    if y_dim:
        if "y" not in sd:
            raise ConfigError(f"data.latents: {name} has no 'y' tensor, and the teacher (an SDXL-family UNet) "
                              f"takes y [N,{y_dim}] beside the context: the pooled text output and the size "
                              "embeddings, as the host encodes them (docs/training.md); re-encode the data "
                              "(an encoded.safetensors made for another teacher: delete it)")
        y = sd["y"].float()
        if y.dim() != 2 or y.shape != (len(lat), y_dim):
            raise ConfigError(f"data.latents: 'y' is {tuple(y.shape)}; the teacher takes [N,{y_dim}] with the "
                              f"latents' N = {len(lat)}")
    elif "y" in sd:
        raise ConfigError(f"data.latents: {name} holds 'y' {tuple(sd['y'].shape)}, but the teacher takes no y "
                          "(an SD1.x / SD2.x-family UNet): these data were encoded for an SDXL-family teacher; "
                          "encode the data for this teacher's family")
    for what, t in (("latents", lat), ("context", ctx), ("y", y)):
        if t is None:
            continue
        bad = (~torch.isfinite(t)).flatten(1).any(1).nonzero().flatten()
        if len(bad):
            raise ConfigError(f"data.latents: {name}: '{what}' of {len(bad)} samples are not "
                              f"finite (NaN or Inf), e.g. sample {int(bad[0])}; re-encode the data")
    return lat, ctx, y


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def encode_images(folder: str, checkpoint: str, size: int, cache: str, log=print, encode_y=None) -> str:
    """Encodes a folder of images with same-name .txt captions through the host's own loaders
    (the checkpoint's VAE and text encoder) into a latents file; reused when present.
    ``encode_y(pooled, size)``: for a teacher that takes y, its y from the caption's pooled text
    output (the teacher's own encoder, ``teacher_y``)."""
    if os.path.exists(cache):
        return cache
    if not os.path.isdir(folder):
        raise ConfigError(f"data.images: {folder} is not a folder")
    images = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
    if not images:
        raise ConfigError(f"data.images: no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}")
    missing = [f for f in images if not os.path.isfile(os.path.join(folder, os.path.splitext(f)[0] + ".txt"))]
    if missing:
        raise ConfigError(f"data.images: {len(missing)} images have no caption file, e.g. {missing[0]} "
                          f"(expected {os.path.splitext(missing[0])[0]}.txt beside it)")
    import comfy.sd   # late: the host's modules exist once it runs (compat.start_host)
    lats, ctxs, ys, skipped = [], [], [], []
    with torch.no_grad():   # the host's CLIP constructor writes into its own parameters
        _, clip, vae = comfy.sd.load_checkpoint_guess_config(checkpoint, output_vae=True, output_clip=True)[:3]
        for f in images:
            try:
                img = Image.open(os.path.join(folder, f)).convert("RGB").resize((size, size), Image.BICUBIC)
            except Exception as e:   # a file that does not decode: skipped and reported
                skipped.append(f"{f} ({type(e).__name__})")
                continue
            pixels = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]
            lats.append(vae.encode(pixels).float())
            text = open(os.path.join(folder, os.path.splitext(f)[0] + ".txt"), encoding="utf-8").read().strip()
            if encode_y is None:
                ctxs.append(clip.encode_from_tokens(clip.tokenize(text)).float())
                continue
            cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
            width = None if pooled is None else pooled.shape[-1]
            if width != SDXL_POOLED:
                raise ConfigError(f"data.checkpoint: its text encoder gives a pooled output {width} wide, but the "
                                  f"teacher's y takes SDXL's ({SDXL_POOLED}, CLIP-G's); encode with the "
                                  "checkpoint of the teacher's family (an SDXL checkpoint)")
            ctxs.append(cond.float())
            ys.append(encode_y(pooled.float(), size).float())
    for what in skipped:
        log(f"data.images: skipped {what}: not a readable image")
    if not lats:
        raise ConfigError(f"data.images: none of the {len(images)} images could be read")
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    tensors = {"latents": torch.cat(lats).contiguous(), "context": torch.cat(ctxs).contiguous()}
    if ys:
        tensors["y"] = torch.cat(ys).contiguous()
    safetensors.torch.save_file(tensors, cache, metadata={"asdm.skipped": json.dumps(skipped)})
    log(f"data.images: encoded {len(lats)} images into {cache}")
    return cache


def teacher_y(teacher):
    """``encode_y(pooled, size)`` for image folders, for a teacher MODEL that takes y (None
    otherwise): the host's own encoding of its model class (SDXL: the pooled text output and
    the six size embeddings), for a ``size`` x ``size`` image seen whole at that target size, as
    CLIPTextEncodeSDXL gives it with width = height = target = size and no crop."""
    if not teacher.model.model_config.unet_config.get("adm_in_channels"):
        return None

    def encode(pooled, size):
        return teacher.model.encode_adm(pooled_output=pooled, width=size, height=size, crop_w=0, crop_h=0,
                                        target_width=size, target_height=size)
    return encode


def build(cfg: dict):
    """(teacher unet, student patcher, trainable parameter names, ME-CondConv experts or None)."""
    return _build(cfg)[1:]


def _build(cfg: dict):
    """The teacher MODEL, then what ``build`` gives."""
    try:
        teacher = derived_files.load_unet(cfg["teacher"]["unet"])
    except UNetFileError as e:
        raise ConfigError(f"teacher.unet: {e}") from None
    student_cfg = cfg["student"]
    experts = None
    if student_cfg["kind"] == "compress":
        student = assembly.compress(teacher, student_cfg["layout"])
        trainable = [n for n, _ in student.model.diffusion_model.named_parameters()]
    elif student_cfg["kind"] == "assemble":
        try:
            compressed = derived_files.load_unet(student_cfg["compressed"])
            spec = assembly.recipe_spec(student_cfg["recipe"])
            student = assembly.assemble(teacher, compressed, spec)
        except ASDMError as e:
            raise ConfigError(f"student: {e}") from None
        unet = student.model.diffusion_model
        choice = assembly.parse_recipe(spec, describe(unet).blocks)
        frozen = set(distill.freeze_blocks(unet, choice, student_cfg["train_original"]))
        trainable = [n for n, _ in unet.named_parameters() if n not in frozen]
    else:   # condconv: a compressed student whose 3x3 convs are ME-CondConv
        try:
            base = (derived_files.load_unet(student_cfg["unet"]) if student_cfg.get("unet")
                    else assembly.compress(teacher, student_cfg["layout"]))
            unet = base.model.diffusion_model
            paths = condconv.select_convs(unet, student_cfg.get("units", condconv.DEFAULT_UNITS))
            experts = condconv.make_experts(unet, paths, int(student_cfg.get("experts", condconv.DEFAULT_EXPERTS)),
                                            student_cfg.get("init", "identity"), cfg["seed"],
                                            teacher.model.diffusion_model)
        except ASDMError as e:
            raise ConfigError(f"student: {e}") from None
        student = base
        # train_unet = false: the experts alone learn, so the exported UNet is the one it came from
        # bit for bit and the embedded family stores it as a file derived from that one
        trainable = [n for n, _ in unet.named_parameters()] if student_cfg.get("train_unet", True) else []
    kt, ks = host_models.conditioning_kind(teacher), host_models.conditioning_kind(student)
    if kt != ks:   # a condconv student's own UNet file: of the teacher's family, or it cannot learn from it
        what = next(k for k in kt if kt[k] != ks[k])
        raise ConfigError(f"student: the student UNet and the teacher are of different families ({what}: "
                          f"{ks[what]} vs the teacher's {kt[what]}); give a student of the teacher's family")
    if cfg.get("gri") is not None:
        if cfg["gri"]["units"].strip().lower() == gri.AUTO:   # recorded as the units it means on this student
            cfg["gri"]["units"] = gri.auto_units(describe(student.model.diffusion_model))
        gri_sites(student.model.diffusion_model, cfg["gri"])   # bad settings: told before training
    return teacher, teacher.model.diffusion_model, student, trainable, experts


def gri_sites(unet, settings: dict) -> list:
    """The transformer blocks ``[gri]`` puts GRI attention in (``asdm.gri.Site``); a bad setting
    is a ConfigError naming its key."""
    for key in ("window", "pool"):
        try:
            gri.Settings(**{"window": 1, "pool": 1, key: settings[key]})
        except gri.GRIError as e:
            raise ConfigError(f"gri.{key}: {e}") from None
    topo = describe(unet)
    try:
        units = gri.resolve_units(topo, settings["units"])
    except ASDMError as e:   # a unit name the grammar refuses, or units without attention
        raise ConfigError(f"gri.units: {e}", input="gri.units") from None
    if not units:
        raise ConfigError(f"gri.units: {settings['units']!r} names no unit; name the A units (or their "
                          f"blocks or layers) to train with GRI attention, e.g. {gri.DEFAULT_UNITS!r}")
    return gri.sites(unet, topo, units)


def gri_meta(settings: dict | None) -> str | None:
    """The ``asdm.gri`` metadata of a UNet trained with these ``[gri]`` settings (None: without)."""
    if settings is None:
        return None
    return json.dumps({"units": settings["units"], "window": settings["window"], "pool": settings["pool"]})


class _Student(torch.nn.Module):
    """The student UNet and its ME-CondConv experts as one module, so DDP averages both."""

    def __init__(self, unet, experts):
        super().__init__()
        self.unet = unet
        self.experts = torch.nn.ModuleDict({p.replace(".", "_"): me for p, me in (experts or {}).items()})

    def forward(self, *args, **kwargs):
        return self.unet(*args, **kwargs)


def _experts_active(unet, experts):
    """While training, the ME-CondConv convs run their expert forward."""
    return distill.replaced_forwards({unet.get_submodule(p): MEForward(unet.get_submodule(p), me)
                              for p, me in (experts or {}).items()})


# ---------------------------------------------------------------------------------------------
# Checkpoints. One file holds everything a resume needs (student weights, experts, optimizer
# state, the step) with a digest of its tensors, and is committed by a rename: at any instant
# `checkpoint.safetensors` (or, between the two renames of a commit, `checkpoint-prev`) is a
# whole, consistent checkpoint. unet.safetensors and condconv.safetensors are exports of it for
# the nodes, rewritten after each commit; a resume never reads them.
# ---------------------------------------------------------------------------------------------

CHECKPOINT_FORMAT = "asdm-train-checkpoint-v1"


def _checkpoint_tensors(run: "Training") -> tuple[dict, dict]:
    """(tensors, metadata) of everything a resume needs: the student, its experts, and the
    optimizer's state as the optimizer gives it (``state_dict``), its tensors keyed by the
    parameter's name and the rest (hyperparameters, scalars) as JSON."""
    sd = {f"unet.{k}": v.detach().cpu() for k, v in run.unet.state_dict().items()}
    for conv, me in (run.experts or {}).items():
        sd.update({f"experts.{conv}.{k}": v.detach().cpu() for k, v in me.state_dict().items()})
    opt = run.opt.state_dict()
    plain: dict = {}
    for i, state in opt["state"].items():
        for k, v in state.items():
            if torch.is_tensor(v):
                sd[f"opt.{k}.{run.names[i]}"] = v.detach().cpu()
            else:
                plain.setdefault(run.names[i], {})[k] = v
    return sd, {"asdm.optimizer": json.dumps({"param_groups": opt["param_groups"], "state": plain})}


def _commit(run: "Training", step: int) -> None:
    sd, meta = _checkpoint_tensors(run)
    path, prev, nxt = run.path("checkpoint"), run.path("checkpoint-prev"), run.path("checkpoint") + ".next"
    meta.update({"asdm.format": CHECKPOINT_FORMAT, "asdm.step": step, "asdm.digest": tensor_digest(sd)})
    if run.gri is not None:
        meta["asdm.gri"] = gri_meta(run.gri)
    write_safetensors(sd, nxt, meta)
    if os.path.exists(path):
        os.replace(path, prev)
    os.replace(nxt, path)


def _read_checkpoint(path: str) -> tuple[tuple[dict, dict] | None, str]:
    """((tensors, metadata), "") of a whole, untouched checkpoint file, else (None, the reason)."""
    try:
        sd, meta = read_safetensors(path)
    except UNetFileError as e:
        return None, str(e)
    if meta.get("asdm.format") != CHECKPOINT_FORMAT:
        return None, "not a trainer checkpoint"
    if meta.get("asdm.digest") != tensor_digest(sd):
        return None, "its contents do not match its digest (damaged)"
    return (sd, meta), ""


def _restore(run: "Training", sd: dict, meta: dict) -> None:
    run.unet.load_state_dict({k[5:]: v for k, v in sd.items() if k.startswith("unet.")})
    for conv, me in (run.experts or {}).items():
        pre = f"experts.{conv}."
        me.load_state_dict({k[len(pre):]: v for k, v in sd.items() if k.startswith(pre)})
    saved = json.loads(meta.get("asdm.optimizer", "null")) or {}
    by_name = {name: dict(v) for name, v in saved.get("state", {}).items()}
    for k, v in sd.items():
        if k.startswith("opt."):
            kind, _, name = k[4:].partition(".")   # opt.<state key>.<parameter name>
            by_name.setdefault(name, {})[kind] = v
    state = {i: by_name[name] for i, name in enumerate(run.names) if name in by_name}
    groups = saved.get("param_groups") or run.opt.state_dict()["param_groups"]
    run.opt.load_state_dict({"state": state, "param_groups": groups})


@dataclass
class Training:
    """Everything one training run holds between its steps."""
    cfg: dict
    rank: int                 # this process among `world` (DDP); 0 alone
    world: int
    device: object
    teacher: torch.nn.Module  # frozen
    student: object           # the student MODEL (its UNet is trained in place)
    experts: dict | None      # ME-CondConv experts of a condconv student: conv path -> MEExperts
    model: torch.nn.Module    # student UNet + experts, DDP-wrapped when world > 1
    latents: torch.Tensor     # the data, at the UNet's latent scale
    context: torch.Tensor
    params: dict              # trained parameter name -> tensor (experts as asdm_experts.<conv>.<name>)
    names: list               # trained parameter names, in the optimizer's order
    opt: torch.optim.Optimizer
    weights: object           # distill.LossWeights
    perceptual: object        # distill.PerceptualNet or None
    pairs: list               # the block outputs feature-KD compares
    sigmas: torch.Tensor
    start: int = 0            # the first step this run computes (> 0 when resumed)
    gri: dict | None = None   # [gri] settings: the student trains with GRI attention
    gri_handle: object = None  # the open asdm.gri.UNetGRI while training (its step: the shift parity)
    y: torch.Tensor | None = None   # the y of every sample, for a teacher that takes one (SDXL's)

    @property
    def unet(self) -> torch.nn.Module:
        return self.student.model.diffusion_model

    def path(self, what: str) -> str:
        return os.path.join(self.cfg["out"], {"unet": "unet.safetensors", "experts": "condconv.safetensors",
                                              "checkpoint": "checkpoint.safetensors",
                                              "checkpoint-prev": "checkpoint-prev.safetensors"}[what])


def _perceptual(cfg: dict, log):
    """The optional perceptual term's network and the loss weights with it on or off."""
    weights = dict(cfg["loss"])
    vgg_file = weights.pop("perceptual_weights", None)
    if not vgg_file:
        weights["perceptual"] = 0.0
        log("perceptual term: off (no loss.perceptual_weights given)")
        return None, weights
    vgg_file = vgg_file if os.path.isabs(vgg_file) else os.path.join(cfg.get("_base", ""), vgg_file)
    try:
        net = distill.PerceptualNet(read_safetensors(vgg_file)[0])
    except (UNetFileError, ValueError) as e:
        raise ConfigError(f"loss.perceptual_weights: {e}") from None
    weights.setdefault("perceptual", 1.0)
    log(f"perceptual term: on ({os.path.basename(vgg_file)}, {len(net.convs)} convs, weight {weights['perceptual']})")
    return net, weights


def setup(cfg: dict, log=print) -> Training:
    """Processes (DDP), data, teacher and student, the trained parameters and the optimizer."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    data = cfg["data"]
    teacher_model, teacher, student, trainable, experts = _build(cfg)
    if data.get("images"):
        if rank == 0:
            encode_images(data["images"], data["checkpoint"], int(data.get("size", 512)),
                          os.path.join(cfg["out"], "encoded.safetensors"), log, teacher_y(teacher_model))
        if world > 1:
            dist.barrier()
        data["latents"] = os.path.join(cfg["out"], "encoded.safetensors")
    unet = student.model.diffusion_model
    unet_cfg = student.model.model_config.unet_config
    lat, ctx, y = load_data(data["latents"], unet_cfg["context_dim"], unet_cfg.get("adm_in_channels"))
    lat = student.model.process_latent_in(lat)   # VAE latents -> the UNet's scale (x0.18215 for SD1.x)
    perceptual, loss_weights = _perceptual(cfg, log)
    import comfy.model_management as mm   # late: the host's modules exist once it runs (compat.start_host)
    dev = mm.get_torch_device()
    teacher.to(dev)
    unet.to(dev)
    for p in teacher.parameters():
        p.requires_grad_(False)
    params = dict(unet.named_parameters())
    trainable = set(trainable)
    names = [n for n in params if n in trainable]
    for conv, me in (experts or {}).items():
        me.to(dev)
        for k, v in me.named_parameters():
            name = f"asdm_experts.{conv}.{k}"
            params[name] = v
            names.append(name)
            trainable.add(name)
    for n, p in params.items():
        p.requires_grad_(n in trainable)
    os.makedirs(cfg["out"], exist_ok=True)
    opt = torch.optim.AdamW([params[n] for n in names], lr=cfg["lr"], weight_decay=0.0)
    model = _Student(unet, experts)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    if perceptual is not None:
        perceptual.to(dev)
    if cfg.get("gri") is not None:
        _log_gri(cfg["gri"], gri_sites(unet, cfg["gri"]), tuple(lat.shape[-2:]), log)
    return Training(cfg=cfg, rank=rank, world=world, device=dev, teacher=teacher, student=student,
                    experts=experts, model=model, latents=lat, context=ctx, params=params, names=names,
                    opt=opt, weights=distill.LossWeights(**loss_weights), perceptual=perceptual,
                    pairs=distill.shared_blocks(teacher, unet),
                    sigmas=student.model.model_sampling.sigmas.float(), gri=cfg.get("gri"), y=y)


def _log_gri(settings: dict, sites: list, latent: tuple[int, int], log) -> None:
    """Says where the student trains with GRI attention, and where a region covers a unit's
    whole grid at the data's latent size (full attention there: nothing GRI-specific to learn)."""
    grids = {}
    for s in sites:
        h, w = latent
        for _ in range(s.level):
            h, w = -(-h // 2), -(-w // 2)
        grids[s.unit.name] = (h, w)
    full = [u for u, g in grids.items() if gri.covers(g, settings["window"])]
    sizes = ", ".join(sorted({f"{h}x{w}" for h, w in grids.values()}))
    log(f"GRI attention in the student: {', '.join(grids)} (window {settings['window']}, pool {settings['pool']}; "
        f"grids at {latent[0]}x{latent[1]} latents: {sizes})")
    if full:
        log(f"GRI attention: window {settings['window']} covers the whole grid of {', '.join(full)} at "
            f"{latent[0]}x{latent[1]} latents, so {'they compute' if len(full) > 1 else 'it computes'} full "
            "attention there; a smaller window trains GRI in them")


def resume(run: Training, log=print) -> None:
    """Continues from the run's last whole checkpoint in ``out``, if any, and says which; a
    checkpoint of another student (layout, experts) or other GRI settings is refused before
    anything is loaded from it."""
    skipped = []
    for what in ("checkpoint", "checkpoint-prev"):
        path = run.path(what)
        if not os.path.exists(path):
            continue
        found, why = _read_checkpoint(path)
        if found is None:
            log(f"skipping {path}: {why}")
            skipped.append(os.path.basename(path))
            continue
        sd, meta = found
        _check_same_student(run, path, sd, meta)
        _check_same_gri(run, path, meta.get("asdm.gri"))
        _restore(run, sd, meta)
        run.start = step = int(meta["asdm.step"])
        log(f"resuming from step {step} ({path})")
        return
    if skipped:
        log(f"no usable checkpoint in {run.cfg['out']} ({', '.join(skipped)} skipped): starting from step 0")
    elif os.path.exists(run.path("unet")):
        log(f"{run.path('unet')} is an export without a checkpoint to resume from: starting at step 0")


def _check_same_student(run: Training, path: str, sd: dict, meta: dict) -> None:
    """A checkpoint resumes only into a run whose student has its tensors (the same layout and
    width, the same ME-CondConv experts) and trains as many of them; told with both sides,
    before any state is loaded."""
    def shapes(prefix, state):
        return {k[len(prefix):]: tuple(v.shape) for k, v in state.items() if k.startswith(prefix)}
    saved_unet, own_unet = shapes("unet.", sd), shapes("", run.unet.state_dict())
    if saved_unet != own_unet:
        raise ConfigError(f"{path} holds a student of another layout: {_layout_of(saved_unet)}; this config "
                          f"({_student_setting(run.cfg)}) trains {_layout_of(own_unet)}. Its weights do not "
                          "continue this run: resume it with the config that made it, or give another 'out' "
                          "folder to start a new run")
    own_experts = {f"{conv}.{k}": tuple(v.shape) for conv, me in (run.experts or {}).items()
                   for k, v in me.state_dict().items()}
    if shapes("experts.", sd) != own_experts:
        def told(state):
            convs = [k for k in state if k.endswith(".experts")]   # one expert tensor per conv
            return f"ME-CondConv experts on {len(convs)} convs" if convs else "no ME-CondConv experts"
        raise ConfigError(f"{path} holds a student with {told(shapes('experts.', sd))}, but this config "
                          f"({_student_setting(run.cfg)}) trains one with {told(own_experts)}. Resume it with "
                          "the config that made it (student.experts, units, kind), or give another 'out' "
                          "folder to start a new run")
    try:
        groups = json.loads(meta.get("asdm.optimizer", "null"))["param_groups"]
        trained = sum(len(g["params"]) for g in groups)
    except (ValueError, KeyError, TypeError):
        return   # no optimizer record: the tensors alone are restored
    if trained != len(run.names):
        raise ConfigError(f"{path} trained {trained} tensors of its student, but this config trains "
                          f"{len(run.names)} ({_student_setting(run.cfg)}; student.train_original and "
                          "train_unet choose them). Resume it with the config that made it, or give another "
                          "'out' folder to start a new run")


def _student_setting(cfg: dict) -> str:
    """The config keys that choose the student, as written."""
    st = cfg["student"]
    if st["kind"] == "assemble":
        return f"student.kind = 'assemble', recipe = {st['recipe']!r}"
    source = f"unet = {os.path.basename(st['unet'])!r}" if st.get("unet") else f"layout = {st['layout']!r}"
    return f"student.kind = {st['kind']!r}, {source}"


def _layout_of(shapes: dict) -> str:
    """A UNet's block layout in words, from its ldm keys (input_blocks.0 is conv_in; a down
    level ends at its downsampler, input_blocks.N.0.op)."""
    conv_in = shapes.get("input_blocks.0.0.weight")
    blocks = sorted({int(k.split(".")[1]) for k in shapes if k.startswith("input_blocks.")})
    per_level, layers = [], 0
    for b in blocks[1:]:
        if f"input_blocks.{b}.0.op.weight" in shapes:
            per_level.append(layers)
            layers = 0
        else:
            layers += 1
    per_level.append(layers)
    mid = any(k.startswith("middle_block.") for k in shapes)
    width = f", {conv_in[0]} channels wide" if conv_in else ""
    return (f"{len(per_level)} levels with {'/'.join(map(str, per_level))} layers per down block, "
            f"{'a' if mid else 'no'} middle block{width}")


def _check_same_gri(run: Training, path: str, saved: str | None) -> None:
    """A checkpoint resumes only into a run with the same GRI attention (the same units, window
    and pool): its weights were trained for that attention."""
    def units(settings):
        return sorted((s.unit.name, s.transformer_index) for s in gri_sites(run.unet, settings))
    try:
        old = json.loads(saved) if saved else None
        same = (old is None) == (run.gri is None) and (old is None or (
            (old["window"], old["pool"]) == (run.gri["window"], run.gri["pool"]) and units(old) == units(run.gri)))
    except (ValueError, KeyError, TypeError, ConfigError):
        same = False
    if not same:
        told = lambda s: "without GRI attention" if s is None else f"with GRI attention {s}"   # noqa: E731
        raise ConfigError(f"{path} was trained {told(saved)}, but this config trains {told(gri_meta(run.gri))}; "
                          "its weights do not continue this run. Give the same [gri] settings to resume it, or "
                          "another 'out' folder to start a new run")


@contextlib.contextmanager
def _gri_active(run: Training):
    """While training, the student's chosen A units compute GRI attention (the teacher keeps full
    attention); ``train_step`` sets the shift parity from the step."""
    if run.gri is None:
        yield None
        return
    with gri.gri_unet(run.unet, run.gri["units"], run.gri["window"], run.gri["pool"]) as g:
        run.gri_handle = g
        try:
            yield g
        finally:
            run.gri_handle = None


def train_step(run: Training, step: int) -> list[dict]:
    """One optimizer step over ``grad_accum`` micro-batches; returns each micro-batch's loss terms."""
    if run.gri_handle is not None:
        run.gri_handle.step = step   # the shift parity, as a sampler step sets it: a resume repeats it
    g = step_generator(run.cfg["seed"], step)
    batch, micro_batches = run.cfg["batch"], run.cfg["grad_accum"]
    run.opt.zero_grad(set_to_none=True)
    terms_per_micro = []
    for micro in range(micro_batches):
        idx = torch.randint(0, len(run.latents), (batch,), generator=g)
        x_t, t, noise = distill.noised(run.latents[idx], run.sigmas, g)
        share = slice(run.rank, None, run.world)   # this process's share of the step's batch
        # DDP averages gradients on the last micro-batch of the step only
        sync = run.world == 1 or micro == micro_batches - 1
        with (contextlib.nullcontext() if sync else run.model.no_sync()):
            dev = run.device
            y = None if run.y is None else run.y[idx][share].to(dev)
            loss, terms = distill.distill_loss(run.teacher, run.unet, x_t[share].to(dev), t[share].to(dev),
                                               run.context[idx][share].to(dev), noise[share].to(dev),
                                               run.weights, student_fn=run.model, perceptual=run.perceptual,
                                               pairs=run.pairs, y=y)
            (loss / micro_batches).backward()
        terms_per_micro.append(terms)
    run.opt.step()
    return terms_per_micro


def checkpoint(run: Training, step: int) -> None:
    """Commits the checkpoint after ``step`` steps, then exports the student (and its experts)
    for the nodes."""
    _commit(run, step)
    export(run, step)


def export(run: Training, step: int) -> None:
    meta = {"asdm.train.step": str(step)}
    if run.gri is not None:
        meta["asdm.gri"] = gri_meta(run.gri)
    assembly.save_unet(run.student, run.path("unet"), extra_meta=meta,
                       state={k: v.detach().cpu() for k, v in run.unet.state_dict().items()})
    if run.experts:
        condconv.save_experts(run.experts, run.path("experts"), {"asdm.train.step": str(step)})


def train(cfg: dict, log=print) -> dict:
    run = setup(cfg, log)
    resume(run, log)
    terms_log, t0, history = [], time.time(), []
    last_saved = run.start
    with distill.trainable(run.teacher, run.unet), _experts_active(run.unet, run.experts), _gri_active(run):
        for step in range(run.start, cfg["steps"]):
            terms = train_step(run, step)
            bad = [k for d in terms for k, v in d.items() if not math.isfinite(v)]
            if bad:
                kept = (f"the last good checkpoint (step {last_saved}) is kept in {cfg['out']}" if last_saved
                        else "no checkpoint was written")
                raise TrainingError(f"the {bad[0]} loss is not finite (NaN or Inf) at step {step + 1}; "
                                    f"training stopped and {kept}. Lower lr, or check the data and the teacher")
            terms_log += terms
            done = step + 1
            if done % cfg["log_every"] == 0 and run.rank == 0:
                mean = {k: sum(d[k] for d in terms_log) / len(terms_log) for k in terms_log[0]}
                history.append((done, mean))
                log(f"step {done}/{cfg['steps']}  " + "  ".join(f"{k} {v:.4f}" for k, v in mean.items())
                    + f"  ({(time.time() - t0) / len(terms_log) * cfg['grad_accum']:.2f} s/step)")
                terms_log, t0 = [], time.time()
            if run.rank == 0 and (done % cfg["save_every"] == 0 or done == cfg["steps"]):
                checkpoint(run, done)
                last_saved = done
    if run.rank == 0 and run.start >= cfg["steps"]:   # resumed a finished run: its exports made whole
        export(run, run.start)
    if run.world > 1:
        digest = tensor_digest({n: run.params[n] for n in run.names})
        print(f"rank {run.rank}: weights sha256 {digest[:16]}", flush=True)   # ranks must agree
        dist.barrier()
        dist.destroy_process_group()
    return {"history": history, "unet": run.path("unet"), "experts": run.path("experts") if run.experts else None}


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m asdm.training", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="a TOML file (see docs/training.md)")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    try:
        cfg = load_config(a.config)   # a bad config is told before ComfyUI starts
        compat.start_host()
        train(cfg)
    except ASDMError as e:   # ConfigError, or the engine's own about what the config gave it
        print(f"asdm.training: {e.message()}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"asdm.training: {e}", file=sys.stderr)
        return 3
    return 0

