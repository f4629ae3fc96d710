"""The trainer with ``[gri]``: a student distilled with GRI attention (the teacher keeps full
attention) on tiny SD1-family UNets (CPU), in the test process."""
import json
import os
import re

import pytest
import safetensors
import safetensors.torch
import torch

from conftest import trainer_config as config
from asdm import gri
from asdm.training import distill
from asdm.training import trainer
from asdm import derived_files

UNITS, WINDOW, POOL = "dn0, up3", 4, 2   # at 16x16 latents: grids of 16x16 tokens, 4x4 regions of 4x4


@pytest.fixture(scope="module")
def gri_data(trainer_files):
    """16x16 latents (the trainer's data format): the grid of the level-0 units (16x16 tokens)
    is larger than the window, so GRI differs from full attention there."""
    g = torch.Generator().manual_seed(1)
    path = trainer_files / "data16.safetensors"
    safetensors.torch.save_file({"latents": torch.randn(8, 4, 16, 16, generator=g),
                                 "context": torch.randn(8, 77, 768, generator=g)}, str(path))
    return f'latents = "{path}"'


def gri_table(**keys):
    return "\n[gri]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in keys.items())


def meta(path):
    with safetensors.safe_open(str(path), "pt") as f:
        return f.metadata()


def gap_with_gri(teacher, student, lat_in):
    """Mean squared error of the student's UNet output, with GRI active in it (both shift
    parities), against the full-attention teacher's on fixed held-out noised latents."""
    g = torch.Generator().manual_seed(99)
    x0 = lat_in(torch.randn(4, 4, 16, 16, generator=g))
    ctx = torch.randn(4, 77, 768, generator=g)
    x_t, t, _ = distill.noised(x0, torch.linspace(0.03, 14.6, 1000), g)
    errs = []
    with torch.no_grad():
        want = teacher(x_t, timesteps=t, context=ctx)
        for step in (0, 1):
            with gri.gri_unet(student, UNITS, WINDOW, POOL, step=step):
                errs.append((student(x_t, timesteps=t, context=ctx) - want).pow(2).mean().item())
    return sum(errs) / len(errs)


def test_gri_distillation_moves_the_gri_student_toward_the_teacher(trainer_files, gri_data, tmp_path):
    """The student starts as the teacher itself (an assembly of the teacher with itself whose
    GRI blocks, dn0 and up3, are the trained ones), so its only difference from the teacher is
    GRI attention: without GRI in training every loss term and gradient would be exactly zero
    and nothing would move. The task term is off (this random teacher does not predict the
    noise, so it would pull away from the teacher)."""
    teacher_file = trainer_files / "teacher.safetensors"
    student = (f'kind = "assemble"\ncompressed = "{teacher_file}"\nrecipe = "dn0=B, up3=B"\n'
               "[loss]\ntask = 0.0" + gri_table(units=UNITS, window=WINDOW, pool=POOL))
    out = tmp_path / "tuned"
    cfg = trainer.load_config(config(trainer_files, out, student=student, data=gri_data, steps=10, save_every=10,
                                log_every=5, batch=2, lr=1e-4))
    teacher, untrained = trainer.build(cfg)[:2]
    lat_in = untrained.model.process_latent_in
    before = gap_with_gri(teacher, untrained.model.diffusion_model, lat_in)
    logs = []
    res = trainer.train(cfg, log=logs.append)
    assert any(line.startswith("GRI attention in the student: dn0.0.A") for line in logs), logs
    trained = derived_files.load_unet(res["unet"]).model.diffusion_model
    after = gap_with_gri(teacher, trained, lat_in)
    print(f"GRI student vs teacher, MSE with GRI: before {before:.6g}, after {after:.6g}")
    assert before > 0 and after < 0.9 * before, (before, after)

    # (b) the export and the checkpoint carry the settings
    want = {"units": UNITS, "window": WINDOW, "pool": POOL}
    assert json.loads(meta(res["unet"])["asdm.gri"]) == want
    assert json.loads(meta(out / "checkpoint.safetensors")["asdm.gri"]) == want


@pytest.mark.parametrize("kind,table,want", [
    ('kind = "compress"\nlayout = "base"', {}, {"units": "dn0, up3", "window": 16, "pool": 4}),   # defaults
    ('kind = "condconv"\nlayout = "small"\nexperts = 2', dict(units="up3", window=4, pool=2),
     {"units": "up3", "window": 4, "pool": 2}),
])
def test_every_student_kind_trains_with_gri_and_exports_its_settings(trainer_files, tmp_path, kind, table, want):
    res = trainer.train(trainer.load_config(config(trainer_files, tmp_path / "k", student=kind + gri_table(**table),
                                         steps=1, save_every=1)))
    assert json.loads(meta(res["unet"])["asdm.gri"]) == want
    assert meta(res["unet"])["asdm.train.step"] == "1"


