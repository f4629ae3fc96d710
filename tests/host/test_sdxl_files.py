"""SDXL-family UNet files on the real host: loading (against the host's own UNet loader and
against diffusers), the real layouts' parameter counts, saving, block removal (BK-SDM and
KOALA layouts) and assembly of SDXL with its students.

The narrow UNets of ``tm.TINY_SDXL`` are the host's own SDXL-family topologies at 32 channels
with a 64-wide text context; the real widths are built on the meta device only."""
import json
import os

import pytest
import safetensors
import safetensors.torch
import torch

from conftest import ksample, model_folder
from sdxl_family import HOST_CLASS, family_model, sdxl_conds
from asdm import assembly
from asdm import compat
from asdm import host_models
from asdm import topology
from asdm import unet_files
from asdm.harness import models as tm

DIFFUSERS = pytest.importorskip("diffusers")
FAMILY = ["sdxl", "ssd-1b", "vega", "koala-700m", "koala-1b"]
LAYOUT_KEYS = ("num_res_blocks", "channel_mult", "transformer_depth", "transformer_depth_output",
               "transformer_depth_middle", "context_dim", "adm_in_channels", "model_channels",
               "use_linear_in_transformer")


def state(m):
    return m.model.diffusion_model.state_dict()


def layout(m_or_cfg):
    cfg = m_or_cfg if isinstance(m_or_cfg, dict) else m_or_cfg.model.model_config.unet_config
    return {k: cfg.get(k) for k in LAYOUT_KEYS}


@pytest.fixture(scope="module")
def unet_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("sdxl-unet")
    with model_folder(compat.unet_folder(), d):
        yield d


def load_node(N, name, prediction="auto", **kw):
    return compat.call_node(N["ASDMLoadCompressedUNet"], unet_name=name, prediction=prediction, **kw)[0]


@pytest.fixture
def host_matches_narrow(monkeypatch):
    """The host's UNet detection matches SDXL's family at the real width only (320 channels,
    context 2048); the narrow test UNets get an entry of their own: the host's SDXL class with a
    match config naming the narrow layout. Everything after the match is the host's own loader."""
    import comfy.supported_models as sm

    def register(cfg):
        class NarrowSDXL(sm.SDXL):
            unet_config = {k: cfg[k] for k in ("model_channels", "use_linear_in_transformer", "transformer_depth",
                                               "context_dim", "adm_in_channels", "use_temporal_attention")}
        monkeypatch.setattr(sm, "models", [NarrowSDXL] + list(sm.models))
    return register


# ---------------------------------------------------------------------------------------------
# Loading: the host's own loader, diffusers, the real layouts
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,marks,steps", [("sdxl", (), 1), ("koala-700m", (), 2), ("vega", ("v_pred", "ztsnr"), 2)])
def test_ldm_file_samples_as_the_hosts_own_loader(N, unet_dir, host_matches_narrow, name, marks, steps):
    """A single-file ldm UNet (plain keys, as a user's file) loaded by Load Compressed UNet and by
    the host's own UNet loader (comfy.sd.load_unet, what its UNETLoader node calls) samples bit for
    bit the same: same model class, latent format, y encoding, dtype and schedule. A file marked
    'v_pred' + 'ztsnr' (SDXL v-prediction fine-tunes with zero terminal SNR) loads as v-prediction
    with the zero-terminal-SNR schedule; the host's reference is its own loader followed by its
    ModelSamplingDiscrete node (v_prediction, zsnr), which is how either host gives that schedule."""
    import comfy.sd
    host_matches_narrow(tm.TINY_SDXL[name])
    sd = dict(state(family_model(name, seed=3)))
    sd.update({k: torch.tensor([]) for k in marks})
    file = f"plain-{name}-{len(marks)}.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, str(unet_dir / file))
    ours = load_node(N, file)
    theirs = comfy.sd.load_unet(str(unet_dir / file))
    if marks:
        theirs = N["ModelSamplingDiscrete"]().patch(theirs, "v_prediction", True)[0]
        assert host_models.prediction(ours) == "v" and host_models.zero_snr(ours)
    else:
        assert host_models.prediction(ours) == "eps" and not host_models.zero_snr(ours)
    assert type(ours.model).__name__ == "SDXL" and unet_files.family_of(ours.model.model_config.unet_config) == "SDXL"
    assert layout(ours) == layout(theirs.model.model_config.unet_config)
    # (one step samples the first sigma's prediction: y, latent format, schedule and weights)
    a, b = ksample(ours, sdxl_conds(), steps=steps), ksample(theirs, sdxl_conds(), steps=steps)
    assert torch.equal(a, b)
    # the prediction chosen by hand: the marks are the default, not a rule
    if marks:
        assert host_models.prediction(load_node(N, file, "eps")) == "eps"


