"""The bundled graphs (example_workflows/), run through ComfyUI's own executor on a project-made
SD1.5 model, narrow SDXL-family UNets or the embedded model."""
import copy
import hashlib
import os
import re

import pytest
import safetensors.torch
import torch

from conftest import holder_of, model_folder, unload_all
from sdxl_family import CONTEXT, family_model
from asdm.harness import graphs, host
from asdm import autocache as ac
from asdm import compat, hooks
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


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def node_defaults(class_type):
    import nodes
    spec = nodes.NODE_CLASS_MAPPINGS[class_type].INPUT_TYPES()
    return {k: v[1]["default"] for sec in spec.values() for k, v in sec.items()
            if len(v) > 1 and "default" in v[1]}


def saved_widgets(api, nid):
    return {k: v for k, v in api[nid]["inputs"].items() if not isinstance(v, list)}


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    """ComfyUI's user directory (where Auto Cache keeps its profiles), for this test only (both
    hosts read the module attribute)."""
    import folder_paths
    monkeypatch.setattr(folder_paths, "user_directory", str(tmp_path))
    return tmp_path


def profiles(user_dir):
    folder = os.path.join(str(user_dir), *ac.PROFILE_FOLDER)
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


@pytest.fixture
def made(monkeypatch):
    """The MODELs the graphs' A-SDM patch nodes return while the executor runs them, per node id
    (their holders say what each sampling run did)."""
    import nodes
    out: dict = {}
    for node_id in ("ASDMFeatureInheritance2", "ASDMAutoCache"):
        cls = nodes.NODE_CLASS_MAPPINGS[node_id]
        func = cls.execute.__func__   # a V3 node: the executor calls its classmethod execute

        def recording(c, *a, _func=func, _id=node_id, **k):
            res = _func(c, *a, **k)
            out.setdefault(_id, []).append(res.args[0])
            return res
        monkeypatch.setattr(cls, "execute", classmethod(recording))
    return out


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


def test_auto_cache_workflow_calibrates_then_reuses(runner, ckpt, user_dir, made):
    """The Auto Cache graph (the README's quick start) with the node's defaults: its first run
    computes fully (full compute's latent, bit for bit) and writes one profile; the next run, a new
    seed, follows the profile's plan and differs from full compute with that seed."""
    api = graphs.load_api_workflow("auto_cache_sd15.json")
    cache = graphs.find(api, "ASDMAutoCache")
    assert saved_widgets(api, cache) == node_defaults("ASDMAutoCache")
    assert api["6"]["inputs"]["model"] == [cache, 0] and api["6"]["inputs"]["steps"] == 20
    p = small(api, ckpt); save_latent(p, "6", "ac_first")
    runner.run(p)
    plain = variant(p); plain["6"]["inputs"]["model"] = ["1", 0]; save_latent(plain, "6", "ac_plain")
    runner.run(plain)
    assert torch.equal(read_latent("ac_first"), read_latent("ac_plain"))
    assert len(profiles(user_dir)) == 1
    again = variant(p); again["6"]["inputs"]["seed"] = 1; save_latent(again, "6", "ac_again")
    runner.run(again)
    assert hooks.holder_of(made["ASDMAutoCache"][-1], ac.AutoCacheHolder).last_run.plan is not None
    plain = variant(again); plain["6"]["inputs"]["model"] = ["1", 0]; save_latent(plain, "6", "ac_plain1")
    runner.run(plain)
    cached = read_latent("ac_again")
    assert torch.isfinite(cached).all() and rel_err(cached, read_latent("ac_plain1")) > 1e-4
    assert len(profiles(user_dir)) == 1   # used, not rewritten


# The SDXL graphs: run on stand-ins for their checkpoint (why: on_test_sdxl).
TEXT_STAND_IN = "TestSDXLTextStandIn"


class TextStandIn:
    """What CLIPTextEncode asks of a CLIP on either host (tokenize, then encode with the pooled
    output): a context of the narrow UNets' width and SDXL's pooled width, seeded by the text."""

    def tokenize(self, text):
        return text

    def encode_from_tokens(self, tokens, return_pooled=False, return_dict=False, **_):
        [[cond, extra]] = tm.conditioning(CONTEXT, int(hashlib.sha256(tokens.encode()).hexdigest()[:8], 16),
                                          pooled=tm.SDXL_POOLED)
        if return_dict:
            return {"cond": cond, **extra}
        return (cond, extra["pooled_output"]) if return_pooled else cond

    def encode_from_tokens_scheduled(self, tokens, **_):
        d = self.encode_from_tokens(tokens, return_dict=True)
        return [[d.pop("cond"), d]]


