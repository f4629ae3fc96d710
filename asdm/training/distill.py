"""Distillation losses and one training step (BK-SDM §3.2, A-SDM §IV, early version §2.5).

The student learns from a frozen teacher on noised latents:

* task: the student's noise prediction against the true noise;
* output-KD: the student's prediction against the teacher's;
* feature-KD: at every block output the two UNets share (same name and shape; block outputs,
  so no regressors are needed), the student's feature against the teacher's;
* mid: the middle block's output (semantic-aware supervision), when both have one.

All weights 1 by default, as BK-SDM. The UNets are ComfyUI ``UNetModel``s; block outputs are
read with forward hooks at the block's last entry (its last layer, or its downsampler).
"""
from __future__ import annotations

import contextlib
import functools
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..topology import describe


@dataclass
class LossWeights:
    task: float = 1.0
    out_kd: float = 1.0
    feat_kd: float = 1.0
    mid: float = 1.0
    perceptual: float = 0.0


class PerceptualNet(torch.nn.Module):
    """A frozen VGG-style feature network (early version §2.5: teacher and student outputs pass
    through the same VGG and its features are aligned), built from a user's weights file.

    The file holds the ``features`` convolutions of a torchvision-style VGG (``features.<i>.weight``
    and ``.bias``); a 2x2 max-pool stands wherever the indices skip one (conv, ReLU, pool), as
    in VGG. The UNet's 4-channel output is fed as it is when the first conv takes 4 channels,
    else its first 3 channels. The loss compares the features after every pooling stage.
    """

    def __init__(self, sd: dict):
        super().__init__()
        idx = sorted({int(m.group(1)) for k in sd for m in [re.match(r"^(?:features\.)?(\d+)\.weight$", k)] if m})
        if not idx:
            raise ValueError("the perceptual weights file holds no 'features.<i>.weight' convolutions (a VGG 'features' stack)")
        self.convs = torch.nn.ModuleList()
        self.pool_after = []
        prefix = "features." if any(k.startswith("features.") for k in sd) else ""
        for j, i in enumerate(idx):
            w = sd[f"{prefix}{i}.weight"]
            if w.dim() != 4:
                raise ValueError(f"perceptual weights: {prefix}{i}.weight is not a convolution")
            conv = torch.nn.Conv2d(w.shape[1], w.shape[0], w.shape[2], padding=w.shape[2] // 2)
            conv.weight.data.copy_(w)
            conv.bias.data.copy_(sd.get(f"{prefix}{i}.bias", torch.zeros(w.shape[0])))
            self.convs.append(conv)
            self.pool_after.append(j + 1 < len(idx) and idx[j + 1] - i > 2)
        self.requires_grad_(False)
        self.in_ch = self.convs[0].in_channels

    def forward(self, x):
        x = x if self.in_ch == x.shape[1] else x[:, :self.in_ch]
        feats = []
        for conv, pool in zip(self.convs, self.pool_after):
            x = torch.relu(conv(x))
            if pool:
                feats.append(x)
                x = F.max_pool2d(x, 2) if min(x.shape[-2:]) >= 2 else x
        return feats + [x]


def _level_offset(teacher_topo, student_topo) -> int:
    count = lambda t: sum(b.startswith("dn") for b in t.blocks)
    return count(teacher_topo) - count(student_topo)


def shared_blocks(teacher, student) -> list[tuple[str, str, str, str]]:
    """(student block, student path, teacher block, teacher path) for each block output both
    UNets have. A student with fewer levels (BK-SDM Tiny) lacks the deepest ones: its up_k is
    the teacher's up_{k+d}."""
    tt, ts = describe(teacher), describe(student)
    d = _level_offset(tt, ts)
    out = []
    for b in ts.blocks:
        tb = f"up{int(b[2:]) + d}" if b.startswith("up") else b
        if tb in tt.entries:
            out.append((b, _last_module(student, ts.entries[b][-1]), tb, _last_module(teacher, tt.entries[tb][-1])))
    return out


def _last_module(unet, path: str) -> str:
    # The host's UNet runs a layer's modules one by one (forward_timestep_embed), never the
    # layer's own __call__, so the hook goes on the layer's last module.
    return f"{path}.{len(unet.get_submodule(path)) - 1}"


class _Capture:
    def __init__(self, unet, paths):
        self.out, self.handles = {}, []
        for p in paths:
            self.handles.append(unet.get_submodule(p).register_forward_hook(
                lambda m, a, o, p=p: self.out.__setitem__(p, o)))

    def close(self):
        for h in self.handles:
            h.remove()


def noised(x0, sigmas, g=None):
    """DDPM forward process at a random timestep per sample; returns (x_t, t, noise)."""
    b = x0.shape[0]
    t = torch.randint(0, len(sigmas), (b,), generator=g, device="cpu").to(x0.device)
    noise = torch.randn(x0.shape, generator=g, device="cpu").to(x0)
    alpha_bar = 1.0 / (1.0 + sigmas.to(x0.device)[t] ** 2)
    a = alpha_bar.sqrt().view(b, 1, 1, 1).to(x0)
    s = (1 - alpha_bar).sqrt().view(b, 1, 1, 1).to(x0)
    return a * x0 + s * noise, t.float(), noise


def distill_loss(teacher, student, x_t, t, context, noise, w: LossWeights, student_fn=None, perceptual=None,
                 pairs=None, y=None):
    """(total loss, {term: value}) for one batch; the teacher runs without gradients.
    ``student_fn`` runs the student's forward when it is wrapped (e.g. by DDP); ``pairs`` is
    ``shared_blocks(teacher, student)``, passed in by a training loop that computed it once.
    ``y``: the class embedding's input of UNets that take one (SDXL's pooled text and size
    embeddings), given to both as the host gives it (``model(x, timesteps, context, y=y)``)."""
    pairs = pairs if pairs is not None else shared_blocks(teacher, student)
    ct, cs = _Capture(teacher, [p[3] for p in pairs]), _Capture(student, [p[1] for p in pairs])
    extra = {} if y is None else {"y": y}
    try:
        with torch.no_grad():
            out_t = teacher(x_t, timesteps=t, context=context, **extra)
        out_s = (student_fn or student)(x_t, timesteps=t, context=context, **extra)
        terms = {"task": F.mse_loss(out_s, noise), "out_kd": F.mse_loss(out_s, out_t)}
        feat = [F.mse_loss(cs.out[sp], ct.out[tp]) for sb, sp, tb, tp in pairs
                if sb != "mid" and cs.out[sp].shape == ct.out[tp].shape]
        terms["feat_kd"] = torch.stack(feat).sum() if feat else out_s.new_zeros(())
        mid = [F.mse_loss(cs.out[sp], ct.out[tp]) for sb, sp, tb, tp in pairs if sb == "mid"]
        terms["mid"] = mid[0] if mid else out_s.new_zeros(())
        if perceptual is not None:
            with torch.no_grad():
                ft = perceptual(out_t)
            terms["perceptual"] = sum(F.mse_loss(a, b) for a, b in zip(perceptual(out_s), ft))
    finally:
        ct.close()
        cs.close()
    total = sum(getattr(w, k) * v for k, v in terms.items())
    return total, {k: float(v) for k, v in terms.items()}


# ---------------------------------------------------------------------------------------------
# Training through the host's UNet: its transformer blocks add residuals in place (x += n),
# which is fine for inference but breaks autograd (LayerNorm keeps its input for backward).
# While training, each SD transformer block runs this out-of-place forward instead: the same
# three residual steps, without the sampling-time patch hooks (none are set during training).
# ---------------------------------------------------------------------------------------------

def _block_forward(block, x, context=None, transformer_options=None):
    x = x + block.attn1(block.norm1(x), context=context if block.disable_self_attn else None)
    if block.attn2 is not None:
        x = x + block.attn2(block.norm2(x), context=context)
    return x + block.ff(block.norm3(x))


@contextlib.contextmanager
def replaced_forwards(forwards: dict):
    """Runs each module with another forward (an instance attribute) inside the block."""
    for m, f in forwards.items():
        m.forward = f
    try:
        yield
    finally:
        for m in forwards:
            del m.forward


def trainable(*unets):
    """Context manager: the UNets' transformer blocks use the out-of-place forward."""
    blocks = [m for u in unets for m in u.modules() if type(m).__name__ == "BasicTransformerBlock"]
    for b in blocks:
        if getattr(b, "ff_in", None) or getattr(b, "switch_temporal_ca_to_sa", False):
            raise ValueError("video/temporal transformer blocks are not supported by the trainer")
    return replaced_forwards({b: functools.partial(_block_forward, b) for b in blocks})


def freeze_blocks(unet, choice: dict[str, str], train_original: bool = False) -> list[str]:
    """Step 2 of model assembly: freezes the parameters of every part taken from the original
    (choice 'A'), unless ``train_original`` (the paper's M‡ rows). Returns the frozen names."""
    topo = describe(unet)
    frozen_prefixes = [p + "." for part, src in choice.items() if src == "A" and not train_original
                       for p in topo.entries.get(part, [])]
    frozen = []
    for name, p in unet.named_parameters():
        if any(name.startswith(pre) for pre in frozen_prefixes):
            p.requires_grad_(False)
            frozen.append(name)
        else:
            p.requires_grad_(True)
    return frozen