def _level_depths(cfg):
    """Per level: the transformer depth of each down layer, and of each up layer in forward order."""
    res, down, up = cfg["num_res_blocks"], cfg["transformer_depth"], cfg["transformer_depth_output"]
    dn, upl, i, j = [], [], 0, 0
    for n in res:
        dn.append(down[i:i + n])
        upl.append(up[j:j + n + 1][::-1])   # the host pops transformer_depth_output from its end
        i, j = i + n, j + n + 1
    return dn, upl


def diffusers_family_unet(cfg, seed=0, meta=False):
    """diffusers' UNet2DConditionModel of an SDXL-family layout (SDXL's y: text_time embedding)."""
    dn, up = _level_depths(cfg)
    widths = [cfg["model_channels"] * m for m in cfg["channel_mult"]]
    levels = len(widths)
    assert all(len(set(d)) == 1 for d in dn)   # diffusers gives one depth per down block
    mid = cfg["transformer_depth_middle"]
    kw = dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=list(cfg["num_res_blocks"]),
        block_out_channels=widths,
        down_block_types=["CrossAttnDownBlock2D" if any(d) else "DownBlock2D" for d in dn],
        up_block_types=["CrossAttnUpBlock2D" if any(up[k]) else "UpBlock2D" for k in reversed(range(levels))],
        transformer_layers_per_block=[d[0] or 1 for d in dn],
        reverse_transformer_layers_per_block=[[x or 1 for x in up[k]] for k in reversed(range(levels))],
        # a middle block without attention is one ResNet (SSD-1B, Vega), as in the host's UNet
        mid_block_type={assembly.NO_MID_BLOCK: None, assembly.MID_WITHOUT_ATTENTION: "UNetMidBlock2D"}.get(
            mid, "UNetMidBlock2DCrossAttn"),
        cross_attention_dim=cfg["context_dim"], use_linear_projection=True,
        attention_head_dim=[max(1, w // 64) for w in widths],   # diffusers' name for the head count
        addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=unet_files.SDXL_Y)
    assert mid < 1 or mid == dn[-1][0]   # diffusers' middle block takes the deepest level's depth
    if meta:
        with torch.device("meta"):
            m = DIFFUSERS.UNet2DConditionModel(**kw)
    else:
        torch.manual_seed(seed)
        m = DIFFUSERS.UNet2DConditionModel(**kw).eval()
    if not meta:
        with torch.no_grad():   # lively outputs: diffusers zero-inits some output projections
            for p in m.parameters():
                p.add_(0.02 * torch.randn_like(p))
    return m


@pytest.mark.parametrize("name", FAMILY)
def test_diffusers_family_file_matches_diffusers(N, unet_dir, name):
    cfg = tm.TINY_SDXL[name]
    ref = diffusers_family_unet(cfg, seed=FAMILY.index(name))
    folder = unet_dir / f"diffusers-{name}" / "unet"
    ref.save_pretrained(folder, safe_serialization=True)
    model = load_node(N, f"diffusers-{name}/unet/diffusion_pytorch_model.safetensors")
    assert layout(model) == layout(cfg)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 16, 16, generator=g)
    ctx = torch.randn(2, 77, cfg["context_dim"], generator=g)
    pooled = torch.randn(2, unet_files.SDXL_POOLED, generator=g)
    t = torch.tensor([999.0, 250.0])
    sizes = dict(height=1024, width=768, crop_h=16, crop_w=0, target_height=1024, target_width=768)
    time_ids = torch.tensor([[1024.0, 768.0, 16.0, 0.0, 1024.0, 768.0]] * 2)   # diffusers' order: the host's
    with torch.no_grad():
        want = ref(x, t, encoder_hidden_states=ctx,
                   added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        y = model.model.encode_adm(pooled_output=pooled, **sizes)   # the host's own y encoding
        got = model.model.diffusion_model(x, timesteps=t, context=ctx, y=y)
    # Two independent fp32 implementations (different attention kernels and summation order):
    # agreement to 1e-4 of the output scale; a wrong key, layout or y gives errors of order 1.
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


# Parameter counts of the real UNets, as published: SDXL's UNet 2.567 B (2,567,463,684 as
# diffusers' SDXL base UNet counts it; the SDXL report rounds to 2.6 B), SSD-1B 1.3 B and Vega
# 745 M (Segmind's model cards), KOALA-700M 782 M and KOALA-1B 1,161 M (the KOALA paper's U-Net
# sizes). In millions, to the published precision.
REAL_COUNTS = {"sdxl": (2567.46, 0.01), "ssd-1b": (1330, 5), "vega": (745, 0.5), "koala-700m": (782, 1),
               "koala-1b": (1161, 1)}


@pytest.mark.parametrize("name", FAMILY)
def test_real_layouts_read_as_the_host_reads_them(name):
    """The real UNets (diffusers, meta device), converted by our key reader: the layout is the
    host's own detection of that UNet (its match: SDXL, SSD1B, ...), the build is SDXL's class,
    every key fits, and the parameter count is the published one."""
    import comfy.model_base
    import comfy.model_detection
    import comfy.supported_models as sm
    cfg = tm.SDXL_UNETS[name]
    sd = unet_files.to_ldm(diffusers_family_unet(cfg, meta=True).state_dict())
    ours = unet_files.model_config(unet_files.unet_config(sd))
    host = comfy.model_detection.model_config_from_unet(sd, "")
    assert type(host).__name__ == HOST_CLASS[name] and issubclass(type(host), sm.SDXL) and type(ours) is sm.SDXL
    assert {k: v for k, v in ours.unet_config.items() if k != "dtype"} == \
        {k: v for k, v in host.unet_config.items() if k != "dtype"}
    assert layout(ours.unet_config) == layout(cfg)
    unet = comfy.model_base.BaseModel(ours, device="meta").diffusion_model
    unet_files.check_keys(unet, sd)
    n = sum(p.numel() for p in unet.parameters()) / 1e6
    want, tol = REAL_COUNTS[name]
    assert abs(n - want) <= tol, n


def test_refiner_video_and_inpaint_unets_are_refused_with_the_reason(N, unet_dir):
    import comfy.supported_models as sm
    # the Refiner's topology (4 levels, y 2560 wide), narrow and one transformer block deep
    refiner = dict(tm.TINY_SDXL["sdxl"], model_channels=32, adm_in_channels=unet_files.REFINER_Y,
                   channel_mult=[1, 2, 4, 4], num_res_blocks=[2, 2, 2, 2],
                   transformer_depth=[0, 0, 1, 1, 1, 1, 0, 0], transformer_depth_middle=1,
                   transformer_depth_output=[0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0])
    unet = tm.fill_(sm.SDXLRefiner(refiner).get_model({}).diffusion_model, 0)
    safetensors.torch.save_file({k: v.contiguous() for k, v in unet.state_dict().items()},
                                str(unet_dir / "refiner.safetensors"))
    with pytest.raises(ValueError, match=r"refiner.safetensors: this is the SDXL Refiner \(y 2560 wide"):
        load_node(N, "refiner.safetensors")
    inpaint = dict(tm.TINY_SDXL["vega"], in_channels=9)
    unet = tm.fill_(sm.SDXL(inpaint).get_model({}).diffusion_model, 0)
    safetensors.torch.save_file({k: v.contiguous() for k, v in unet.state_dict().items()},
                                str(unet_dir / "inpaint.safetensors"))
    with pytest.raises(ValueError, match="has 9 input channels .*inpainting"):
        load_node(N, "inpaint.safetensors")
    with pytest.raises(unet_files.UNetFileError, match="video UNet"):
        unet_files.family_of(dict(tm.TINY_SDXL["sdxl"], use_temporal_attention=True))
    sd = dict(state(family_model("vega", 0)), edm_mean=torch.zeros(1, 4, 1, 1), edm_std=torch.ones(1, 4, 1, 1))
    safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, str(unet_dir / "edm.safetensors"))
    with pytest.raises(ValueError, match="marked 'edm_mean': it samples on an EDM schedule"):
        load_node(N, "edm.safetensors")


