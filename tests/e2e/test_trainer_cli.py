"""The trainer command as users run it: its own process, two processes under torchrun (DDP),
and a bad config told in one line."""
import os
import re

from conftest import run_cli, trainer_config as config


def test_torchrun_two_processes_end_with_identical_weights(trainer_files, tmp_path):
    cfg = config(trainer_files, tmp_path / "ddp", steps=3, batch=4, save_every=3, grad_accum=2)
    r = run_cli(["-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "asdm.training", cfg], timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    digests = re.findall(r"rank (\d): weights sha256 (\w+)", r.stdout + r.stderr)
    assert sorted(d[0] for d in digests) == ["0", "1"] and digests[0][1] == digests[1][1]
    assert os.path.exists(tmp_path / "ddp" / "unet.safetensors")


def test_bad_config_is_one_line_and_exit_2(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('out = "x"\n[teacher]\nunet = "t.safetensors"\n')
    r = run_cli(["-m", "asdm.training", str(bad)])
    assert r.returncode == 2 and "asdm.training:" in r.stderr and "'data.latents' is missing" in r.stderr
    assert "Traceback" not in r.stderr and r.stderr.strip().splitlines()[-1].startswith("asdm.training:")
