"""Compressed UNets on the real host: loading (checked against diffusers), assembly, saving."""
import os

import pytest
import safetensors.torch
import torch

from conftest import model_folder, unload_all
from asdm import assembly
from asdm import compat
from asdm import topology
from asdm import unet_files
from asdm.harness import models as tm

DIFFUSERS = pytest.importorskip("diffusers")


# BK-SDM layouts as diffusers configs (BK-SDM §3.1). Reduced widths keep the tests fast; the
# real widths are used for the parameter counts below.
def bksdm_config(layout: str, version: int, widths=None):
    v2 = version == 2
    widths = widths or ((64, 128, 256, 256) if v2 else (32, 64, 128, 128))
    levels = 3 if layout == "tiny" else 4
    widths = tuple(widths[:levels])
    down = ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    up = ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    return dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=widths,
        down_block_types=down[:levels], up_block_types=up[4 - levels:],
        mid_block_type="UNetMidBlock2DCrossAttn" if layout == "base" else None,
        cross_attention_dim=1024 if v2 else 768, use_linear_projection=v2,
        attention_head_dim=[w // 64 for w in widths] if v2 else 8,
    )


SD15_DIFFUSERS = dict(bksdm_config("base", 1, (320, 640, 1280, 1280)), layers_per_block=2)


def diffusers_unet(cfg, seed=0):
    torch.manual_seed(seed)
    m = DIFFUSERS.UNet2DConditionModel(**cfg).eval()
    with torch.no_grad():   # diffusers zero-inits nothing we care about, but make outputs lively
        for p in m.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return m


@pytest.fixture(scope="module")
def unet_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("unet")
    with model_folder(compat.unet_folder(), d):
        yield d


def load_node(N, name, prediction="auto"):
    return compat.call_node(N["ASDMLoadCompressedUNet"], unet_name=name, prediction=prediction)[0]


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("layout", ["base", "small", "tiny"])
def test_diffusers_layout_matches_diffusers(N, unet_dir, layout, version):
    cfg = bksdm_config(layout, version)
    ref = diffusers_unet(cfg, seed=version)
    folder = unet_dir / f"bk-sdm-{layout}-v{version}" / "unet"
    ref.save_pretrained(folder, safe_serialization=True)
    name = f"bk-sdm-{layout}-v{version}/unet/diffusion_pytorch_model.safetensors"
    model = load_node(N, name)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 16, 16, generator=g)
    ctx = torch.randn(2, 77, cfg["cross_attention_dim"], generator=g)
    t = torch.tensor([999.0, 250.0])
    with torch.no_grad():
        want = ref(x, t, encoder_hidden_states=ctx).sample
        got = model.model.diffusion_model(x, timesteps=t, context=ctx)
    # Two independent fp32 implementations (different attention kernels and summation order):
    # agreement to 1e-4 of the output scale; a wrong key or layout gives errors of order 1.
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    topo = topology.describe(model.model.diffusion_model)
    assert ("mid" in topo.blocks) == (layout == "base")
    assert len([b for b in topo.blocks if b.startswith("dn")]) == (3 if layout == "tiny" else 4)
    # the safetensors alone (no config.json beside it): same weights, same model
    alone = unet_dir / f"alone-{layout}-v{version}.safetensors"
    os.link(folder / "diffusion_pytorch_model.safetensors", alone)
    again = load_node(N, alone.name)
    sd1, sd2 = model.model.diffusion_model.state_dict(), again.model.diffusion_model.state_dict()
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)


@pytest.mark.parametrize("cfg,want", [
    (SD15_DIFFUSERS, 859.5), (bksdm_config("base", 1, (320, 640, 1280, 1280)), 579.4),
    (bksdm_config("small", 1, (320, 640, 1280, 1280)), 482.3),
    (bksdm_config("tiny", 1, (320, 640, 1280, 1280)), 323.4)])
