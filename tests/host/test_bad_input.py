"""The catalogue of bad input and damaged files: each gets one clear error at the node (naming
the input or file and the fix), never a bare traceback, never silent wrong output. The trainer's
cases are in test_train.py, the samplers' in test_inheritance.py and test_switch.py."""
import json
import os
import re
import shutil

import pytest
import safetensors.torch
import torch

from conftest import model_folder, trainer_config
from asdm import assembly
from asdm import compat
from asdm import condconv
from asdm import embedded
from asdm import hooks
from asdm.errors import ASDMError
from asdm.harness import graphs, host
from asdm.training import trainer


def save(sd_model, path, **edit):
    assembly.save_unet(sd_model, str(path))
    sd = safetensors.torch.load_file(str(path))
    meta = safetensors.safe_open(str(path), "pt").metadata()
    for k, fn in edit.items():
        sd[k.replace("__", ".")] = fn(sd[k.replace("__", ".")])
    safetensors.torch.save_file(sd, str(path), metadata=meta)


def load(N, name):
    return compat.call_node(N["ASDMLoadCompressedUNet"], unet_name=name, prediction="auto")[0]


def one_nan(t):
    t = t.clone()
    t.view(-1)[7] = float("nan")
    return t


@pytest.mark.parametrize("edit,needle", [
    (dict(input_blocks__1__0__in_layers__2__weight=one_nan), "input_blocks.1.0.in_layers.2.weight holds 1 NaN/Inf values"),
    (dict(out__2__bias=lambda t: t.fill_(float("inf"))), "out.2.bias holds 4 NaN/Inf values"),
    (dict(out__2__weight=lambda t: t.to(torch.int8)), "out.2.weight is int8; a UNet needs float16, bfloat16 or float32"),
])
def test_non_finite_or_integer_unet_weights_are_refused(N, sd_and_base, tmp_path, edit, needle):
    save(sd_and_base[1], tmp_path / "bad.safetensors", **edit)
    with model_folder(compat.unet_folder(), tmp_path), pytest.raises(ValueError) as e:
        load(N, "bad.safetensors")
    assert str(e.value).startswith("A-SDM Load Compressed UNet: bad.safetensors") and needle in str(e.value)


def test_malformed_diffusers_config_is_named(N, tmp_path):
    from test_compressed import bksdm_config, diffusers_unet   # noqa: F401 (the same tiny BK-SDM)
    d = tmp_path / "bk" / "unet"
    d.mkdir(parents=True)
    safetensors.torch.save_file({k: v.contiguous() for k, v in diffusers_unet(bksdm_config("base", 1)).state_dict().items()},
                                str(d / "diffusion_pytorch_model.safetensors"))
    (d / "config.json").write_text("{ not json")
    with model_folder(compat.unet_folder(), tmp_path), pytest.raises(ValueError) as e:
        load(N, os.path.join("bk", "unet", "diffusion_pytorch_model.safetensors"))
    assert "config.json is not a readable JSON config" in str(e.value) and "delete it" in str(e.value)


def embedded_copy(tmp_path):
    d = tmp_path / "emb"
    shutil.copytree(embedded.WEIGHTS, d, ignore=shutil.ignore_patterns("condconv"))
    return embedded, d


def test_damaged_embedded_model_files_are_named(tmp_path, monkeypatch):
    emb, d = embedded_copy(tmp_path)
    # a foreign VAE (another width): named, with the fix, not a raw size mismatch
    vae = safetensors.torch.load_file(str(d / "vae.safetensors"))
    vae["encoder.conv_in.weight"] = torch.zeros(64, 3, 3, 3)
    safetensors.torch.save_file(vae, str(d / "vae.safetensors"))
    with pytest.raises(emb.EmbeddedModelError, match="vae.safetensors: the VAE weights do not fit .* "
                                                      "encoder.conv_in.weight: \\(64, 3, 3, 3\\), expected"):
        emb.load(str(d))
    # a malformed text_encoder.json: named, with the fix
    monkeypatch.setattr(emb, "WEIGHTS", str(d))
    (d / "text_encoder.json").write_text("{ broken")
    with pytest.raises(emb.EmbeddedModelError, match="text_encoder.json is missing or not valid JSON.*git checkout"):
        emb.text_config_file()
    (d / "text_encoder.json").write_text(json.dumps(dict(emb.TEXT_CONFIG, hidden_size=65)))
    with pytest.raises(emb.EmbeddedModelError, match="does not describe the embedded text encoder \\(differs in hidden_size"):
        emb.text_config_file()


