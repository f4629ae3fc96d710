"""Model assembly (A-SDM §IV-A) and BK-SDM block removal (BK-SDM §3.1), over the block names
of ``topology``.

An assembled UNet takes each block from one of two sources: ``A`` (the original UNet) or ``B``
(the compressed one). Its layout is per level: a level's down block and its mirrored up block
may come from different sources only when the up block still has one layer more than the down
block, so every skip connection finds its partner. The stem follows the blocks it touches
unless the recipe says otherwise: ``in`` (conv_in) follows dn0, ``out`` follows the last up
block, ``time`` (the time embedding) follows ``mid`` — the deep part A-SDM keeps frozen.

Recipe grammar: ``part=A|B`` pairs, comma-separated; ``part`` is a block name (``dn0``, ``mid``,
``up3``), a stem part (``in``, ``time``, ``out``) or ``*`` (every part not named). Unnamed parts
come from A. Example: ``dn0=B, dn1=B, up2=B, up3=B`` is M2.
"""
from __future__ import annotations

import copy
import json
from typing import NamedTuple

import torch

from . import derived_files, host_models
from .errors import AssemblyError, UNetFileError
from .topology import Topology, copy_entries, describe
from .unet_files import ASDM_FORMAT, check_keys

RECIPES: dict[str, tuple[str, str]] = {
    "M1": ("dn0=B, up3=B", "Base dn0 + up3, SD the rest"),
    "M2": ("dn0=B, dn1=B, up2=B, up3=B", "Base dn0, dn1, up2, up3; SD dn2, dn3, mid, up0, up1 (the paper's best)"),
    "M3": ("dn0=B, dn1=B, dn2=B, up1=B, up2=B, up3=B", "Base dn0-dn2 + up1-up3, SD dn3, mid, up0"),
}

STEM = ("in", "time", "out")



def recipe_spec(recipe: str) -> str:
    """A recipe's spec: the named recipes (M1, M2, M3) are looked up, a spec is itself."""
    if recipe in RECIPES:
        return RECIPES[recipe][0]
    if "=" not in recipe:
        raise AssemblyError(f"unknown recipe {_short(recipe)}: one of {', '.join(RECIPES)}, or a spec such "
                            "as 'dn0=B, up3=B'")
    return recipe


def _short(text: str, n: int = 60) -> str:
    """A user's text quoted in an error, cut short: a pasted megabyte is not echoed back."""
    return repr(text) if len(text) <= n else repr(text[:n]) + f"... ({len(text)} characters)"


def parse_recipe(recipe: str, blocks: list[str]) -> dict[str, str]:
    """part -> 'A' or 'B' for every block in ``blocks`` and every stem part."""
    given: dict[str, str] = {}
    valid = list(blocks) + list(STEM) + ["*"]
    if len(recipe) > 4000:
        raise AssemblyError(f"the recipe is {len(recipe)} characters long; a recipe names at most a dozen "
                            "parts, e.g. 'dn0=B, dn1=B, up2=B, up3=B'")
    for tok in [t.strip() for t in recipe.replace(";", ",").split(",") if t.strip()]:
        part, eq, src = (s.strip() for s in tok.partition("="))
        if not eq or src.upper() not in ("A", "B"):
            raise AssemblyError(f"malformed recipe entry {_short(tok)}: write part=A or part=B, e.g. 'dn0=B, up3=B'")
        if part not in valid:
            raise AssemblyError(f"recipe entry {_short(tok)} names {_short(part, 20)}, which is not a part of this "
                                f"UNet; parts: {', '.join(valid)}")
        if part in given and given[part] != src.upper():
            raise AssemblyError(f"the recipe gives {part} twice, from {given[part]} and from {src.upper()}; "
                                "name each part once")
        given[part] = src.upper()
    default = given.get("*", "A")
    out = {b: given.get(b, default) for b in blocks}
    last_up = [b for b in blocks if b.startswith("up")][-1]
    derived = {"in": out["dn0"], "out": out[last_up], "time": out.get("mid", default)}
    for s in STEM:
        out[s] = given.get(s, given.get("*", derived[s]))
    return out


def _unet(patcher):
    return patcher.model.diffusion_model


def _levels(topo: Topology) -> int:
    return sum(b.startswith("dn") for b in topo.blocks)