class TextStandInNode:
    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load"
    CATEGORY = "testing"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    def load(self):
        return (TextStandIn(),)


@pytest.fixture(scope="module")
def sdxl_files(tmp_path_factory):
    """Narrow SDXL and SSD-1B UNets (the host's topologies at 32 channels) as single-file UNets
    in a UNet folder of their own, and the text stand-in registered as a node, for this module."""
    import nodes
    d = tmp_path_factory.mktemp("sdxl-graphs")
    names = {}
    for name, seed in (("sdxl", 0), ("ssd-1b", 3)):
        names[name] = f"tiny-{name}.safetensors"
        sd = family_model(name, seed).model.diffusion_model.state_dict()
        safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, str(d / names[name]))
    with model_folder(compat.unet_folder(), d):
        nodes.NODE_CLASS_MAPPINGS[TEXT_STAND_IN] = TextStandInNode
        try:
            yield names
        finally:
            del nodes.NODE_CLASS_MAPPINGS[TEXT_STAND_IN]


def on_test_sdxl(api, ckpt, files, steps=6):
    """An SDXL graph on test weights, at 64x64 px. Its Load Checkpoint expects the user's SDXL
    checkpoint; a project-made one would need SDXL's two text encoders (CLIP-L and the 1280-wide
    CLIP-G, 0.8 B parameters) and could then only feed a UNet of SDXL's full width. So the
    loader's three outputs come from stand-ins, and every other node runs as saved:
    MODEL: a narrow SDXL UNet file (tm.TINY_SDXL) read by A-SDM Load Compressed UNet, which builds
    the host's SDXL model class, as a checkpoint gives it; CLIP: the text stand-in above (a seeded
    context of the narrow UNet's width with SDXL's pooled output); VAE: the Load Checkpoint node
    itself, on the project-made SD1.5 checkpoint (SDXL's VAE has SD's architecture)."""
    p = copy.deepcopy(api)
    p["1"]["inputs"]["ckpt_name"] = ckpt   # now used for its VAE only
    p["sdxl"] = {"class_type": "ASDMLoadCompressedUNet", "inputs": {"unet_name": files["sdxl"], "prediction": "auto"}}
    p["text"] = {"class_type": TEXT_STAND_IN, "inputs": {}}
    for node in p.values():
        for k, v in node["inputs"].items():
            if v in (["1", 0], ["1", 1]):
                node["inputs"][k] = ["sdxl", 0] if v[1] == 0 else ["text", 0]
    p["4"]["inputs"].update(width=64, height=64)
    p[graphs.find(p, "KSampler")]["inputs"]["steps"] = steps
    return p


def test_feature_inheritance_sdxl_workflow(runner, ckpt, sdxl_files, made):
    """The SDXL inheritance graph (node defaults, 1024 px) on a narrow SDXL UNet through the
    executor (on_test_sdxl says on what): its saved period 3 gives one full step, then two
    inheriting ones, and inheriting changes the result; period 1 is the plain model bit for bit."""
    api = graphs.load_api_workflow("feature_inheritance_sdxl.json")
    fi = graphs.find(api, "ASDMFeatureInheritance2")
    assert saved_widgets(api, fi) == node_defaults("ASDMFeatureInheritance2")
    assert api["4"]["inputs"] == {"width": 1024, "height": 1024, "batch_size": 1}
    g = on_test_sdxl(api, ckpt, sdxl_files); save_latent(g, "6", "xfi")
    runner.run(g)
    steps: dict = {}
    for step, mode in holder_of(made["ASDMFeatureInheritance2"][-1]).last_run.calls:
        steps.setdefault(step, set()).add(mode)
    assert steps == {0: {"store"}, 1: {"inherit"}, 2: {"inherit"}, 3: {"store"}, 4: {"inherit"}, 5: {"inherit"}}
    plain = variant(g); plain["6"]["inputs"]["model"] = ["sdxl", 0]; save_latent(plain, "6", "xplain")
    runner.run(plain)
    p1 = variant(g); p1[fi]["inputs"]["period"] = 1; save_latent(p1, "6", "xp1")
    runner.run(p1)
    assert torch.equal(read_latent("xp1"), read_latent("xplain"))
    assert rel_err(read_latent("xfi"), read_latent("xplain")) > 1e-3