def test_nodes_that_act_on_one_unet_refuse_a_switch(N, sd_and_base):
    sd, base = sd_and_base
    sw = compat.call_node(N["ASDMUNetSwitch"], unit="steps", model_1=base, start_1=0.0, end_1=3.0, model_2=sd,
                          start_2=3.0, end_2=-1.0)[0]
    cases = {
        "A-SDM Save UNet": lambda: compat.call_node(N["ASDMSaveUNet"], model=sw, filename_prefix="unet/x"),
        "A-SDM Assemble UNet": lambda: compat.call_node(N["ASDMAssembleUNet"], original=sd, compressed=sw,
                                                        recipe="M2", custom_recipe=""),
        "A-SDM Feature Inheritance": lambda: compat.call_node(N["ASDMFeatureInheritance2"], model=sw, preset="CO6",
                                                              period=5, units="", reuse="residual", forecast=False,
                                                              final_full_fraction=0.2),
        "A-SDM ME-CondConv": lambda: compat.call_node(N["ASDMMECondConv"], model=sw, weights="none",
                                                      units="dn*.*.R, up*.*.R", experts=2, init="identity",
                                                      seed=0),
        "A-SDM GRI Attention": lambda: compat.call_node(N["ASDMGRIAttention"], model=sw, units="dn0, up3",
                                                        window=16, pool=4, start=0.0, end=1.0),
    }
    for node, call in cases.items():
        with pytest.raises(ValueError) as e:
            call()
        msg = str(e.value)
        assert msg.startswith(f"{node}: this MODEL is an A-SDM UNet Switch of 2 models") and "before the switch" in msg


def test_save_stays_inside_the_output_folder(N, sd_and_base, tmp_path):
    import folder_paths
    out = folder_paths.get_output_directory()
    outside = tmp_path / "outside"
    outside.mkdir()
    link = os.path.join(out, "escape_link")
    if os.path.lexists(link):
        os.remove(link)
    os.symlink(outside, link)
    try:
        with pytest.raises(ValueError, match="leads outside the output folder"):
            compat.call_node(N["ASDMSaveUNet"], model=sd_and_base[1], filename_prefix="escape_link/unet")
        assert list(outside.iterdir()) == []
        with pytest.raises(ValueError, match="A-SDM Save UNet: filename_prefix '../x'"):
            compat.call_node(N["ASDMSaveUNet"], model=sd_and_base[1], filename_prefix="../x")
        with pytest.raises(ValueError, match="choose a shorter or simpler filename_prefix"):
            compat.call_node(N["ASDMSaveUNet"], model=sd_and_base[1], filename_prefix="unet/" + "n" * 300)
    finally:
        os.remove(link)


def test_recipes_quoted_short_and_contradictions_refused(N, sd_and_base):
    sd, base = sd_and_base
    node = N["ASDMAssembleUNet"]
    with pytest.raises(ValueError) as e:
        compat.call_node(node, original=sd, compressed=base, recipe="custom",
                         custom_recipe="dn0=B, " + "x" * 1000 + "=B")
    assert len(str(e.value)) < 400 and "characters" in str(e.value)
    with pytest.raises(ValueError, match=r"the recipe is \d+ characters long"):
        compat.call_node(node, original=sd, compressed=base, recipe="custom", custom_recipe="dn0=B," * 166668)
    with pytest.raises(ValueError, match="gives dn0 twice, from B and from A"):
        compat.call_node(node, original=sd, compressed=base, recipe="custom", custom_recipe="dn0=B, dn0=A")


def experts_file(tiny, path, sd_edit=None, meta_edit=None):
    unet = tiny.model.diffusion_model
    condconv.save_experts(condconv.make_experts(unet, condconv.select_convs(unet, condconv.DEFAULT_UNITS), 2, "paper", 0), str(path))
    sd = safetensors.torch.load_file(str(path))
    meta = safetensors.safe_open(str(path), "pt").metadata()
    (sd_edit or (lambda s: None))(sd)
    (meta_edit or (lambda m: None))(meta)
    safetensors.torch.save_file(sd, str(path), metadata=meta)


def first_expert_key(sd):
    return sorted(k for k in sd if k.endswith(".experts"))[0]


@pytest.mark.parametrize("case,needle", [
    ("layout-json", "layout metadata ('asdm.condconv.layout') is missing or damaged (JSONDecodeError"),
    ("layout-missing", "layout metadata ('asdm.condconv.layout') is missing or damaged (KeyError"),
    ("not-a-conv", "in this MODEL is a ResBlock, not a convolution"),
    ("nan", "holds 1 NaN/Inf values"),
    ("int8", "is int8; a UNet needs float16"),
    ("missing-tensor", "are incomplete or malformed"),
])
def test_damaged_experts_files_are_named(N, tiny, tmp_path, case, needle):
    def relayout(m, fn):
        layout = json.loads(m["asdm.condconv.layout"])
        m["asdm.condconv.layout"] = json.dumps(fn(layout))
    edits = {
        "layout-json": dict(meta_edit=lambda m: m.update({"asdm.condconv.layout": "{ broken"})),
        "layout-missing": dict(meta_edit=lambda m: m.pop("asdm.condconv.layout")),
        "not-a-conv": dict(meta_edit=lambda m: relayout(m, lambda l: {"input_blocks.1.0": next(iter(l.values())), **l})),
        "nan": dict(sd_edit=lambda s: s.update({first_expert_key(s): one_nan(s[first_expert_key(s)])})),
        "int8": dict(sd_edit=lambda s: s.update({first_expert_key(s): s[first_expert_key(s)].to(torch.int8)})),
        "missing-tensor": dict(sd_edit=lambda s: s.pop(first_expert_key(s))),
    }
    experts_file(tiny, tmp_path / "bad.safetensors", **edits[case])
    with model_folder("asdm_condconv", tmp_path), pytest.raises(ValueError) as e:
        compat.call_node(N["ASDMMECondConv"], model=tiny, weights="bad.safetensors", units="", experts=2,
                         init="identity", seed=0)
    assert str(e.value).startswith("A-SDM ME-CondConv: ") and needle in str(e.value), str(e.value)


