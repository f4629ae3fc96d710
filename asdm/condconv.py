"""ME-CondConv: multi-expert conditional convolution (A-SDM §IV-B, early version §2.3,
CondConv by Yang et al. 2019).

A 3×3 convolution becomes N experts mixed per sample: ``K(x) = sum_i r_i(x) W_i`` with the
routing ``r(x) = sigmoid(Linear(GlobalAvgPool(x)))``, biases mixed alike. Expert 0 is the
original convolution's own weight, read live from the module (so a LoRA on it still acts and
the parameter path is unchanged); experts 1..N-1 and the router are held by the patch.

Per-sample kernels run as one grouped convolution over the batch (groups = batch). When every
sample routes alike (e.g. ``identity`` init) the batch shares one kernel and runs as a plain
convolution, so ``identity`` init reproduces the original convolution bit for bit: the router
gives expert 0 a weight of exactly 1.0 (sigmoid of a large logit rounds to 1 in fp32, fp16 and
bf16) and the zero experts add exactly 0.

Init modes: ``paper`` (other experts random, §IV-B), ``identity`` (other experts zero: the safe
start for distillation), ``cross-layer`` (early version §2.3: the other experts are the
same-role 3×3 weights of the teacher block's layers, e.g. Base's up3 convs take SD's up3 ones;
random where the teacher has too few of that shape).
"""
from __future__ import annotations

import copy
import json
import math

import torch
import torch.nn.functional as F

from .topology import Topology, TopologyError, describe, parse_unit_spec

INIT_MODES = ("paper", "identity", "cross-layer")
FORMAT = "asdm-me-condconv-v1"
IDENTITY_LOGIT = 40.0   # sigmoid(40) == 1.0 exactly in fp32/fp16/bf16; sigmoid(-40) ~ 4e-18
DEFAULT_UNITS = "dn*.*.R, up*.*.R"
CONV_ROLES = ("in_layers.2", "out_layers.3")   # a ResBlock's two 3×3 convolutions


class CondConvError(ValueError):
    pass


class MEExperts(torch.nn.Module):
    """The trainable part of one ME-CondConv: experts 1..N-1 and the router."""

    def __init__(self, n: int, out_ch: int, in_ch: int, k: int):
        super().__init__()
        self.experts = torch.nn.Parameter(torch.zeros(n - 1, out_ch, in_ch, k, k))
        self.expert_bias = torch.nn.Parameter(torch.zeros(n - 1, out_ch))
        self.router = torch.nn.Linear(in_ch, n)

    @property
    def n(self) -> int:
        return self.router.out_features


def me_conv(x, conv, me: MEExperts, shared: bool | None = None):
    """The ME-CondConv forward of ``conv`` (a Conv2d whose weight is expert 0). ``shared``: the
    routing is known to be the same for every sample (a zero router weight); None = look."""
    w0 = conv.weight.to(device=x.device, dtype=x.dtype)
    b0 = (conv.bias.to(device=x.device, dtype=x.dtype) if conv.bias is not None
          else torch.zeros(w0.shape[0], dtype=x.dtype, device=x.device))
    experts, biases = me.experts.to(x.dtype).flatten(1), me.expert_bias.to(x.dtype)   # experts 1..N-1
    r = torch.sigmoid(F.linear(x.mean((2, 3)), me.router.weight.to(x.dtype), me.router.bias.to(x.dtype)))  # [B, N]
    kw = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation)
    if shared if shared is not None else bool((r == r[:1]).all()):   # one kernel for the batch: a plain conv
        r0 = r[:1]
        k = torch.addmm(r0[:, :1] * w0.reshape(1, -1), r0[:, 1:], experts).view_as(w0)
        return F.conv2d(x, k, torch.addmm(r0[:, :1] * b0[None], r0[:, 1:], biases)[0], **kw)
    # Per-sample kernels (sum_n r_bn W_n, one GEMM over the experts, expert 0 without a copy),
    # then one grouped convolution with the batch as groups.
    b, i, h, w = x.shape
    k = torch.addmm(r[:, :1] * w0.reshape(1, -1), r[:, 1:], experts).view(b * w0.shape[0], *w0.shape[1:])
    bias = torch.addmm(r[:, :1] * b0[None], r[:, 1:], biases).flatten()
    out = F.conv2d(x.reshape(1, b * i, h, w), k, bias, groups=b, **kw)
    return out.view(b, w0.shape[0], *out.shape[2:])


def _version(t: torch.Tensor) -> int:
    """The in-place change counter; experts loaded inside ComfyUI's executor are inference
    tensors, which have none (and cannot be changed in place outside inference mode)."""
    try:
        return t._version
    except RuntimeError:
        return -1


class MEForward:
    """The object patch for one conv's ``forward``: calls ``me_conv`` with the experts placed
    on the model's device and dtype, and the routing decision (input-independent or not) made,
    once per placement and per change of the router, not once per call."""

    def __init__(self, conv, me: MEExperts):
        self.conv, self.me = conv, me
        self._key = None

    def __call__(self, x):
        me = self.me
        key = (x.device, x.dtype, _version(me.router.weight))
        if self._key != key:
            if me.experts.dtype == x.dtype:
                placed = me.to(x.device)   # in place: a trainer keeps updating the same parameters
            else:                          # inference in another dtype: convert once, not per call
                placed = copy.deepcopy(me).to(device=x.device, dtype=x.dtype)
            self._placed, self._shared = placed, not bool(placed.router.weight.any())
            self._key = (x.device, x.dtype, _version(me.router.weight))
        return me_conv(x, self.conv, self._placed, self._shared)

    def __deepcopy__(self, memo):
        return self


