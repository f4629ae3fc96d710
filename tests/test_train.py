"""The trainer command on tiny SD1-family UNets (CPU): resume, checkpoints the nodes load,
two-process DDP, bad input."""
import os
import re
import subprocess
import sys

import pytest
import safetensors.torch
import torch

from conftest import engine, ksample
from asdm import host


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("train")
    tm = engine("testmodels")
    teacher = tm.sd_model(tm.TINY_SD1, seed=0)
    engine("assembly").save_unet(teacher, str(d / "teacher.safetensors"))
    g = torch.Generator().manual_seed(0)
    safetensors.torch.save_file({"latents": torch.randn(8, 4, 8, 8, generator=g),
                                 "context": torch.randn(8, 77, 768, generator=g)}, str(d / "data.safetensors"))
    return d


def config(d, out, **over):
    lines = {"out": f'"{out}"', "steps": 6, "batch": 2, "save_every": 3, "log_every": 1, "lr": 1e-3, "seed": 1}
    lines.update(over)
    text = "\n".join(f"{k} = {v}" for k, v in lines.items())
    text += f'\n[teacher]\nunet = "{d / "teacher.safetensors"}"\n[data]\nlatents = "{d / "data.safetensors"}"\n'
    text += '[student]\nkind = "compress"\nlayout = "base"\n'
    p = d / f"{os.path.basename(str(out))}.toml"
    p.write_text(text)
    return str(p)


def weights(out):
    return safetensors.torch.load_file(os.path.join(out, "unet.safetensors"))


def test_interrupted_and_resumed_equals_uninterrupted(files, N, tmp_path):
    tr = engine("train")
    full = tr.train(tr.load_config(config(files, tmp_path / "full")))
    assert len(full["history"]) == 6 and all(v > 0 for v in full["history"][0][1].values())
    tr.train(tr.load_config(config(files, tmp_path / "parts", steps=3)))            # "interrupted" after 3
    meta = safetensors.safe_open(os.path.join(tmp_path / "parts", "unet.safetensors"), "pt").metadata()
    assert meta["asdm.train.step"] == "3"
    logs = []
    tr.train(tr.load_config(config(files, tmp_path / "parts")), log=logs.append)    # resumes at 3
    assert logs[0].startswith("resuming from step 3")
    a, b = weights(tmp_path / "full"), weights(tmp_path / "parts")
    # Same seed, same ops in the same order on the CPU: bit for bit.
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the checkpoint is a UNet file the loader node reads, and it samples
    import folder_paths
    folder_paths.add_model_folder_path(engine("compat").unet_folder(), str(tmp_path / "full"))
    m = N["ASDMLoadCompressedUNet"]().load("unet.safetensors", "auto")[0]
    tm = engine("testmodels")
    out = ksample(m, (tm.conditioning(768, 1), tm.conditioning(768, 2)), steps=3)
    assert torch.isfinite(out).all()


def run_cli(args, timeout=300):
    env = dict(os.environ, PYTHONPATH=host.REPO_ROOT)
    return subprocess.run([sys.executable, *args], cwd=host.REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_torchrun_two_processes_end_with_identical_weights(files, tmp_path):
    cfg = config(files, tmp_path / "ddp", steps=3, batch=4, save_every=3)
    r = run_cli(["-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "asdm.train", cfg], timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    digests = re.findall(r"rank (\d): weights sha256 (\w+)", r.stdout + r.stderr)
    assert sorted(d[0] for d in digests) == ["0", "1"] and digests[0][1] == digests[1][1]
    assert os.path.exists(tmp_path / "ddp" / "unet.safetensors")


def test_bad_input_is_named_and_nothing_starts(files, tmp_path):
    tr = engine("train")
    bad = tmp_path / "bad.toml"
    bad.write_text('out = "x"\n[teacher]\nunet = "t.safetensors"\n')
    with pytest.raises(tr.ConfigError, match="'data.latents' is missing"):
        tr.load_config(str(bad))
    g = torch.Generator().manual_seed(0)
    safetensors.torch.save_file({"latents": torch.randn(2, 4, 8, 8, generator=g),
                                 "context": torch.randn(2, 77, 1024, generator=g)}, str(tmp_path / "v2.safetensors"))
    cfg = tr.load_config(config(files, tmp_path / "wrongctx"))
    cfg["data"]["latents"] = str(tmp_path / "v2.safetensors")
    with pytest.raises(tr.ConfigError, match="context dim 1024 but the teacher takes 768"):
        tr.train(cfg)
    assert not os.path.exists(tmp_path / "wrongctx" / "unet.safetensors")
    with pytest.raises(tr.ConfigError, match="student.kind = 'distill'"):
        tr.load_config(_kind(files, tmp_path))
    # the command line says it in one line, exit code 2
    r = run_cli(["-m", "asdm.train", str(bad)])
    assert r.returncode == 2 and "asdm.train:" in r.stderr and "'data.latents' is missing" in r.stderr


def _kind(files, tmp_path):
    p = config(files, tmp_path / "k")
    text = open(p).read().replace('kind = "compress"', 'kind = "distill"')
    open(p, "w").write(text)
    return p