# ---------------------------------------------------------------------------------------------
# Every input of every node, checked against the node's own INPUT_TYPES (nodes/common.py): a
# prompt sent to the API, or a value arriving over a link, bypasses the front end's limits, and
# the host lets NaN through its own min / max check.
# ---------------------------------------------------------------------------------------------

def pack_node_classes():
    pack = host.boot()
    import nodes
    return {k: v for k, v in sorted(nodes.NODE_CLASS_MAPPINGS.items()) if v.__module__.startswith(pack.__name__ + ".")}


PACK_NODES = pack_node_classes()


def common_module():
    import sys
    return sys.modules[host.boot().__name__ + ".nodes.common"]


def specs(cls):
    types = cls.INPUT_TYPES()
    return [(sec, name, spec[0], spec[1] if len(spec) > 1 else {})
            for sec in ("required", "optional") for name, spec in types.get(sec, {}).items()]


def default_inputs(cls, model):
    """What the front end sends for a new node: every widget at its default, every MODEL input
    connected (required ones)."""
    out = {}
    for sec, name, kind, opts in specs(cls):
        if kind == "MODEL":
            if sec == "required":
                out[name] = model
        elif graphs.choices(kind, opts) is not None:   # a combo (V3: ("COMBO", {"options": [...]}))
            if graphs.choices(kind, opts):
                out[name] = opts.get("default", graphs.choices(kind, opts)[0])
        elif "default" in opts:
            out[name] = opts["default"]
    return out


def number_text(x):
    return f"{x:g}" if isinstance(x, float) else repr(x)


def test_the_pack_loads_the_nodes_this_catalogue_covers():
    assert set(PACK_NODES) == {"ASDMAssembleUNet", "ASDMAutoCache", "ASDMFeatureInheritance", "ASDMFeatureInheritance2", "ASDMGRIAttention", "ASDMLoadCompressedUNet",
                               "ASDMLoadEmbeddedModel", "ASDMMECondConv", "ASDMSaveUNet", "ASDMUNetSwitch"}


@pytest.mark.parametrize("node_id", list(PACK_NODES))
def test_every_numeric_input_refuses_non_finite_and_out_of_range_values(sd_and_base, node_id):
    """NaN, infinities, values past min / max, booleans, text and (INT) fractions in every INT and
    FLOAT input, through the node's function as the executor calls it: each one refused at the
    node, naming the input and its range, before the node does any work."""
    cls = PACK_NODES[node_id]
    base = default_inputs(cls, sd_and_base[0])
    numeric = [(name, kind, opts) for _, name, kind, opts in specs(cls) if kind in ("INT", "FLOAT")]
    failures = []
    for name, kind, opts in numeric:
        lo, hi = opts["min"], opts["max"]   # every numeric input of the pack states both
        what = f"{'a whole number' if kind == 'INT' else 'a number'} from {number_text(lo)} to {number_text(hi)}"
        step = 1 if kind == "INT" else 1.0
        bad = [(float("nan"), "nan"), (float("inf"), "inf"), (float("-inf"), "-inf"),
               (lo - step, number_text(lo - step)), (hi + step, number_text(hi + step)),
               (True, "bool True"), ("3", "str '3'")]
        if kind == "INT":
            bad.append((lo + 0.5, number_text(lo + 0.5)))
        for value, shown in bad:
            try:
                compat.call_node(cls, **dict(base, **{name: value}))
                failures.append((name, value, "accepted"))
            except ValueError as e:
                want = f"{cls.TITLE}: {name} must be {what} (got {shown})"
                if str(e) != want:
                    failures.append((name, value, str(e), want))
    assert not failures, failures
    if node_id in ("ASDMAutoCache", "ASDMFeatureInheritance", "ASDMFeatureInheritance2", "ASDMGRIAttention", "ASDMMECondConv", "ASDMUNetSwitch"):
        assert numeric   # the nodes with numbers are covered, not skipped


