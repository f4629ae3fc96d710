"""The bundled graphs (example_workflows/), run through ComfyUI's own executor on a project-made
SD1.5 model or the embedded model."""
import copy
import os
import re

import pytest
import torch

from conftest import unload_all
from asdm.harness import graphs, host
from asdm import compat
from asdm.harness import models as tm

ROOT = host.REPO_ROOT


@pytest.fixture(scope="module")
def runner():
    r = host.Runner()
    yield r
    unload_all()


@pytest.fixture(scope="module")
def ckpt():
    return tm.random_sd15_checkpoint()


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
    files = sorted(f for f in os.listdir(d) if re.fullmatch(re.escape(prefix) + r"_\d{5}_\.latent", f))
    return safetensors.torch.load_file(os.path.join(d, files[-1]))["latent_tensor"]


WORKFLOWS = graphs.bundled()


@pytest.mark.parametrize("name", WORKFLOWS)
def test_ui_graph_is_generated_from_its_api_twin(name):
    """Every bundled graph is UI format, made from its API twin with the host's own node
    definitions and its note (scripts/make_workflows.py): same nodes, widget values and links,
    plus one Note node saying what it shows, which the API twin (what is queued) does not have."""
    ui = graphs.load_ui_workflow(name)
    assert ui == graphs.ui_workflow(name)
    for link_id, src, _, dst, _, _ in ui["links"]:   # every link has both ends
        assert any(n["id"] == src for n in ui["nodes"]) and any(n["id"] == dst for n in ui["nodes"])
    notes = [n for n in ui["nodes"] if n["type"] == graphs.NOTE]
    assert [n["widgets_values"] for n in notes] == [[graphs.NOTES[name]]]
    assert sorted(n["id"] for n in ui["nodes"] if n["type"] != graphs.NOTE) == \
        sorted(int(k) for k in graphs.load_api_workflow(name))


def test_example_workflow_runs_and_inherits(runner, ckpt):
    api = graphs.load_api_workflow("feature_inheritance_sd15.json")
    # plain: the sampler fed by the checkpoint directly
    plain = small(api, ckpt); plain["6"]["inputs"]["model"] = ["1", 0]; save_latent(plain, "6", "wf_plain")
    runner.run(plain)
    p1 = small(api, ckpt); p1["5"]["inputs"].update(period=1); save_latent(p1, "6", "wf_p1")
    runner.run(p1)
    p2 = small(api, ckpt); p2["5"]["inputs"].update(period=2, final_full_fraction=0); save_latent(p2, "6", "wf_p2")
    runner.run(p2)
    base = read_latent("wf_plain")
    assert torch.equal(read_latent("wf_p1"), base)
    assert ((read_latent("wf_p2") - base).abs().max() / base.abs().max()) > 1e-3
    import folder_paths
    assert any(f.startswith("asdm_inheritance") for f in os.listdir(folder_paths.get_output_directory()))


def test_two_runs_in_one_prompt_with_other_sizes(runner, ckpt):
    api = graphs.load_api_workflow("feature_inheritance_sd15.json")
    p = small(api, ckpt); p["5"]["inputs"].update(period=2, final_full_fraction=0)
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


def shrink(api, ckpt, sampler="7", steps=6, size=64):
    p = copy.deepcopy(api)
    p["1"]["inputs"]["ckpt_name"] = ckpt
    p["4"]["inputs"].update(width=size, height=size)
    p[sampler]["inputs"]["steps"] = steps
    return p


def variant(prompt):
    """A copy without the prompt's latent savers (each variant saves under its own name)."""
    return {k: copy.deepcopy(v) for k, v in prompt.items() if not k.startswith("save_")}


@pytest.fixture(scope="module")
def base_unet():
    return tm.random_bksdm_unet("base")


