"""ME-CondConv: multi-expert conditional convolution (A-SDM §IV-B, early version §2.3,
CondConv by Yang et al. 2019).

A 3×3 convolution becomes N experts mixed per sample: ``K(x) = sum_i r_i(x) W_i`` with the
routing ``r(x) = sigmoid(Linear(GlobalAvgPool(x)))``, biases mixed alike. Expert 0 is the
original convolution's own weight, read live from the module (so a LoRA on it still acts and
the parameter path is unchanged); experts 1..N-1 and the router are held by the patch.

Per-sample routing runs one of two paths, picked per call by a cost model from the shapes
(``choose_path``): the kernel mix (each sample's kernel, then one grouped convolution over the
batch), cheap on large maps, or the stacked path (``conv(x, sum_i r_i W_i) = sum_i r_i conv(x,
W_i)``: the plain convolution plus one matmul of the other experts, then each sample's weighted
sum), cheap on small maps, where the kernels outweigh the activations. When every sample routes
alike (e.g. ``identity`` init) the batch shares one kernel and runs as a plain convolution, so
``identity`` init reproduces the original convolution bit for bit: the router gives expert 0 a
weight of exactly 1.0 (sigmoid of a large logit rounds to 1 in fp32, fp16 and bf16) and the
zero experts add exactly 0.

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

from . import compat
from .errors import CondConvError, UNetFileError
from .topology import Topology, describe, parse_unit_spec
from .unet_files import check_weights, read_safetensors, write_safetensors

INIT_MODES = ("paper", "identity", "cross-layer")
FORMAT = "asdm-me-condconv-v1"
IDENTITY_LOGIT = 40.0   # sigmoid(40) == 1.0 exactly in fp32/fp16/bf16; sigmoid(-40) ~ 4e-18
DEFAULT_UNITS = "dn*.*.R, up*.*.R"
DEFAULT_EXPERTS = 2   # the paper's N
MAX_EXPERTS = 16
CONV_ROLES = ("in_layers.2", "out_layers.3")   # a ResBlock's two 3×3 convolutions



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


# ---------------------------------------------------------------------------------------------
# The forward: two ways to convolve with per-sample mixed kernels, and a cost model between them
# ---------------------------------------------------------------------------------------------

PATHS = ("mix", "stacked")
# None: the cost model picks the path per call (choose_path). "mix" / "stacked" forces one for
# every ME-CondConv in the process: the exactness tests and benchmarks/condconv.py set it.
PATH: str | None = None


class Workspace:
    """One reusable buffer for the kernel-mix path's per-sample kernels, shared by the
    ME-CondConvs of one patched model (they run one after another, and each conv is done with
    its kernels before the next starts, in stream order on a GPU). Why: the B kernels of a deep
    conv are large (118 MB for 1280 channels at batch 2 in fp32); a fresh allocation that size
    is mapped anew on every call, and its page faults cost more than the mixing itself. Only in
    inference (autograd keeps each call's kernels), and only up to MAX_BYTES."""
    MAX_BYTES = 256 << 20

    def __init__(self):
        self._buf = None

    def fits(self, numel: int, itemsize: int) -> bool:
        return numel * itemsize <= self.MAX_BYTES

    def take(self, shape: tuple, like: torch.Tensor):
        """A [shape] view of the buffer in ``like``'s device and dtype, or None over MAX_BYTES."""
        n = math.prod(shape)
        if not self.fits(n, like.element_size()):
            return None
        b = self._buf
        # an inference tensor (made inside ComfyUI's executor) cannot be written outside
        # inference mode, so a buffer made there is replaced when used outside it
        if (b is None or b.numel() < n or b.device != like.device or b.dtype != like.dtype
                or (b.is_inference() and not torch.is_inference_mode_enabled())):
            b = self._buf = torch.empty(n, dtype=like.dtype, device=like.device)
        return b[:n].view(shape)

    def __deepcopy__(self, memo):   # model clones share it: they do not run at the same time
        return self


def me_conv(x, conv, me: MEExperts, shared: bool | None = None, path: str | None = None,
            workspace: Workspace | None = None):
    """The ME-CondConv forward of ``conv`` (a Conv2d whose weight is expert 0). ``shared``: the
    routing is known to be the same for every sample (a zero router weight); None = look.
    ``path``: "mix" or "stacked" for per-sample routing; None = the module's PATH, else
    ``choose_path``. ``workspace``: where the kernel mix writes its kernels (inference only);
    None = fresh memory each call."""
    # expert 0 as the host's own conv forward would use it: with a LoRA or another weight patch,
    # and with the weight cast or offloaded, when the host applies those at cast time (partial loading)
    with compat.cast_weight_bias(conv, x) as (w0, b0):
        if b0 is None:
            b0 = torch.zeros(w0.shape[0], dtype=x.dtype, device=x.device)
        return _me_conv(x, conv, me, w0, b0, shared, path, workspace)


def _me_conv(x, conv, me: MEExperts, w0, b0, shared, path, workspace):
    experts, biases = me.experts.to(x.dtype), me.expert_bias.to(x.dtype)   # experts 1..N-1
    r = torch.sigmoid(F.linear(x.mean((2, 3)), me.router.weight.to(x.dtype), me.router.bias.to(x.dtype)))  # [B, N]
    kw = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation)
    if shared if shared is not None else bool((r == r[:1]).all()):   # one kernel for the batch: a plain conv
        r0 = r[:1]
        k = torch.addmm(r0[:, :1] * w0.reshape(1, -1), r0[:, 1:], experts.flatten(1)).view_as(w0)
        return F.conv2d(x, k, torch.addmm(r0[:, :1] * b0[None], r0[:, 1:], biases)[0], **kw)
    if path is None:
        path = PATH
    if path is None:
        out_pixels = x.shape[2] * x.shape[3] // (conv.stride[0] * conv.stride[1])
        reused = workspace is not None and workspace.fits(x.shape[0] * w0.numel(), x.element_size())
        path = choose_path(x.shape[0], out_pixels, me.n, w0.numel(), x.device.type, x.element_size(), reused)
    if path == "stacked" and conv.groups == 1 and conv.padding_mode == "zeros" and not isinstance(conv.padding, str):
        return _stacked(x, w0, b0, experts, biases, r, kw)
    buf = workspace.take((x.shape[0], w0.numel()), x) if workspace is not None else None
    return _kernel_mix(x, w0, b0, experts, biases, r, kw, buf)