@pytest.mark.parametrize("node_id", list(PACK_NODES))
def test_values_the_front_end_sends_pass_the_check_unchanged(node_id):
    """Defaults, both ends of every range, every combo choice, a whole FLOAT sent as a JSON
    integer, optional inputs left out: all pass; a whole INT sent as a float comes back an int."""
    check = common_module().check_inputs
    cls = PACK_NODES[node_id]
    for sec, name, kind, opts in specs(cls):
        if kind in ("INT", "FLOAT"):
            values = [opts["default"], opts["min"], opts["max"]]
            if kind == "FLOAT":
                values.append(int(opts["default"]))
            for v in values:
                assert check(cls, {name: v}) == {name: v}
            if kind == "INT":
                got = check(cls, {name: float(opts["default"])})[name]
                assert got == opts["default"] and type(got) is int
        elif graphs.choices(kind, opts) is not None:   # a combo (V3: ("COMBO", {"options": [...]}))
            for v in graphs.choices(kind, opts):
                assert check(cls, {name: v}) == {name: v}
        elif kind in ("STRING", "BOOLEAN") and "default" in opts:
            assert check(cls, {name: opts["default"]}) == {name: opts["default"]}
    assert check(cls, {}) == {}


def test_the_v1_spec_forms_are_read():
    check = common_module().check_inputs

    class Node:
        PATH_INPUTS = ("prefix",)

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"mode": ("COMBO", {"options": ["a", "b"]}), "count": ("INT",), "model": ("MODEL",),
                                 "prefix": ("STRING", {"default": "x/y"}), "text": ("STRING", {"multiline": True})},
                    "optional": {"ratio": ("FLOAT", {"min": 0.0})}, "hidden": {"unique_id": "UNIQUE_ID"}}

    ok = {"mode": "b", "count": -7, "model": object(), "prefix": "a/b c", "text": "line\nline", "ratio": 3,
          "unique_id": "12"}
    assert check(Node, ok) == ok
    with pytest.raises(ASDMError, match=re.escape("mode must be one of a, b (got 'c')")):
        check(Node, dict(ok, mode="c"))
    with pytest.raises(ASDMError, match=re.escape("count must be a whole number (got nan)")):
        check(Node, dict(ok, count=float("nan")))
    with pytest.raises(ASDMError, match=re.escape("ratio must be a number of at least 0 (got -1)")):
        check(Node, dict(ok, ratio=-1))
    with pytest.raises(ASDMError, match=re.escape("prefix holds a control character ('\\t' at character 2)")):
        check(Node, dict(ok, prefix="a\tb"))


@pytest.mark.parametrize("node_id,inputs,needle", [
    ("ASDMAssembleUNet", dict(recipe="M9"), "A-SDM Assemble UNet: recipe must be one of M1, M2, M3, custom (got 'M9')"),
    ("ASDMLoadCompressedUNet", dict(unet_name="x.safetensors", prediction="x0"),
     "A-SDM Load Compressed UNet: prediction must be one of auto, eps, v (got 'x0')"),
    ("ASDMMECondConv", dict(init="zeros"), "A-SDM ME-CondConv: init must be one of paper, identity, cross-layer (got 'zeros')"),
    ("ASDMFeatureInheritance2", dict(reuse=None), "A-SDM Feature Inheritance: reuse must be one of residual, output (got None)"),
    ("ASDMFeatureInheritance2", dict(features_on="gpu"),
     "A-SDM Feature Inheritance: features_on must be one of compute, offload (got 'gpu')"),
    ("ASDMFeatureInheritance2", dict(units=5), "A-SDM Feature Inheritance: units must be text (got int 5)"),
    ("ASDMUNetSwitch", dict(unit="seconds"), "A-SDM UNet Switch: unit must be one of steps, fraction (got 'seconds')"),
])
def test_combo_and_text_inputs_outside_their_choices(sd_and_base, node_id, inputs, needle):
    cls = PACK_NODES[node_id]
    given = default_inputs(cls, sd_and_base[0])
    if node_id == "ASDMLoadCompressedUNet":
        given["unet_name"] = "x.safetensors"   # a listed file: the check reaches prediction
        with model_folder(compat.unet_folder(), host.workdir()):
            open(os.path.join(host.workdir(), "x.safetensors"), "wb").close()
            try:
                with pytest.raises(ValueError) as e:
                    compat.call_node(cls, **dict(given, **inputs))
            finally:
                os.remove(os.path.join(host.workdir(), "x.safetensors"))
    else:
        with pytest.raises(ValueError) as e:
            compat.call_node(cls, **dict(given, **inputs))
    assert str(e.value) == needle


@pytest.mark.parametrize("prefix,shown", [("unet/a\0b", "'\\x00' at character 7"), ("unet/a\nb", "'\\n' at character 7"),
                                          ("\x1b[31munet", "'\\x1b' at character 1"), ("unet/\ud800", "'\\ud800' at character 6")])