# ---------------------------------------------------------------------------------------------
# Block removal and saving
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sdxl():
    return family_model("sdxl", seed=0)


@pytest.mark.parametrize("name", ["koala-700m", "koala-1b"])
def test_koala_cut_is_the_hosts_koala_layout_with_the_teachers_weights(sdxl, name):
    student = assembly.compress(sdxl, name)
    assert layout(student) == layout(tm.TINY_SDXL[name])
    s, t = state(student), state(sdxl)
    ts, tt = topology.describe(student.model.diffusion_model), topology.describe(sdxl.model.diffusion_model)
    depth = tm.TINY_SDXL[name]["transformer_depth"][-1]

    def same(dst, src, prefix=""):
        keys = [k for k in t if k.startswith(src + "." + prefix)]
        assert keys and all(torch.equal(s[dst + k[len(src):]], t[k]) for k in keys), (dst, src)
        return keys

    # dn2's one layer: its ResNet and the first `depth` blocks of its 10-block stack, norm and projections
    dst, src = ts.entries["dn2"][0], tt.entries["dn2"][0]
    same(dst, src, "0.")
    for i in range(depth):
        same(dst, src, f"1.transformer_blocks.{i}.")
    for part in ("norm", "proj_in", "proj_out"):
        same(dst, src, f"1.{part}.")
    assert not any(k.startswith(f"{dst}.1.transformer_blocks.{depth}.") for k in s)
    # up0 keeps the teacher's first and last layer (the last holds the upsampler), each cut the same way
    for d, src in zip(ts.entries["up0"], [tt.entries["up0"][0], tt.entries["up0"][-1]]):
        same(d, src, "0.")
        same(d, src, f"1.transformer_blocks.{depth - 1}.")
    same(ts.entries["up0"][-1], tt.entries["up0"][-1], "2.")   # the upsampler
    for part in ("in", "time", "out"):   # the stem, SDXL's class embedding (label_emb) with it
        for d, src in zip(ts.entries[part], tt.entries[part]):
            same(d, src)
    assert "label_emb" in ts.entries["time"]
    if name == "koala-1b":   # the middle block keeps 6 of its 10 blocks
        same("middle_block", "middle_block", "1.transformer_blocks.5.")
        same("middle_block", "middle_block", "2.")
    else:
        assert "mid" not in ts.blocks