def test_without_gri_the_export_has_no_gri_metadata(trainer_files, tmp_path):
    res = trainer.train(trainer.load_config(config(trainer_files, tmp_path / "plain", steps=1, save_every=1)))
    assert "asdm.gri" not in meta(res["unet"])
    assert "asdm.gri" not in meta(tmp_path / "plain" / "checkpoint.safetensors")


def test_gri_resume_is_bit_exact_shifts_alternate_and_other_settings_are_refused(
        trainer_files, gri_data, tmp_path, monkeypatch):
    shifts = []
    real = gri.gri_attention

    def spy(*args, **kwargs):
        shifts.append(kwargs["shift"])
        return real(*args, **kwargs)

    monkeypatch.setattr(gri, "gri_attention", spy)
    student = 'kind = "compress"\nlayout = "base"' + gri_table(units="dn0", window=WINDOW, pool=POOL)
    cfg = lambda out, **over: trainer.load_config(config(trainer_files, tmp_path / out, student=student,   # noqa: E731
                                                    data=gri_data, save_every=2, **over))
    trainer.train(cfg("full", steps=4))
    # dn0 of Base holds one A unit: its shift is the step's parity
    per_step = len(shifts) // 4
    assert shifts == [bool(s % 2) for s in range(4) for _ in range(per_step)] and per_step >= 1, shifts
    trainer.train(cfg("parts", steps=2))
    logs = []
    trainer.train(cfg("parts", steps=4), log=logs.append)
    assert any(line.startswith("resuming from step 2") for line in logs)
    a = safetensors.torch.load_file(str(tmp_path / "full" / "unet.safetensors"))
    b = safetensors.torch.load_file(str(tmp_path / "parts" / "unet.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # another window, or no GRI, on the same out: refused before any step
    other = 'kind = "compress"\nlayout = "base"' + gri_table(units="dn0", window=WINDOW + 1, pool=POOL)
    with pytest.raises(trainer.ConfigError, match=r"was trained with GRI attention .*\"window\": 4.* but this config "
                                             r"trains with GRI attention .*\"window\": 5"):
        trainer.train(trainer.load_config(config(trainer_files, tmp_path / "parts", student=other, data=gri_data, steps=6)))
    with pytest.raises(trainer.ConfigError, match="but this config trains without GRI attention"):
        trainer.train(trainer.load_config(config(trainer_files, tmp_path / "parts", data=gri_data, steps=6)))
    assert meta(tmp_path / "parts" / "unet.safetensors")["asdm.train.step"] == "4"
    # the same units written another way are the same settings
    same = 'kind = "compress"\nlayout = "base"' + gri_table(units="dn0.0.A", window=WINDOW, pool=POOL)
    trainer.train(trainer.load_config(config(trainer_files, tmp_path / "parts", student=same, data=gri_data, steps=5,
                                   save_every=5)))
    assert meta(tmp_path / "parts" / "unet.safetensors")["asdm.train.step"] == "5"


@pytest.mark.parametrize("table,needle,at", [
    (dict(units="nope"), "gri.units: unit token 'nope' names no unit of this UNet", "build"),
    (dict(units="dn0.0.R"), "gri.units: 'dn0.0.R' names no attention (A) unit", "build"),
    (dict(window=0), "'gri.window' must be a whole number >= 1", "load"),
    (dict(pool=1.5), "'gri.pool' must be a whole number >= 1", "load"),
    (dict(units=""), "'gri.units' must be a text naming A units", "load"),
    (dict(windw=4), "unknown key 'gri.windw'; did you mean 'gri.window'?", "load"),
])
def test_bad_gri_settings_are_named_before_training(trainer_files, tmp_path, table, needle, at):
    path = config(trainer_files, tmp_path / "bad", student='kind = "compress"\nlayout = "base"' + gri_table(**table))
    with pytest.raises(trainer.ConfigError, match=re.escape(needle)):
        trainer.train(trainer.load_config(path))
    if at == "build":   # the config reads; the student's units are checked before any step
        trainer.load_config(path)
    assert not os.path.exists(tmp_path / "bad" / "unet.safetensors")
    assert not os.path.exists(tmp_path / "bad" / "checkpoint.safetensors")
