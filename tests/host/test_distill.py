"""Distillation core on tiny SD-like UNets (CPU): the losses teach, step 2 freezes what it must."""
import torch

from asdm import assembly
from asdm import topology
from asdm.harness import models as tm
from asdm.training import distill


def synthetic(n=8, size=8, ctx_dim=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, size, size, generator=g), torch.randn(n, 77, ctx_dim, generator=g)


def train(teacher, student, params, steps, seed=0, lr=1e-3, weights=None):
    sigmas = torch.linspace(0.03, 14.6, 1000)   # SD's range of noise levels
    x0, ctx = synthetic(seed=seed)
    opt = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    losses = []
    with distill.trainable(teacher, student):
        for step in range(steps):
            idx = torch.randint(0, len(x0), (4,), generator=g)
            x_t, t, noise = distill.noised(x0[idx], sigmas, g)
            loss, terms = distill.distill_loss(teacher, student, x_t, t, ctx[idx], noise, weights or distill.LossWeights())
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(terms)
    return losses


def test_training_forward_equals_the_hosts(tiny):
    """The out-of-place block forward computes what the host's in-place one does."""
    unet = tiny.model.diffusion_model
    x, ctx = synthetic(n=2, seed=5)
    t = torch.tensor([100.0, 700.0])
    with torch.no_grad():
        want = unet(x, timesteps=t, context=ctx)
        with distill.trainable(unet):
            got = unet(x, timesteps=t, context=ctx)
        again = unet(x, timesteps=t, context=ctx)
    assert torch.equal(got, want) and torch.equal(again, want)


def gap(teacher, student):
    """Student's distance to the teacher on fixed held-out inputs."""
    x, ctx = synthetic(n=4, seed=99)
    t = torch.tensor([10.0, 300.0, 600.0, 900.0])
    with torch.no_grad():
        return (student(x, timesteps=t, context=ctx) - teacher(x, timesteps=t, context=ctx)).pow(2).mean().item()


def test_step1_compress_lowers_the_loss_and_moves_toward_the_teacher(tiny):
    torch.manual_seed(0)
    teacher = tiny.model.diffusion_model
    student_m = assembly.compress(tiny, "base")
    student = student_m.model.diffusion_model
    tm.fill_(student, seed=7)   # start far from the teacher (BK-SDM would start from its weights)
    for p in teacher.parameters():
        p.requires_grad_(False)
    state = {k: v.clone() for k, v in student.state_dict().items()}
    losses = train(teacher, student, [p for p in student.parameters()], steps=200)
    first = sum(sum(v for v in l.values()) for l in losses[:10]) / 10
    last = sum(sum(v for v in l.values()) for l in losses[-10:]) / 10
    assert last < 0.7 * first, (first, last)
    # Toward the teacher: this teacher is random, so the task target (the true noise) and the
    # teacher disagree and the task term pulls away from it; the KD terms alone must pull in.
    student.load_state_dict(state)
    before = gap(teacher, student)
    train(teacher, student, [p for p in student.parameters()], steps=200,
          weights=distill.LossWeights(task=0.0))
    assert gap(teacher, student) < 0.5 * before
    # feature-KD saw every shared block output, mid included
    pairs = distill.shared_blocks(teacher, student)
    assert [p[0] for p in pairs] == ["dn0", "dn1", "dn2", "dn3", "mid", "up0", "up1", "up2", "up3"]


def test_step2_assembly_trains_only_the_compressed_part(tiny):
    base = assembly.compress(tiny, "base")
    m2 = assembly.assemble(tiny, base, assembly.RECIPES["M2"][0])
    unet = m2.model.diffusion_model
    choice = assembly.parse_recipe(assembly.RECIPES["M2"][0], topology.describe(unet).blocks)
    frozen = set(distill.freeze_blocks(unet, choice))
    before = {k: v.detach().clone() for k, v in unet.named_parameters()}
    teacher = tiny.model.diffusion_model
    train(teacher, unet, [p for p in unet.parameters() if p.requires_grad], steps=5)
    assert frozen and any(k.startswith("middle_block.") for k in frozen)
    assert not any(k.startswith("input_blocks.1.") for k in frozen)       # dn0 comes from Base
    for k, v in unet.named_parameters():
        if k in frozen:
            assert torch.equal(v, before[k]), k
        else:
            assert not torch.equal(v, before[k]), k


def test_sdxl_teacher_and_student_both_get_y():
    """SDXL's class embedding input reaches the teacher's and the student's label_emb as given
    (the host passes it as model(x, timesteps, context, y=y)); the loss depends on it."""
    from sdxl_family import family_model
    teacher = family_model("sdxl", 0)
    student = assembly.compress(teacher, "koala-700m").model.diffusion_model
    teacher = teacher.model.diffusion_model
    seen = {}
    hooks = [u.label_emb.register_forward_pre_hook(lambda m, a, name=name: seen.__setitem__(name, a[0].clone()))
             for name, u in (("teacher", teacher), ("student", student))]
    g = torch.Generator().manual_seed(0)
    x, ctx, y = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 64, generator=g), torch.randn(2, 2816, generator=g)
    t, noise = torch.tensor([100.0, 800.0]), torch.randn(2, 4, 8, 8, generator=g)
    try:
        with torch.no_grad(), distill.trainable(teacher, student):
            _, terms = distill.distill_loss(teacher, student, x, t, ctx, noise, distill.LossWeights(), y=y)
            _, other = distill.distill_loss(teacher, student, x, t, ctx, noise, distill.LossWeights(), y=y.flip(0))
    finally:
        for h in hooks:
            h.remove()
    assert torch.equal(seen["teacher"], y.flip(0)) and torch.equal(seen["student"], y.flip(0))
    assert terms["out_kd"] != other["out_kd"]
