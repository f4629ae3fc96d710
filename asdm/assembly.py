"""Model assembly (A-SDM §IV-A) and block removal (BK-SDM §3.1; KOALA's depth cuts for SDXL),
over the block names of ``topology``.

An assembled UNet takes each block from one of two sources: ``A`` (the original UNet) or ``B``
(the compressed one). Its layout is per level: a level's down block and its mirrored up block
may come from different sources only when the up block still has one layer more than the down
block, so every skip connection finds its partner. The stem follows the blocks it touches
unless the recipe says otherwise: ``in`` (conv_in) follows dn0, ``out`` follows the last up
block, ``time`` (the time embedding, and SDXL's class embedding of y) follows ``mid`` — the deep
part A-SDM keeps frozen.

Recipe grammar: ``part=A|B`` pairs, comma-separated; ``part`` is a block name (``dn0``, ``mid``,
``up3``), a level pair ``pairK`` (``dn{K}`` and its mirror ``up{L-1-K}``, on a UNet of L levels),
a stem part (``in``, ``time``, ``out``) or ``*`` (every part not named). Unnamed parts come from
A. The named recipes are written as level pairs, so M1 / M2 / M3 take the analogous parts of
every layout: on SD1.5 (4 levels) M2 is ``dn0, dn1, up2, up3``, on SDXL (3 levels) ``dn0, dn1,
up1, up2``.
"""
from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from typing import NamedTuple

import torch

from . import derived_files, host_models, unet_files
from .errors import AssemblyError, UNetFileError
from .topology import Topology, copy_entries, describe
from .unet_files import ASDM_FORMAT, check_keys

