"""The bundled workflows, run through ComfyUI's own executor on a project-made SD1.5 model."""
import copy
import json
import os

import pytest
import torch

from conftest import unload_all
from asdm import host

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def runner():
    r = host.Runner()
    yield r
    unload_all()


@pytest.fixture(scope="module")
def ckpt():
    return host.random_sd15_checkpoint()


def small(prompt, ckpt, steps=6, size=64, batch=1):
    p = copy.deepcopy(prompt)
    p["1"]["inputs"]["ckpt_name"] = ckpt
    p["4"]["inputs"].update(width=size, height=size, batch_size=batch)
    p["6"]["inputs"]["steps"] = steps
    return p


def save_latent(p, node, prefix):
    p[f"save_{prefix}"] = {"class_type": "SaveLatent", "inputs": {"samples": [node, 0], "filename_prefix": prefix}}


def read_latent(prefix):
    import folder_paths
    import safetensors.torch
    d = folder_paths.get_output_directory()
    files = sorted(f for f in os.listdir(d) if f.startswith(prefix + "_") and f.endswith(".latent"))
    return safetensors.torch.load_file(os.path.join(d, files[-1]))["latent_tensor"]


def test_ui_and_api_twins_agree():
    ui = json.load(open(os.path.join(ROOT, "workflows", "feature_inheritance_sd15.json")))
    api = host.load_api_workflow("feature_inheritance_sd15.json")
    assert {str(n["id"]): n["type"] for n in ui["nodes"]} == {k: v["class_type"] for k, v in api.items()}
    node = next(n for n in ui["nodes"] if n["type"] == "ASDMFeatureInheritance")
    i = api[str(node["id"])]["inputs"]
    assert node["widgets_values"] == [i["preset"], i["units"], i["period"], i["final_full_steps"]]
    for link_id, src, _, dst, _, _ in ui["links"]:   # every link has both ends
        assert any(n["id"] == src for n in ui["nodes"]) and any(n["id"] == dst for n in ui["nodes"])


def test_example_workflow_runs_and_inherits(runner, ckpt):
    api = host.load_api_workflow("feature_inheritance_sd15.json")
    # plain: the sampler fed by the checkpoint directly
    plain = small(api, ckpt); plain["6"]["inputs"]["model"] = ["1", 0]; save_latent(plain, "6", "wf_plain")
    runner.run(plain)
    p1 = small(api, ckpt); p1["5"]["inputs"].update(period=1); save_latent(p1, "6", "wf_p1")
    runner.run(p1)
    p2 = small(api, ckpt); p2["5"]["inputs"].update(period=2, final_full_steps=0); save_latent(p2, "6", "wf_p2")
    runner.run(p2)
    base = read_latent("wf_plain")
    assert torch.equal(read_latent("wf_p1"), base)
    assert ((read_latent("wf_p2") - base).abs().max() / base.abs().max()) > 1e-3
    import folder_paths
    assert any(f.startswith("asdm_inheritance") for f in os.listdir(folder_paths.get_output_directory()))


def test_two_runs_in_one_prompt_with_other_sizes(runner, ckpt):
    api = host.load_api_workflow("feature_inheritance_sd15.json")
    p = small(api, ckpt); p["5"]["inputs"].update(period=2, final_full_steps=0)
    del p["7"], p["8"]
    p["4b"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 96, "height": 96, "batch_size": 2}}
    p["6b"] = copy.deepcopy(p["6"]); p["6b"]["inputs"]["latent_image"] = ["4b", 0]
    save_latent(p, "6", "two_a"); save_latent(p, "6b", "two_b")
    runner.run(p)
    # each sampler alone, on a fresh executor (no cached sampler outputs to reuse)
    fresh = host.Runner()
    for keep, prefix in (("6", "solo_a"), ("6b", "solo_b")):
        solo = copy.deepcopy(p)
        for k in [k for k in solo if k.startswith("save_") or (k.startswith("6") and k != keep)]:
            del solo[k]
        save_latent(solo, keep, prefix)
        fresh.run(solo)
    assert torch.equal(read_latent("two_a"), read_latent("solo_a"))
    assert torch.equal(read_latent("two_b"), read_latent("solo_b"))