def _kernel_mix(x, w0, b0, experts, biases, r, kw, buf=None):
    """The kernel-mix path: each sample's kernel sum_i r_bi W_i (into ``buf``, [B, K], when
    given), then one grouped convolution with the batch as groups. Cost: reading the N experts
    and writing B kernels."""
    b, i, h, w = x.shape
    # r_b1.. @ experts, then + r_b0 W0 in place: one pass less over the B kernels than adding
    # into a scaled copy of W0 (addmm), and expert 0 is read without a copy
    k = torch.mm(r[:, 1:], experts.flatten(1), out=buf) if buf is not None else torch.mm(r[:, 1:], experts.flatten(1))
    k.addcmul_(r[:, :1], w0.reshape(1, -1))
    bias = torch.addmm(r[:, :1] * b0[None], r[:, 1:], biases)
    # Measured on the calibration CPU against a loop of B plain convolutions (batch 2): the
    # grouped convolution is as fast single-threaded and faster with 2 threads at the sizes
    # where this path is chosen (16x16 and up); the loop only wins on small maps with large
    # kernels, where the stacked path wins by more.
    out = F.conv2d(x.reshape(1, b * i, h, w), k.view(b * w0.shape[0], *w0.shape[1:]), bias.flatten(),
                   groups=b, **kw)
    return out.view(b, w0.shape[0], *out.shape[2:])


def _stacked(x, w0, b0, experts, biases, r, kw):
    """The stacked path, from conv(x, sum_i r_i W_i) = sum_i r_i conv(x, W_i): expert 0 runs as
    the plain convolution (the very op of the plain model), the other experts as one matmul of
    their stacked kernels [(N-1)*O, I*kh*kw] (a view, no copy) with the unfolded input, then
    each sample's weighted sum and mixed bias. Cost: (N-1) more convolutions' arithmetic, no
    per-sample kernels."""
    b, o = x.shape[0], w0.shape[0]
    n1 = experts.shape[0]
    y0 = F.conv2d(x, w0, b0, **kw)                                          # [B, O, H', W']
    out = torch.addcmul((r[:, 1:] @ biases)[:, :, None, None], y0, r[:, :1, None, None])   # r_b0 conv(x_b, W0) + mixed bias
    if n1 == 0:
        return out
    # The unfolded input with batch and pixels as the matmul's rows, [B, H'W', I*kh*kw]: one
    # matmul then reads each expert once (a batched matmul [O', K] @ [B, K, H'W'] reads it B
    # times, the costly part on small maps, where the kernels outweigh the activations).
    cols = F.unfold(x, tuple(w0.shape[2:]), kw["dilation"], kw["padding"], kw["stride"]).transpose(1, 2)
    ye = F.linear(cols, experts.reshape(n1 * o, -1))                       # [B, H'W', (N-1)*O]
    mixed = torch.matmul(r[:, None, None, 1:], ye.view(b, -1, n1, o))      # sum_i>0 r_bi conv(x_b, W_i): [B, H'W', 1, O]
    return out.add_(mixed.view(b, -1, o).transpose(1, 2).view_as(out))


