"""ME-CondConv on the real host: exact where it claims, both per-sample paths (kernel mix,
stacked) = per-sample reference, input-dependent routing, save/load, stacking and clean undo.
(The cost model, caches and gradients as plain torch: tests/unit/test_condconv_math.py.)"""
import pytest
import torch

from conftest import ksample, unload_all
from asdm import assembly
from asdm import compat
from asdm import condconv
from asdm import topology
from references import condconv_reference as reference


def node(N, model, **kw):
    args = dict(weights="none", units=condconv.DEFAULT_UNITS, experts=2, init="identity", seed=0)
    args.update(kw)
    return compat.call_node(N["ASDMMECondConv"], model=model, **args)[0]


@pytest.mark.parametrize("experts,init", [(1, "paper"), (2, "identity"), (4, "identity")])
def test_one_expert_and_identity_init_equal_the_plain_model(N, tiny, conds, experts, init):
    out = ksample(node(N, tiny, experts=experts, init=init), conds)
    assert torch.equal(out, ksample(tiny, conds))


def test_paper_init_changes_the_output(N, tiny, conds):
    assert not torch.equal(ksample(node(N, tiny, init="paper"), conds), ksample(tiny, conds))


# Both paths compute the same sum as the reference in another order (kernel mix: one grouped
# conv with per-sample kernels; stacked: the plain conv plus a matmul of the other experts over
# the unfolded input, then a weighted sum): fp32 rounding only, well under 1e-5 of the output scale.
TOL = 1e-5


