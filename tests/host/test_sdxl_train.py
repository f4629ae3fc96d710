"""The trainer with an SDXL-family teacher (a narrow SDXL-topology UNet, CPU): every student
kind, the data file's ``y`` beside ``context``, image folders encoded with SDXL's y."""
import json
import os

import pytest
import safetensors
import safetensors.torch
import torch

from conftest import trainer_config as config
from sdxl_family import data, family_model
from asdm import assembly
from asdm import derived_files
from asdm import topology
from asdm import unet_files
from asdm.training import trainer


@pytest.fixture(scope="module")
def sdxl_files(tmp_path_factory):
    """A narrow SDXL teacher, an SSD-1B-topology UNet (a step-1 result to assemble with it) and
    pre-encoded data with y (8 samples, 8x8 latents)."""
    d = tmp_path_factory.mktemp("train-sdxl")
    assembly.save_unet(family_model("sdxl", 0), str(d / "teacher.safetensors"))
    assembly.save_unet(family_model("ssd-1b", 4), str(d / "ssd1b.safetensors"))
    safetensors.torch.save_file(data(), str(d / "data.safetensors"))
    return d


def exported(out):
    return safetensors.torch.load_file(os.path.join(out, "unet.safetensors"))


def meta(path):
    with safetensors.safe_open(str(path), "pt") as f:
        return f.metadata()


STUDENTS = {
    "koala-700m": ('kind = "compress"\nlayout = "koala-700m"', None),
    "assemble": ('kind = "assemble"\ncompressed = "{d}/ssd1b.safetensors"\nrecipe = "M2"', None),
    "condconv": ('kind = "condconv"\nlayout = "small"\nexperts = 2\ninit = "identity"', None),
    # GRI in SDXL's attention levels (its first has none); at 8x8 latents dn1 / up1 see 4x4 tokens,
    # so a window of 2 makes GRI differ from full attention there
    "gri": ('kind = "compress"\nlayout = "base"\n[gri]\nunits = "dn1, up1"\nwindow = 2\npool = 2',
            {"units": "dn1, up1", "window": 2, "pool": 2}),
}


@pytest.mark.parametrize("kind", list(STUDENTS))
def test_every_student_kind_trains_on_an_sdxl_teacher(sdxl_files, tmp_path, kind):
    student, gri = STUDENTS[kind]
    out = tmp_path / kind
    cfg = trainer.load_config(config(sdxl_files, out, student=student.format(d=sdxl_files), steps=2, save_every=2))
    start = {k: v.clone() for k, v in trainer.build(cfg)[1].model.diffusion_model.state_dict().items()}
    res = trainer.train(cfg)
    for _, terms in res["history"]:   # (no middle block in the student: no mid term)
        assert all(v >= 0 and v == v for v in terms.values()) and terms["out_kd"] > 0 and terms["feat_kd"] > 0
    m = derived_files.load_unet(res["unet"])
    cfg_out = m.model.model_config.unet_config
    assert unet_files.family_of(cfg_out) == "SDXL" and cfg_out["adm_in_channels"] == unet_files.SDXL_Y
    got = {k: v.float() for k, v in exported(out).items() if k in start}
    assert got.keys() == start.keys()
    moved = [k for k in got if not torch.equal(got[k], start[k].float())]
    if kind == "condconv":   # the experts learn with the UNet (condconv.safetensors beside it)
        assert res["experts"] and os.path.exists(res["experts"])
    if kind == "assemble":   # SDXL's deep part (A) frozen, SSD-1B's shallow pairs (B) trained
        topo = topology.describe(m.model.diffusion_model)
        frozen = tuple(p + "." for b in ("dn2", "mid", "up0") for p in topo.entries[b])
        assert moved and not any(k.startswith(frozen) for k in moved)
        assert any(k.startswith(tuple(p + "." for p in topo.entries["dn0"])) for k in moved)
    else:
        assert moved
    if gri:
        assert json.loads(meta(res["unet"])["asdm.gri"]) == gri
    if kind == "koala-700m":
        assert cfg_out["transformer_depth"] == [0, 2, 5] and cfg_out["transformer_depth_middle"] == assembly.NO_MID_BLOCK


