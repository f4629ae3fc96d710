"""GRI attention: global-regional interactive self-attention (A-SDM early version, §1: "to speed
up the computationally intensive attention part"; the paper names it, this module designs it).

Self-attention (``attn1``) of an attention unit costs O(N^2) in its token count N = h*w: at
512 px SD1.5's level-0 units (dn0.*.A, up3.*.A) attend over 4096 tokens, at 768 px over 9216.
GRI attention lets every query attend, in ONE softmax, to two key sets:

* its **region**: the tokens of its own window of the latent grid, at full resolution;
* a **global** set: keys and values average-pooled over the whole grid by ``pool`` (one token
  per pool x pool cell, N / pool^2 tokens).

Cost per query: window^2 + N / pool^2 keys instead of N (SD1.5 at 512 px, window 16, pool 4:
512 instead of 4096). Cross-attention (``attn2``) is untouched.

Choices, and why
----------------
* **The global set stands for the tokens outside the region (complement weighting).** A pooled
  key k_c stands in for the tokens of its cell that the region does not already hold, and gets
  the additive logit bias log(count of those tokens) (-inf where the region holds the whole
  cell). Full attention sums exp(q.k_j) v_j over all tokens; GRI keeps the region's terms
  exactly and replaces each cell's remaining terms by count * exp(q.k_c) v_c (the first-order
  approximation for a cell of similar tokens, as ToMe's proportional attention). Without it a
  cell of 16 tokens would weigh like one token and the region would be counted twice. So: a
  region that covers the grid is exactly full attention, pool 1 is exactly full attention (each
  outside token is its own cell), and a model used without training (the node's use) stays
  close to its full-attention self: of the three weightings tried (none, log(pool^2) on every
  pooled key, the complement) the complement came closest to full attention (docs/benchmarks.md,
  "GRI attention"). The bias costs nothing: it lives in the attention mask.
* **Regions are equal splits of the grid.** ``window`` is the largest region side: an axis of L
  tokens is split into n = ceil(L / window) regions of ceil(L / n) tokens, so a 90-token axis
  with window 16 gets 6 regions of 15, and at most n - 1 padding tokens are added at the
  bottom / right. Padding never attends as a key (masked); a padding query attends only to
  itself (its row is never empty, so no NaN reaches the gradients) and is cropped. Any
  resolution and aspect ratio works; a window at least the grid's side is one region on that
  axis. The global pooling runs on the unpadded grid (``avg_pool2d`` with ``ceil_mode``: a
  border cell is the mean of its real tokens, and its count says how many).
* **Shifted regions, so no seam persists.** A unit is *shifted* on odd sampler steps, and
  chosen units alternate within a UNet call (the k-th chosen transformer block is shifted when
  step + k is odd; Swin's alternation, plus a change every step). A shifted unit moves its
  region boundaries by half a region (on axes with more than one region), computed as a cyclic
  roll of the (padded) grid by half a region whose wrapped-around windows are split by the mask
  into their true sub-regions (Swin's masked shift): the regions are then the non-cyclic offset
  partition of the grid, with no extra windows. Steps come from the pack's sampling hooks
  (``hooks.current_run``), so heun's or uni_pc's extra calls and split cond / uncond calls of
  one step use the same regions.
* **One SDPA call per unit**: queries as [B*heads, windows, window tokens, dim_head], keys and
  values per window = the window's own tokens concatenated with the pooled global tokens, the
  region / padding / complement structure as one additive float mask [1, windows, Q or 1, K]
  (built once per grid size, window, pool and shift, and cached). It broadcasts over the batch
  and the heads, and over the queries where every window is one whole region (no shift, no
  padding). Gradients flow through it (the mask is a constant).

Where it acts, and exactness
----------------------------
* A MODEL (``apply_gri``): ``set_model_attn1_replace`` for every transformer block of the chosen
  A units, keyed ("input" | "middle" | "output", block index, transformer index) as ComfyUI's
  UNet sets ``transformer_options["block"]``; a UNet call wrapper and step tracking with a
  ``GRIHolder`` (``hooks``). Inside the step range [start, end) (fractions of the sampler's
  schedule: step i of T is in when start*T <= i < end*T) the replace patch computes GRI; outside
  it, and wherever the tokens are not the unit's latent grid (another patch changed them:
  ToMe merges the queries, HyperTile tiles them, SD2's disable_self_attn attends to the text),
  it calls what the unpatched block would: an earlier attn1 replace patch for that key if there
  is one, else the host's ``optimized_attention`` with the arguments ``CrossAttention`` passes,
  so outside the range the MODEL is bit-exact. A region covering the whole grid (window at
  least the grid) takes the same path (bit-exact full attention). A UNet call with no known
  step (no sampler, or a sampler the hooks cannot read) uses GRI only when the range is the
  whole schedule.
* A bare UNet (training; the trainer distils a GRI student from the full-attention teacher):
  ``with gri_unet(unet, units, window, pool) as g:`` replaces ``attn1.forward`` of the chosen
  units' transformer blocks (instance attributes, removed on exit) with the GRI forward; the
  grid comes from a forward pre-hook on the unit. No ModelPatcher is needed, autograd flows
  through it, and ``g.step`` (default 0) sets the shift parity the way the sampler step does.
* ``gri_attention(q, k, v, heads, grid, window, pool, shift)`` is the attention itself.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import math
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import hooks
from .errors import GRIError
from .switch import refuse_switch
from .topology import Topology, TopologyError, Unit, describe, parse_unit_spec

log = logging.getLogger("A-SDM")
AUTO = "auto"   # units: the A units of the highest-resolution level pair that has them (auto_units)
DEFAULT_UNITS = AUTO
DEFAULT_WINDOW = 16   # regions of 16x16 tokens: a 64x64 latent (SD1.5 at 512 px) in 16 regions
DEFAULT_POOL = 4      # global keys pooled 4x4: 256 of them on a 64x64 latent



@dataclass(frozen=True)
class Settings:
    window: int   # the largest region side, in latent tokens of the unit's grid
    pool: int     # the global set: keys / values average-pooled by pool x pool
    start: float = 0.0   # step range [start, end), fractions of the sampler's schedule
    end: float = 1.0

    def __post_init__(self):
        if not isinstance(self.window, int) or self.window < 1:
            raise GRIError(f"window must be a whole number of latent tokens >= 1 (got {self.window!r}); "
                           "16 suits SD1.5 at 512 px (64x64 latents: 16 regions)", input="window")
        if not isinstance(self.pool, int) or self.pool < 1:
            raise GRIError(f"pool must be a whole number >= 1 (got {self.pool!r}); 4 pools each 4x4 "
                           "tokens into one global token (1 = every token: full attention, slower)", input="pool")
        for name, v in (("start", self.start), ("end", self.end)):
            if not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise GRIError(f"{name} must be a fraction of the schedule from 0 to 1 (got {v!r})", input=name)
        if self.start > self.end:
            raise GRIError(f"start ({self.start}) is after end ({self.end}); GRI acts on steps from "
                           "start to end: make start <= end (start = end: no step)", input="start")

    def active(self, step: int, total: int | None) -> bool:
        """Whether sampler step ``step`` of a run of ``total`` steps is in [start, end)."""
        if total is None:
            return self.covers_all()
        eps = 1e-9   # 0.3 * 10 is 3.0000000000000004
        return math.ceil(self.start * total - eps) <= step < math.ceil(self.end * total - eps)

    def covers_all(self) -> bool:
        return self.start <= 0.0 and self.end >= 1.0


# ---------------------------------------------------------------------------------------------
# The attention
# ---------------------------------------------------------------------------------------------

def covers(grid: tuple[int, int], window: int) -> bool:
    """One region covers the whole grid: GRI is full attention there."""
    return window >= grid[0] and window >= grid[1]


def split(length: int, window: int) -> tuple[int, int]:
    """(regions, region side) for an axis of ``length`` tokens: equal regions of at most
    ``window`` tokens, the last ones padded by fewer than ``regions`` tokens in all."""
    n = -(-length // window)
    return n, -(-length // n)


@dataclass(frozen=True)
class Layout:
    grid: tuple[int, int]      # (h, w) of the unit's tokens
    regions: tuple[int, int]   # (ny, nx)
    size: tuple[int, int]      # (wh, ww): one window
    roll: tuple[int, int]      # the shift, in tokens (0 where unshifted)
    pool: int
    mask: torch.Tensor         # [1, windows, Q or 1, Q + G] additive, float32, on the CPU

    @property
    def whole(self) -> bool:
        """One region covers the grid: GRI is full attention."""
        return self.regions == (1, 1)

    @property
    def padded(self) -> tuple[int, int]:
        return self.regions[0] * self.size[0], self.regions[1] * self.size[1]

    @property
    def global_grid(self) -> tuple[int, int]:
        return -(-self.grid[0] // self.pool), -(-self.grid[1] // self.pool)


_LAYOUTS: "OrderedDict[tuple, Layout]" = OrderedDict()
_MASKS: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
_CACHE_SIZE = 32


def _cached(cache: OrderedDict, key, make):
    hit = cache.get(key)
    if hit is None:
        hit = cache[key] = make()
        while len(cache) > _CACHE_SIZE:
            cache.popitem(last=False)
    else:
        cache.move_to_end(key)
    return hit


def layout(grid: tuple[int, int], window: int, pool: int, shift: bool) -> Layout:
    """The regions, padding, shift and mask of one unit's grid (cached)."""
    return _cached(_LAYOUTS, (tuple(grid), window, pool, bool(shift)),
                   lambda: _make_layout(tuple(grid), window, pool, bool(shift)))