def test_sdxl_layer_removal_layouts(sdxl):
    """BK-SDM's layouts on SDXL: one layer per down block and two per up block, the transformer
    stacks whole; Small without the middle block. Tiny (the deepest level removed) does not fit
    SDXL's widths and is refused with the reason."""
    for name, mid in (("base", 10), ("small", assembly.NO_MID_BLOCK)):
        cfg = assembly.compress(sdxl, name).model.model_config.unet_config
        assert cfg["num_res_blocks"] == [1, 1, 1] and cfg["transformer_depth_middle"] == mid
        assert cfg["transformer_depth"] == [0, 2, 10]
        assert cfg["transformer_depth_output"] == [0, 0, 2, 2, 10, 10]
    with pytest.raises(assembly.AssemblyError, match=r"layout tiny removes the deepest level, .* \(64\) where the "
                                                    r"teacher's read the removed level's \(128\)"):
        assembly.compress(sdxl, "tiny")


def test_koala_layouts_are_refused_where_they_do_not_apply(sdxl, sd_and_base):
    with pytest.raises(assembly.AssemblyError, match="koala-700m is a layout of SDXL-family UNets .* this teacher is SD1"):
        assembly.compress(sd_and_base[0], "koala-700m")
    vega = family_model("vega", 1)
    with pytest.raises(assembly.AssemblyError, match="keeps 2 transformer blocks in each level-1 layer, but the teacher's "
                                                    r"dn1.0 has 1; cut koala-700m from SDXL itself"):
        assembly.compress(vega, "koala-700m")
    with pytest.raises(assembly.AssemblyError, match="unknown layout 'koala'"):
        assembly.compress(sdxl, "koala")