def _check_sources(a, b) -> None:
    ca, cb = a.model.model_config.unet_config, b.model.model_config.unet_config
    if type(a.model.model_config) is not type(b.model.model_config) or ca.get("context_dim") != cb.get("context_dim"):
        raise AssemblyError(
            f"the models are of different families: original {type(a.model.model_config).__name__} "
            f"(context {ca.get('context_dim')}), compressed {type(b.model.model_config).__name__} "
            f"(context {cb.get('context_dim')}); assemble a v1 UNet with a v1 UNet, v2 with v2")
    la, lb = len(ca["channel_mult"]), len(cb["channel_mult"])
    if la != lb:
        raise AssemblyError(
            f"the original UNet has {la} levels and the compressed one {lb}; blocks can only be "
            "exchanged between UNets with the same levels (BK-SDM Tiny has none of dn3/up0/mid: "
            "assemble Base or Small, or use the switch node)")
    for key in ("model_channels", "channel_mult", "use_linear_in_transformer", "num_heads", "num_head_channels"):
        if ca.get(key) != cb.get(key):
            raise AssemblyError(f"the models' {key} differ (original {ca.get(key)}, compressed "
                                f"{cb.get(key)}); their blocks do not fit together")
    for name, p in (("original", a), ("compressed", b)):
        if p.patches or p.object_patches:
            raise AssemblyError(
                f"the {name} MODEL carries {len(p.patches)} weight patches (LoRA) and "
                f"{len(p.object_patches)} object patches (A-SDM, ...); assembling builds a new UNet "
                "and cannot carry them — connect the plain loaders here and apply LoRAs and patches "
                "to the assembled MODEL")


def _transformer_depths(unet, topo: Topology, block: str) -> list[int]:
    """Transformer depth per layer of a block (0 where the layer has no attention unit)."""
    out = []
    for path in topo.entries[block][:topo.layers[block]]:
        seq = unet.get_submodule(path)
        depth = 0
        for m in seq:
            if type(m).__name__ == "SpatialTransformer":
                depth = len(m.transformer_blocks)
        out.append(depth)
    return out


# ComfyUI's unet_config key transformer_depth_middle: the middle block's attention depth, or one
# of these two values the host's UNetModel reads as "no attention in the middle block" (R, R)
# and "no middle block at all" (BK-SDM Small and Tiny).
MID_WITHOUT_ATTENTION = -1
NO_MID_BLOCK = -2


def _mid_depth(unet) -> int:
    mid = getattr(unet, "middle_block", None)
    if mid is None or len(mid) == 0:
        return NO_MID_BLOCK
    for m in mid:
        if type(m).__name__ == "SpatialTransformer":
            return len(m.transformer_blocks)
    return MID_WITHOUT_ATTENTION


class _Source(NamedTuple):
    patcher: object   # the MODEL
    unet: torch.nn.Module
    topo: Topology


def assemble(original, compressed, recipe: str):
    """A new MODEL whose UNet holds each block's weights from the source the recipe names."""
    _check_sources(original, compressed)
    ua, ub = _unet(original), _unet(compressed)
    ta, tb = describe(ua), describe(ub)
    choice = parse_recipe(recipe, ta.blocks)
    src = {"A": _Source(original, ua, ta), "B": _Source(compressed, ub, tb)}
    for part, s in choice.items():
        if part in STEM:
            continue
        if part not in src[s].topo.blocks:
            raise AssemblyError(f"the recipe takes {part} from {'the compressed' if s == 'B' else 'the original'} "
                                f"UNet, which has no {part} (its blocks: {', '.join(src[s].topo.blocks)})")
    n = _levels(ta)
    num_res, depth_in, depth_out = [], [], []
    for k in range(n):
        dn, up = f"dn{k}", f"up{n - 1 - k}"
        (_, u_dn, t_dn), (_, u_up, t_up) = src[choice[dn]], src[choice[up]]
        if t_up.layers[up] != t_dn.layers[dn] + 1:
            raise AssemblyError(
                f"{dn} from {choice[dn]} has {t_dn.layers[dn]} layers but {up} from {choice[up]} has "
                f"{t_up.layers[up]}; a level's up block needs exactly one layer more than its down "
                f"block so the skip connections line up — take {dn} and {up} from the same source")
        num_res.append(t_dn.layers[dn])
        depth_in += _transformer_depths(u_dn, t_dn, dn)
    for k in range(n):
        up = f"up{k}"
        _, u_up, t_up = src[choice[up]]
        depth_out += _transformer_depths(u_up, t_up, up)
    mid_src = choice.get("mid")
    cfg = copy.deepcopy(original.model.model_config.unet_config)
    cfg.update(num_res_blocks=num_res, transformer_depth=depth_in,
               transformer_depth_output=depth_out[::-1],   # the host pops it from the end
               transformer_depth_middle=_mid_depth(src[mid_src].unet) if mid_src else NO_MID_BLOCK)
    cfg.pop("dtype", None)

    clean = {s: host_models.unet_state_dict(source.patcher) for s, source in src.items()
             if s in choice.values()}
    model_config = type(original.model.model_config)(cfg)
    target = describe(host_models.empty_unet(model_config))
    sd = {}
    for part, s in choice.items():
        copy_entries(clean[s], src[s].topo.entries[part], target.entries[part], sd)
    patcher = host_models.model_from_config(model_config, sd, host_models.prediction(original), _check_complete)
    patcher.model.model_config.asdm_recipe = recipe_string(choice)
    return patcher