def test_real_topology_parameter_counts(cfg, want):
    """The real BK-SDM layouts (built by diffusers on the meta device), converted by our key
    reader and built by the host: every key fits, and the counts are BK-SDM's."""
    import comfy.model_base
    import comfy.supported_models as sm
    with torch.device("meta"):
        ref = DIFFUSERS.UNet2DConditionModel(**cfg)
    sd = unet_files.to_ldm(ref.state_dict())
    unet_cfg = unet_files.unet_config(sd)
    assert unet_files.family_of(unet_cfg) == "SD1"
    unet = comfy.model_base.BaseModel(sm.SD15(unet_cfg), device="meta").diffusion_model
    unet_files.check_keys(unet, sd)
    n = sum(p.numel() for p in unet.parameters()) / 1e6
    assert abs(n - want) < 0.05, n


def state(m):
    return m.model.diffusion_model.state_dict()


def forward(m, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, ctx = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 77, 768, generator=g)
    with torch.no_grad():
        return m.model.diffusion_model(x, timesteps=torch.tensor([500.0]), context=ctx)


def test_compress_keeps_bksdm_layers(sd_and_base):
    sd = sd_and_base[0]
    topo = topology.describe
    for layout, levels, mid in (("base", 4, True), ("small", 4, False), ("tiny", 3, False)):
        m = assembly.compress(sd, layout)
        t = topo(m.model.diffusion_model)
        assert ("mid" in t.blocks) == mid and sum(b.startswith("dn") for b in t.blocks) == levels
        assert all(t.layers[f"dn{k}"] == 1 and t.layers[f"up{k}"] == 2 for k in range(levels))
        s, ts = state(m), state(sd)
        # down: first layer kept; up: first and last (BK-SDM §3.1)
        assert torch.equal(s["input_blocks.1.0.in_layers.2.weight"], ts["input_blocks.1.0.in_layers.2.weight"])
        last_up_t = len(sd.model.diffusion_model.output_blocks) - 1
        last_up_s = len(m.model.diffusion_model.output_blocks) - 1
        assert torch.equal(s[f"output_blocks.{last_up_s}.1.proj_out.weight"], ts[f"output_blocks.{last_up_t}.1.proj_out.weight"])
    assert tm is not None


@pytest.mark.parametrize("recipe,src", [("*=A", 0), ("*=B", 1)])
def test_recipe_from_one_source_reproduces_it(N, sd_and_base, recipe, src):
    out = compat.call_node(N["ASDMAssembleUNet"], original=sd_and_base[0], compressed=sd_and_base[1],
                           recipe="custom", custom_recipe=recipe)[0]
    want = sd_and_base[src]
    s, w = state(out), state(want)
    assert s.keys() == w.keys() and all(torch.equal(s[k], w[k]) for k in s)
    assert torch.equal(forward(out), forward(want))


def test_m2_takes_each_block_from_its_source(N, sd_and_base):
    sd, base = sd_and_base
    m2 = compat.call_node(N["ASDMAssembleUNet"], original=sd, compressed=base, recipe="M2", custom_recipe="")[0]
    t = topology.describe(m2.model.diffusion_model)
    assert [t.layers[b] for b in t.blocks] == [1, 1, 2, 2, 1, 3, 3, 2, 2]
    tb = topology.describe(base.model.diffusion_model)
    ts = topology.describe(sd.model.diffusion_model)
    s, sb, ss = state(m2), state(base), state(sd)
    for block, src_topo, src in (("dn1", tb, sb), ("up2", tb, sb), ("dn2", ts, ss), ("mid", ts, ss), ("up1", ts, ss)):
        for dst, sp in zip(t.entries[block], src_topo.entries[block]):
            keys = [k for k in src if k.startswith(sp + ".")]
            assert keys and all(torch.equal(s[dst + k[len(sp):]], src[k]) for k in keys)
    assert torch.equal(s["input_blocks.0.0.weight"], sb["input_blocks.0.0.weight"])    # in follows dn0
    assert torch.equal(s["time_embed.0.weight"], ss["time_embed.0.weight"])            # time follows mid
    forward(m2)


def test_save_load_roundtrip_is_exact(N, sd_and_base, unet_dir):
    import folder_paths
    m2 = compat.call_node(N["ASDMAssembleUNet"], original=sd_and_base[0], compressed=sd_and_base[1], recipe="M2",
                          custom_recipe="")[0]
    # an output node: its result is what the page shows (NodeOutput.ui), which call_node leaves out
    res = N["ASDMSaveUNet"].execute(model=m2, filename_prefix="asdm_test_m2")
    path = os.path.join(folder_paths.get_output_directory(), res.ui["text"][0])
    meta = safetensors.safe_open(path, "pt").metadata()
    assert meta["asdm.recipe"].startswith("dn0=B, dn1=B, dn2=A")
    os.replace(path, unet_dir / "m2.safetensors")
    back = load_node(N, "m2.safetensors")
    s, w = state(back), state(m2)
    assert s.keys() == w.keys() and all(torch.equal(s[k], w[k]) for k in s)
    assert torch.equal(forward(back), forward(m2))