@pytest.mark.parametrize("size", [4, 32])
@pytest.mark.parametrize("experts", [2, 4])
@pytest.mark.parametrize("path", ["mix", "stacked"])
def test_each_path_equals_per_sample_loop(tiny, path, experts, size):
    unet = tiny.model.diffusion_model
    p = "input_blocks.4.0.in_layers.2"
    me = condconv.make_experts(unet, [p], experts, "paper", seed=3)[p]
    conv = unet.get_submodule(p)
    x = torch.randn(3, conv.in_channels, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = condconv.me_conv(x, conv, me, path=path), reference(x, conv, me)
    assert (got - want).abs().max() <= TOL * want.abs().max()


def test_workspace_reuse_is_exact(tiny):
    """The kernel mix writing its kernels into a reused Workspace equals it writing fresh memory
    bit for bit (same ops, same order), across convs of other sizes sharing the buffer and
    across inference mode (a buffer made there is replaced outside it, not written)."""
    unet = tiny.model.diffusion_model
    paths = ["input_blocks.4.0.in_layers.2", "input_blocks.1.0.in_layers.2", "input_blocks.4.0.out_layers.3"]
    experts = condconv.make_experts(unet, paths, 3, "paper", seed=5)
    g = torch.Generator().manual_seed(1)
    xs = {p: torch.randn(2, unet.get_submodule(p).in_channels, 8, 8, generator=g) for p in paths}
    ws = condconv.Workspace()
    for mode in (torch.inference_mode, torch.no_grad, torch.inference_mode):
        with mode():
            for p in paths + paths[:1]:
                conv = unet.get_submodule(p)
                fresh = condconv.me_conv(xs[p], conv, experts[p], shared=False, path="mix")
                reused = condconv.me_conv(xs[p], conv, experts[p], shared=False, path="mix", workspace=ws)
                assert torch.equal(fresh, reused), p
    assert ws.take((condconv.Workspace.MAX_BYTES // 4 + 1,), xs[paths[0]]) is None   # over the cap: fresh memory


def test_the_path_switch_reaches_sampling_and_both_paths_take_a_lora(N, tiny, conds, monkeypatch):
    """PATH forces every ME-CondConv of a sampled MODEL onto one path; both sample alike, and
    on both a LoRA on expert 0 acts and its unpatching leaves nothing stale behind."""
    m = node(N, tiny, init="paper", experts=3)
    lora = m.clone()
    key = "diffusion_model.output_blocks.3.0.out_layers.3.weight"   # an ME-CondConv's expert 0 (4x4 map)
    shape = m.model.diffusion_model.get_submodule("output_blocks.3.0.out_layers.3").weight.shape
    lora.add_patches({key: (0.05 * torch.randn(shape, generator=torch.Generator().manual_seed(1)),)}, 1.0)
    outs = {}
    for path in ("mix", "stacked"):
        monkeypatch.setattr(condconv, "PATH", path)
        outs[path] = ksample(m, conds, steps=4)
        assert not torch.equal(ksample(lora, conds, steps=4), outs[path])
        assert torch.equal(ksample(m, conds, steps=4), outs[path])
    scale = outs["mix"].abs().max()
    assert (outs["mix"] - outs["stacked"]).abs().max() <= 1e-4 * scale   # 4 steps of fp32 rounding


def test_routing_depends_on_the_input(tiny):
    unet = tiny.model.diffusion_model
    path = "output_blocks.9.0.out_layers.3"
    me = condconv.make_experts(unet, [path], 2, "paper", seed=1)[path]
    conv = unet.get_submodule(path)
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(1, conv.in_channels, 8, 8, generator=g), torch.randn(1, conv.in_channels, 8, 8, generator=g) * 3
    w = torch.cat([conv.weight[None], me.experts])
    bias = torch.cat([conv.bias[None], me.expert_bias])

    def mixed(x, r):   # x convolved with the kernel and bias that routing r mixes
        return torch.nn.functional.conv2d(x, torch.einsum("n,nf->f", r, w.flatten(1)).view_as(conv.weight),
                                          r @ bias, padding=1)

    with torch.no_grad():
        ra, rb = (torch.sigmoid(me.router(v.mean((2, 3))))[0] for v in (a, b))
        assert (ra - rb).abs().max() > 1e-3
        both = condconv.me_conv(torch.cat([a, b]), conv, me)
        scale = both.abs().max()
        # each sample gets its own routing's kernel, not its batch neighbour's
        assert (both[1:] - mixed(b, rb)).abs().max() <= 1e-5 * scale
        assert (both[1:] - mixed(b, ra)).abs().max() > 1e-3 * scale


def test_save_load_is_exact_and_foreign_layouts_are_refused(N, tiny, conds, tmp_path, monkeypatch):
    import folder_paths
    unet = tiny.model.diffusion_model
    paths = condconv.select_convs(unet, "dn0, up3")
    me = condconv.make_experts(unet, paths, 2, "paper", seed=4)
    folder = tmp_path / "cc"
    folder.mkdir()
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "asdm_condconv", ([str(folder)], {".safetensors"}))
    condconv.save_experts(me, str(folder / "trained.safetensors"))
    loaded = node(N, tiny, weights="trained.safetensors")
    direct = condconv.apply_condconv(tiny, me)
    assert torch.equal(ksample(loaded, conds), ksample(direct, conds))
    # as ComfyUI's executor runs nodes: in inference mode (the experts are inference tensors)
    with torch.inference_mode():
        out_inf = ksample(node(N, tiny, weights="trained.safetensors"), conds)
    assert torch.equal(out_inf.clone(), ksample(direct, conds))
    back = condconv.load_experts(str(folder / "trained.safetensors"), unet)
    for p in paths:
        for k, v in me[p].state_dict().items():
            assert torch.equal(back[p].state_dict()[k], v)
    # experts of the tiny SD layout do not fit a BK-SDM Base made from it
    base = assembly.compress(tiny, "base")
    with pytest.raises(ValueError, match="A-SDM ME-CondConv: the experts .*(another layout|does not have)"):
        node(N, base, weights="trained.safetensors")
    (folder / "other.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(ValueError, match="not an A-SDM ME-CondConv file"):
        node(N, tiny, weights="other.safetensors")


def test_stacks_with_inheritance_and_lora_and_undoes_cleanly(N, tiny, conds):
    unet = tiny.model.diffusion_model
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    m = node(N, tiny, init="paper", units="dn*.*.R, up*.*.R")
    m = compat.call_node(N["ASDMFeatureInheritance"], model=m, preset="CO6", units="", period=2,
                         final_full_steps=0)[0]
    lora = m.clone()
    key = "diffusion_model.input_blocks.1.0.in_layers.2.weight"   # an ME-CondConv's expert 0
    lora.add_patches({key: (0.05 * torch.randn(before[key[len("diffusion_model."):]].shape,
                                               generator=torch.Generator().manual_seed(1)),)}, 1.0)
    out_m, out_l = ksample(m, conds), ksample(lora, conds)
    assert not torch.equal(out_m, out_l)          # the LoRA on expert 0 acts
    unload_all()
    after = unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    for p in condconv.select_convs(unet, "dn*.*.R, up*.*.R"):
        conv = unet.get_submodule(p)
        assert getattr(conv.forward, "__func__", None) is type(conv).forward   # the original forward again
    assert torch.equal(ksample(tiny, conds), ksample(tiny, conds))


def test_cross_layer_init_takes_teacher_block_weights(N, tiny):
    student = assembly.compress(tiny, "base")
    su, tu = student.model.diffusion_model, tiny.model.diffusion_model
    st, tt = (topology.describe(u) for u in (su, tu))
    path = f"{st.by_name()['up3.1.R'].path}.out_layers.3"     # student up3.1 = teacher up3.2
    me = condconv.make_experts(su, [path], 3, "cross-layer", teacher_unet=tu)[path]
    teacher = [tu.get_submodule(f"{tt.by_name()[f'up3.{j}.R'].path}.out_layers.3").weight for j in range(3)]
    # expert 0 is the student's own (= teacher up3.2); the others are teacher up3.0 and up3.1
    assert torch.equal(me.experts[0], teacher[0]) and torch.equal(me.experts[1], teacher[1])


def test_condconv_errors(N, tiny):
    with pytest.raises(ValueError, match="hold no ResNet unit"):
        node(N, tiny, units="up3.*.A")
    with pytest.raises(ValueError, match="connect the teacher MODEL"):
        node(N, tiny, init="cross-layer")
    with pytest.raises(ValueError, match="used only by init cross-layer"):
        compat.call_node(N["ASDMMECondConv"], model=tiny, weights="none", units=condconv.DEFAULT_UNITS, experts=2,
                         init="paper", seed=0, teacher=tiny)
    with pytest.raises(ValueError, match="malformed unit token"):
        node(N, tiny, units="dn0..1")
