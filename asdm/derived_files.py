"""Derived UNet files: a UNet stored as what it adds to the UNet file it derives from.

An assembled UNet shares most blocks with its original, an ME-CondConv student's UNet may be
its compressed UNet bit for bit: such a file stores only the parts (blocks, stem) whose weights
differ, and names its source (a file in the same folder), the parts it takes from it and a digest
of what it takes, so a changed source is noticed. ``read_unet`` and ``load_unet`` give any UNet
file back whole; ``write_unet`` writes one whole or derived. A derived file is read by A-SDM Load
Compressed UNet, not by ComfyUI's own UNet loader.
"""
from __future__ import annotations

import json
import logging
import os

import torch

from . import host_models, unet_files
from .topology import Topology, copy_entries, describe
from .errors import AssemblyError, UNetFileError

log = logging.getLogger("A-SDM")

DERIVED_FROM = "asdm.derived_from"     # the source file's name, in the same folder
DERIVED_PARTS = "asdm.derived_parts"   # JSON list of the parts (blocks, stem) taken from it
DERIVED_DIGEST = "asdm.derived_digest"  # sha256 of what it takes, so a changed source is noticed
MAX_CHAIN = 8                          # derived files deriving from derived files, at most


def read_unet(path: str, _chain: tuple = ()) -> tuple[dict, dict]:
    """(state dict, metadata) of a UNet file; a derived file comes back whole, with the parts
    it takes from its source file (beside it) filled in. ``_chain``: the files that derive from
    this one, in reading order (a name met twice is a loop)."""
    sd, meta = unet_files.read_safetensors(path)
    source = meta.get(DERIVED_FROM)
    if source is None:
        return sd, meta
    name = os.path.basename(path)
    if os.path.basename(source) != source or source in ("", ".", ".."):
        raise UNetFileError(f"{name} derives from {source!r}, which is not a file name; it must name "
                            "a UNet file in the same folder")
    chain = _chain + (name,)
    if source in chain:
        raise UNetFileError(f"{chain[0]} derives from itself ({' -> '.join(chain + (source,))}): re-save it whole")
    src_path = os.path.join(os.path.dirname(path), source)
    if not os.path.isfile(src_path):
        raise UNetFileError(f"{name} stores only what it adds to {source}, which is not beside it in "
                            f"{os.path.dirname(path)}; put both files in one folder")
    if len(chain) > MAX_CHAIN:
        raise UNetFileError(f"{name}: derived files chain more than {MAX_CHAIN} deep; re-save it whole")
    try:
        src_sd, _ = read_unet(src_path, chain)
        return resolve_derived(sd, meta, unet_files.to_ldm(src_sd)), meta
    except UNetFileError as e:
        raise UNetFileError(f"{name} (derived from {source}): {e}") from None


def load_unet(path: str, prediction: str = "eps", name: str | None = None, zsnr: bool = False):
    """A MODEL from a UNet safetensors file in either layout (a diffusers config.json beside it
    is read for its head layout only), or a derived file whole. ``name``: how the user knows the
    file (a node's file list entry); errors are led by it.

    ``prediction``: "eps", "v", or "auto": what the file says (an A-SDM file's metadata, else the
    host's marks 'v_pred' / 'ztsnr'), else eps. ``zsnr``: sample with the zero-terminal-SNR
    schedule; with "auto" a file that says so turns it on too."""
    host_models.check_prediction(prediction, auto=True)
    try:
        return _load_unet(path, prediction, zsnr)
    except UNetFileError as e:
        if name is None:
            raise
        text, base = str(e), os.path.basename(path)
        # led by the file's name as the user knows it, once
        text = name + text[len(base):] if text.startswith(base + " ") else f"{name}: {text}"
        raise UNetFileError(text, e.input) from None


def file_prediction(meta: dict, marks: dict) -> tuple[str | None, bool]:
    """(prediction, zero terminal SNR) a UNet file states: A-SDM's metadata, else the host's
    marks; (None, False) when it states nothing."""
    if meta.get("asdm.prediction"):
        return meta["asdm.prediction"], meta.get("asdm.zsnr") == "true"
    if "v_pred" in marks:
        return "v", "ztsnr" in marks
    return None, False


def _load_unet(path: str, prediction: str, zsnr: bool):
    sd, meta = read_unet(path)
    sd, marks = unet_files.split_marks(sd)
    config = None
    cfg_path = os.path.join(os.path.dirname(path), "config.json")
    unet_files.check_weights(sd)
    if unet_files.layout_of(sd) == "diffusers" and os.path.isfile(cfg_path):
        try:
            with open(cfg_path) as f:
                config = json.load(f)
            if not isinstance(config, dict):
                raise ValueError("not a JSON object")
        except (ValueError, OSError) as e:
            raise UNetFileError(f"{cfg_path} is not a readable JSON config ({type(e).__name__}: {e}); fix it "
                                "or delete it (it is read for the attention head layout only)") from None
    if prediction == "auto":
        said, said_zsnr = file_prediction(meta, marks)
        if said is not None and said not in host_models.PREDICTIONS:
            raise UNetFileError(f"its metadata records the prediction {said[:40]!r}, which is none of "
                                f"{', '.join(host_models.PREDICTIONS)}; choose the prediction in the loader "
                                "instead of auto, or re-save the file")
        prediction, zsnr = said or "eps", zsnr or said_zsnr
    if meta.get("asdm.gri"):
        # the weights were tuned for GRI attention; the MODEL loads as a plain UNet, so say what
        # to add rather than silently sampling with the attention it was not tuned for
        log.info(f"A-SDM: {os.path.basename(path)} was distilled with GRI attention ({meta['asdm.gri']}); "
                 "add A-SDM GRI Attention with these settings after the loader")
    return unet_files.build_model(unet_files.to_ldm(sd), prediction, config, zsnr)


