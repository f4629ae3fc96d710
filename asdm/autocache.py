"""Auto Cache: one knob (a target UNet speed-up, as a FLOP ratio) for span-output reuse, with the
units and a per-step refresh schedule chosen on the user's own model.

**Unit groups.** Nested spans of the UNet, read from its own layout (``topology``): the middle
block, then the up path taken one layer further at a time, each with the down-path modules only
it reads (``topology.span_plan`` finds them: the deep down blocks and the downsamplers whose
every reader is in the span). A group is named by the last up layer it takes: ``up1`` is the
middle block, up0 and up1 with dn3 and dn2 (EX2's unit set on SD1.5), ``up2`` adds up2 and dn1
(EX3's set, what DeepCache skips at depth 2), ``up2.1`` stops one layer short of it. A group is reused as feature
inheritance reuses a span's output: its modules are not run, and the one output leaving it (the
last layer's) is stored whenever the group computes and reused whole, or extrapolated with
inheritance's first-order forecast. The groups nest, so one sampler step reuses at most one of
them, the outermost it reuses: a step's *depth* is that group's index (FULL: none), and a group
refreshes on every step whose depth is below its index, so a deep group can sit on a stale
output while shallower layers refresh around it. Of the chain only groups at least
``MIN_SHARE_GAP`` of a UNet call's FLOPs apart are used (``select``).

**calibration = "auto".** The first sampling run with a model (``weights_digest``), sampler,
schedule (its sigmas: scheduler, steps, denoise) and resolution bucket computes fully (its image
is full compute's, bit for bit) and records every group's output at every step, strided down,
plus, at ``PROBE_FRACTIONS`` of the run, one bare extra UNet call per group that reuses the
group's output of the step before (``compat.bare_unet_call``: its output is compared with the
real one and thrown away). The profile (``Profile``: per group the Gram matrix of its outputs
over the steps, and the probes) is stored as JSON in ComfyUI's user directory. Later runs
predict (``Predictor``) the error any schedule makes in the final latent: per reusing step, how
far the reused (or forecast) output is from the one full compute had (from the Gram matrix),
times the probes' output change per unit of it (interpolated in sigma), times how much of an
error in that step's denoised prediction reaches the end of an Euler-type run (from the
sigmas); they choose (``choose_plan``) the schedule that meets the FLOP target at the least
predicted error.

**calibration = "off".** No calibration run: ``RuntimeRule`` decides at each group's entry, as
the forward reaches it, whether its input changed enough since its last refresh (scaled by the
rate its output changed per input change between its last two refreshes: EasyCache's rule, per
group), against what an even schedule meeting the rest of the FLOP target would let it change.

Steps are sampler steps (``hooks``): multi-call samplers, CFG and cond/uncond splitting keep one
depth per step. Stored outputs are keyed by conditioning chunk and dropped when the run ends.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from . import compat, costs, hooks
from .errors import AutoCacheError
from .inheritance import reuse_feature, save_feature
from .switch import refuse_switch
from .topology import dataflow, describe, span_plan

log = logging.getLogger("A-SDM")

CALIBRATION = ("auto", "off")
PROFILE_VERSION = 1
PROFILE_FOLDER = ("asdm", "autocache")   # under ComfyUI's user directory
FULL = -1             # a step's depth when it reuses nothing
SAMPLE_SIDE = 16      # recorded outputs are strided down to at most this many positions per side
MIN_SHARE_GAP = 0.12  # groups used: at least this share of a UNet call's FLOPs apart
PROBE_FRACTIONS = (0.25, 0.75)   # where in the run the calibration probes each group
# The spread of clean latents that the propagation weights assume: a denoiser passes an input
# error through to its prediction about as sigma_data^2 / (sigma^2 + sigma_data^2). Chosen to
# follow how single-step errors carried to the end on the embedded model (docs/autocache.md).
SIGMA_DATA = 0.5


# ---------------------------------------------------------------------------------------------
# Unit groups
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Group:
    name: str                     # "mid", "up0", "up2.1": the last up layer it takes
    skipped: tuple[str, ...]      # atoms not run while the group is reused
    boundary: tuple[str, ...]     # atoms whose outputs are stored and reused
    entry: str                    # its first atom in forward order: what that reads is the group's input


def unit_groups(unet: torch.nn.Module) -> list[Group]:
    """The chain of candidate groups of any SD-style UNet, innermost first: the middle block
    (where the UNet has one), then the up path one layer further at a time, up to all but its
    last layer."""
    topo = describe(unet)
    order = list(dataflow(unet))
    mid = [u for u in topo.units if u.block == "mid"]
    up_layers = [(b, i) for b in topo.blocks if b.startswith("up") for i in range(topo.layers[b])]
    out = []
    for n in range(len(up_layers)):   # the first n up layers with the middle block
        taken = {f"{b}.{i}" for b, i in up_layers[:n]}
        units = mid + [u for u in topo.units if ".".join(u.name.split(".")[:2]) in taken]
        if not units:
            continue
        skipped, boundary = span_plan(unet, units)
        span = set(skipped) | set(boundary)
        entry = next(p for p in order if p in span)
        if n == 0:
            name = "mid"
        else:
            b, i = up_layers[n - 1]
            name = b if i == topo.layers[b] - 1 else f"{b}.{i}"
        out.append(Group(name, tuple(skipped), tuple(boundary), entry))
    return out


def group_shares(flops: dict[str, int], groups: list[Group]) -> list[float]:
    """Each group's share of a UNet call's FLOPs, from a per-module count (``costs.counting``)."""
    total = sum(flops.values()) or 1
    shares = []
    for g in groups:
        atoms = set(g.skipped) | set(g.boundary)
        shares.append(sum(v for p, v in flops.items() if _atom_of(p) in atoms) / total)
    return shares


def _atom_of(module_path: str) -> str:
    """The atom (a child of input_blocks.i, middle_block or output_blocks.j) a module is in."""
    parts = module_path.split(".")
    return ".".join(parts[:2]) if parts[0] == "middle_block" else ".".join(parts[:3])


def select(shares: list[float], gap: float | None = None) -> list[int]:
    """The groups used, innermost first: from the outermost inwards, each at least ``gap`` of a
    call's FLOPs below the last one kept (finer steps buy little and each costs probe calls)."""
    gap = MIN_SHARE_GAP if gap is None else gap
    kept: list[int] = []
    for j in range(len(shares) - 1, -1, -1):
        if shares[j] > 0 and (not kept or shares[kept[-1]] - shares[j] >= gap):
            kept.append(j)
    return kept[::-1]