@pytest.fixture(scope="module")
def ssd1b():
    return family_model("ssd-1b", 4)


@pytest.mark.parametrize("what", ["sdxl", "ssd-1b", "koala-700m", "koala-1b", "base", "m2"])
def test_save_unet_round_trips_sdxl_family(N, sdxl, ssd1b, unet_dir, what):
    """Save UNet, then Load Compressed UNet: the same weights bit for bit, layout, model class,
    conditioning and prediction; so the same MODEL (test_ldm_file_samples_as_the_hosts_own_loader
    shows that such a load samples as the host's own)."""
    import folder_paths
    if what in ("koala-700m", "koala-1b", "base"):
        m = assembly.compress(sdxl, what)
    elif what == "m2":
        m = assembly.assemble(sdxl, ssd1b, "M2")
    else:
        m = family_model(what, 2)
    # an output node: its result is what the page shows (NodeOutput.ui), which call_node leaves out
    res = N["ASDMSaveUNet"].execute(model=m, filename_prefix=f"sdxl-{what}")
    path = os.path.join(folder_paths.get_output_directory(), res.ui["text"][0])
    meta = safetensors.safe_open(path, "pt").metadata()
    assert json.loads(meta["asdm.layout"])["adm_in_channels"] == unet_files.SDXL_Y
    assert meta["asdm.prediction"] == "eps"
    os.replace(path, unet_dir / f"saved-{what}.safetensors")
    back = load_node(N, f"saved-{what}.safetensors")
    s, w = state(back), state(m)
    assert s.keys() == w.keys() and all(torch.equal(s[k], w[k]) for k in s)
    assert layout(back) == layout(m) and type(back.model) is type(m.model)
    assert host_models.conditioning_kind(back) == host_models.conditioning_kind(m)
    assert (host_models.prediction(back), host_models.zero_snr(back)) == ("eps", False)


def test_v_prediction_with_zero_snr_round_trips_and_marks_the_file(N, unet_dir):
    """A v-prediction UNet with zero terminal SNR saves with the A-SDM metadata and the host's
    marks ('v_pred', 'ztsnr'), loads back the same way, and samples as it did."""
    import folder_paths
    safetensors.torch.save_file({k: v.contiguous() for k, v in state(family_model("vega", 5)).items()},
                                str(unet_dir / "vega-plain.safetensors"))
    v = load_node(N, "vega-plain.safetensors", "v", zsnr=True)
    assert host_models.prediction(v) == "v" and host_models.zero_snr(v)
    # an output node: its result is what the page shows (NodeOutput.ui), which call_node leaves out
    res = N["ASDMSaveUNet"].execute(model=v, filename_prefix="sdxl-vz")
    path = os.path.join(folder_paths.get_output_directory(), res.ui["text"][0])
    meta = safetensors.safe_open(path, "pt").metadata()
    assert (meta["asdm.prediction"], meta["asdm.zsnr"]) == ("v", "true")
    assert {"v_pred", "ztsnr"} <= set(safetensors.safe_open(path, "pt").keys())
    os.replace(path, unet_dir / "vz.safetensors")
    back = load_node(N, "vz.safetensors")
    assert host_models.prediction(back) == "v" and host_models.zero_snr(back)
    assert torch.equal(back.model.model_sampling.sigmas, v.model.model_sampling.sigmas)
    eps = load_node(N, "vega-plain.safetensors")
    assert not torch.equal(eps.model.model_sampling.sigmas, v.model.model_sampling.sigmas)
    assert float(v.model.model_sampling.sigmas[-1]) > 1e3   # zero terminal SNR: the last sigma is huge
    s, w = state(back), state(v)
    assert s.keys() == w.keys() and all(torch.equal(s[k], w[k]) for k in s)


# ---------------------------------------------------------------------------------------------
# Assembly: SDXL with its students
# ---------------------------------------------------------------------------------------------