def write_unet(sd: dict, meta: dict, path: str, derive_from: str | None = None, int8: bool = False) -> None:
    """Writes a UNet state dict with its A-SDM metadata (``asdm.layout`` included), whole or as
    what it adds to ``derive_from`` (a UNet file in the same folder); ``int8``: see
    ``unet_files.write_safetensors``."""
    meta = dict(meta)
    if derive_from is not None:
        if os.path.dirname(os.path.abspath(derive_from)) != os.path.dirname(os.path.abspath(path)):
            raise AssemblyError(f"{path} can derive only from a file in its own folder, not {derive_from}")
        src_sd = read_unet(derive_from)[0]
        sd, parts, taken = split_derived(sd, json.loads(meta["asdm.layout"]), src_sd)
        meta.update({DERIVED_FROM: os.path.basename(derive_from), DERIVED_PARTS: json.dumps(parts),
                     DERIVED_DIGEST: unet_files.tensor_digest(src_sd, taken)})
    else:
        for key in (DERIVED_FROM, DERIVED_PARTS, DERIVED_DIGEST):
            meta.pop(key, None)
    unet_files.write_safetensors(sd, path, meta, int8)


def _topology_of_config(cfg: dict) -> Topology:
    return describe(host_models.empty_unet(unet_files.model_config(dict(cfg))))


def _part_map(src_topo: Topology, dst_topo: Topology) -> dict[str, tuple[list[str], list[str]]]:
    """part -> (source entries, target entries) for the parts both UNets have with the same shape."""
    out = {}
    for part in list(dst_topo.entries):
        src, dst = src_topo.entries.get(part), dst_topo.entries[part]
        if src is not None and len(src) == len(dst):
            out[part] = (src, dst)
    return out


def split_derived(sd: dict, cfg: dict, src_sd: dict) -> tuple[dict, list[str], list[str]]:
    """``sd`` (a UNet of layout ``cfg``) without the parts whose weights are the source's, bit for
    bit; those parts' names; the source's keys they take."""
    mapping = _part_map(_topology_of_config(unet_files.unet_config(src_sd)), _topology_of_config(cfg))
    kept, same, taken = dict(sd), [], []
    for part, (src, dst) in mapping.items():
        mine = {}
        copy_entries(sd, dst, src, mine)      # this UNet's part, under the source's keys
        theirs = {k: v for k, v in src_sd.items() if any(k.startswith(p + ".") for p in src)}
        if mine and mine.keys() == theirs.keys() and all(
                mine[k].dtype == theirs[k].dtype and torch.equal(mine[k], theirs[k]) for k in mine):
            same.append(part)
            taken += list(theirs)
            for p in dst:
                kept = {k: v for k, v in kept.items() if not k.startswith(p + ".")}
    return kept, same, taken


def resolve_derived(stored: dict, meta: dict, src_sd: dict) -> dict:
    """The whole state dict of a derived UNet: its stored tensors, plus the parts it takes from
    the source UNet's state dict ``src_sd``."""
    try:
        cfg = json.loads(meta["asdm.layout"])
        parts = json.loads(meta[DERIVED_PARTS])
    except (KeyError, ValueError) as e:
        raise UNetFileError(f"its derived-file metadata is damaged ({type(e).__name__}: {e}); "
                            "re-save it with A-SDM Save UNet or the trainer") from None
    mapping = _part_map(_topology_of_config(unet_files.unet_config(src_sd)), _topology_of_config(cfg))
    missing = [p for p in parts if p not in mapping]
    if missing:
        raise UNetFileError(f"it takes {', '.join(missing)} from {meta[DERIVED_FROM]}, which has no "
                            "such part of that shape: the source file is not the one it was made from")
    taken = [k for part in parts for k in src_sd if any(k.startswith(p + ".") for p in mapping[part][0])]
    if unet_files.tensor_digest(src_sd, taken) != meta.get(DERIVED_DIGEST):
        raise UNetFileError(f"{meta[DERIVED_FROM]} is not the file it was made from (its weights differ); "
                            "restore that file, or re-save this UNet whole")
    out = dict(stored)
    for part in parts:
        src, dst = mapping[part]
        copy_entries(src_sd, src, dst, out)
    return out