def test_switch_s1_workflow(runner, ckpt, base_unet):
    api = graphs.load_api_workflow("switch_s1_sd15.json")
    api["5"]["inputs"]["unet_name"] = base_unet
    s1 = shrink(api, ckpt); s1["6"]["inputs"].update(end_1=2.0, start_2=2.0); save_latent(s1, "7", "swA")
    runner.run(s1)
    same = variant(s1); same["6"]["inputs"]["model_1"] = ["1", 0]; save_latent(same, "7", "swB")
    runner.run(same)
    plain = variant(s1); plain["7"]["inputs"]["model"] = ["1", 0]; save_latent(plain, "7", "swC")
    runner.run(plain)
    assert torch.equal(read_latent("swB"), read_latent("swC"))   # SD on both ranges == SD
    d = (read_latent("swA") - read_latent("swC")).abs().max() / read_latent("swC").abs().max()
    assert d > 1e-3                                                        # Base really ran steps 0-1


def test_assembly_m2_workflow_and_stock_loader(runner, ckpt, base_unet):
    import folder_paths
    api = graphs.load_api_workflow("assembly_m2_sd15.json")
    api["5"]["inputs"]["unet_name"] = base_unet
    m2 = shrink(api, ckpt); m2["10"]["inputs"]["filename_prefix"] = "unet/wf_m2"; save_latent(m2, "7", "asmA")
    runner.run(m2)
    out = os.path.join(folder_paths.get_output_directory(), "unet")
    saved = sorted(f for f in os.listdir(out) if f.startswith("wf_m2_"))[-1]
    import safetensors
    assert safetensors.safe_open(os.path.join(out, saved), "pt").metadata()["asdm.recipe"].startswith("dn0=B, dn1=B")
    # ComfyUI's own UNet loader reads the saved M2 back: same sampling result, bit for bit
    host.add_model_folder(compat.unet_folder(), out)
    stock = variant(m2)
    for k in ("5", "6", "10"):
        del stock[k]
    stock["11"] = graphs.stock_node("UNETLoader", unet_name=saved)
    stock["7"]["inputs"]["model"] = ["11", 0]
    save_latent(stock, "7", "asmB")
    runner.run(stock)
    assert torch.equal(read_latent("asmB"), read_latent("asmA"))
    os.remove(os.path.join(out, saved))



def test_comparison_graph_differs_only_in_the_model(runner):
    """The with / without graph: two samplers alike in everything but their model (the embedded
    model, and the same through A-SDM Feature Inheritance with its node defaults), each decoded
    and saved; queued, the two images differ."""
    import nodes
    api = graphs.load_api_workflow("inheritance_compare_embedded.json")
    samplers = sorted(k for k, v in api.items() if v["class_type"] == "KSampler")
    a, b = (dict(api[k]["inputs"]) for k in samplers)
    loader = graphs.find(api, "ASDMLoadEmbeddedModel")
    fi = graphs.find(api, "ASDMFeatureInheritance2")
    assert (a.pop("model"), b.pop("model")) == ([loader, 0], [fi, 0]) and a == b and a["steps"] == 20
    spec = nodes.NODE_CLASS_MAPPINGS["ASDMFeatureInheritance2"].INPUT_TYPES()
    defaults = {k: v[1]["default"] for sec in spec.values() for k, v in sec.items() if "default" in v[1]}
    assert {k: v for k, v in api[fi]["inputs"].items() if k != "model"} == defaults
    saves = [k for k, v in api.items() if v["class_type"] == "SaveImage"]
    assert sorted(api[api[k]["inputs"]["images"][0]]["inputs"]["samples"][0] for k in saves) == samplers

    p = copy.deepcopy(api)
    for k in samplers:
        p[k]["inputs"]["steps"] = 6
    p["4"]["inputs"]["batch_size"] = 1
    for k in samplers:
        save_latent(p, k, f"cmp_{k}")
    runner.run(p)
    full, fi_out = (read_latent(f"cmp_{k}") for k in samplers)
    assert not torch.equal(full, fi_out) and torch.isfinite(fi_out).all()