def test_derived_file_stores_only_what_it_adds(N, sd_and_base, tmp_path):
    """An assembled UNet saved as what it adds to its original: the original's blocks are not
    stored, loading puts them back bit for bit; a changed or missing source is refused."""
    import json
    sd, base = sd_and_base
    m2 = assembly.assemble(sd, base, assembly.recipe_spec("M2"))
    assembly.save_unet(sd, str(tmp_path / "sd.safetensors"))
    assembly.save_unet(m2, str(tmp_path / "m2.safetensors"), derive_from=str(tmp_path / "sd.safetensors"))
    assembly.save_unet(m2, str(tmp_path / "m2-whole.safetensors"))
    meta = safetensors.safe_open(str(tmp_path / "m2.safetensors"), "pt").metadata()
    assert sorted(json.loads(meta["asdm.derived_parts"])) == ["dn2", "dn3", "mid", "time", "up0", "up1"]
    assert os.path.getsize(tmp_path / "m2.safetensors") < 0.5 * os.path.getsize(tmp_path / "m2-whole.safetensors")
    with model_folder(compat.unet_folder(), tmp_path):
        derived, whole = load_node(N, "m2.safetensors"), load_node(N, "m2-whole.safetensors")
        a, b = state(derived), state(whole)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        # the source changed since: refused, naming it
        other = tm.sd_model(tm.TINY_SD1, seed=9)
        assembly.save_unet(other, str(tmp_path / "sd.safetensors"))
        with pytest.raises(ValueError, match="sd.safetensors is not the file it was made from"):
            load_node(N, "m2.safetensors")
        os.remove(tmp_path / "sd.safetensors")
        with pytest.raises(ValueError, match="stores only what it adds to sd.safetensors, which is not beside it"):
            load_node(N, "m2.safetensors")
    with pytest.raises(assembly.AssemblyError, match="in its own folder"):
        assembly.save_unet(m2, str(tmp_path / "m2b.safetensors"), derive_from=str(tmp_path.parent / "x.safetensors"))


def test_int8_storage(N, sd_and_base, tmp_path):
    """The embedded family's storage: a (derived) UNet stored in int8 loads with weights within
    half a code of its fp16 ones, per output channel; biases and norms exactly; a file
    whose scales are damaged is refused, naming the tensor."""
    sd, base = sd_and_base
    m2 = assembly.assemble(sd, base, assembly.recipe_spec("M2"))
    assembly.save_unet(sd, str(tmp_path / "sd.safetensors"), dtype=torch.float16, int8=True)
    assembly.save_unet(m2, str(tmp_path / "m2.safetensors"), dtype=torch.float16, int8=True,
                  derive_from=str(tmp_path / "sd.safetensors"))
    assembly.save_unet(m2, str(tmp_path / "m2-fp16.safetensors"), dtype=torch.float16,
                  derive_from=str(tmp_path / "sd.safetensors"))
    raw = safetensors.torch.load_file(str(tmp_path / "m2.safetensors"))
    assert any(v.dtype == torch.int8 for v in raw.values())
    assert os.path.getsize(tmp_path / "m2.safetensors") < 0.6 * os.path.getsize(tmp_path / "m2-fp16.safetensors")
    with model_folder(compat.unet_folder(), tmp_path):
        for name, m in (("sd.safetensors", sd), ("m2.safetensors", m2)):
            got, want = state(load_node(N, name)), {k: v.half() for k, v in state(m).items()}
            assert got.keys() == want.keys()
            for k, w in want.items():
                g = got[k].half()   # the host casts to its compute dtype (fp32 on a CPU): exact from fp16
                if w.dim() >= 2 and w.numel() >= 1024:
                    # half a code (max|w| / 254) plus the fp16 rounding of the result (half an
                    # ulp: at most max|w| * 2^-11)
                    bound = w.float().reshape(w.shape[0], -1).abs().amax(1) * (1 / 254 + 2 ** -11)
                    err = (g.float() - w.float()).reshape(w.shape[0], -1).abs().amax(1)
                    assert bool((err <= bound).all()), k
                else:
                    assert torch.equal(g, w), k
        key = next(k for k in raw if k.endswith(unet_files.INT8_SCALE))
        meta = safetensors.safe_open(str(tmp_path / "m2.safetensors"), "pt").metadata()
        safetensors.torch.save_file({k: v for k, v in raw.items() if k != key}, str(tmp_path / "bad.safetensors"), meta)
        with pytest.raises(ValueError, match=f"its tensor {key[:-len(unet_files.INT8_SCALE)]} has no matching per-channel scale"):
            load_node(N, "bad.safetensors")