def layout_digest(groups: list[Group]) -> str:
    text = json.dumps([[g.name, g.skipped, g.boundary] for g in groups])
    return hashlib.sha1(text.encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------
# The profile
# ---------------------------------------------------------------------------------------------

def strided(t: torch.Tensor, n_chunks: int) -> list[torch.Tensor]:
    """One small float64 vector per conditioning chunk of ``t`` ([B, C, H, W]): a grid of
    positions strided down to at most SAMPLE_SIDE per side, all channels."""
    sy = max(1, t.shape[2] // SAMPLE_SIDE)
    sx = max(1, t.shape[3] // SAMPLE_SIDE)
    s = t[:, :, ::sy, ::sx].detach().to("cpu", torch.float64)
    n = t.shape[0] // n_chunks
    return [s[i * n:(i + 1) * n].flatten() for i in range(n_chunks)]


@dataclass
class Profile:
    """A calibration run, reduced to what schedules are chosen from."""
    groups: list[str]                   # the groups calibrated, innermost first
    schedule: list[float]               # the run's sigmas (steps + 1)
    steps: list[int]                    # the sampler steps recorded (all, unless a switch gave the model a range)
    grams: list[list[list[float]]]      # per group: Gram matrix of its outputs over the recorded steps
    probes: list[list[list[float]]]     # per group: [step, UNet output change, group output change]

    def to_json(self) -> dict:
        return {"groups": self.groups, "schedule": self.schedule, "steps": self.steps,
                "grams": self.grams, "probes": self.probes}

    @classmethod
    def from_json(cls, d: dict) -> "Profile":
        """Raises ValueError (or KeyError, TypeError) when ``d`` is not a whole profile."""
        p = cls(**{k: d[k] for k in ("groups", "schedule", "steps", "grams", "probes")})
        n = len(p.steps)
        if not p.groups or len(p.grams) != len(p.groups) or len(p.probes) != len(p.groups):
            raise ValueError("the groups, Gram matrices and probes do not match")
        if n < 2 or sorted(set(p.steps)) != p.steps or p.steps[-1] >= len(p.schedule) - 1:
            raise ValueError("the recorded steps do not fit the schedule")
        numbers = [v for g in p.grams for row in g for v in row] + list(p.schedule) + \
                  [v for g in p.probes for pr in g for v in pr]
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in numbers):
            raise ValueError("it holds a value that is not a finite number")
        if any(len(g) != n or any(len(row) != n for row in g) for g in p.grams):
            raise ValueError("a Gram matrix is not steps x steps")
        if any(len(pr) != 3 for g in p.probes for pr in g):
            raise ValueError("a probe is not [step, output change, group output change]")
        return p


def _gram(vectors: list[torch.Tensor]) -> list[list[float]]:
    m = torch.stack(vectors)
    return [[float(f"{v:.10g}") for v in row] for row in (m @ m.T).tolist()]


# ---------------------------------------------------------------------------------------------
# Profiles on disk: JSON in ComfyUI's user directory
# ---------------------------------------------------------------------------------------------

def profile_folder() -> str:
    return os.path.join(compat.user_directory(), *PROFILE_FOLDER)


def profile_name(key: dict) -> str:
    """A profile's file name: a digest of its key without the format version (so a profile an
    older version of the pack wrote is found, and recalibrated as stale)."""
    k = {n: v for n, v in key.items() if n != "version"}
    return hashlib.sha1(json.dumps(k, sort_keys=True).encode()).hexdigest()[:16] + ".json"


def load_profile(key: dict) -> tuple[Profile | None, str]:
    """(the stored profile of ``key``, "") or (None, why there is none to use)."""
    path = os.path.join(profile_folder(), profile_name(key))
    if not os.path.exists(path):
        return None, "no profile stored yet"
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        stored = d["key"]
        profile = d["profile"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, f"profile {path} is damaged ({type(e).__name__})"
    if not isinstance(stored, dict) or stored.get("version") != key["version"]:
        return None, f"profile {path} is stale (another version of the pack wrote it)"
    if stored != key:
        return None, f"profile {path} is foreign (it profiles another model, sampler, schedule or size)"
    try:
        p = Profile.from_json(profile)
    except (ValueError, KeyError, TypeError) as e:
        return None, f"profile {path} is damaged ({e})"
    if len(p.schedule) != key["steps"] + 1:
        return None, f"profile {path} is damaged (its schedule is not {key['steps']} steps)"
    return p, ""


def save_profile(key: dict, profile: Profile) -> str:
    folder = profile_folder()
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, profile_name(key))
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"key": key, "profile": profile.to_json()}, f)
    os.replace(tmp, path)   # a reader never sees half a file
    return path


