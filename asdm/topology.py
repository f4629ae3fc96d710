"""The paper's block / layer / unit names, mapped to module paths of a ComfyUI ``UNetModel``.

Tiers (A-SDM §III-B):

* **block**: ``dn0..dnL-1`` (dn0 = highest resolution), ``mid``, ``up0..upL-1`` (up0 = lowest
  resolution, so ``up{L-1-k}`` mirrors ``dn{k}``). SD1.x/2.x have L = 4; BK-SDM Tiny has 3.
* **layer**: ``dn1.0``, ``up2.2``... Down/upsamplers belong to their block but are not layers.
* **unit**: ``R`` (ResNet unit, ``ResBlock``) or ``A`` (attention unit, ``SpatialTransformer``):
  ``dn0.1.A``, ``up3.0.R``; the middle block has ``mid.R0``, ``mid.A``, ``mid.R1``.

Everything else in the pack speaks in these names; this is the only module that knows that
``dn1.0.R`` is ``input_blocks.4.0`` in SD1.5.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

import torch

from .errors import TopologyError


@dataclass(frozen=True)
class Unit:
    name: str   # "dn1.0.R", "mid.A"
    path: str   # module path inside the UNet: "input_blocks.4.0"
    kind: str   # "R" or "A"
    block: str  # "dn1", "mid"


@dataclass
class Topology:
    units: list[Unit]
    blocks: list[str]          # in forward order: dn0.., mid, up0..
    layers: dict[str, int]     # block -> number of layers (mid: 1)
    # block -> module paths of its entries in forward order: its layers, then a down block's
    # downsampler (an up block's upsampler sits inside its last layer). Also the stem parts
    # "in" (conv_in), "time" (time embedding) and "out" (final norm + conv).
    entries: dict[str, list[str]] = field(default_factory=dict)

    def by_name(self) -> dict[str, Unit]:
        return {u.name: u for u in self.units}



def _is_kind(module: torch.nn.Module, cls_name: str) -> bool:
    # Match by class name so this works for every host version's module classes (and for
    # video/temporal subclasses, which we reject separately).
    return type(module).__name__ == cls_name


def _unit_kind(module: torch.nn.Module) -> str | None:
    if _is_kind(module, "ResBlock"):
        return "R"
    if _is_kind(module, "SpatialTransformer"):
        return "A"
    return None


def _is_resample(module: torch.nn.Module) -> bool:
    return type(module).__name__ in ("Downsample", "Upsample")


def describe(unet: torch.nn.Module) -> Topology:
    """Names every unit of an SD-style UNet (SD1.x, SD2.x, BK-SDM layouts, assembled mixes)."""
    for attr in ("input_blocks", "output_blocks"):
        if not hasattr(unet, attr):
            raise TopologyError(
                f"this MODEL's diffusion model is a {type(unet).__name__}, not an SD-style UNet "
                "(no input_blocks/output_blocks); A-SDM works on SD1.x/SD2.x-family UNets")
    units: list[Unit] = []
    layers: dict[str, int] = {}

    # Down path: input_blocks[0] is conv_in; a block whose first module is a Downsample closes
    # a level.
    down_levels: list[list[tuple[int, torch.nn.Module]]] = [[]]
    entries: dict[str, list[str]] = {"in": ["input_blocks.0"], "time": ["time_embed"], "out": ["out"]}
    if getattr(unet, "label_emb", None) is not None:
        entries["time"].append("label_emb")
    samplers: dict[int, str] = {}
    for idx, seq in enumerate(unet.input_blocks):
        if idx == 0:
            continue
        mods = list(seq)
        if _is_resample(mods[0]):
            samplers[len(down_levels) - 1] = f"input_blocks.{idx}"
            down_levels.append([])
            continue
        down_levels[-1].append((idx, seq))
    n_levels = len(down_levels)
    for lvl, level in enumerate(down_levels):
        block = f"dn{lvl}"
        layers[block] = len(level)
        entries[block] = [f"input_blocks.{idx}" for idx, _ in level] + (
            [samplers[lvl]] if lvl in samplers else [])
        for li, (idx, seq) in enumerate(level):
            units += _layer_units(seq, f"{block}.{li}", f"input_blocks.{idx}", block)

    mid = getattr(unet, "middle_block", None)
    mid_blocks = []
    if mid is not None and len(mid) > 0:
        layers["mid"] = 1
        r = 0
        for j, m in enumerate(mid):
            kind = _unit_kind(m)
            if kind is None:
                raise TopologyError(f"unexpected module {type(m).__name__} in the middle block")
            name = f"mid.R{r}" if kind == "R" else "mid.A"
            r += kind == "R"
            units.append(Unit(name, f"middle_block.{j}", kind, "mid"))
        mid_blocks = ["mid"]
        entries["mid"] = ["middle_block"]

    # Up path: a layer that ends with an Upsample closes a level (the last level has none).
    up_levels: list[list[tuple[int, torch.nn.Module]]] = [[]]
    for idx, seq in enumerate(unet.output_blocks):
        up_levels[-1].append((idx, seq))
        if _is_resample(list(seq)[-1]) and idx != len(unet.output_blocks) - 1:
            up_levels.append([])
    if len(up_levels) != n_levels:
        raise TopologyError(
            f"down path has {n_levels} levels but up path has {len(up_levels)}; not an SD-style UNet")
    for lvl, level in enumerate(up_levels):
        block = f"up{lvl}"
        layers[block] = len(level)
        entries[block] = [f"output_blocks.{idx}" for idx, _ in level]
        for li, (idx, seq) in enumerate(level):
            units += _layer_units(seq, f"{block}.{li}", f"output_blocks.{idx}", block)

    blocks = [f"dn{i}" for i in range(n_levels)] + mid_blocks + [f"up{i}" for i in range(n_levels)]
    return Topology(units=units, blocks=blocks, layers=layers, entries=entries)


def _layer_units(seq, prefix: str, path: str, block: str) -> list[Unit]:
    out = []
    for j, m in enumerate(seq):
        kind = _unit_kind(m)
        if kind is None:
            if _is_resample(m):
                continue
            raise TopologyError(
                f"unexpected module {type(m).__name__} at {path}.{j}; A-SDM works on SD-style "
                "UNets (ResBlock + SpatialTransformer layers)")
        out.append(Unit(f"{prefix}.{kind}", f"{path}.{j}", kind, block))
    return out


def copy_entries(src_sd: dict, src_paths: list[str], dst_paths: list[str], out: dict) -> None:
    """Puts the weights of ``src_sd`` under the module paths ``src_paths`` into ``out`` under
    ``dst_paths`` (pairwise): one part of a UNet (a block's entries) into another UNet's keys."""
    if len(src_paths) != len(dst_paths):
        raise TopologyError(f"internal: entry count differs ({src_paths} vs {dst_paths})")
    for sp, dp in zip(src_paths, dst_paths):
        for k, v in src_sd.items():
            if k.startswith(sp + "."):
                out[dp + k[len(sp):]] = v


# ---------------------------------------------------------------------------------------------
# Unit sets: a short grammar over the names above.
#
#   spec   := token ("," token)*
#   token  := a unit name, layer name or block name, with "*" as a wildcard:
#             "dn0"        every unit of dn0
#             "dn1.1"      both units of layer dn1.1
#             "up3.*.A"    the A units of every up3 layer
#             "dn*.*.R"    every R unit of every down block
#             "mid", "mid.A", "mid.R0"
#
# A token matches a unit when it matches the unit's whole name, or the name's prefix up to a
# dot ("dn1.1" covers "dn1.1.R" and "dn1.1.A").
# ---------------------------------------------------------------------------------------------

_TOKEN_RE = re.compile(r"^[A-Za-z0-9*]+(\.[A-Za-z0-9*]+){0,2}$")


def _token_matches(token: str, name: str) -> bool:
    return fnmatch.fnmatchcase(name, token) or fnmatch.fnmatchcase(name, token + ".*")


def parse_unit_spec(spec: str, topo: Topology, *, strict: bool = True) -> list[Unit]:
    """Resolves a comma-separated unit spec to the units it names, in forward order.

    ``strict``: a token that names nothing in this UNet is an error (user input); presets
    pass ``strict=False`` and report what they skip.
    """
    tokens = [t.strip() for t in spec.replace(";", ",").split(",") if t.strip()]
    chosen: set[str] = set()
    for tok in tokens:
        if not _TOKEN_RE.match(tok):
            raise TopologyError(
                f"malformed unit token {tok!r}: write block[.layer[.unit]], e.g. 'dn0', 'dn1.1', "
                f"'up3.*.A', 'mid.R0'. {valid_names_hint(topo)}")
        hits = [u.name for u in topo.units if _token_matches(tok, u.name)]
        if not hits and strict:
            raise TopologyError(f"unit token {tok!r} names no unit of this UNet. {valid_names_hint(topo)}")
        chosen.update(hits)
    return [u for u in topo.units if u.name in chosen]


def valid_names_hint(topo: Topology) -> str:
    parts = []
    for b in topo.blocks:
        if b == "mid":
            parts.append("mid (" + ", ".join(u.name for u in topo.units if u.block == "mid") + ")")
        else:
            kinds = sorted({u.kind for u in topo.units if u.block == b})
            parts.append(f"{b}.0-{topo.layers[b] - 1} ({'/'.join(kinds)})")
    return "Valid names here: " + "; ".join(parts) + "."


# ---------------------------------------------------------------------------------------------
# Structure presets (paper Fig. 10; the figure is not in the paper's text, so this table is the
# project's reading of it): the units that inherit on inheriting steps, defined by level role so
# they mean the analogous parts on every layout. Level pair k is (dn k, up L-1-k), k = 0 the
# shallowest (highest resolution); "deep" counts from the other end. On SD1.x/2.x (L = 4) the
# sets are the paper's; on three levels (SDXL family, BK-SDM Tiny) some coincide (LI2 = LI3,
# EX2 = EX3, DE1 = DE2, EN1 = EN2), which docs/presets.md lists.
# ---------------------------------------------------------------------------------------------

def _dn(ks) -> list[str]:
    return [f"dn{k}" for k in ks]


def _up(ks, L) -> list[str]:
    return [f"up{L - 1 - k}" for k in ks]


def _pairs(ks, L) -> list[str]:
    return _dn(ks) + _up(ks, L)


def _shallow(n: int, L: int) -> range:
    return range(min(n, L))


def _deep(n: int, L: int) -> range:
    return range(max(L - n, 0), L)


def _layer(blocks: list[str], index: int) -> list[str]:
    return [f"{b}.{index}" for b in blocks]


# name -> (unit spec for a UNet of L levels, description)
PRESETS: dict[str, tuple] = {
    "LI1": (lambda L: ["dn*.1", "up*.1"],
            "layer-level: 2nd layer of every down block, middle layer of every up block"),
    "LI2": (lambda L: _layer(_pairs(_shallow(L - 1, L), L), 1), "LI1 without the deepest level pair"),
    "LI3": (lambda L: _layer(_pairs(_shallow(2, L), L), 1), "LI1 in the two shallowest level pairs only"),
    "AI": (lambda L: ["dn*.*.A", "up*.*.A"], "every attention unit in down and up blocks"),
    "RI": (lambda L: ["dn*.*.R", "up*.*.R"], "every ResNet unit in down and up blocks"),
    "IN1": (lambda L: _pairs(_shallow(1, L), L), "inner loop: the shallowest level pair inherited"),
    "IN2": (lambda L: _pairs(_shallow(2, L), L), "inner loop: the two shallowest level pairs inherited"),
    "IN3": (lambda L: _pairs(_shallow(3, L), L), "inner loop: the three shallowest level pairs inherited"),
    "EX1": (lambda L: _pairs(_deep(1, L), L) + ["mid"], "external loop: the deepest level pair and mid inherited"),
    "EX2": (lambda L: _pairs(_deep(2, L), L) + ["mid"], "external loop: the two deepest level pairs and mid inherited"),
    "EX3": (lambda L: _pairs(_deep(L - 1, L), L) + ["mid"],
            "external loop: all but the shallowest level pair inherited"),
    "DE1": (lambda L: _dn(_deep(2, L)), "decoder loop: the down blocks of the two deepest pairs inherited"),
    "DE2": (lambda L: _dn(_deep(L - 1, L)), "decoder loop: the encoder below the shallowest down block inherited"),
    "DE3": (lambda L: ["dn*", "mid"], "decoder loop: whole encoder and mid inherited"),
    "EN1": (lambda L: _up(_deep(2, L), L), "encoder loop: the up blocks of the two deepest pairs inherited"),
    "EN2": (lambda L: _up(_deep(L - 1, L), L), "encoder loop: the decoder above the shallowest up block inherited"),
    "EN3": (lambda L: ["mid", "up*"], "encoder loop: mid and whole decoder inherited"),
    "CO1": (lambda L: ["dn*", "mid"] + _pairs(_deep(2, L), L), "DE3 and EX2 together"),
    "CO2": (lambda L: _dn(_deep(L - 1, L)) + _pairs(_deep(1, L), L) + ["mid"], "DE2 and EX1 together"),
    "CO3": (lambda L: ["dn*", "mid"] + _up(_deep(L - 1, L), L), "everything except the shallowest up block"),
    "CO4": (lambda L: ["dn*.*.A", "up*.*.A", "mid"] + _pairs(_deep(2, L), L),
            "external loop where only R units compute"),
    "CO5": (lambda L: ["dn*.*.R", "up*.*.R", "mid"] + _pairs(_deep(2, L), L),
            "only the shallow A units compute"),
    "CO6": (lambda L: ["dn*", "mid"] + _up(_deep(L - 1, L), L) + [f"up{L - 1}.*.R"],
            "only the A units of the shallowest up block compute"),
}


def levels(topo: Topology) -> int:
    return sum(b.startswith("dn") for b in topo.blocks)


def preset_spec(name: str, topo: Topology) -> str:
    """The unit spec a preset names on this UNet's number of levels."""
    return ", ".join(PRESETS[name][0](levels(topo)))


# ---------------------------------------------------------------------------------------------
# The UNet's dataflow, for span-output reuse: every module the forward calls in turn (the
# children of input_blocks, middle_block and output_blocks, called "atoms" here), and which
# atoms read each one's output. ComfyUI's forward appends every input block's output to the
# skip list and pops it into output block N-1-i, so the last atom of input block i feeds the
# first atom of the next block and of output block N-1-i.
# ---------------------------------------------------------------------------------------------

OUT = "out"   # the final norm + conv: the consumer of the last output block


def dataflow(unet: torch.nn.Module) -> dict[str, tuple[str, ...]]:
    """Atom path -> the atoms that read its output, in forward order."""
    n_in, n_out = len(unet.input_blocks), len(unet.output_blocks)
    seqs = [f"input_blocks.{i}" for i in range(n_in)]
    mid = getattr(unet, "middle_block", None)
    if mid is not None and len(mid) > 0:
        seqs.append("middle_block")
    seqs += [f"output_blocks.{j}" for j in range(n_out)]
    flow: dict[str, tuple[str, ...]] = {}
    for k, seq in enumerate(seqs):
        n = len(unet.get_submodule(seq))
        for j in range(n):
            if j < n - 1:
                flow[f"{seq}.{j}"] = (f"{seq}.{j + 1}",)
                continue
            readers = [f"{seqs[k + 1]}.0" if k + 1 < len(seqs) else OUT]
            if seq.startswith("input_blocks."):
                readers.append(f"output_blocks.{n_out - 1 - int(seq.split('.')[1])}.0")
            flow[f"{seq}.{j}"] = tuple(readers)
    return flow


def span_plan(unet: torch.nn.Module, units: list[Unit]) -> tuple[list[str], list[str]]:
    """For span-output reuse of ``units``: (skipped, boundary) atom paths in forward order.

    An inheriting step runs neither. A *boundary* atom's output is read outside the span (by a
    computed atom, across a skip connection too), so it is stored on full steps and returned
    whole; every other atom of the span only feeds the span and is not run at all. A resampler
    goes with the span where the atom before it or every atom after it is in the span (so a
    span that ends in an up block's upsampler stores the upsampled features, as DeepCache
    does). Atoms outside the span whose every reader is in the span (or is such an atom) are
    skipped too: nothing would use what they compute."""
    flow = dataflow(unet)
    order = list(flow)
    chosen = {u.path for u in units}
    for i, p in enumerate(order):
        if i and _is_resample(unet.get_submodule(p)):
            if order[i - 1] in chosen or all(r in chosen for r in flow[p]):
                chosen.add(p)
    boundary = {p for p in chosen if any(r not in chosen for r in flow[p])}
    skipped = chosen - boundary
    for p in reversed(order):   # dead atoms: every reader is in the span or dead (none reads its input)
        if p not in chosen and all(r in chosen or r in skipped for r in flow[p]):
            skipped.add(p)
    return [p for p in order if p in skipped], [p for p in order if p in boundary]


# ---------------------------------------------------------------------------------------------
# What each atom costs: multiply-accumulates for one image, estimated from the weights' shapes
# at a latent side (convolutions and linear layers at their resolution, attention's two matmuls
# over its tokens). Enough to say what share of the UNet a step computes; FLOP counts of real
# forwards (evaluation/flops.py) check it in the tests.
# ---------------------------------------------------------------------------------------------

def atom_sides(unet: torch.nn.Module, latent: int) -> dict[str, float]:
    """Atom path -> the side of the grid it writes, for a latent of side ``latent``."""
    side, out = float(latent), {}
    for path in dataflow(unet):
        kind = type(unet.get_submodule(path)).__name__
        side = side / 2 if kind == "Downsample" else side * 2 if kind == "Upsample" else side
        out[path] = side
    return out


def atom_macs(unet: torch.nn.Module, latent: int, context_tokens: int = 77) -> dict[str, float]:
    """Atom path (``dataflow``'s keys) -> multiply-accumulates for one image at ``latent`` x
    ``latent``; OUT is the final norm and conv (with conv_in, ``input_blocks.0.0``, the stem)."""
    out = {p: module_macs(unet.get_submodule(p), side * side, context_tokens)
           for p, side in atom_sides(unet, latent).items()}
    out[OUT] = module_macs(unet.out, float(latent) ** 2, context_tokens)
    return out


def module_macs(module: torch.nn.Module, pixels: float, context_tokens: int = 77) -> float:
    """Multiply-accumulates of one module writing a grid of ``pixels`` tokens."""
    total = 0.0
    for name, m in module.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            total += pixels * m.weight.numel()
        elif isinstance(m, torch.nn.Linear):
            if name.endswith(("emb_layers.1", "time_emb_proj")):
                tokens = 1.0   # the time embedding: once per image
            elif ".attn2.to_k" in "." + name or ".attn2.to_v" in "." + name:
                tokens = context_tokens
            else:
                tokens = pixels
            total += tokens * m.weight.numel()
        elif type(m).__name__ == "CrossAttention":
            keys = context_tokens if name.endswith("attn2") else pixels
            total += 2 * pixels * keys * m.to_q.out_features   # QK^T and the weights times V
    return total


def reaches_output(unet: torch.nn.Module, skipped: set) -> bool:
    """Whether the UNet's input reaches its output through atoms not in ``skipped`` (atoms that
    are not run, or return stored outputs): else a step's output ignores its input."""
    flow = dataflow(unet)
    first = next(iter(flow))
    seen, todo = set(), [first]
    while todo:
        p = todo.pop()
        if p == OUT:
            return True
        if p in seen or p in skipped:
            continue
        seen.add(p)
        todo += list(flow[p])
    return False