def _check_complete(unet, sd):
    try:
        check_keys(unet, sd)
    except UNetFileError as e:
        raise AssemblyError(f"the chosen blocks do not fit together: {e}") from None


def recipe_string(choice: dict[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in choice.items())


# ---------------------------------------------------------------------------------------------
# BK-SDM block removal: a compact UNet initialised from its teacher (BK-SDM §3.1)
# ---------------------------------------------------------------------------------------------

BKSDM_LAYOUTS = {
    # name: (layers per down block, middle block kept, levels removed from the deep end)
    "base": (1, True, 0),
    "small": (1, False, 0),
    "tiny": (1, False, 1),
}


def compress(teacher, layout: str = "base"):
    """A block-removed MODEL initialised from ``teacher``'s weights: down blocks keep their
    first layers, up blocks their first and last (the last holds the skip from the end of the
    mirrored down block); Tiny also drops the deepest level and Small/Tiny the middle block."""
    if layout not in BKSDM_LAYOUTS:
        raise AssemblyError(f"unknown layout {layout!r}; one of {', '.join(BKSDM_LAYOUTS)}")
    per_block, keep_mid, drop = BKSDM_LAYOUTS[layout]
    ut = _unet(teacher)
    tt = describe(ut)
    n = _levels(tt) - drop
    cfg = copy.deepcopy(teacher.model.model_config.unet_config)
    cfg.pop("dtype", None)
    teacher_dn = [f"dn{k}" for k in range(n)]
    teacher_up = [f"up{k + drop}" for k in range(n)]
    cfg.update(channel_mult=list(cfg["channel_mult"])[:n], num_res_blocks=[per_block] * n,
               transformer_depth=sum((_transformer_depths(ut, tt, b)[:per_block] for b in teacher_dn), []),
               transformer_depth_output=sum(   # in output order; the host pops it from the end
                   (_keep_up(_transformer_depths(ut, tt, b), per_block + 1) for b in teacher_up), [])[::-1],
               transformer_depth_middle=_mid_depth(ut) if keep_mid else NO_MID_BLOCK)
    model_config = type(teacher.model.model_config)(cfg)
    student = describe(host_models.empty_unet(model_config))
    clean = host_models.unet_state_dict(teacher)
    sd = {}
    for part in ("in", "time", "out"):
        copy_entries(clean, tt.entries[part], student.entries[part], sd)
    for k in range(n):
        dn_t, up_t = tt.entries[teacher_dn[k]], tt.entries[teacher_up[k]]
        layers_dn = dn_t[:tt.layers[teacher_dn[k]]]
        sampler = dn_t[tt.layers[teacher_dn[k]]:] if k < n - 1 else []
        copy_entries(clean, layers_dn[:per_block] + sampler, student.entries[f"dn{k}"], sd)
        copy_entries(clean, _keep_up(up_t, per_block + 1), student.entries[f"up{k}"], sd)
    if keep_mid:
        copy_entries(clean, tt.entries["mid"], student.entries["mid"], sd)
    return host_models.model_from_config(model_config, sd, host_models.prediction(teacher), _check_complete)


def _keep_up(items: list, count: int) -> list:
    """First count-1 items and the last one."""
    return list(items[:count - 1]) + [items[-1]]


# ---------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------

def save_unet(patcher, path: str, extra_meta: dict | None = None, dtype=None, state: dict | None = None,
              derive_from: str | None = None, int8: bool = False) -> None:
    """The UNet in ldm layout (what ComfyUI's own UNet loader reads), with its layout and the
    assembly recipe (if any) in the metadata.

    ``derive_from``: a UNet file in the same folder this one derives from (an assembled UNet's
    original, an ME-CondConv student's compressed UNet). The blocks whose weights equal that
    file's (block by block, by name) are not stored; loading puts them back from it. Such a
    file is read by A-SDM Load Compressed UNet, not by ComfyUI's own UNet loader."""
    sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
          for k, v in (state if state is not None else host_models.unet_state_dict(patcher)).items()}
    mc = patcher.model.model_config
    meta = {"asdm.format": ASDM_FORMAT,
            "asdm.family": type(mc).__name__,
            "asdm.prediction": host_models.prediction(patcher),
            "asdm.layout": json.dumps({k: v for k, v in mc.unet_config.items() if k != "dtype"}, default=str)}
    if getattr(mc, "asdm_recipe", None):
        meta["asdm.recipe"] = mc.asdm_recipe
    meta.update(extra_meta or {})
    derived_files.write_unet(sd, meta, path, derive_from, int8)
