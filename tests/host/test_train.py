"""The trainer on tiny SD1-family UNets (CPU), in the test process: resume, checkpoints the
nodes load, ME-CondConv students, image folders, bad input (the command line: e2e tier)."""
import os
import re

import pytest
import safetensors.torch
import torch

from conftest import ksample, model_folder, trainer_config as config
from asdm import assembly
from asdm import compat
from asdm import condconv
from asdm.harness import models as tm
from asdm.training import distill
from asdm.training import trainer
from asdm import derived_files


def weights(out):
    return safetensors.torch.load_file(os.path.join(out, "unet.safetensors"))


def test_interrupted_and_resumed_equals_uninterrupted(trainer_files, N, tmp_path):
    full = trainer.train(trainer.load_config(config(trainer_files, tmp_path / "full")))
    assert len(full["history"]) == 6 and all(v > 0 for v in full["history"][0][1].values())
    trainer.train(trainer.load_config(config(trainer_files, tmp_path / "parts", steps=3)))            # "interrupted" after 3
    meta = safetensors.safe_open(os.path.join(tmp_path / "parts", "unet.safetensors"), "pt").metadata()
    assert meta["asdm.train.step"] == "3"
    logs = []
    trainer.train(trainer.load_config(config(trainer_files, tmp_path / "parts")), log=logs.append)    # resumes at 3
    assert any(line.startswith("resuming from step 3") for line in logs)
    assert "perceptual term: off (no loss.perceptual_weights given)" in logs
    a, b = weights(tmp_path / "full"), weights(tmp_path / "parts")
    # Same seed, same ops in the same order on the CPU: bit for bit.
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the checkpoint is a UNet file the loader node reads, and it samples
    with model_folder(compat.unet_folder(), tmp_path / "full"):
        m = compat.call_node(N["ASDMLoadCompressedUNet"], unet_name="unet.safetensors", prediction="auto")[0]
    out = ksample(m, (tm.conditioning(768, 1), tm.conditioning(768, 2)), steps=3)
    assert torch.isfinite(out).all()


