"""The catalogue of bad input and damaged files: each gets one clear error at the node (naming
the input or file and the fix), never a bare traceback, never silent wrong output. The trainer's
cases are in test_train.py, the samplers' in test_inheritance.py and test_switch.py."""
import json
import os
import shutil

import pytest
import safetensors.torch
import torch

from conftest import model_folder
from asdm import assembly
from asdm import compat
from asdm import condconv
from asdm import embedded


def save(sd_model, path, **edit):
    assembly.save_unet(sd_model, str(path))
    sd = safetensors.torch.load_file(str(path))
    meta = safetensors.safe_open(str(path), "pt").metadata()
    for k, fn in edit.items():
        sd[k.replace("__", ".")] = fn(sd[k.replace("__", ".")])
    safetensors.torch.save_file(sd, str(path), metadata=meta)


def load(N, name):
    return N["ASDMLoadCompressedUNet"]().load(name, "auto")[0]


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
    sw = N["ASDMUNetSwitch"]().switch("steps", model_1=base, start_1=0.0, end_1=3.0, model_2=sd, start_2=3.0,
                                      end_2=-1.0)[0]
    cases = {
        "A-SDM Save UNet": lambda: N["ASDMSaveUNet"]().save(sw, "unet/x"),
        "A-SDM Assemble UNet": lambda: N["ASDMAssembleUNet"]().assemble(sd, sw, "M2", ""),
        "A-SDM Feature Inheritance": lambda: N["ASDMFeatureInheritance2"]().patch(sw, "CO6", 5, "", "residual", False, 0.2),
        "A-SDM ME-CondConv": lambda: N["ASDMMECondConv"]().patch(sw, "none", "dn*.*.R, up*.*.R", 2, "identity", 0),
        "A-SDM GRI Attention": lambda: N["ASDMGRIAttention"]().patch(sw, "dn0, up3", 16, 4, 0.0, 1.0),
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
            N["ASDMSaveUNet"]().save(sd_and_base[1], "escape_link/unet")
        assert list(outside.iterdir()) == []
        with pytest.raises(ValueError, match="A-SDM Save UNet: filename_prefix '../x'"):
            N["ASDMSaveUNet"]().save(sd_and_base[1], "../x")
        with pytest.raises(ValueError, match="choose a shorter or simpler filename_prefix"):
            N["ASDMSaveUNet"]().save(sd_and_base[1], "unet/" + "n" * 300)
    finally:
        os.remove(link)


def test_recipes_quoted_short_and_contradictions_refused(N, sd_and_base):
    sd, base = sd_and_base
    node = N["ASDMAssembleUNet"]()
    with pytest.raises(ValueError) as e:
        node.assemble(sd, base, "custom", "dn0=B, " + "x" * 1000 + "=B")
    assert len(str(e.value)) < 400 and "characters" in str(e.value)
    with pytest.raises(ValueError, match=r"the recipe is \d+ characters long"):
        node.assemble(sd, base, "custom", "dn0=B," * 166668)
    with pytest.raises(ValueError, match="gives dn0 twice, from B and from A"):
        node.assemble(sd, base, "custom", "dn0=B, dn0=A")


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
        N["ASDMMECondConv"]().patch(tiny, "bad.safetensors", "", 2, "identity", 0)
    assert str(e.value).startswith("A-SDM ME-CondConv: ") and needle in str(e.value), str(e.value)