# The cost model. Both paths cost extra time in proportion to the kernel's K = O*I*kh*kw
# weights, so per weight, with B the batch and L the output pixels:
#   stacked  (N-1) * (read + 2*B*L * flop)     reading each other expert once (as a matmul
#                                              operand) and its B*L outputs' multiply-adds
#   mix      N * read + B * fresh              reading the N experts, writing the B per-sample
#                                              kernels and convolving with them (the grouped
#                                              convolution reads and re-lays out B kernels, not 1)
# so the stacked path wins on small maps, the mix on large ones; K matters only through
# `fresh`, which jumps once the B kernels no longer fit in cache: written to fresh memory
# (page faults) without a Workspace, to the reused one (`reused`) with it.
# Constants in ns per weight at 4 bytes (read and fresh scale with the element size):
_COST = {
    # Calibrated on the project's 2-core AMD EPYC VM (torch 2.14 CPU, fp32, batch 2, single convs
    # at SD1.5 widths, N = 2: benchmarks/condconv.py --calibrate, 2026-11-24, the mix writing into
    # a Workspace as patched models run it). Extra ns per kernel weight: stacked 0.55 (2x2 maps),
    # 0.9 (4x4), 2.1-3.1 (8x8), 7-11 (16x16), so read 0.5 and flop 0.0065; the mix 3.1 at 1280
    # channels (118 MB of per-sample kernels, out of cache: reused 1.05; into fresh memory it was
    # ~10, page faults: fresh 4.0), 1.5-2.2 at 320 (7 MB, in cache: fresh_cached 0.5). Picks at
    # N = 2: stacked up to 8x8 at 640-1280 channels and up to 4x4 at 320, the mix elsewhere; the
    # faster path at every calibrated shape but 640 channels at 8x8 (the mix is 0.5 ns/weight
    # faster there, ~2 ms a conv). At N = 4 the stacked path keeps the maps up to 4x4.
    "cpu": dict(read=0.5, flop=0.0065, fresh=4.0, fresh_cached=0.5, reused=1.05, cache_bytes=16 << 20),
    # GPUs (cuda and anything else): NOT measured (no GPU on the calibration machine); estimated
    # for a current datacenter GPU at fp16/bf16: ~3 TB/s (read = 2 bytes / 3 TB/s, scaled to
    # 4 bytes), ~200 TFLOP/s on tensor cores for these skinny matmuls (fp32: 4x slower, see
    # choose_path), fresh = a write and a read, no page faults. Crossover at N = 2, B = 2:
    # about 15x15 outputs.
    "gpu": dict(read=0.0013, flop=0.000005, fresh=0.0027, fresh_cached=0.0027, reused=0.0027, cache_bytes=0),
}


def choose_path(batch: int, out_pixels: int, n: int, kernel_numel: int, device_type: str = "cpu",
                itemsize: int = 4, reused: bool = False) -> str:
    """"stacked" or "mix" for a convolution with per-sample routing: whichever the cost model
    above says costs less extra time. ``reused``: the mix writes its kernels into a Workspace
    (no fresh memory). Plain arithmetic on shapes: no device work, no sync."""
    if n < 2:
        return "mix"
    c = _COST["cpu" if device_type == "cpu" else "gpu"]
    scale = itemsize / 4
    flop = c["flop"] * (4 if device_type != "cpu" and itemsize == 4 else 1)   # GPU fp32: no fp16 tensor cores
    fresh = (c["fresh_cached"] if batch * kernel_numel * itemsize <= c["cache_bytes"]
             else c["reused"] if reused else c["fresh"])
    stacked = (n - 1) * (c["read"] * scale + 2 * batch * out_pixels * flop)
    mix = n * c["read"] * scale + batch * fresh * scale
    return "stacked" if stacked < mix else "mix"


def _version(t: torch.Tensor) -> int:
    """The in-place change counter; experts loaded inside ComfyUI's executor are inference
    tensors, which have none (and cannot be changed in place outside inference mode)."""
    try:
        return t._version
    except RuntimeError:
        return -1


def _stamp(tensors) -> tuple:
    """What tells whether tensors changed without reading them: identity, storage and in-place
    change counter (inference tensors have no counter; see _version)."""
    return tuple((id(t), t.data_ptr(), _version(t)) for t in tensors)