def test_save_refuses_control_characters_in_the_prefix(N, sd_and_base, prefix, shown):
    import folder_paths
    out = folder_paths.get_output_directory()
    before = sorted(os.listdir(out))
    with pytest.raises(ValueError) as e:
        compat.call_node(N["ASDMSaveUNet"], model=sd_and_base[1], filename_prefix=prefix)
    assert str(e.value) == (f"A-SDM Save UNet: filename_prefix holds a control character ({shown}), which a file name "
                            "cannot hold; write it in ordinary characters, e.g. unet/asdm")
    assert sorted(os.listdir(out)) == before


def embedded_prompt(**switch):
    return {
        "1": {"class_type": "ASDMLoadEmbeddedModel", "inputs": {}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "ASDMUNetSwitch", "inputs": dict({"unit": "steps", "model_1": ["1", 0], "start_1": 0.0, "end_1": 2.0,
                                                              "model_2": ["1", 0], "start_2": 2.0, "end_2": -1.0}, **switch)},
        "6": {"class_type": "KSampler", "inputs": {"model": ["5", 0], "seed": 0, "steps": 3, "cfg": 4.0, "sampler_name": "euler",
                                                   "scheduler": "normal", "positive": ["2", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0], "denoise": 1.0}},
        "7": {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": "bad_input_switch"}},
    }


def test_an_api_prompt_with_a_nan_switch_end_is_refused_at_the_node():
    """The host's own validation passes end_1 = NaN (NaN < min is false); the executor then
    reports the node's message, naming the input and its range (it was int()'s "cannot
    convert float NaN to integer")."""
    from asdm.harness.host import Runner, WorkflowError
    runner = Runner()
    runner.run(embedded_prompt())   # the same graph with a finite end runs
    with pytest.raises(WorkflowError) as e:
        runner.run(embedded_prompt(end_1=float("nan")))
    assert str(e.value).strip() == ("ASDMUNetSwitch (node 5): ValueError: A-SDM UNet Switch: end_1 must be a number from -1 "
                            "to 10000 (got nan)")


# ---------------------------------------------------------------------------------------------
# The GRI node's inputs
# ---------------------------------------------------------------------------------------------

def gri(N, model, units="dn0, up3", window=16, pool=4, start=0.0, end=1.0):
    return compat.call_node(N["ASDMGRIAttention"], model=model, units=units, window=window, pool=pool, start=start,
                            end=end)[0]


@pytest.mark.parametrize("inputs,message", [
    (dict(window=0), "window must be a whole number from 1 to 512 (got 0)"),
    (dict(window=10**6), "window must be a whole number from 1 to 512 (got 1000000)"),
    (dict(pool=0), "pool must be a whole number from 1 to 64 (got 0)"),
    (dict(pool=65), "pool must be a whole number from 1 to 64 (got 65)"),
    (dict(start=float("nan")), "start must be a number from 0 to 1 (got nan)"),
    (dict(end=float("inf")), "end must be a number from 0 to 1 (got inf)"),
    (dict(units="dn0.0.R, up3.*.R"), "units: 'dn0.0.R, up3.*.R' names no attention (A) unit, only ResNet units: GRI "
                                      "replaces self-attention, so name blocks, layers or A units, or 'auto'. This "
                                      "UNet's highest-resolution attention units are in dn0 and up3: "
                                      "units = 'dn0, up3' (or 'auto')."),
])
def test_gri_inputs_out_of_range_or_without_attention(N, tiny, inputs, message):
    with pytest.raises(ValueError) as e:
        gri(N, tiny, **inputs)
    assert str(e.value) == "A-SDM GRI Attention: " + message


@pytest.mark.parametrize("layout,want", [("sdxl", ["dn1", "up1"]), ("bk-sdm-tiny", ["dn0", "up2"])])
def test_gri_default_units_on_a_layout_without_that_level(N, layout, want):
    """A graph made for SD1.5 names its level 0 (dn0, up3): SDXL has no attention there and no up3,
    BK-SDM Tiny no up3. The message says which units this layout's highest resolution has, and
    those units work."""
    from asdm import gri as engine_gri
    from asdm.harness import models as tm
    model = (tm.sd_model(tm.TINY_SDXL["sdxl"]) if layout == "sdxl"
             else assembly.compress(tm.sd_model(tm.TINY_SD1), "tiny"))
    with pytest.raises(ValueError) as e:
        gri(N, model)
    msg = str(e.value)
    assert msg.startswith("A-SDM GRI Attention: units: unit token 'up3' names no unit of this UNet. Valid names here:")
    assert msg.endswith(f"This UNet's highest-resolution attention units are in {want[0]} and {want[1]}: "
                        f"units = '{want[0]}, {want[1]}' (or 'auto').")
    holder = hooks.holder_of(gri(N, model, units=", ".join(want)), engine_gri.GRIHolder)
    assert sorted({s.unit.block for s in holder.sites}) == want


# ---------------------------------------------------------------------------------------------
# Engine calls made directly (scripts, other packs): the same clear errors
# ---------------------------------------------------------------------------------------------

def test_direct_engine_calls_name_the_input(tiny, sd_and_base, tmp_path):
    from asdm import derived_files, unet_files
    unet = tiny.model.diffusion_model
    paths = condconv.select_convs(unet, condconv.DEFAULT_UNITS)
    for n in (0, -3, 17):
        with pytest.raises(condconv.CondConvError) as e:
            condconv.make_experts(unet, paths, n, "identity")
        assert e.value.input == "experts" and str(e.value) == (
            f"experts must be a whole number from 1 to 16 (got {n}): the number of experts per conv, 2 in the "
            "paper (1 = the plain conv)")
    sd = {k: v.detach().clone() for k, v in sd_and_base[1].model.diffusion_model.state_dict().items()}
    with pytest.raises(ASDMError) as e:
        unet_files.build_model(sd, "x")
    assert e.value.input == "prediction" and str(e.value).startswith("prediction must be one of eps, v (got 'x'): eps for")
    assembly.save_unet(sd_and_base[1], str(tmp_path / "base.safetensors"))
    with pytest.raises(ASDMError) as e:
        derived_files.load_unet(str(tmp_path / "base.safetensors"), "x0")
    assert e.value.input == "prediction" and str(e.value).startswith("prediction must be one of auto, eps, v (got 'x0')")


# ---------------------------------------------------------------------------------------------
# Derived and int8 UNet files, damaged
# ---------------------------------------------------------------------------------------------

def rewrite(path, sd_edit=None, meta_edit=None):
    sd = safetensors.torch.load_file(str(path))
    meta = safetensors.safe_open(str(path), "pt").metadata()
    (sd_edit or (lambda s: None))(sd)
    (meta_edit or (lambda m: None))(meta)
    safetensors.torch.save_file(sd, str(path), metadata=meta)


def first_scale(sd):
    return sorted(k for k in sd if k.endswith(".int8_scale"))[0]


DAMAGE = {
    "parts-json": ("m2", dict(meta_edit=lambda m: m.update({"asdm.derived_parts": "[broken"})),
                   "m2.safetensors (derived from sd.safetensors): its derived-file metadata is damaged (JSONDecodeError"),
    "source-path": ("m2", dict(meta_edit=lambda m: m.update({"asdm.derived_from": "../sd.safetensors"})),
                    "m2.safetensors derives from '../sd.safetensors', which is not a file name; it must name a UNet file "
                    "in the same folder"),
    "loop": ("m2", dict(meta_edit=lambda m: m.update({"asdm.derived_from": "m2.safetensors"})),
             "m2.safetensors derives from itself (m2.safetensors -> m2.safetensors): re-save it whole"),
    "source-not-unet": ("sd", dict(sd_edit=lambda s: [s.clear(), s.update({"encoder.conv_in.weight": torch.zeros(2, 3, 3, 3)})]),
                        "m2.safetensors (derived from sd.safetensors): this file holds no SD-style UNet"),
    "int8-nan-scale": ("sd", dict(sd_edit=lambda s: s[first_scale(s)].fill_(float("nan"))),
                       "sd.safetensors: tensor {first} holds "),
    "int8-scale-missing": ("sd", dict(sd_edit=lambda s: s.pop(first_scale(s))),
                           "sd.safetensors is stored in int8 but its tensor {first} has no matching per-channel scale; "
                           "the file is damaged"),
    "int8-source-damaged": ("sd", dict(sd_edit=lambda s: s.pop(first_scale(s))),
                            "m2.safetensors (derived from sd.safetensors): sd.safetensors is stored in int8 but its "
                            "tensor {first} has no matching"),
    "prediction-meta": ("m2", dict(meta_edit=lambda m: m.update({"asdm.prediction": "sample"})),
                        "m2.safetensors: its metadata records the prediction 'sample', which is none of eps, v; choose "
                        "the prediction in the loader instead of auto, or re-save the file"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_derived_and_int8_files_are_named(N, sd_and_base, tmp_path, case):
    sd, base = sd_and_base
    m2 = assembly.assemble(sd, base, assembly.recipe_spec("M2"))
    int8 = case.startswith("int8")
    assembly.save_unet(sd, str(tmp_path / "sd.safetensors"), dtype=torch.float16, int8=int8)
    assembly.save_unet(m2, str(tmp_path / "m2.safetensors"), dtype=torch.float16, int8=int8,
                       derive_from=str(tmp_path / "sd.safetensors"))
    with model_folder(compat.unet_folder(), tmp_path):
        load(N, "m2.safetensors")   # whole, both load
        which, edit, needle = DAMAGE[case]
        if int8:
            first = first_scale(safetensors.torch.load_file(str(tmp_path / f"{which}.safetensors")))
            needle = needle.replace("{first}", first[:-len(".int8_scale")])
        rewrite(tmp_path / f"{which}.safetensors", **edit)
        loaded = "sd" if case in ("int8-nan-scale", "int8-scale-missing") else "m2"
        with pytest.raises(ValueError) as e:
            load(N, f"{loaded}.safetensors")
    assert str(e.value).startswith("A-SDM Load Compressed UNet: " + needle), str(e.value)


# ---------------------------------------------------------------------------------------------
# The trainer: assemble / condconv / [gri] / image-data options, NaN and inf, resuming
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trainer_units(trainer_files):
    """A BK-SDM Base UNet file made from the trainer's teacher, for assemble students."""
    from asdm import derived_files
    teacher = derived_files.load_unet(str(trainer_files / "teacher.safetensors"))
    assembly.save_unet(assembly.compress(teacher, "base"), str(trainer_files / "base.safetensors"))
    return trainer_files


TRAINER_CASES = [
    # (student table, extra text, the error's text, where it is told: load = the config alone,
    #  build = before the first step)
    ('kind = "assemble"\nrecipe = "M2"', "", "student.kind = 'assemble' needs student.compressed (the step-1 UNet)", "load"),
    ('kind = "assemble"\ncompressed = "{d}/base.safetensors"\nrecipe = "M9"', "",
     "student: unknown recipe 'M9': one of M1, M2, M3, or a spec such as 'dn0=B, up3=B'", "build"),
    ('kind = "assemble"\ncompressed = "{d}/base.safetensors"\nrecipe = "dn0=C"', "",
     "student: malformed recipe entry 'dn0=C': write part=A or part=B", "build"),
    ('kind = "assemble"\ncompressed = "{d}/nothing.safetensors"\nrecipe = "M2"', "",
     "student: {d}/nothing.safetensors does not exist", "build"),
    ('kind = "condconv"\nlayout = "small"\nexperts = 0', "", "'student.experts' must be a whole number from 2 to 16 (got 0)", "load"),
    ('kind = "condconv"\nlayout = "small"\nexperts = nan', "", "'student.experts' must be a whole number from 2 to 16 (got nan)", "load"),
    ('kind = "condconv"\nlayout = "small"\ninit = "zeros"', "", "'student.init' must be one of paper, identity, cross-layer (got 'zeros')", "load"),
    ('kind = "condconv"\nlayout = "small"\nunits = "up3.*.A"', "", "student: the units 'up3.*.A' hold no ResNet unit", "build"),
    ('kind = "condconv"\nunet = "{d}/nothing.safetensors"', "", "student: {d}/nothing.safetensors does not exist", "build"),
    ('kind = "compress"\nlayout = "tiny"', '[gri]\nunits = "dn0, up3"',
     "gri.units: unit token 'up3' names no unit of this UNet", "build"),
    ('kind = "compress"\nlayout = "tiny"', '[gri]\nunits = "dn0, up3"',
     "This UNet's highest-resolution attention units are in dn0 and up2: units = 'dn0, up2' (or 'auto').", "build"),
    ('kind = "compress"\nlayout = "base"', "[gri]\nwindow = nan", "'gri.window' must be a whole number >= 1 (the largest "
                                                              "region side, in latent tokens) (got nan)", "load"),
    ('kind = "compress"\nlayout = "base"', "[gri]\npool = -inf", "'gri.pool' must be a whole number >= 1", "load"),
    ('kind = "compress"\nlayout = "base"', "[loss]\ntask = inf", "'loss.task' must be a finite number >= 0 (got inf)", "load"),
    ('kind = "compress"\nlayout = "base"', "[loss]\nout_kd = nan", "'loss.out_kd' must be a finite number >= 0 (got nan)", "load"),
]


@pytest.mark.parametrize("student,extra,needle,at", TRAINER_CASES)
def test_trainer_options_with_bad_values_are_named_before_training(trainer_units, tmp_path, student, extra, needle, at):
    d = trainer_units
    out = tmp_path / "run"
    path = trainer_config(d, out, student=student.format(d=d) + ("\n" + extra if extra else ""))
    with pytest.raises(trainer.ConfigError) as e:
        trainer.train(trainer.load_config(path))
    assert needle.format(d=d) in str(e.value), str(e.value)
    if at == "build":   # the config reads; the student is checked before any step
        trainer.load_config(path)
    assert not os.path.exists(out / "checkpoint.safetensors") and not os.path.exists(out / "unet.safetensors")


@pytest.mark.parametrize("data,needle", [
    ('images = "{d}/no-such-folder"\ncheckpoint = "{d}/teacher.safetensors"', "data.images: {d}/no-such-folder is not a folder"),
    ('images = "{d}/empty"\ncheckpoint = "{d}/teacher.safetensors"', "data.images: no images (.png, .jpg, .jpeg, .webp, .bmp) in {d}/empty"),
    ('images = "{d}/empty"', "data.images needs data.checkpoint (the SD checkpoint whose VAE and text encoder encode"),
    ('images = "{d}/empty"\ncheckpoint = "{d}/teacher.safetensors"\nsize = 60',
     "'data.size' must be a whole number >= 64, a multiple of 8 (got 60)"),
    ('images = "{d}/empty"\ncheckpoint = "{d}/teacher.safetensors"\nsize = inf',
     "'data.size' must be a whole number >= 64, a multiple of 8 (got inf)"),
])
def test_trainer_image_data_options_with_bad_values(trainer_files, tmp_path, data, needle):
    d = trainer_files
    (d / "empty").mkdir(exist_ok=True)
    with pytest.raises(trainer.ConfigError) as e:
        trainer.train(trainer.load_config(trainer_config(d, tmp_path / "run", data=data.format(d=d))))
    assert needle.format(d=d) in str(e.value), str(e.value)


def test_resuming_a_checkpoint_of_another_student_is_refused_naming_both(trainer_files, tmp_path, capsys):
    """A BK-SDM Small run's checkpoint in the out folder of a Base run: told by the trainer
    command (exit 2, one line naming both layouts), nothing loaded, the checkpoint kept."""
    out = tmp_path / "run"
    trainer.train(trainer.load_config(trainer_config(trainer_files, out, student='kind = "compress"\nlayout = "small"', steps=1)))
    before = (out / "checkpoint.safetensors").read_bytes()
    base = trainer_config(trainer_files, out, student='kind = "compress"\nlayout = "base"')
    assert trainer.main([base]) == 2
    told = [line for line in capsys.readouterr().err.splitlines() if line.startswith("asdm.training:")]
    assert told == [f"asdm.training: {out}/checkpoint.safetensors holds a student of another layout: 4 levels with "
                   "1/1/1/1 layers per down block, no middle block, 32 channels wide; this config (student.kind = "
                   "'compress', layout = 'base') trains 4 levels with 1/1/1/1 layers per down block, a middle block, "
                   "32 channels wide. Its weights do not continue this run: resume it with the config that made it, "
                   "or give another 'out' folder to start a new run"]
    assert (out / "checkpoint.safetensors").read_bytes() == before
    # a condconv student's checkpoint (experts) into a plain run of its layout
    cc = tmp_path / "cc"
    trainer.train(trainer.load_config(trainer_config(trainer_files, cc, steps=1,
                                                     student='kind = "condconv"\nlayout = "small"\nexperts = 2')))
    with pytest.raises(trainer.ConfigError, match=re.escape(
            "holds a student with ME-CondConv experts on 24 convs, but this config (student.kind = 'compress', "
            "layout = 'small') trains one with no ME-CondConv experts")):
        trainer.train(trainer.load_config(trainer_config(trainer_files, cc, student='kind = "compress"\nlayout = "small"')))


def test_a_damaged_checkpoint_with_no_earlier_one_restarts_at_step_0_and_says_so(trainer_files, tmp_path):
    out = tmp_path / "run"
    trainer.train(trainer.load_config(trainer_config(trainer_files, out, steps=2)))
    assert not (out / "checkpoint-prev.safetensors").exists()   # one save: no earlier checkpoint
    first = safetensors.torch.load_file(str(out / "unet.safetensors"))
    ck = out / "checkpoint.safetensors"
    ck.write_bytes(ck.read_bytes()[:-1000])   # damaged: cut short
    logs = []
    res = trainer.train(trainer.load_config(trainer_config(trainer_files, out, steps=2)), log=logs.append)
    assert [done for done, _ in res["history"]] == [1, 2]   # both steps trained again
    i = next(i for i, line in enumerate(logs) if line.startswith("skipping"))
    assert logs[i].startswith(f"skipping {ck}: could not read checkpoint.safetensors as safetensors")
    assert logs[i + 1] == f"no usable checkpoint in {out} (checkpoint.safetensors skipped): starting from step 0"
    again = safetensors.torch.load_file(str(out / "unet.safetensors"))
    assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)   # from step 0, bit for bit


@pytest.mark.parametrize("key,value,needle", [
    ("lr", "nan", "'lr' must be a number > 0 (e.g. 5e-5) (got nan)"),
    ("lr", "inf", "'lr' must be a number > 0 (e.g. 5e-5) (got inf)"),
    ("steps", "inf", "'steps' must be a whole number >= 1 (got inf)"),
    ("seed", "-1", "'seed' must be a whole number >= 0 (got -1)"),
])
def test_trainer_numbers_refuse_nan_and_inf(trainer_files, tmp_path, key, value, needle):
    """TOML writes nan and inf; every number of the config refuses them, naming the key."""
    with pytest.raises(trainer.ConfigError) as e:
        trainer.load_config(trainer_config(trainer_files, tmp_path / "run", **{key: value}))
    assert str(e.value).endswith(needle)