def test_data_y_is_required_by_sdxl_teachers_and_refused_by_others(sdxl_files, trainer_files, tmp_path):
    safetensors.torch.save_file(data(y=None), str(tmp_path / "no-y.safetensors"))
    safetensors.torch.save_file(data(y=100), str(tmp_path / "narrow-y.safetensors"))
    for file, needle in (("no-y", "has no 'y' tensor, and the teacher .* takes y \\[N,2816\\]"),
                         ("narrow-y", "'y' is \\(8, 100\\); the teacher takes \\[N,2816\\]")):
        cfg = trainer.load_config(config(sdxl_files, tmp_path / file, data=f'latents = "{tmp_path / file}.safetensors"'))
        with pytest.raises(trainer.ConfigError, match=needle):
            trainer.train(cfg)
        assert not os.path.exists(tmp_path / file / "unet.safetensors")
    # an SD1.x teacher with data encoded for SDXL (y present, context 768 as it needs)
    g = torch.Generator().manual_seed(0)
    safetensors.torch.save_file({"latents": torch.randn(4, 4, 8, 8, generator=g), "context": torch.randn(4, 77, 768, generator=g),
                                 "y": torch.randn(4, 2816, generator=g)}, str(tmp_path / "sd1-y.safetensors"))
    cfg = trainer.load_config(config(trainer_files, tmp_path / "sd1", data=f'latents = "{tmp_path / "sd1-y.safetensors"}"'))
    with pytest.raises(trainer.ConfigError, match="holds 'y' \\(4, 2816\\), but the teacher takes no y"):
        trainer.train(cfg)


class _StubCLIP:
    """A text encoder of the stub checkpoint: a context 64 wide and a pooled output ``pooled`` wide,
    both drawn from the caption."""

    def __init__(self, pooled):
        self.pooled, self.calls = pooled, []

    def tokenize(self, text):
        return text

    def encode_from_tokens(self, tokens, return_pooled=False):
        g = torch.Generator().manual_seed(len(tokens))
        cond, pooled = torch.randn(1, 77, 64, generator=g), torch.randn(1, self.pooled, generator=g)
        self.calls.append(pooled)
        return (cond, pooled) if return_pooled else cond


class _StubVAE:
    def encode(self, pixels):   # [B, H, W, 3] -> [B, 4, H/8, W/8]
        return torch.full((pixels.shape[0], 4, pixels.shape[1] // 8, pixels.shape[2] // 8), float(pixels.mean()))


def test_image_folder_for_an_sdxl_teacher_stores_y_as_the_host_encodes_it(sdxl_files, tmp_path, monkeypatch):
    """The checkpoint's CLIP and VAE are stand-ins here (a whole SDXL checkpoint with CLIP-G is
    too large for this suite; the host's own loading is the SD1 image test's): what is checked is
    that each caption's y is the teacher's own encoding of its pooled output at the data size, and
    that a text encoder without SDXL's pooled width is refused."""
    import comfy.sd
    from PIL import Image
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i, color in enumerate(["red", "blue"]):
        Image.new("RGB", (64, 64), color).save(imgs / f"{i}.png")
        (imgs / f"{i}.txt").write_text(f"a {color} square" + "!" * i)
    clip = _StubCLIP(unet_files.SDXL_POOLED)
    monkeypatch.setattr(comfy.sd, "load_checkpoint_guess_config",
                        lambda *a, **k: (None, clip, _StubVAE(), None))
    images = f'images = "{imgs}"\ncheckpoint = "{tmp_path / "stub.safetensors"}"\nsize = 64'
    trainer.train(trainer.load_config(config(sdxl_files, tmp_path / "enc", steps=1, data=images)))
    enc = safetensors.torch.load_file(str(tmp_path / "enc" / "encoded.safetensors"))
    teacher = derived_files.load_unet(str(sdxl_files / "teacher.safetensors"))
    want = torch.cat([teacher.model.encode_adm(pooled_output=p, width=64, height=64, crop_w=0, crop_h=0,
                                               target_width=64, target_height=64) for p in clip.calls])
    assert enc["y"].shape == (2, unet_files.SDXL_Y) and torch.equal(enc["y"], want)
    assert torch.equal(enc["y"][:, :unet_files.SDXL_POOLED], torch.cat(clip.calls))
    monkeypatch.setattr(comfy.sd, "load_checkpoint_guess_config",
                        lambda *a, **k: (None, _StubCLIP(768), _StubVAE(), None))
    with pytest.raises(trainer.ConfigError, match="data.checkpoint: its text encoder gives a pooled output 768 wide"):
        trainer.train(trainer.load_config(config(sdxl_files, tmp_path / "enc2", steps=1, data=images)))