class MEForward:
    """The object patch for one conv's ``forward``: ``me_conv`` with the experts placed on the
    model's device and dtype, and the routing decision (input-independent or not) made once
    per placement and per change of the experts, not once per call (no device sync per call).

    What is cached, and on what: the placed experts (the patch's own, moved to the device, or a
    converted copy in another dtype; their stacked kernels for the stacked path are a view of
    them) and the shared-routing flag, keyed on device, dtype and each expert tensor's identity,
    storage and version, so a trainer updating the experts in place gets them fresh. Expert 0
    (the conv's own weight) is never cached: ComfyUI patches weights by swapping in a new
    Parameter (no version to compare: it may be an inference tensor) or, for hooked LoRAs, by
    ``param.data.copy_`` (which bumps no version at all), so only reading it live honours every
    LoRA. In training (grad mode, trainable experts) nothing is cached and the routing is always
    treated as per-sample, so gradients reach the experts and the router from every sample."""

    def __init__(self, conv, me: MEExperts, workspace: Workspace | None = None):
        self.conv, self.me, self.workspace = conv, me, workspace
        self._key = None

    def _params(self):
        me = self.me
        return (me.experts, me.expert_bias, me.router.weight, me.router.bias)

    def __call__(self, x):
        params = self._params()
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            if self.me.experts.device != x.device:
                self.me.to(x.device)   # in place: the trainer's optimizer holds these parameters
            return me_conv(x, self.conv, self.me, shared=False)
        key = (x.device, x.dtype, _stamp(params))
        if self._key != key:
            me = self.me
            if me.experts.dtype == x.dtype:
                placed = me.to(x.device)   # in place: one copy of the experts, the patch's own
            else:                          # inference in another dtype: convert once, not per call
                placed = copy.deepcopy(me).to(device=x.device, dtype=x.dtype)
            self._placed, self._shared = placed, not bool(placed.router.weight.any())
            params = self._params()
            self._key, self._pinned = (x.device, x.dtype, _stamp(params)), params   # pinned: ids stay unique
        return me_conv(x, self.conv, self._placed, self._shared, workspace=self.workspace)

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
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_EXPERTS:
        raise CondConvError(f"experts must be a whole number from 1 to {MAX_EXPERTS} (got {n!r}): the "
                            "number of experts per conv, 2 in the paper (1 = the plain conv)", input="experts")
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
    ws = Workspace()   # one per patched model: its ME-CondConvs run one at a time
    for path, me in experts.items():
        m.add_object_patch(f"diffusion_model.{path}.forward", MEForward(unet.get_submodule(path), me, ws))
    return m


# ---------------------------------------------------------------------------------------------
# Saving and loading trained experts
# ---------------------------------------------------------------------------------------------

def save_experts(experts: dict, path: str, meta: dict | None = None) -> None:
    """The experts and routers, float32 (what a training run resumes from and exports)."""
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
    sd, meta = read_safetensors(path)
    if meta.get("asdm.format") != FORMAT:
        raise CondConvError(f"{path.split('/')[-1]} is not an A-SDM ME-CondConv file (no "
                            f"'asdm.format: {FORMAT}' in its metadata)")
    name = path.split("/")[-1]
    fix = "re-export it with the trainer, or restore the original file"
    try:
        layout = json.loads(meta["asdm.condconv.layout"])
        entries = [(p, *(int(d) for d in dims)) for p, dims in layout.items()]
        if any(len(e) != 6 for e in entries):
            raise ValueError("each conv needs [experts, out, in, kh, kw]")
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise CondConvError(f"{name}: its layout metadata ('asdm.condconv.layout') is missing or damaged "
                            f"({type(e).__name__}: {e}); {fix}") from None
    try:
        check_weights(sd)
    except UNetFileError as e:
        raise CondConvError(f"{name}: {e}") from None
    out = {}
    for p, n, o, i, k, _k2 in entries:
        try:
            conv = unet.get_submodule(p)
        except AttributeError:
            raise CondConvError(f"the experts were trained for a conv at {p}, which this MODEL does "
                                "not have; they belong to another layout (e.g. Small vs Tiny)") from None
        if not isinstance(conv, torch.nn.Conv2d):
            raise CondConvError(f"{name}: the experts name {p}, which in this MODEL is a "
                                f"{type(conv).__name__}, not a convolution; {fix}")
        shape = tuple(conv.weight.shape)
        if shape != (o, i, k, _k2):
            raise CondConvError(f"the experts for {p} are {o}x{i}x{k}x{_k2} but this MODEL's conv there "
                                f"is {'x'.join(map(str, shape))}; they belong to another layout")
        if not 2 <= n <= 64:
            raise CondConvError(f"{name}: the layout metadata gives {p} {n} experts; {fix}")
        me = MEExperts(n, o, i, k)
        try:
            me.load_state_dict({k2: sd[f"{p}.{k2}"] for k2 in me.state_dict()})
        except (KeyError, RuntimeError) as e:
            raise CondConvError(f"the experts for {p} are incomplete or malformed in this file ({e})") from None
        out[p] = me
    return out