RECIPES: dict[str, tuple[str, str]] = {
    "M1": ("pair0=B", "B's shallowest level pair (dn0 and the last up block), A the rest"),
    "M2": ("pair0=B, pair1=B", "B's two shallowest level pairs (SD1.5: dn0, dn1, up2, up3), A the deep "
           "part and mid (the paper's best)"),
    "M3": ("pair0=B, pair1=B, pair2=B", "B's three shallowest level pairs, A the rest (on a 3-level UNet "
           "such as SDXL that is every pair: B with A's middle block and time embedding)"),
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


_PAIR_RE = re.compile(r"^pair(\d+)$")


def parse_recipe(recipe: str, blocks: list[str]) -> dict[str, str]:
    """part -> 'A' or 'B' for every block in ``blocks`` and every stem part."""
    given: dict[str, str] = {}
    levels = sum(b.startswith("dn") for b in blocks)
    valid = list(blocks) + list(STEM) + ["*"]
    if len(recipe) > 4000:
        raise AssemblyError(f"the recipe is {len(recipe)} characters long; a recipe names at most a dozen "
                            "parts, e.g. 'dn0=B, dn1=B, up2=B, up3=B'")
    for tok in [t.strip() for t in recipe.replace(";", ",").split(",") if t.strip()]:
        part, eq, src = (s.strip() for s in tok.partition("="))
        if not eq or src.upper() not in ("A", "B"):
            raise AssemblyError(f"malformed recipe entry {_short(tok)}: write part=A or part=B, e.g. 'dn0=B, up3=B'")
        if m := _PAIR_RE.match(part):
            k = int(m.group(1))
            if k >= levels:
                raise AssemblyError(f"recipe entry {_short(tok)} names level pair {k}, but this UNet has {levels} "
                                    f"levels (pairs 0-{levels - 1}); a pair is dn{{k}} with up{{L-1-k}}")
            parts = [f"dn{k}", f"up{levels - 1 - k}"]
        elif part in valid:
            parts = [part]
        else:
            raise AssemblyError(f"recipe entry {_short(tok)} names {_short(part, 20)}, which is not a part of this "
                                f"UNet; parts: {', '.join(valid)}, or a level pair pair0-pair{levels - 1}")
        for p in parts:
            if p in given and given[p] != src.upper():
                raise AssemblyError(f"the recipe gives {p} twice, from {given[p]} and from {src.upper()}; "
                                    "name each part once")
            given[p] = src.upper()
    default = given.get("*", "A")
    out = {b: given.get(b, default) for b in blocks}
    last_up = [b for b in blocks if b.startswith("up")][-1]
    derived = {"in": out["dn0"], "out": out[last_up], "time": out.get("mid", default)}
    for s in STEM:
        out[s] = given.get(s, given.get("*", derived[s]))
    if "*" not in given and all(out[b] == "B" for b in blocks):
        why = "" if "mid" in blocks else " (the original has no middle block to keep)"
        raise AssemblyError(f"the recipe takes every block of this {levels}-level UNet from B{why}: no part of "
                            "A is left. Use the compressed MODEL itself, a recipe with fewer level pairs (M1, "
                            "M2), or write '*=B' to rebuild B")
    return out


def _unet(patcher):
    return patcher.model.diffusion_model


def _levels(topo: Topology) -> int:
    return sum(b.startswith("dn") for b in topo.blocks)


def _check_sources(a, b) -> None:
    ca, cb = a.model.model_config.unet_config, b.model.model_config.unet_config
    ka, kb = host_models.conditioning_kind(a), host_models.conditioning_kind(b)
    if ka != kb:
        what = next(k for k in ka if ka[k] != kb[k])
        raise AssemblyError(
            f"the models are of different families: {what} of the original {ka[what]}, of the compressed "
            f"{kb[what]}; assemble a UNet with a student of its own family (SD1.x with BK-SDM v1, SD2.x with "
            "v2, SDXL with SSD-1B, Vega or KOALA)")
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
# of these two values the host's UNetModel reads as "no attention in the middle block" (then it
# holds one ResNet: SSD-1B, Vega) and "no middle block at all" (BK-SDM Small and Tiny, KOALA-700M).
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
    """A new MODEL whose UNet holds each block's weights from the source the recipe (a named
    recipe or a spec) names."""
    _check_sources(original, compressed)
    ua, ub = _unet(original), _unet(compressed)
    ta, tb = describe(ua), describe(ub)
    choice = parse_recipe(RECIPES[recipe][0] if recipe in RECIPES else recipe, ta.blocks)
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
    patcher = host_models.model_from_config(model_config, sd, host_models.prediction(original), _check_complete,
                                            host_models.zero_snr(original), like=original)
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
# Block removal: a compact UNet initialised from its teacher (BK-SDM §3.1; KOALA's depth cuts)
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Layout:
    """A block-removed layout, as operations on any teacher of the families it names.

    Down blocks keep their first ``per_block`` layers, up blocks their first ``per_block`` and
    their last (the last holds the skip from the end of the mirrored down block); ``drop_levels``
    levels go from the deep end. ``mid``: True keeps the middle block, False removes it, a number
    keeps it with that many transformer blocks. ``depths``: per level, how many transformer blocks
    each kept layer's attention unit keeps (None: all). A cut keeps a stack's first blocks, as
    BK-SDM keeps a block's first layers: the shorter residual stack, with the unit's norm and
    projections, is initialised from the teacher's weights."""
    per_block: int
    mid: bool | int
    drop_levels: int
    depths: tuple | None = None
    family: str | None = None   # the one family it is defined for (its depths are that family's)
    text: str = ""


LAYOUTS = {
    "base": Layout(1, True, 0, text="BK-SDM Base: one layer per down block, two per up block"),
    "small": Layout(1, False, 0, text="BK-SDM Small: Base without the middle block"),
    "tiny": Layout(1, False, 1, text="BK-SDM Tiny: Small without the deepest level (UNets whose two deepest "
                   "levels share a width: SD1.x, SD2.x)"),
    # KOALA's UNets (the host's KOALA_700M / KOALA_1B configs): BK-SDM-style layer removal on SDXL,
    # plus the deepest level's 10-block transformer stacks cut to 5 (700M, no middle block) or 6
    # (1B, whose middle block keeps 6).
    "koala-700m": Layout(1, False, 0, (0, 2, 5), "SDXL", "KOALA-700M: SDXL, one layer per down block, "
                         "transformer depth 2 / 5 at levels 1 / 2, no middle block"),
    "koala-1b": Layout(1, 6, 0, (0, 2, 6), "SDXL", "KOALA-1B: SDXL, one layer per down block, transformer "
                       "depth 2 / 6 at levels 1 / 2, middle block of depth 6"),
}
BKSDM_LAYOUTS = {k: v for k, v in LAYOUTS.items() if v.family is None}


def _layout(name: str) -> Layout:
    if name not in LAYOUTS:
        raise AssemblyError(f"unknown layout {name!r}; one of {', '.join(LAYOUTS)}")
    return LAYOUTS[name]


def _cut_depth(layout: Layout, name: str, level: int, depth: int, where: str) -> int:
    """The transformer depth a kept layer of ``level`` (teacher depth ``depth``) has in the layout."""
    if layout.depths is None:
        return depth
    want = layout.depths[level]
    if (want == 0) != (depth == 0) or depth < want:
        raise AssemblyError(f"layout {name} keeps {want} transformer blocks in each level-{level} layer, but the "
                            f"teacher's {where} has {depth}; cut {name} from SDXL itself (depths 0 / 2 / 10)")
    return want


def _check_layout(teacher, name: str, layout: Layout, levels: int) -> None:
    if layout.family is None:
        if levels - layout.drop_levels < 1:
            raise AssemblyError(f"layout {name} removes {layout.drop_levels} level(s), and the teacher has only {levels}")
        cfg = teacher.model.model_config.unet_config
        mult = list(cfg["channel_mult"])
        if layout.drop_levels and len(set(mult[levels - 1 - layout.drop_levels:])) > 1:
            mc = cfg["model_channels"]
            raise AssemblyError(f"layout {name} removes the deepest level, after which the up blocks read the next "
                                f"level's width ({mc * mult[-1 - layout.drop_levels]}) where the teacher's read the "
                                f"removed level's ({mc * mult[-1]}), so the teacher's weights do not fit: it is defined "
                                "for UNets whose deepest levels share a width (SD1.x, SD2.x), not this one (SDXL's "
                                "family); use one of " + ", ".join(k for k in LAYOUTS if not LAYOUTS[k].drop_levels))
        return
    fam = unet_files.family_of(teacher.model.model_config.unet_config)
    if fam != layout.family or levels != len(layout.depths):
        raise AssemblyError(f"layout {name} is a layout of {layout.family}-family UNets ({len(layout.depths)} "
                            f"levels); this teacher is {fam} with {levels} levels: use one of "
                            f"{', '.join(BKSDM_LAYOUTS)}")


def compress(teacher, layout: str = "base"):
    """A block-removed MODEL initialised from ``teacher``'s weights (``LAYOUTS``): the kept
    layers, samplers, stem and middle block carry the teacher's weights bit for bit."""
    lay = _layout(layout)
    ut = _unet(teacher)
    tt = describe(ut)
    levels = _levels(tt)
    _check_layout(teacher, layout, lay, levels)
    per_block, drop = lay.per_block, lay.drop_levels
    n = levels - drop
    teacher_dn = [f"dn{k}" for k in range(n)]
    teacher_up = [f"up{k + drop}" for k in range(n)]   # up{k} of the student mirrors dn{n-1-k}
    depth_in, depth_out = [], []
    for k in range(n):   # student dn{k} is at level k
        depth_in += [_cut_depth(lay, layout, k, d, f"{teacher_dn[k]}.{i}") for i, d in
                     enumerate(_transformer_depths(ut, tt, teacher_dn[k])[:per_block])]
    for k in range(n):   # student up{k} is at level n-1-k
        tb = teacher_up[k]
        kept = _keep_up(list(enumerate(_transformer_depths(ut, tt, tb))), per_block + 1)
        depth_out += [_cut_depth(lay, layout, n - 1 - k, d, f"{tb}.{i}") for i, d in kept]
    mid_depth = _mid_depth(ut)
    if lay.mid is False or mid_depth == NO_MID_BLOCK:
        new_mid = NO_MID_BLOCK
    elif lay.mid is True:
        new_mid = mid_depth
    else:
        if mid_depth < lay.mid:
            raise AssemblyError(f"layout {layout} keeps {lay.mid} transformer blocks in the middle block, but the "
                                f"teacher's has {max(mid_depth, 0)}; cut {layout} from SDXL itself (depth 10)")
        new_mid = lay.mid
    cfg = copy.deepcopy(teacher.model.model_config.unet_config)
    cfg.pop("dtype", None)
    cfg.update(channel_mult=list(cfg["channel_mult"])[:n], num_res_blocks=[per_block] * n,
               transformer_depth=depth_in,
               transformer_depth_output=depth_out[::-1],   # in output order; the host pops it from the end
               transformer_depth_middle=new_mid)
    model_config = type(teacher.model.model_config)(cfg)
    empty = host_models.empty_unet(model_config)
    student = describe(empty)
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
    if new_mid != NO_MID_BLOCK:
        copy_entries(clean, tt.entries["mid"], student.entries["mid"], sd)
    sd = _without_cut_blocks(sd, empty.state_dict())
    return host_models.model_from_config(model_config, sd, host_models.prediction(teacher), _check_complete,
                                         host_models.zero_snr(teacher), like=teacher)


_BLOCK_RE = re.compile(r"\.transformer_blocks\.\d+\.")


def _without_cut_blocks(sd: dict, own: dict) -> dict:
    """``sd`` without the transformer blocks a depth cut removed (those the student has no
    place for); any other key the student lacks stays, for the completeness check to name."""
    return {k: v for k, v in sd.items() if k in own or not _BLOCK_RE.search(k)}


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
    prediction, zsnr = host_models.prediction(patcher), host_models.zero_snr(patcher)
    meta = {"asdm.format": ASDM_FORMAT,
            "asdm.family": type(mc).__name__,
            "asdm.prediction": prediction,
            "asdm.layout": json.dumps({k: v for k, v in mc.unet_config.items() if k != "dtype"}, default=str)}
    if zsnr:
        meta["asdm.zsnr"] = "true"
    if mc.unet_config.get("adm_in_channels") == unet_files.SDXL_Y:
        # the host's own loader reads these marks (for SDXL's class only) where it reads no metadata
        sd.update(unet_files.sampling_marks(prediction, zsnr))
    if getattr(mc, "asdm_recipe", None):
        meta["asdm.recipe"] = mc.asdm_recipe
    meta.update(extra_meta or {})
    derived_files.write_unet(sd, meta, path, derive_from, int8)