def test_assembly_errors(N, sd_and_base, sd2_tiny):
    sd, base = sd_and_base
    small = assembly.compress(sd, "small")
    tiny = assembly.compress(sd, "tiny")
    node = N["ASDMAssembleUNet"]
    with pytest.raises(ValueError, match="compressed UNet, which has no mid"):
        compat.call_node(node, original=sd, compressed=small, recipe="custom", custom_recipe="dn0=B, up3=B, mid=B")
    with pytest.raises(ValueError, match="dn0 from B has 1 layers but up3 from A has 3; .*one layer more"):
        compat.call_node(node, original=sd, compressed=base, recipe="custom", custom_recipe="dn0=B")
    with pytest.raises(ValueError, match="same levels"):
        compat.call_node(node, original=sd, compressed=tiny, recipe="M2", custom_recipe="")
    with pytest.raises(ValueError, match="names 'dn7'"):
        compat.call_node(node, original=sd, compressed=base, recipe="custom", custom_recipe="dn7=B")
    with pytest.raises(ValueError, match="malformed recipe entry"):
        compat.call_node(node, original=sd, compressed=base, recipe="custom", custom_recipe="dn0 B")
    v2 = sd2_tiny
    with pytest.raises(ValueError, match="different families"):
        compat.call_node(node, original=sd, compressed=v2, recipe="M2", custom_recipe="")
    lora = base.clone()
    lora.add_patches({"diffusion_model.out.2.weight": (torch.zeros_like(state(base)["out.2.weight"]),)}, 1.0)
    with pytest.raises(ValueError, match="weight patches"):
        compat.call_node(node, original=sd, compressed=lora, recipe="M2", custom_recipe="")


def test_loader_errors(N, unet_dir):
    (unet_dir / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="corrupt.safetensors: could not read .* as safetensors"):
        load_node(N, "corrupt.safetensors")
    safetensors.torch.save_file({"encoder.conv_in.weight": torch.zeros(1), "decoder.conv_out.weight": torch.zeros(1)},
                                str(unet_dir / "vae.safetensors"))
    with pytest.raises(ValueError, match="no SD-style UNet.*looks like a VAE"):
        load_node(N, "vae.safetensors")
    torch.save({"a": torch.zeros(1)}, str(unet_dir / "old.ckpt"))
    with pytest.raises(ValueError, match="pickle checkpoint; A-SDM loads safetensors only"):
        load_node(N, "old.ckpt")
    # a diffusers UNet with one up layer removed: cannot be held, so refused
    ref = diffusers_unet(bksdm_config("base", 1))
    sd = {k: v for k, v in ref.state_dict().items() if not k.startswith("up_blocks.1.resnets.1.")
          and not k.startswith("up_blocks.1.attentions.1.")}
    safetensors.torch.save_file(sd, str(unet_dir / "pruned.safetensors"))
    with pytest.raises(ValueError, match="up_blocks.1 has 1.*one layer more"):
        load_node(N, "pruned.safetensors")
    # a truncated ldm file
    ldm = unet_files.to_ldm(ref.state_dict())
    ldm.pop("output_blocks.3.0.in_layers.2.weight")
    safetensors.torch.save_file(ldm, str(unet_dir / "truncated.safetensors"))
    with pytest.raises(ValueError, match="do not fit|incomplete"):
        load_node(N, "truncated.safetensors")
    unload_all()