def test_bad_input_is_named_and_nothing_starts(trainer_files, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('out = "x"\n[teacher]\nunet = "t.safetensors"\n')
    with pytest.raises(trainer.ConfigError, match="'data.latents' is missing"):
        trainer.load_config(str(bad))
    g = torch.Generator().manual_seed(0)
    safetensors.torch.save_file({"latents": torch.randn(2, 4, 8, 8, generator=g),
                                 "context": torch.randn(2, 77, 1024, generator=g)}, str(tmp_path / "v2.safetensors"))
    cfg = trainer.load_config(config(trainer_files, tmp_path / "wrongctx"))
    cfg["data"]["latents"] = str(tmp_path / "v2.safetensors")
    with pytest.raises(trainer.ConfigError, match="context dim 1024 but the teacher takes 768"):
        trainer.train(cfg)
    assert not os.path.exists(tmp_path / "wrongctx" / "unet.safetensors")
    with pytest.raises(trainer.ConfigError, match=r"'student.kind' must be one of compress, assemble, condconv \(got 'distill'\)"):
        trainer.load_config(_kind(trainer_files, tmp_path))


def _kind(trainer_files, tmp_path):
    p = config(trainer_files, tmp_path / "k")
    text = open(p).read().replace('kind = "compress"', 'kind = "distill"')
    open(p, "w").write(text)
    return p


def test_condconv_student_trains_its_experts_and_the_node_loads_them(trainer_files, N, tmp_path):
    res = trainer.train(trainer.load_config(config(trainer_files, tmp_path / "cc", steps=4, save_every=4,
                                         student='kind = "condconv"\nlayout = "small"\nexperts = 2\ninit = "identity"')))
    assert res["experts"] and os.path.exists(res["experts"])
    trained = safetensors.torch.load_file(res["experts"])
    assert any(k.endswith(".experts") and v.abs().max() > 0 for k, v in trained.items())   # moved off zero
    with model_folder(compat.unet_folder(), tmp_path / "cc"), model_folder("asdm_condconv", tmp_path / "cc"):
        unet = compat.call_node(N["ASDMLoadCompressedUNet"], unet_name="unet.safetensors", prediction="auto")[0]
        m = compat.call_node(N["ASDMMECondConv"], model=unet, weights="condconv.safetensors",
                             units=condconv.DEFAULT_UNITS, experts=2, init="identity", seed=0)[0]
    conds = (tm.conditioning(768, 1), tm.conditioning(768, 2))
    assert not torch.equal(ksample(m, conds, steps=3), ksample(unet, conds, steps=3))
    # train_unet = false: the experts move, the UNet is the layout it started from bit for bit
    res2 = trainer.train(trainer.load_config(config(trainer_files, tmp_path / "cc2", steps=4, save_every=4,
                                          student='kind = "condconv"\nlayout = "small"\nexperts = 2\n'
                                                  'init = "identity"\ntrain_unet = false')))
    moved = safetensors.torch.load_file(res2["experts"])
    assert any(k.endswith(".experts") and v.abs().max() > 0 for k, v in moved.items())
    start = assembly.compress(derived_files.load_unet(str(trainer_files / "teacher.safetensors")), "small")
    start = {k: v.float() for k, v in start.model.diffusion_model.state_dict().items()}
    kept = {k: v.float() for k, v in weights(tmp_path / "cc2").items()}
    changed = {k: v.float() for k, v in weights(tmp_path / "cc").items()}
    assert kept.keys() == start.keys() and all(torch.equal(kept[k], start[k]) for k in kept)
    assert any(not torch.equal(changed[k], start[k]) for k in changed)


def test_image_folder_is_encoded_with_the_checkpoints_vae_and_clip(trainer_files, tmp_path):
    from PIL import Image
    ckpt = os.path.join(tm.cache(), "checkpoints", tm.random_sd15_checkpoint())
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i, color in enumerate(["red", "blue", "green"]):
        Image.new("RGB", (64, 64), color).save(imgs / f"{i}.png")
        (imgs / f"{i}.txt").write_text(f"a {color} square")
    (imgs / "3.png").write_bytes(b"not a png")
    (imgs / "3.txt").write_text("broken")
    data = f'images = "{imgs}"\ncheckpoint = "{ckpt}"\nsize = 64'
    logs = []
    trainer.train(trainer.load_config(config(trainer_files, tmp_path / "enc", steps=1, data=data)), log=logs.append)
    enc = safetensors.torch.load_file(str(tmp_path / "enc" / "encoded.safetensors"))
    assert enc["latents"].shape == (3, 4, 8, 8) and enc["context"].shape == (3, 77, 768)
    assert any("skipped 3.png" in line for line in logs)
    (imgs / "4.png").write_bytes((imgs / "0.png").read_bytes())   # no 4.txt
    with pytest.raises(trainer.ConfigError, match="have no caption file, e.g. 4.png"):
        trainer.train(trainer.load_config(config(trainer_files, tmp_path / "enc2", steps=1, data=data)))


def test_optional_perceptual_term(trainer_files, tmp_path):
    g = torch.Generator().manual_seed(0)
    vgg = {"features.0.weight": torch.randn(8, 3, 3, 3, generator=g), "features.0.bias": torch.zeros(8),
           "features.2.weight": torch.randn(8, 8, 3, 3, generator=g), "features.2.bias": torch.zeros(8),
           "features.5.weight": torch.randn(16, 8, 3, 3, generator=g), "features.5.bias": torch.zeros(16)}
    safetensors.torch.save_file(vgg, str(tmp_path / "vgg.safetensors"))
    p = config(trainer_files, tmp_path / "perc", steps=2, save_every=2)
    open(p, "a").write(f'[loss]\nperceptual_weights = "{tmp_path / "vgg.safetensors"}"\nperceptual = 0.5\n')
    logs = []
    res = trainer.train(trainer.load_config(p), log=logs.append)
    assert any(line.startswith("perceptual term: on (vgg.safetensors, 3 convs, weight 0.5)") for line in logs)
    assert res["history"][-1][1]["perceptual"] > 0
    safetensors.torch.save_file({"x": torch.zeros(2)}, str(tmp_path / "notvgg.safetensors"))
    p2 = config(trainer_files, tmp_path / "perc2", steps=1)
    open(p2, "a").write(f'[loss]\nperceptual_weights = "{tmp_path / "notvgg.safetensors"}"\n')
    with pytest.raises(trainer.ConfigError, match="perceptual_weights: the perceptual weights file holds no"):
        trainer.train(trainer.load_config(p2))
    p3 = config(trainer_files, tmp_path / "perc3", steps=1)
    open(p3, "a").write("[loss]\nfeat_kdd = 1.0\n")
    with pytest.raises(trainer.ConfigError, match="unknown key 'loss.feat_kdd'; did you mean 'loss.feat_kd'"):
        trainer.load_config(p3)


def test_teacher_and_student_of_other_families_are_refused(trainer_files, tmp_path):
    v2 = tm.sd_model(dict(tm.TINY_SD1, model_channels=64, context_dim=1024, use_linear_in_transformer=True,
                          num_heads=-1, num_head_channels=64), seed=1)   # an SD2-family UNet (64-wide heads)
    assembly.save_unet(v2, str(tmp_path / "v2.safetensors"))
    p = config(trainer_files, tmp_path / "fam", steps=1,
               student=f'kind = "assemble"\ncompressed = "{tmp_path / "v2.safetensors"}"\nrecipe = "M2"')
    with pytest.raises(trainer.ConfigError, match="student: .*different families"):
        trainer.train(trainer.load_config(p))
    teacher = tm.sd_model(tm.TINY_SD1, seed=0)
    assembly.save_unet(assembly.compress(teacher, "base"), str(tmp_path / "base.safetensors"))
    p = config(trainer_files, tmp_path / "lay", steps=1,
               student=f'kind = "assemble"\ncompressed = "{tmp_path / "base.safetensors"}"\nrecipe = "dn0=B"')
    with pytest.raises(trainer.ConfigError, match="student: .*one layer more"):
        trainer.train(trainer.load_config(p))


class Killed(BaseException):
    """A kill at one instant: nothing catches it, as nothing survives a real one."""


def test_a_crash_at_any_point_of_a_save_resumes_to_the_same_weights(trainer_files, tmp_path, monkeypatch):
    """The trainer is killed at each file operation of its first checkpoint (a file half
    written, a rename not done), then rerun: it resumes from a whole checkpoint and ends bit for
    bit where an uninterrupted run ends."""
    import safetensors.torch as st
    ref = trainer.train(trainer.load_config(config(trainer_files, tmp_path / "ref")))
    want = weights(tmp_path / "ref")
    real_save, real_replace = st.save_file, os.replace
    ops = []

    def counting(kind, real):
        def op(*args, **kwargs):
            ops.append(kind)
            if len(ops) == crash_at[0]:
                if kind == "write":   # half a file, then the kill
                    real(*args, **kwargs)
                    with open(args[1], "r+b") as f:
                        f.truncate(os.path.getsize(args[1]) // 2)
                raise Killed()
            return real(*args, **kwargs)
        return op

    crash_at = [0]
    monkeypatch.setattr(st, "save_file", counting("write", real_save))
    monkeypatch.setattr(os, "replace", counting("rename", real_replace))
    trainer.train(trainer.load_config(config(trainer_files, tmp_path / "count", steps=3)))
    n_ops = len(ops)   # every file operation of the first save (at step 3)
    assert n_ops >= 5
    for k in range(1, n_ops + 1):
        out = tmp_path / f"kill{k}"
        ops.clear()
        crash_at[0] = k
        with pytest.raises(Killed):
            trainer.train(trainer.load_config(config(trainer_files, out)))
        crash_at[0] = 0
        logs = []
        trainer.train(trainer.load_config(config(trainer_files, out)), log=logs.append)
        got = weights(out)
        assert got.keys() == want.keys() and all(torch.equal(got[k2], want[k2]) for k2 in want), (k, ops[:k], logs[:3])
    assert ref["unet"]


def test_a_non_finite_loss_stops_with_the_last_good_checkpoint(trainer_files, tmp_path, monkeypatch):
    real = distill.distill_loss
    calls = [0]

    def poisoned(*args, **kwargs):   # from step 5 on, the loss is NaN
        calls[0] += 1
        loss, terms = real(*args, **kwargs)
        if calls[0] > 4:
            return loss * float("nan"), {k: float("nan") for k in terms}
        return loss, terms

    monkeypatch.setattr(distill, "distill_loss", poisoned)
    with pytest.raises(trainer.TrainingError, match=r"not finite \(NaN or Inf\) at step 5; training stopped and "
                                                r"the last good checkpoint \(step 3\) is kept"):
        trainer.train(trainer.load_config(config(trainer_files, tmp_path / "nan")))
    meta = safetensors.safe_open(str(tmp_path / "nan" / "checkpoint.safetensors"), "pt").metadata()
    assert meta["asdm.step"] == "3"
    assert all(torch.isfinite(v).all() for v in weights(tmp_path / "nan").values())


@pytest.mark.parametrize("text,needle", [
    ('lr = "fast"', "'lr' must be a number > 0 (e.g. 5e-5) (got 'fast')"),
    ("lr = -1", "'lr' must be a number > 0"),
    ("stpes = 10", "unknown key 'stpes'; did you mean 'steps'?"),
    ('[student]\nkidn = "compress"', "unknown key 'student.kidn'; did you mean 'student.kind'?"),
    ("[studnet]\nkind = 1", "unknown table [studnet]; did you mean [student]?"),
    ("batch = 2.5", "'batch' must be a whole number >= 1 (got 2.5)"),
    ('[student]\nexperts = 1', "'student.experts' must be a whole number from 2 to 16"),
])
def test_bad_config_values_are_named(trainer_files, tmp_path, text, needle):
    p = tmp_path / "bad.toml"
    p.write_text(text + '\n')
    with pytest.raises(trainer.ConfigError, match=re.escape(needle)):
        trainer.load_config(str(p))


def test_unwritable_out_and_non_finite_data_are_named(trainer_files, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(trainer.ConfigError, match="'out' = .* cannot be written"):
        trainer.load_config(config(trainer_files, blocker / "sub"))
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(4, 4, 8, 8, generator=g)
    lat[2, 0, 0, 0] = float("nan")
    safetensors.torch.save_file({"latents": lat, "context": torch.randn(4, 77, 768, generator=g)},
                                str(tmp_path / "nan.safetensors"))
    cfg = trainer.load_config(config(trainer_files, tmp_path / "o", data=f'latents = "{tmp_path / "nan.safetensors"}"'))
    with pytest.raises(trainer.ConfigError, match="'latents' of 1 samples are not finite .* e.g. sample 2"):
        trainer.train(cfg)