def _make_layout(grid, window, pool, shift) -> Layout:
    h, w = grid
    (ny, wh), (nx, ww) = split(h, window), split(w, window)
    # Half a region on every axis that has more than one region (one region shifted by half
    # would only cut itself in two).
    sy = wh // 2 if shift and ny > 1 else 0
    sx = ww // 2 if shift and nx > 1 else 0
    hp, wp = ny * wh, nx * ww
    nwin, q = ny * nx, wh * ww
    gh, gw = -(-h // pool), -(-w // pool)

    ys, xs = torch.arange(hp), torch.arange(wp)
    # Region of every (padded) position: the non-cyclic partition whose boundaries sit at
    # roll + k * side; label 0 is the partial region before the first boundary.
    ly = torch.div(ys - sy, wh, rounding_mode="floor") + 1
    lx = torch.div(xs - sx, ww, rounding_mode="floor") + 1
    label = ly[:, None] * (nx + 1) + lx[None, :]
    valid = (ys < h)[:, None] & (xs < w)[None, :]
    cell = (ys // pool).clamp(max=gh - 1)[:, None] * gw + (xs // pool).clamp(max=gw - 1)[None, :]

    # Complement weighting: how many real tokens of each global cell lie outside each region.
    n_labels = (ny + 1) * (nx + 1)
    joint = torch.zeros(n_labels, gh * gw)
    joint.index_put_((label[valid], cell[valid]), torch.ones(int(valid.sum())), accumulate=True)
    outside = joint.sum(0, keepdim=True) - joint
    global_bias = torch.log(outside)          # log 0 = -inf: the region holds that whole cell

    def windows(t):   # [hp, wp] -> [windows, Q], in the order gri_attention makes windows
        t = torch.roll(t, shifts=(-sy, -sx), dims=(0, 1))
        return t.reshape(ny, wh, nx, ww).permute(0, 2, 1, 3).reshape(nwin, q)

    lw, vw = windows(label), windows(valid)
    region = (lw[:, :, None] == lw[:, None, :]) & vw[:, None, :]
    region |= torch.eye(q, dtype=torch.bool)  # a padding query sees itself: no empty row
    mask = torch.cat([torch.zeros(nwin, q, q).masked_fill_(~region, float("-inf")),
                      global_bias[lw]], dim=-1)
    if torch.equal(mask, mask[:, :1].expand_as(mask)):
        mask = mask[:, :1]                    # every query of a window sees the same keys
    return Layout(grid, (ny, nx), (wh, ww), (sy, sx), pool, mask[None].contiguous())


def _mask_on(lay: Layout, device, dtype) -> torch.Tensor:
    key = (lay.grid, lay.size, lay.regions, lay.roll, lay.pool, str(device), dtype)
    return _cached(_MASKS, key, lambda: lay.mask.to(device=device, dtype=dtype))


def gri_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                  grid: tuple[int, int], window: int, pool: int, shift: bool = False,
                  attn_precision=None) -> torch.Tensor:
    """GRI self-attention. q, k, v: [B, h*w, heads*dim_head] (row-major tokens of the unit's
    h x w grid, as ComfyUI's attn1 replace patches receive them); returns [B, h*w,
    heads*dim_head] like the host's attention. ``attn_precision`` torch.float32 computes in
    float32 (the host's upcast option for fp16 models)."""
    b, n, c = q.shape
    h, w = grid
    if n != h * w or k.shape != q.shape or v.shape != q.shape:
        raise GRIError(f"q, k, v {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)} are not the "
                       f"tokens of a {h}x{w} grid")
    d = c // heads
    out_dtype = q.dtype
    if attn_precision == torch.float32 and q.dtype != torch.float32:
        q, k, v = q.float(), k.float(), v.float()
    lay = layout(grid, window, pool, shift)
    (ny, nx), (wh, ww), (sy, sx) = lay.regions, lay.size, lay.roll
    hp, wp = lay.padded
    nwin, qn = ny * nx, wh * ww

    def to_windows(t):   # [B, N, C] -> [B*heads, windows, Q, d]
        t = t.reshape(b, h, w, c)
        if (hp, wp) != (h, w):
            t = F.pad(t, (0, 0, 0, wp - w, 0, hp - h))
        if sy or sx:
            t = torch.roll(t, shifts=(-sy, -sx), dims=(1, 2))
        t = t.reshape(b, ny, wh, nx, ww, heads, d).permute(0, 5, 1, 3, 2, 4, 6)
        return t.reshape(b * heads, nwin, qn, d)

    def to_global(t):    # [B, N, C] -> [B*heads, 1, G, d]: pooled on the unpadded grid
        g = F.avg_pool2d(t.reshape(b, h, w, c).permute(0, 3, 1, 2), pool, pool, ceil_mode=True)
        return g.reshape(b, heads, d, -1).transpose(2, 3).reshape(b * heads, 1, -1, d)

    qw = to_windows(q)
    kg, vg = to_global(k), to_global(v)
    kw = torch.cat([to_windows(k), kg.expand(-1, nwin, -1, -1)], dim=2)
    vw = torch.cat([to_windows(v), vg.expand(-1, nwin, -1, -1)], dim=2)
    out = F.scaled_dot_product_attention(qw, kw, vw, attn_mask=_mask_on(lay, q.device, q.dtype))
    out = out.view(b, heads, ny, nx, wh, ww, d).permute(0, 2, 4, 3, 5, 1, 6).reshape(b, hp, wp, c)
    if sy or sx:
        out = torch.roll(out, shifts=(sy, sx), dims=(1, 2))
    if (hp, wp) != (h, w):
        out = out[:, :h, :w]
    return out.reshape(b, n, c).to(out_dtype)


def attention_flops(grid: tuple[int, int], window: int, pool: int, inner: int, batch: int = 1) -> tuple[int, int]:
    """(full attention, GRI) FLOPs of one self-attention's two matmuls (QK^T and AV, 2 FLOPs per
    multiply-add), for ``inner`` = heads * dim_head channels; GRI counts its padded queries and
    the pooling."""
    h, w = grid
    n = h * w
    full = 4 * batch * n * n * inner
    if covers(grid, window):
        return full, full
    (ny, wh), (nx, ww) = split(h, window), split(w, window)
    keys = wh * ww + (-(-h // pool)) * (-(-w // pool))
    return full, 4 * batch * (ny * wh) * (nx * ww) * keys * inner + 2 * batch * n * inner


# ---------------------------------------------------------------------------------------------
# The host's attention, called as the unpatched CrossAttention calls it
# ---------------------------------------------------------------------------------------------

def host_attention(q, k, v, extra_options: dict, preferred=None):
    """What the host's CrossAttention computes from q, k, v (bit-exact): its module-level
    ``optimized_attention`` (read at call time, as CrossAttention does), with the keyword
    arguments that host passes: attn_precision and transformer_options (whose
    optimized_attention_override it honours), and, on hosts whose layers carry their own
    attention preference (``comfy_attention``), that layer's as ``preferred_attention``: the
    patch's ``extra_options`` do not carry it, so the site found it on the module."""
    import comfy.ldm.modules.attention as attention   # late: the host's modules exist once it runs (compat.start_host)
    fn = attention.optimized_attention
    kwargs = {}
    params = _params(fn)
    if "attn_precision" in params:
        kwargs["attn_precision"] = extra_options.get("attn_precision")
    if "transformer_options" in params or "kwargs" in params:
        kwargs["transformer_options"] = extra_options
    if preferred is not None:
        kwargs["preferred_attention"] = preferred
    return fn(q, k, v, extra_options["n_heads"], **kwargs)


_PARAMS: dict = {}


def _params(fn) -> frozenset:
    hit = _PARAMS.get(fn)
    if hit is None:
        hit = _PARAMS[fn] = frozenset(inspect.signature(fn).parameters)
    return hit


def token_grid(n: int, extra_options: dict, level: int) -> tuple[int, int] | None:
    """The (h, w) grid of a unit's ``n`` tokens: the unit's own input shape where the host gives
    it (``activations_shape``), else the UNet input (``original_shape``) halved ``level`` times
    as SD's stride-2 downsamplers do (ceil), else halved until the count matches (another
    layout); None when nothing matches."""
    shape = extra_options.get("activations_shape")
    if shape is not None and len(shape) == 4 and shape[2] * shape[3] == n:
        return int(shape[2]), int(shape[3])
    shape = extra_options.get("original_shape")
    if shape is None or len(shape) < 4:
        return None
    h, w = int(shape[-2]), int(shape[-1])
    for _ in range(level):
        h, w = -(-h // 2), -(-w // 2)
    if h * w == n:
        return h, w
    h, w = int(shape[-2]), int(shape[-1])
    while h * w > n:
        h, w = -(-h // 2), -(-w // 2)
    return (h, w) if h * w == n else None


def _fits(q, k, v, grid) -> bool:
    """q, k, v are the unit's own self-attention tokens on ``grid``: not merged (ToMe), tiled
    (HyperTile) or text (disable_self_attn)."""
    return grid is not None and q.shape == k.shape == v.shape and q.shape[1] == grid[0] * grid[1]


# ---------------------------------------------------------------------------------------------
# Units
# ---------------------------------------------------------------------------------------------

def level_of(topo: Topology, block: str) -> int:
    """Resolution level of a block: dnK -> K, upK -> L-1-K, mid -> L-1 (0 = highest)."""
    depth = sum(b.startswith("dn") for b in topo.blocks)
    if block == "mid":
        return depth - 1
    k = int(block[2:])
    return k if block.startswith("dn") else depth - 1 - k


def attention_key(unit: Unit) -> tuple[str, int]:
    """("input" | "middle" | "output", block index) of an A unit: the ``transformer_options
    ["block"]`` ComfyUI's UNet sets while that unit runs, which attention patches are keyed by
    (with the transformer block's index inside the unit)."""
    top, index = unit.path.split(".")[:2]
    name = {"input_blocks": "input", "middle_block": "middle", "output_blocks": "output"}[top]
    return name, 0 if name == "middle" else int(index)


def auto_units(topo: Topology) -> str:
    """The blocks of the highest-resolution level pair that has attention units: where
    self-attention costs the most (SD1.x/2.x: dn0, up3; the SDXL family, which has no attention
    at level 0: dn1, up1). Empty where the UNet has none."""
    levels = sum(b.startswith("dn") for b in topo.blocks)
    with_a = {u.block for u in topo.units if u.kind == "A"}
    for k in range(levels):
        pair = [f"dn{k}", f"up{levels - 1 - k}"]
        if with_a & set(pair):
            return ", ".join(pair)
    return ""


def resolve_units(topo: Topology, spec: str) -> list[Unit]:
    """The A units a spec names (blocks and layers resolve to their A units; AUTO: those of the
    highest-resolution level pair that has them). An error says where this UNet's
    highest-resolution attention is."""
    if spec.strip().lower() == AUTO:
        spec = auto_units(topo)
    try:
        named = parse_unit_spec(spec, topo, strict=True)
    except TopologyError as e:
        raise TopologyError(f"{e} {_attention_hint(topo)}", input="units") from None
    chosen = [u for u in named if u.kind == "A"]
    if named and not chosen:
        raise GRIError(f"{spec!r} names no attention (A) unit, only ResNet units: GRI replaces "
                       f"self-attention, so name blocks, layers or A units, or '{AUTO}'. "
                       f"{_attention_hint(topo)}", input="units")
    return chosen


def _attention_hint(topo: Topology) -> str:
    units = auto_units(topo)
    if units:
        return (f"This UNet's highest-resolution attention units are in {units.replace(', ', ' and ')}: "
                f"units = '{units}' (or '{AUTO}').")
    return "This UNet has no attention units in its down and up blocks."


@dataclass(frozen=True)
class Site:
    """One transformer block of a chosen A unit."""
    unit: Unit
    transformer_index: int
    order: int    # position among all chosen transformer blocks, in forward order
    level: int
    preferred: object = None   # the layer's own attention preference (newer hosts: attn1.comfy_attention)


def sites(unet: torch.nn.Module, topo: Topology, units: list[Unit]) -> list[Site]:
    out = []
    for u in units:
        for ti in range(len(unet.get_submodule(u.path).transformer_blocks)):
            attn1 = unet.get_submodule(u.path).transformer_blocks[ti].attn1
            out.append(Site(u, ti, len(out), level_of(topo, u.block), getattr(attn1, "comfy_attention", None)))
    return out


# ---------------------------------------------------------------------------------------------
# A MODEL: attention replace patches, stepped by the sampling hooks
# ---------------------------------------------------------------------------------------------

@dataclass
class RunState(hooks.Run):
    calls: list = field(default_factory=list)   # (step, active) per UNet call
    gri: int = 0          # attention calls computed with GRI
    exact: int = 0        # attention calls in the range that computed full attention
    fallbacks: set = field(default_factory=set)  # units whose tokens were not their grid


@dataclass
class CallState:
    active: bool
    step: int
    run: RunState | None


class GRIHolder(hooks.Holder):
    """Shared by the attention patches and the sampling hooks of one patched MODEL."""
    KEY = "asdm_gri_attention"
    RUN = RunState

    def __init__(self, settings: Settings, sites_: list[Site], label: str):
        super().__init__()
        self.settings = settings
        self.sites = sites_
        self.label = label
        self._warned: set = set()

    def finish_run(self, run: RunState) -> None:
        steps = {s for s, _ in run.calls}
        on = {s for s, a in run.calls if a}
        if steps:
            log.info("A-SDM GRI attention (%s): %d of %d sampler steps used GRI in %d attention units%s",
                     self.label, len(on), len(steps), len({s.unit.name for s in self.sites}),
                     f"; {', '.join(sorted(run.fallbacks))} computed full attention (their tokens were "
                     "changed by another patch)" if run.fallbacks else "")

    def begin_call(self, run: RunState | None, x, keys) -> CallState:
        """Tells the attention patches whether this call's step is in the range, and its step
        (the shift parity)."""
        if run is None:
            return CallState(self.settings.covers_all(), 0, None)
        state = CallState(self.settings.active(run.step, run.total), run.step, run)
        run.calls.append((run.step, state.active))
        return state

    def attn1_patch(self, site: Site, inner):
        """The attn1 replace patch of one transformer block; ``inner(q, k, v, extra_options)``
        is what runs outside the range (an earlier replace patch, or None: the host's own)."""
        holder, s = self, self.settings

        def patch(q, k, v, extra_options):
            state = holder.call
            active = state.active if state is not None else s.covers_all()
            grid = token_grid(q.shape[1], extra_options, site.level) if active else None
            if active and _fits(q, k, v, grid) and not covers(grid, s.window):
                shift = (state.step if state is not None else 0) + site.order
                if state is not None and state.run is not None:
                    state.run.gri += 1
                return gri_attention(q, k, v, extra_options["n_heads"], grid, s.window, s.pool,
                                     shift=bool(shift % 2), attn_precision=extra_options.get("attn_precision"))
            if active:
                if state is not None and state.run is not None:
                    state.run.exact += 1
                if not _fits(q, k, v, grid):
                    holder._fell_back(site, state)
            if inner is not None:
                return inner(q, k, v, extra_options)
            return host_attention(q, k, v, extra_options, site.preferred)

        return patch

    def _fell_back(self, site: Site, state: CallState | None) -> None:
        if state is not None and state.run is not None:
            state.run.fallbacks.add(site.unit.name)
        if site.unit.name not in self._warned:
            self._warned.add(site.unit.name)
            log.warning("A-SDM GRI attention: the self-attention tokens of %s are not its latent grid "
                        "(another patch such as ToMe or HyperTile changed them); it computes full "
                        "attention there", site.unit.name)


def apply_gri(model, units: str = DEFAULT_UNITS, window: int = DEFAULT_WINDOW, pool: int = DEFAULT_POOL,
              start: float = 0.0, end: float = 1.0):
    """Returns a clone of ``model`` (a ComfyUI ModelPatcher) whose chosen A units use GRI
    self-attention on the sampler steps in [start, end)."""
    settings = Settings(window, pool, float(start), float(end))
    unet = getattr(model.model, "diffusion_model", None)
    if unet is None:
        raise GRIError("this MODEL has no diffusion_model; connect an SD1.x/SD2.x-family MODEL")
    refuse_switch(model, "A-SDM GRI Attention")   # the patches would reach only the switch's first model
    topo = describe(unet)
    chosen = resolve_units(topo, units)
    m = model.clone()
    if not chosen or settings.start == settings.end:
        log.info("A-SDM GRI attention: %s, so the MODEL is returned unchanged",
                 "no units" if not chosen else "empty step range (start = end)")
        return m
    label = f"{units.strip()}: window {window}, pool {pool}" + (
        "" if settings.covers_all() else f", steps {start:g}-{end:g}")
    all_sites = sites(unet, topo, chosen)
    holder = GRIHolder(settings, all_sites, label)
    replace = m.model_options["transformer_options"].get("patches_replace", {}).get("attn1", {})
    for site in all_sites:
        name, number = attention_key(site.unit)
        inner = replace.get((name, number, site.transformer_index))
        m.set_model_attn1_replace(holder.attn1_patch(site, inner), name, number, site.transformer_index)
    hooks.attach(m, holder)
    return m


# ---------------------------------------------------------------------------------------------
# A bare UNet module (training): attn1 forwards replaced while the context is open
# ---------------------------------------------------------------------------------------------

class UNetGRI:
    """GRI in the chosen A units of a bare UNet until ``remove()``. ``step`` plays the
    sampler step's part in the shift parity (the k-th chosen transformer block is shifted when
    step + k is odd)."""

    def __init__(self, unet: torch.nn.Module, units: str = DEFAULT_UNITS, window: int = DEFAULT_WINDOW,
                 pool: int = DEFAULT_POOL, step: int = 0):
        self.settings = Settings(window, pool)
        topo = describe(unet)
        self.sites = sites(unet, topo, resolve_units(topo, units))
        self.step = step
        self._grids: dict[str, tuple[int, int]] = {}
        self._undo: list = []
        try:
            for site in self.sites:
                unit = unet.get_submodule(site.unit.path)
                if site.transformer_index == 0:
                    h = unit.register_forward_pre_hook(self._grid_hook(site.unit.name))
                    self._undo.append(h.remove)
                attn = unit.transformer_blocks[site.transformer_index].attn1
                self._replace_forward(attn, site)
        except Exception:
            self.remove()
            raise

    def _grid_hook(self, name):
        def hook(module, args):
            x = args[0]
            self._grids[name] = (int(x.shape[-2]), int(x.shape[-1]))
        return hook

    def _replace_forward(self, attn, site: Site):
        own = attn.__dict__.get("forward")   # an instance forward set by someone else: restore it
        original = attn.forward
        s = self.settings

        def forward(x, context=None, value=None, mask=None, **kwargs):
            grid = self._grids.get(site.unit.name)
            if context is not None or value is not None or mask is not None or grid is None \
                    or x.shape[1] != grid[0] * grid[1] or covers(grid, s.window):
                return original(x, context=context, value=value, mask=mask, **kwargs)
            q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
            out = gri_attention(q, k, v, attn.heads, grid, s.window, s.pool,
                                shift=bool((self.step + site.order) % 2),
                                attn_precision=getattr(attn, "attn_precision", None))
            return attn.to_out(out)

        attn.forward = forward

        def undo():
            if own is not None:
                attn.forward = own
            else:
                del attn.forward
        self._undo.append(undo)

    def remove(self) -> None:
        while self._undo:
            self._undo.pop()()


@contextlib.contextmanager
def gri_unet(unet: torch.nn.Module, units: str = DEFAULT_UNITS, window: int = DEFAULT_WINDOW, pool: int = DEFAULT_POOL,
             step: int = 0):
    """``with gri_unet(unet, "dn0, up3", 16, 4) as g: out = unet(x, t, context)``: GRI in the
    chosen units of a bare ComfyUI UNetModel while the block runs (gradients flow through it);
    set ``g.step`` to alternate the shift between training steps."""
    g = UNetGRI(unet, units, window, pool, step)
    try:
        yield g
    finally:
        g.remove()