def weights_digest(unet: torch.nn.Module, patcher=None) -> str:
    """A cheap digest of what the UNet computes: every parameter's name, shape and dtype, and 16
    values strided through each, so another checkpoint gives another digest without reading the
    UNet; with ``patcher`` (the sampled MODEL), its weight patches too (``patches_digest``). The
    stored weights are read as they are before patching (the host's backup where it patched a
    weight in place), so one MODEL has one digest however the host loaded it: fully (a LoRA
    patched into the weights) or partially (the LoRA applied as each layer casts its weight)."""
    backup = getattr(patcher, "backup", None) or {}
    h = hashlib.sha1()
    samples = []
    with torch.no_grad():
        for name, p in unet.named_parameters():
            kept = backup.get("diffusion_model." + name)
            p = kept.weight if kept is not None else p
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype};".encode())
            samples.append(_strided(p))
        if samples:
            h.update(torch.cat(samples).cpu().numpy().tobytes())   # one copy from the device
    if patcher is not None:
        h.update(patches_digest(patcher).encode())
    return h.hexdigest()[:20]


def _strided(t: torch.Tensor) -> torch.Tensor:
    flat = t.detach().flatten()
    return flat[::max(1, flat.numel() // 16)][:16].float()


def patches_digest(patcher) -> str:
    """A digest of a MODEL's weight patches (LoRA and the like): which weights they patch, their
    strengths, and 16 values strided through each tensor they hold, so adding, removing or
    re-weighting a LoRA gives another digest, and loading the same LoRA again the same one."""
    h = hashlib.sha1()
    samples = []

    def walk(x):
        if isinstance(x, torch.Tensor):
            h.update(f"T{tuple(x.shape)}{x.dtype};".encode())
            samples.append(_strided(x).cpu())
        elif isinstance(x, (list, tuple)):
            h.update(f"[{len(x)}".encode())
            for v in x:
                walk(v)
        elif isinstance(x, dict):
            for k in sorted(x, key=str):
                h.update(f"{k}:".encode())
                walk(x[k])
        elif isinstance(x, (str, int, float, bool)) or x is None:
            h.update(f"{x!r};".encode())
        else:   # a host's patch object (a weight adapter holds its tensors in .weights) or a function
            h.update(type(x).__name__.encode())
            walk(getattr(x, "weights", None))

    with torch.no_grad():
        for key in sorted(getattr(patcher, "patches", {}) or {}):
            h.update(key.encode())
            for patch in patcher.patches[key]:
                walk(patch)
    if samples:
        h.update(torch.cat(samples).numpy().tobytes())
    return h.hexdigest()[:20]


def resolution_bucket(h: int, w: int) -> str:
    """Latents of about the same size share a profile: the area in half-octaves and the aspect
    ratio in quarter-octaves."""
    return f"area 2^{round(2 * math.log2(h * w)) / 2:g}, aspect 2^{round(4 * math.log2(w / h)) / 4:g}"


def sigmas_digest(sigmas: list[float]) -> str:
    return hashlib.sha1(json.dumps([float(f"{s:.5g}") for s in sigmas]).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Predicting a schedule's error, choosing the schedule
# ---------------------------------------------------------------------------------------------

def propagation(sigmas: list[float]) -> list[float]:
    """Per step, how much of an error in that step's denoised prediction reaches the end of the
    run, for an Euler step x' = r x + (1 - r) D (r = sigma'/sigma) and a denoiser that passes
    an input error through as SIGMA_DATA^2 / (sigma^2 + SIGMA_DATA^2): the step adds (1 - r) of
    the error, every later step keeps r + (1 - r) of that pass-through of it."""
    n = len(sigmas) - 1
    r = [sigmas[i + 1] / sigmas[i] if sigmas[i] > 0 else 0.0 for i in range(n)]
    keep = [r[i] + (1 - r[i]) * SIGMA_DATA ** 2 / (sigmas[i] ** 2 + SIGMA_DATA ** 2) for i in range(n)]
    out, tail = [0.0] * n, 1.0
    for s in range(n - 1, -1, -1):
        out[s] = (1 - r[s]) * tail
        tail *= keep[s]
    return out


class Predictor:
    """The predicted error of a plan (``error``) from a profile. A plan is one depth per step of
    the profile's schedule (an index into the profile's groups, or FULL)."""

    def __init__(self, profile: Profile):
        sig = profile.schedule
        self.n_steps = len(sig) - 1
        self.n_groups = len(profile.groups)
        self.recorded = set(profile.steps)
        w = propagation(sig)
        # term[k][s]: predicted final error per unit of group k's output deviation at step s
        self.term = [[math.inf] * self.n_steps for _ in range(self.n_groups)]
        for k, probes in enumerate(profile.probes):
            pts = sorted((math.log(sig[s]), math.log(od / (fd * sig[s])))
                         for s, od, fd in probes if od > 0 and fd > 0 and sig[int(s)] > 0)
            if not pts:
                continue   # not probed: never reused
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            for s in profile.steps:
                if sig[s] > 0:
                    self.term[k][s] = w[s] * sig[s] * math.exp(float(np.interp(math.log(sig[s]), xs, ys)))
        # plain[k][s][r]: |F(s) - F(r)|, for every pair of recorded steps; line(k, s, r1, r2):
        # |F(s) - the forecast from r1 and r2|, computed when first asked for
        self.plain, self.grams, self._line = [], [], {}
        idx = np.asarray(profile.steps)
        for g in profile.grams:
            gm = np.zeros((self.n_steps, self.n_steps))
            gm[np.ix_(idx, idx)] = np.asarray(g, dtype=np.float64)
            d = np.diag(gm)
            dist = np.sqrt(np.maximum(d[:, None] + d[None, :] - 2 * gm, 0))
            self.plain.append(dist.tolist())
            self.grams.append(gm)

    def line(self, k: int, s: int, r1: int, r2: int) -> float:
        key = (k, s, r1, r2)
        v = self._line.get(key)
        if v is None:
            # c = e_s - (1 + a) e_r1 + a e_r2, a = (s - r1) / (r1 - r2): |c|^2 = c G c
            a = (s - r1) / (r1 - r2)
            gm = self.grams[k]
            q = (gm[s, s] + (1 + a) ** 2 * gm[r1, r1] + a ** 2 * gm[r2, r2]
                 - 2 * (1 + a) * gm[s, r1] + 2 * a * gm[s, r2] - 2 * a * (1 + a) * gm[r1, r2])
            v = self._line[key] = math.sqrt(max(float(q), 0.0))
        return v

    def error(self, plan: list[int]) -> tuple[float, list[bool]]:
        """(predicted error, per step whether it reuses with the forecast). Each reusing step
        takes the forecast where it predicts less error than the stored output."""
        forecast = [False] * len(plan)
        total = self._walk(plan, 0, [-1] * self.n_groups, [-1] * self.n_groups, 0.0, forecast)
        return total, forecast

    def _walk(self, plan, start, last1, last2, total, forecast=None, states=None) -> float:
        """The error of ``plan`` from step ``start`` on, given each group's last two refreshes
        before it and the error up to it; ``states`` collects those per step (for choose_plan)."""
        last1, last2 = list(last1), list(last2)
        for s in range(start, len(plan)):
            if states is not None:
                states.append((list(last1), list(last2), total))
            d = plan[s]
            if d >= 0:
                r1, r2 = last1[d], last2[d]
                if r1 < 0:
                    return math.inf
                dev = self.plain[d][s][r1]
                if r2 >= 0:
                    line = self.line(d, s, r1, r2)
                    if line < dev:
                        dev = line
                        if forecast is not None:
                            forecast[s] = True
                total += self.term[d][s] * dev
            for k in range(d + 1, self.n_groups):
                last2[k], last1[k] = last1[k], s
        return total


def choose_plan(pred: Predictor, shares: list[float], ratio: float, allowed: list[bool]) -> list[int]:
    """The plan that reaches ``ratio`` (a UNet call's FLOPs over the average call's) at the least
    predicted error, greedily: from all steps full, the move (one step reusing a larger group)
    with the least added error per FLOP saved, until the ratio is met or nothing is left."""
    n = pred.n_steps
    plan = [FULL] * n
    budget = n / ratio
    spent = float(n)
    err = 0.0
    saving = lambda d: shares[d] if d >= 0 else 0.0   # noqa: E731
    while spent > budget + 1e-9:
        states: list = []
        pred._walk(plan, 0, [-1] * pred.n_groups, [-1] * pred.n_groups, 0.0, states=states)
        best = None
        for s in range(1, n):
            if not allowed[s] or s not in pred.recorded:
                continue
            cur = plan[s]
            last1, last2, before = states[s]
            for d in range(cur + 1, pred.n_groups):
                gain = saving(d) - saving(cur)
                if gain <= 0:
                    continue
                plan[s] = d
                e = pred._walk(plan, s, last1, last2, before)   # the steps before s are unchanged
                plan[s] = cur
                if math.isinf(e):
                    continue
                score = (e - err) / gain
                if best is None or score < best[0]:
                    best = (score, s, d, e, gain)
        if best is None:
            break
        _, s, d, err, gain = best
        plan[s] = d
        spent -= gain
    return plan


# ---------------------------------------------------------------------------------------------
# calibration = "off": the run-time rule
# ---------------------------------------------------------------------------------------------

class RuntimeRule:
    """calibration "off": EasyCache's rule, per group. A group's output is predicted to have
    changed by ``rate x`` the relative change of its input since its last refresh, ``rate`` being
    its output's relative change per input change between its last two refreshes (1 until it has
    two). The threshold comes from the target: the run reuses a primary group (the one whose
    FLOP share, reused on REUSE_SHARE of the steps, saves what the target asks) and the groups
    inside it; with the FLOPs still to save and the steps left, reusing the primary group evenly
    means one refresh every ``interval`` steps, and a group is reused while its predicted change
    stays under what ``interval - 1`` steps at its recent pace of change add up to. So a group
    refreshes early where its input moves faster than it has, late where slower, and the run
    meets the target: a step reuses nothing once the target is met, and the primary group when
    refreshing would leave the target out of reach. Reuse takes the forecast up to
    FORECAST_STEPS steps after a refresh (further out a line through two refreshes overshoots)."""
    REUSE_SHARE = 0.6   # the primary group meets the target reused on about this share of the steps
    PACE = 0.5          # weight of the newest step in a group's pace of change
    FORECAST_STEPS = 2  # reuse with the forecast up to this many steps after a refresh

    def __init__(self, shares: dict[int, float], ratio: float, allowed: list[bool]):
        n = len(allowed)
        self.allowed = allowed
        self.target = (1 - 1 / ratio) * n          # FLOPs to save, in UNet calls
        want = self.target / max(1, sum(allowed)) / self.REUSE_SHARE
        self.primary = min(shares, key=lambda j: (abs(shares[j] - want), -j))
        self.shares = {j: v for j, v in shares.items() if j <= self.primary}   # the groups it may reuse
        self.saved = 0.0
        self.interval = 1.0
        self.ref: dict[int, tuple] = {}            # group -> (input, output, step) at its last refresh
        self.rate: dict[int, float] = {}
        self.pace: dict[int, float] = {}           # group -> predicted change per step, recently
        self.entered: dict[int, tuple] = {}        # group -> (input, step) of this step's refresh

    def decide(self, step: int) -> int | None:
        """This step's depth when the budget decides it (FULL, or the group it must reuse), None
        when the rule decides at the groups' entries."""
        if not self.allowed[step]:
            return FULL
        need = self.target - self.saved
        left = sum(self.allowed[step:])
        if need <= 1e-9:
            return FULL
        primary = self.shares[self.primary]
        reuses = need / primary
        if reuses > left - 1 + 1e-9:
            # refreshing now would leave the target out of reach: reuse the smallest group that
            # keeps it in reach (the primary one while the steps left must all reuse it)
            must = need - (left - 1) * primary
            return min((j for j, v in self.shares.items() if v >= must - 1e-9), default=self.primary)
        self.interval = left / (left - reuses)
        return None

    def reuse(self, j: int, h: torch.Tensor, step: int) -> bool:
        """At group ``j``'s entry with input ``h``: whether to reuse it this step."""
        ref = self.ref.get(j)
        if ref is None:
            self.entered[j] = (h, step)
            return False
        change = self.rate.get(j, 1.0) * float((h - ref[0]).norm()) / max(float(ref[0].norm()), 1e-12)
        per_step = change / max(1, step - ref[2])
        pace = self.pace.get(j, per_step)
        self.pace[j] = self.PACE * per_step + (1 - self.PACE) * pace
        if change <= pace * (self.interval - 1):
            return True
        self.entered[j] = (h, step)
        return False

    def refreshed(self, j: int, out: torch.Tensor) -> None:
        """Group ``j`` computed this step, with output ``out``."""
        entered = self.entered.pop(j, None)
        if entered is None:
            return
        h, step = entered
        ref = self.ref.get(j)
        if ref is not None:
            d_in = float((h - ref[0]).norm()) / max(float(ref[0].norm()), 1e-12)
            d_out = float((out - ref[1]).norm()) / max(float(ref[1].norm()), 1e-12)
            if d_in > 0:
                self.rate[j] = d_out / d_in
        self.ref[j] = (h, out, step)

    def forecast(self, call, path) -> bool:
        levels = call.run.features.get(path, [])
        return len(levels) > 1 and call.step - levels[0]["step"] <= self.FORECAST_STEPS

    def step_done(self, step: int, depth: int) -> None:
        if self.allowed[step]:
            self.saved += self.shares.get(depth, 0.0)


# ---------------------------------------------------------------------------------------------
# The holder
# ---------------------------------------------------------------------------------------------

@dataclass
class Recording:
    """A calibration run's records: (group, step) -> {chunk: strided output}, and the probes."""
    feats: dict = field(default_factory=dict)
    probes: dict = field(default_factory=dict)      # group -> [[step, output change, group output change]]
    probed: set = field(default_factory=set)        # steps probed


@dataclass
class AutoRun(hooks.Run):
    features: dict = field(default_factory=dict)   # boundary path -> stored levels (inheritance.save_feature)
    shapes: dict = field(default_factory=dict)     # skipped path -> (shape[1:], dtype)
    fillers: dict = field(default_factory=dict)    # (shape, dtype, device) -> what skipped paths return
    depths: dict = field(default_factory=dict)     # step -> the group it reuses (FULL: none)
    calls: list = field(default_factory=list)      # (step, depth) per UNet call
    flops: list = field(default_factory=list)      # (a full call's FLOPs, this call's) per UNet call
    ready: bool = False                            # the first call has chosen what this run does
    active: list = field(default_factory=list)     # the groups this run uses (candidate indices)
    stores: set = field(default_factory=set)       # the groups whose outputs computing calls store
    plan: list | None = None                       # depth per step, chosen from a profile
    forecast: list | None = None                   # per step: reuse with the forecast
    rule: RuntimeRule | None = None                # calibration "off"
    record: Recording | None = None                # a calibration run's records
    probe_steps: tuple = ()
    key: dict | None = None                        # the profile key
    sigmas: list | None = None
    predicted: float = 0.0                         # a planned run: predicted ratio
    shape: tuple | None = None
    share: dict = field(default_factory=dict)      # group -> share of a call's FLOPs in this run
    fallbacks: int = 0                             # calls that reused less than planned for lack of stored outputs
    note: str = ""                                 # why there was no profile to use


@dataclass
class AutoCall:
    run: AutoRun
    keys: tuple
    step: int
    depth: int              # the group this call reuses, FULL: none
    record: bool = False    # record the groups' outputs (a calibration run's first call of a step)
    probe: bool = False     # a calibration probe: reuse the output of the step before, store nothing
    decide: bool = False    # calibration "off": the depth is still to be decided at the groups' entries
    ruled: bool = False     # calibration "off": the step's deciding call (it tells the rule what refreshed)


class AutoCacheHolder(hooks.Holder):
    KEY = "asdm_auto_cache"
    RUN = AutoRun

    def __init__(self, base_model, groups: list[Group], speed: float, start: float, end: float,
                 calibration: str):
        super().__init__()
        self.base_model = base_model       # the model's BaseModel (its UNet, model_sampling)
        self.unet = base_model.diffusion_model
        self.groups = groups
        self.speed = speed
        self.window = (start, end)
        self.calibration = calibration
        self.plan_override = None          # (plan, forecast): a fixed plan (tests, measurements)
        self.roles: dict[str, dict[int, str]] = {}
        self.entries: dict[str, list[int]] = {}
        for j, g in enumerate(groups):
            for p in g.skipped:
                self.roles.setdefault(p, {})[j] = "skipped"
            for p in g.boundary:
                self.roles.setdefault(p, {})[j] = "boundary"
            self.entries.setdefault(g.entry, []).insert(0, j)   # outermost first
        self.layout = layout_digest(groups)
        self._shares: dict = {}            # input shape -> (FLOPs per sample of a full call, shares)
        self._plans: dict = {}             # (profile key, window steps) -> (plan, forecast, error)

    # -- one UNet call ------------------------------------------------------------------------
    def begin_call(self, run: AutoRun | None, x: torch.Tensor, keys: tuple) -> AutoCall | None:
        if run is None:
            return None
        sig = (tuple(x.shape[1:]), x.dtype, x.device)
        if run.shape != sig:   # a run's first call, or a new size: start over from a full call
            if run.shape is not None:
                log.warning("A-SDM Auto Cache: the latent changed from %s to %s within one run; "
                            "starting over from a full step", run.shape[0], sig[0])
            run.features.clear()
            run.shapes.clear()
            run.fillers.clear()
            run.ready, run.plan, run.rule, run.record = False, None, None, None
            run.shape = sig
        step = run.step
        if not run.ready:
            # The run's first call computes fully; what it records and stores serves a
            # calibration if _setup finds no profile to use
            run.stores = set(range(len(self.groups)))
            run.record = Recording()
            return AutoCall(run, keys, step, FULL, record=True)
        depth = run.depths.get(step)
        decide = False
        if depth is None:
            if run.plan is not None:
                depth = run.plan[step] if step < len(run.plan) else FULL
            elif run.rule is not None and step > 0:
                depth = run.rule.decide(step)
                decide = depth is None
                depth = FULL if decide else depth
            else:
                depth = FULL
        depth = self._available(run, depth, keys, x.shape[0])
        record = run.record is not None and bool(run.active) and \
            not all(k in run.record.feats.get((run.active[-1], step), {}) for k in keys)
        return AutoCall(run, keys, step, depth, record=record, decide=decide, ruled=decide)

    def _available(self, run: AutoRun, depth: int, keys: tuple, batch: int, level: int = 0) -> int:
        """The largest group at or inside ``depth`` that this call can reuse (its skipped atoms'
        shapes known, its output stored for every chunk of the call); FULL if none."""
        wanted = depth
        while depth >= 0 and not (depth in run.stores and self._can_reuse(run, depth, keys, batch, level)):
            depth -= 1
        if depth != wanted:
            run.fallbacks += 1
        return max(depth, FULL)

    def _can_reuse(self, run, j, keys, batch, level=0) -> bool:
        g = self.groups[j]
        ctx = AutoCall(run, keys, run.step, j)
        return all(p in run.shapes for p in g.skipped) and \
            all(reuse_feature(ctx, p, batch, False, level=level) is not None for p in g.boundary)

    def run_call(self, call, x, t, c):
        state = self.call
        if state is None:
            return call.next(x, t, c)
        run = state.run
        first = not run.ready
        if first:
            key = tuple(x.shape[1:])
            if key not in self._shares:
                with costs.counting(self.unet) as counted:
                    out = call.next(x, t, c)
                self._shares[key] = (sum(counted.values()) / x.shape[0], group_shares(dict(counted), self.groups))
            else:
                out = call.next(x, t, c)
            self._setup(run, x, state)
            kept = {p for j in run.stores for p in self.groups[j].boundary}
            for p in [p for p in run.features if p not in kept]:
                del run.features[p]
        else:
            out = call.next(x, t, c)
        per_sample, shares = self._shares[tuple(x.shape[1:])]
        full = per_sample * x.shape[0]
        run.flops.append((full, full * (1 - (shares[state.depth] if state.depth >= 0 else 0))))
        run.calls.append((state.step, state.depth))
        if state.step not in run.depths:
            run.depths[state.step] = state.depth
            if run.rule is not None and state.step > 0:
                run.rule.step_done(state.step, state.depth)
        if run.record is not None and state.step in run.probe_steps and state.step not in run.record.probed \
                and state.depth == FULL:
            run.record.probed.add(state.step)
            self._probe(run, state, x, t, c, out)
        return out

    # -- what a run does -------------------------------------------------------------------------
    def _setup(self, run: AutoRun, x: torch.Tensor, state: AutoCall) -> None:
        """After the run's first (full) call: which groups, and a plan, a calibration or the rule."""
        run.ready = True
        _, shares = self._shares[tuple(x.shape[1:])]
        run.active = select(shares)
        run.share = {j: shares[j] for j in run.active}
        record, run.record = run.record, None   # kept only by a calibration run
        if self.plan_override is not None:
            run.plan, run.forecast = [list(v) for v in self.plan_override]
            run.stores = {d for d in run.plan if d >= 0}
            return
        total, sigmas = run.total, run.schedule
        if total is None or sigmas is None or len(sigmas) != total + 1:
            log.warning("A-SDM Auto Cache: this sampler's schedule could not be read; computing every step fully")
            run.stores = set()
            return
        run.sigmas = sigmas
        allowed = self._window(sigmas)
        if self.calibration == "off":
            run.rule = RuntimeRule(run.share, self.speed, allowed)
            run.stores = set(run.rule.shares)
            return
        run.key = {"version": PROFILE_VERSION, "weights": weights_digest(self.unet, run.patcher),
                   "layout": self.layout, "groups": [self.groups[j].name for j in run.active], "sampler": run.sampler,
                   "sigmas": sigmas_digest(sigmas), "steps": total,
                   "size": resolution_bucket(x.shape[2], x.shape[3])}
        profile, why = load_profile(run.key)
        if profile is not None:
            self._plan_from(run, profile, allowed)
            return
        if why != "no profile stored yet":
            log.warning("A-SDM Auto Cache: %s; this run recalibrates it", why)
        run.note = why
        run.record = record
        run.stores = set(run.active)
        run.probe_steps = tuple(sorted({min(total - 1, max(1, round(f * (total - 1)))) for f in PROBE_FRACTIONS}))

    def _window(self, sigmas: list[float]) -> list[bool]:
        """Steps where reuse may happen: sigma within start_percent's and end_percent's (ComfyUI's
        convention, as its caches read them); never step 0, which stores what later steps reuse."""
        ms = self.base_model.model_sampling
        hi, lo = (float(ms.percent_to_sigma(p)) for p in self.window)
        return [s > 0 and lo < sigmas[s] <= hi for s in range(len(sigmas) - 1)]

    def _plan_from(self, run: AutoRun, profile: Profile, allowed: list[bool]) -> None:
        cand = {g.name: j for j, g in enumerate(self.groups)}
        idx = [cand[n] for n in profile.groups]
        shares = [run.share.get(j, 0.0) for j in idx]
        digest = hashlib.sha1(json.dumps(profile.to_json()).encode()).hexdigest()
        key = (digest, tuple(allowed), self.speed, tuple(round(s, 4) for s in shares))
        if key not in self._plans:
            pred = Predictor(profile)
            plan = choose_plan(pred, shares, self.speed, allowed)
            err, forecast = pred.error(plan)
            self._plans[key] = (plan, forecast, err)
        plan, forecast, _ = self._plans[key]
        run.plan = [idx[d] if d >= 0 else FULL for d in plan]
        run.forecast = forecast
        run.stores = {idx[d] for d in plan if d >= 0}
        n = len(plan)
        run.predicted = n / sum(1 - (shares[d] if d >= 0 else 0) for d in plan)

    def _probe(self, run: AutoRun, state: AutoCall, x, t, c, out) -> None:
        """Calibration: per group, one bare UNet call that reuses the group's output of the step
        before; how much the UNet's output changes per unit of the group's output change."""
        rec = run.record
        for j in run.active:
            if not self._can_reuse(run, j, state.keys, x.shape[0], level=1):
                continue
            g = self.groups[j]
            levels = run.features[g.boundary[0]]
            prev = levels[1]["step"]
            now = rec.feats.get((j, state.step), {})
            before = rec.feats.get((j, prev), {})
            if not all(k in now and k in before for k in state.keys):
                continue
            fd = float(torch.cat([now[k] - before[k] for k in state.keys]).norm())
            probe = AutoCall(run, state.keys, state.step, j, probe=True)
            outer, self.call = self.call, probe
            try:
                with torch.no_grad():
                    po = compat.bare_unet_call(self.base_model, x, t, c)
            finally:
                self.call = outer
            od = float((po.detach().float() - out.detach().float()).norm())
            rec.probes.setdefault(j, []).append([state.step, od, fd])

    def finish_run(self, run: AutoRun) -> None:
        run.features.clear()
        run.shapes.clear()
        run.fillers.clear()
        if not run.calls:
            return
        steps = sorted(run.depths)
        ratio = sum(f for f, _ in run.flops) / max(sum(a for _, a in run.flops), 1e-9)
        refreshed = ", ".join(f"{self.groups[j].name} {sum(run.depths[s] < j for s in steps)}/{len(steps)}"
                              for j in reversed(run.active)) or "none"
        fallbacks = f"; {run.fallbacks} calls reused less than planned for lack of stored outputs" if run.fallbacks else ""
        if run.record is not None and run.key is not None:
            path = self._save_calibration(run, steps)
            if path:
                log.info("A-SDM Auto Cache: calibration run (%s): computed every step fully and wrote the "
                         "profile %s; runs with this model, sampler, schedule and size now reach %.2fx", 
                         run.note, path, self.speed)
            else:
                log.info("A-SDM Auto Cache: calibration run ended before its last step; no profile written")
        elif run.plan is not None:
            n_fc = sum(1 for s in steps if run.forecast and run.forecast[s] and run.depths[s] >= 0)
            log.info("A-SDM Auto Cache: FLOP ratio %.2fx (target %.2fx) from its profile; steps refreshed "
                     "per group: %s; %d reusing steps forecast%s", ratio, self.speed, refreshed, n_fc, fallbacks)
        elif run.rule is not None:
            log.info("A-SDM Auto Cache (run-time rule): FLOP ratio %.2fx (target %.2fx); steps refreshed "
                     "per group: %s%s", ratio, self.speed, refreshed, fallbacks)
        run.record = None

    def _save_calibration(self, run: AutoRun, steps: list[int]) -> str | None:
        rec = run.record
        if run.total is None or steps != list(range(steps[0], steps[-1] + 1)) or steps[-1] != run.total - 1:
            return None   # the run did not reach its end (an error or an interruption)
        keys = None
        grams = []
        for j in run.active:
            rows = [rec.feats.get((j, s), {}) for s in steps]
            if keys is None:
                keys = [k for k in rows[0] if all(k in r for r in rows)]
            if not keys:
                return None
            grams.append(_gram([torch.cat([r[k] for k in keys]) for r in rows]))
        profile = Profile(groups=[self.groups[j].name for j in run.active], schedule=run.sigmas, steps=steps,
                          grams=grams, probes=[rec.probes.get(j, []) for j in run.active])
        try:
            return save_profile(run.key, profile)
        except OSError as e:
            log.warning("A-SDM Auto Cache: could not write the profile to %s (%s); the next run calibrates again",
                        profile_folder(), e)
            return None

    # -- the atoms -------------------------------------------------------------------------------
    def atom_forward(self, path: str, inner):
        """The forward that replaces an atom's (object patch); ``inner`` is the one it replaces."""
        holder = self
        roles = self.roles[path]
        entering = self.entries.get(path, [])

        def forward(x, *args, **kwargs):
            call = holder.call
            if call is None:
                return inner(x, *args, **kwargs)
            if call.decide and entering:
                holder._decide(call, entering, x)
            role = roles.get(call.depth)
            if role == "skipped":
                shape, dtype = call.run.shapes[path]
                # Read only by other skipped atoms (and ComfyUI's skip list and in-place
                # ControlNet adds between them): one zero tensor per shape serves them all.
                key = ((x.shape[0],) + shape, dtype, x.device)
                filler = call.run.fillers.get(key)
                if filler is None:
                    filler = call.run.fillers[key] = x.new_zeros(key[0], dtype=dtype)
                return filler
            if role == "boundary":
                if call.probe:
                    return reuse_feature(call, path, x.shape[0], False, copy=True, level=1)
                run = call.run
                if run.forecast and call.step < len(run.forecast):
                    fc = bool(run.forecast[call.step])
                else:
                    fc = run.rule is not None and run.rule.forecast(call, path)
                return reuse_feature(call, path, x.shape[0], fc, copy=True)
            out = inner(x, *args, **kwargs)
            if call.probe:
                return out
            run = call.run
            for j, r in roles.items():
                if r == "skipped":
                    run.shapes[path] = (tuple(out.shape[1:]), out.dtype)
                elif j in run.stores:
                    # ComfyUI adds ControlNet in place to what we return: store a copy
                    save_feature(call, path, out.clone(), keep=2)
                    if call.record:
                        rec = run.record.feats.setdefault((j, call.step), {})
                        for k, v in zip(call.keys, strided(out, len(call.keys))):
                            rec.setdefault(k, v)
                    if call.ruled:
                        run.rule.refreshed(j, strided(out, len(call.keys))[0])
            return out

        return forward

    def _decide(self, call: AutoCall, groups: list[int], x: torch.Tensor) -> None:
        """calibration "off", at the entry of ``groups`` (outermost first) in a step's deciding
        call: reuse one of them, or let them compute."""
        run = call.run
        for j in groups:
            if j not in run.rule.shares or call.depth != FULL:
                continue
            h = strided(x, len(call.keys))[0]
            if run.rule.reuse(j, h, call.step) and self._can_reuse(run, j, call.keys, x.shape[0]):
                call.depth = j
                call.decide = False
                return


def apply_auto_cache(model, speed: float, start_percent: float = 0.0, end_percent: float = 1.0,
                     calibration: str = "auto"):
    """A clone of ``model`` (a ComfyUI ModelPatcher) with Auto Cache; ``model`` itself at
    speed 1 (nothing to save)."""
    if not isinstance(speed, (int, float)) or not math.isfinite(speed) or speed < 1:
        raise AutoCacheError(f"must be 1.0 or more (got {speed!r}); it is the UNet's FLOPs with full compute "
                             "over its FLOPs with the cache (1.0 = unchanged)", input="speed")
    if calibration not in CALIBRATION:
        raise AutoCacheError(f"must be one of {', '.join(CALIBRATION)} (got {calibration!r})", input="calibration")
    for name, v in (("start_percent", start_percent), ("end_percent", end_percent)):
        if not 0 <= v <= 1:
            raise AutoCacheError(f"must lie within 0-1 (got {v!r}): a fraction of the sampling run", input=name)
    if end_percent <= start_percent:
        raise AutoCacheError(f"end_percent ({end_percent}) must be above start_percent ({start_percent}): reuse "
                             "may happen only between them", input="end_percent")
    refuse_switch(model, "A-SDM Auto Cache")
    unet = getattr(model.model, "diffusion_model", None)
    if unet is None:
        raise AutoCacheError("this MODEL has no diffusion_model; connect an SD1.x/SD2.x/SDXL-family MODEL", input="model")
    groups = unit_groups(unet)
    if speed == 1 or not groups:
        return model
    holder = AutoCacheHolder(model.model, groups, float(speed), start_percent, end_percent, calibration)
    return patch_model(model, holder)


def patch_model(model, holder: AutoCacheHolder):
    """A clone of ``model`` with ``holder``'s atom forwards (object patches) and hooks."""
    m = model.clone()
    for path in holder.roles:
        key = f"diffusion_model.{path}.forward"
        m.add_object_patch(key, holder.atom_forward(path, m.get_model_object(key)))
    hooks.attach(m, holder)
    return m