def test_switch_s1_sdxl_workflow(runner, ckpt, sdxl_files):
    """The SDXL S1 graph: an SSD-1B-topology UNet from the graph's own A-SDM Load Compressed UNet
    for the first steps, SDXL for the rest (on_test_sdxl says on what). SDXL in both ranges is SDXL
    alone, bit for bit; S1 differs from SDXL alone (the student ran the first steps) and from the
    student alone (SDXL ran the rest)."""
    api = graphs.load_api_workflow("switch_s1_sdxl.json")
    assert api["6"]["inputs"]["model_1"] == ["5", 0] and api["6"]["inputs"]["model_2"] == ["1", 0]
    assert (api["6"]["inputs"]["end_1"], api["6"]["inputs"]["start_2"], api["7"]["inputs"]["steps"]) == (10.0, 10.0, 25)
    api["5"]["inputs"]["unet_name"] = sdxl_files["ssd-1b"]
    s1 = on_test_sdxl(api, ckpt, sdxl_files); s1["6"]["inputs"].update(end_1=2.0, start_2=2.0)
    save_latent(s1, "7", "xswA")
    runner.run(s1)
    runs = {"xswB": ("6", "model_1", "sdxl"), "xswS": ("7", "model", "sdxl"), "xswD": ("7", "model", "5")}
    for prefix, (nid, inp, src) in runs.items():
        v = variant(s1); v[nid]["inputs"][inp] = [src, 0]; save_latent(v, "7", prefix)
        runner.run(v)
    s1_out, sdxl_out = read_latent("xswA"), read_latent("xswS")
    assert torch.equal(read_latent("xswB"), sdxl_out)
    assert rel_err(s1_out, sdxl_out) > 1e-3 and rel_err(s1_out, read_latent("xswD")) > 1e-3



@pytest.mark.parametrize("name,patch", [("inheritance_compare_embedded.json", "ASDMFeatureInheritance2"),
                                        ("auto_cache_compare_embedded.json", "ASDMAutoCache")])
def test_comparison_graph_differs_only_in_the_model(runner, user_dir, name, patch):
    """The with / without graphs: two samplers alike in everything but their model (the embedded
    model, and the same through the A-SDM node with its defaults), each decoded and saved; queued,
    the two images differ. Auto Cache's first queue calibrates, so there both match bit for bit
    until the prompt is edited (as the graph's note says)."""
    api = graphs.load_api_workflow(name)
    samplers = sorted(k for k, v in api.items() if v["class_type"] == "KSampler")
    a, b = (dict(api[k]["inputs"]) for k in samplers)
    loader = graphs.find(api, "ASDMLoadEmbeddedModel")
    node = graphs.find(api, patch)
    assert (a.pop("model"), b.pop("model")) == ([loader, 0], [node, 0]) and a == b and a["steps"] == 20
    assert saved_widgets(api, node) == node_defaults(patch)
    saves = [k for k, v in api.items() if v["class_type"] == "SaveImage"]
    assert sorted(api[api[k]["inputs"]["images"][0]]["inputs"]["samples"][0] for k in saves) == samplers

    p = copy.deepcopy(api)
    for k in samplers:
        p[k]["inputs"]["steps"] = 6
    p["4"]["inputs"]["batch_size"] = 1
    tag = patch[4:8]
    for k in samplers:
        save_latent(p, k, f"cmp_{tag}_{k}")
    runner.run(p)
    full, out = (read_latent(f"cmp_{tag}_{k}") for k in samplers)
    if patch == "ASDMAutoCache":
        assert torch.equal(full, out) and len(profiles(user_dir)) == 1
        p = variant(p)
        p["2"]["inputs"]["text"] += ", on a white background"
        for k in samplers:
            save_latent(p, k, f"cmp_{tag}_edited_{k}")
        runner.run(p)
        full, out = (read_latent(f"cmp_{tag}_edited_{k}") for k in samplers)
    assert torch.isfinite(out).all() and rel_err(out, full) > 1e-4