def _from(out, src, block):
    """Every weight of ``block`` in ``out`` is ``src``'s (entry by entry, bit for bit)."""
    to, ts = topology.describe(out.model.diffusion_model), topology.describe(src.model.diffusion_model)
    so, ss = state(out), state(src)
    for d, sp in zip(to.entries[block], ts.entries[block]):
        keys = [k for k in ss if k.startswith(sp + ".")]
        if not keys or not all(torch.equal(so[d + k[len(sp):]], ss[k]) for k in keys):
            return False
    return len(to.entries[block]) == len(ts.entries[block])


@pytest.mark.parametrize("recipe,from_b", [
    ("M1", {"dn0", "up2"}), ("M2", {"dn0", "dn1", "up1", "up2"}), ("M3", {"dn0", "dn1", "dn2", "up0", "up1", "up2"})])
def test_sdxl_with_ssd1b_assembles_by_mirror_pairs(sdxl, ssd1b, recipe, from_b):
    """SDXL (A, the host's SDXL class) with SSD-1B (B, the host's SSD1B class): the recipes name
    level pairs, so on SDXL's 3 levels M1 / M2 / M3 take 1 / 2 / 3 pairs from B; M3 is every pair,
    B with SDXL's middle block and time embedding. Every block is its source's bit for bit."""
    out = assembly.assemble(sdxl, ssd1b, recipe)
    for block in topology.describe(out.model.diffusion_model).blocks:
        assert _from(out, ssd1b if block in from_b else sdxl, block), block
    assert _from(out, ssd1b, "in") and _from(out, ssd1b, "out") and _from(out, sdxl, "time")
    assert out.model.model_config.asdm_recipe.startswith(
        ", ".join(f"{b}={'B' if b in from_b else 'A'}" for b in ("dn0", "dn1", "dn2", "mid")))


def test_sdxl_assembly_with_koala_and_refusals(sdxl, sd_and_base):
    koala = family_model("koala-700m", 6)
    out = assembly.assemble(sdxl, koala, "M2")   # whole pairs: KOALA's one-layer dn0 / dn1 with their up blocks
    assert out.model.model_config.unet_config["num_res_blocks"] == [1, 1, 2]
    assert _from(out, koala, "dn1") and _from(out, koala, "up1") and _from(out, sdxl, "mid") and _from(out, sdxl, "dn2")
    with pytest.raises(assembly.AssemblyError, match="dn0 from B has 1 layers but up2 from A has 3; .*one layer more"):
        assembly.assemble(sdxl, koala, "dn0=B")
    with pytest.raises(assembly.AssemblyError, match="no part of A is left"):
        assembly.assemble(koala, sdxl, "M3")   # KOALA-700M as the original has no middle block to keep
    with pytest.raises(assembly.AssemblyError, match="different families: latent format of the original SDXL"):
        assembly.assemble(sdxl, sd_and_base[1], "M2")
    with pytest.raises(assembly.AssemblyError, match="names level pair 3, but this UNet has 3 levels"):
        assembly.assemble(sdxl, koala, "pair3=B")


def test_compressed_and_assembled_models_keep_the_originals_dtype():
    """As the host's model merging keeps the first model's dtype: bf16 originals give bf16 UNets
    computing in bf16 (the host's own choice on a CPU would be fp32, twice the memory), SD1.5 and
    SDXL alike; the weights are the sources' bit for bit."""
    bf16 = torch.bfloat16
    sd = tm.sd_model(tm.TINY_UNET, seed=0, dtype=bf16)
    sdxl = tm.sd_model(tm.TINY_SDXL["sdxl"], seed=1, dtype=bf16)
    ssd1b = tm.sd_model(tm.TINY_SDXL["ssd-1b"], seed=2, dtype=bf16)
    base = assembly.compress(sd, "base")
    for m in (base, assembly.assemble(sd, base, "M2"), assembly.compress(sdxl, "koala-700m"),
              assembly.assemble(sdxl, ssd1b, "M2")):
        assert m.model.get_dtype() == bf16
        assert {p.dtype for p in m.model.diffusion_model.parameters()} == {bf16}
    out = assembly.assemble(sdxl, ssd1b, "M2")
    assert _from(out, ssd1b, "dn0") and _from(out, sdxl, "dn2")