def conv_paths(topo: Topology, units) -> list[str]:
    out = []
    for u in units:
        if u.kind == "R":
            out += [f"{u.path}.{role}" for role in CONV_ROLES]
    return out


def select_convs(unet, spec: str) -> list[str]:
    topo = describe(unet)
    units = parse_unit_spec(spec or DEFAULT_UNITS, topo, strict=True)
    paths = conv_paths(topo, units)
    if not paths:
        raise CondConvError(f"the units {spec!r} hold no ResNet unit; ME-CondConv replaces the 3x3 "
                            "convolutions of R units (e.g. 'dn*.*.R, up*.*.R')")
    return paths


def _teacher_convs(teacher_unet, student_topo: Topology, path: str) -> list[torch.Tensor]:
    """Same-role 3×3 weights of every layer of the teacher block that holds ``path``."""
    unit = next(u for u in student_topo.units if path.startswith(u.path + "."))
    role = path[len(unit.path) + 1:]
    tt = describe(teacher_unet)
    if unit.block not in tt.blocks:
        return []
    return [teacher_unet.get_submodule(f"{u.path}.{role}").weight.detach().float()
            for u in tt.units if u.block == unit.block and u.kind == "R"]


def make_experts(unet, paths: list[str], n: int, init: str, seed: int = 0, teacher_unet=None) -> dict:
    """path -> MEExperts for each conv, initialised by ``init``."""
    if init not in INIT_MODES:
        raise CondConvError(f"unknown init mode {init!r}; one of {', '.join(INIT_MODES)}")
    if init == "cross-layer" and teacher_unet is None:
        raise CondConvError("init 'cross-layer' takes the experts from a teacher UNet: connect the "
                            "teacher MODEL (e.g. SD1.5 for a BK-SDM student)")
    g = torch.Generator().manual_seed(seed)
    topo = describe(unet)
    out = {}
    for path in paths:
        conv = unet.get_submodule(path)
        w0 = conv.weight.detach().float().cpu()
        o, i, k, _ = w0.shape
        me = MEExperts(n, o, i, k)
        with torch.no_grad():
            bound = 1 / math.sqrt(i)
            me.router.weight.uniform_(-bound, bound, generator=g)
            me.router.bias.uniform_(-bound, bound, generator=g)
            if init == "identity":
                me.router.weight.zero_()
                me.router.bias.fill_(0.0)
                me.router.bias[0] = IDENTITY_LOGIT
            else:
                std = float(w0.std())
                pool = []
                if init == "cross-layer":
                    pool = [w for w in _teacher_convs(teacher_unet, topo, path)
                            if w.shape == w0.shape and not torch.equal(w.cpu(), w0)]
                for e in range(n - 1):
                    if e < len(pool):
                        me.experts[e].copy_(pool[e])
                    else:
                        me.experts[e].copy_(torch.randn(w0.shape, generator=g) * std)
        out[path] = me
    return out


def apply_condconv(model, experts: dict):
    """A clone of ``model`` whose chosen convs run as ME-CondConv (object patches on their
    ``forward``; parameter paths unchanged)."""
    m = model.clone()
    unet = m.model.diffusion_model
    for path, me in experts.items():
        m.add_object_patch(f"diffusion_model.{path}.forward", MEForward(unet.get_submodule(path), me))
    return m


# ---------------------------------------------------------------------------------------------
# Saving and loading trained experts
# ---------------------------------------------------------------------------------------------

def save_experts(experts: dict, path: str, meta: dict | None = None) -> None:
    from .unet_files import write_safetensors
    sd, layout = {}, {}
    for p, me in experts.items():
        for k, v in me.state_dict().items():
            sd[f"{p}.{k}"] = v.detach().float().cpu().contiguous()
        layout[p] = [me.n, *me.experts.shape[1:]]
    info = {"asdm.format": FORMAT, "asdm.condconv.layout": json.dumps(layout)}
    info.update(meta or {})
    write_safetensors(sd, path, info)


def load_experts(path: str, unet) -> dict:
    """Experts from a file, checked against this UNet's convs."""
    from .unet_files import UNetFileError, read_safetensors
    try:
        sd, meta = read_safetensors(path)
    except UNetFileError as e:
        raise CondConvError(str(e)) from None
    if meta.get("asdm.format") != FORMAT:
        raise CondConvError(f"{path.split('/')[-1]} is not an A-SDM ME-CondConv file (no "
                            f"'asdm.format: {FORMAT}' in its metadata)")
    layout = json.loads(meta["asdm.condconv.layout"])
    out = {}
    for p, (n, o, i, k, _k2) in layout.items():
        try:
            conv = unet.get_submodule(p)
        except AttributeError:
            raise CondConvError(f"the experts were trained for a conv at {p}, which this MODEL does "
                                "not have; they belong to another layout (e.g. Small vs Tiny)") from None
        shape = tuple(conv.weight.shape)
        if shape != (o, i, k, _k2):
            raise CondConvError(f"the experts for {p} are {o}x{i}x{k}x{_k2} but this MODEL's conv there "
                                f"is {'x'.join(map(str, shape))}; they belong to another layout")
        me = MEExperts(n, o, i, k)
        try:
            me.load_state_dict({k2: sd[f"{p}.{k2}"] for k2 in me.state_dict()})
        except (KeyError, RuntimeError) as e:
            raise CondConvError(f"the experts for {p} are incomplete or malformed in this file ({e})") from None
        out[p] = me
    return out
