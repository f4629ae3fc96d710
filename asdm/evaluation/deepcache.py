"""DeepCache, the baseline the inheritance modes are measured against, written by the project from
the paper: X. Ma, G. Fang, X. Wang, "DeepCache: Accelerating Diffusion Models for Free", CVPR
2024 (arXiv:2312.00858), §3.2-3.3 with the uniform 1:N strategy.

On a full step (every ``interval``-th sampler step, from step 0) the whole UNet runs and the
features entering the up path at the skip junction of depth ``depth`` are cached; on the other
steps only the shallow branch runs (``input_blocks[0..depth]`` and
``output_blocks[N-1-depth..]``) and the cached features stand in for everything deeper.
``depth`` counts ComfyUI's input blocks as the ComfyUI ports of DeepCache do (depth 3 on SD1.5:
conv_in, dn0's two layers and its downsampler compute).

Not part of the pack: the main job registers its node (``register()``) in the process that
measures. It shares the sampling hooks with the pack (steps are sampler steps), nothing else.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .. import hooks

NODE = "ASDMBaselineDeepCache"


@dataclass
class CacheRun(hooks.Run):
    cached: dict = field(default_factory=dict)   # chunk keys -> features at the junction
    shapes: dict = field(default_factory=dict)   # skipped child path -> output shape[1:]
    fillers: dict = field(default_factory=dict)  # shape -> the zeros skipped children return
    calls: list = field(default_factory=list)    # (step, "full" | "cached")


@dataclass
class CacheCall:
    run: CacheRun
    keys: tuple
    cached: bool   # this call reuses the cached features (else it computes and caches them)


class DeepCache(hooks.Holder):
    KEY = "asdm_baseline_deepcache"
    RUN = CacheRun

    def __init__(self, depth: int, interval: int, n_blocks: int):
        super().__init__()
        self.depth, self.interval, self.n = depth, interval, n_blocks

    def finish_run(self, run):
        run.cached.clear()
        run.fillers.clear()

    def begin_call(self, run, x, keys):
        if run is None:
            return None
        cached = (run.step % self.interval != 0 and keys in run.cached
                  and run.cached[keys].shape[0] == x.shape[0])
        run.calls.append((run.step, "cached" if cached else "full"))
        return CacheCall(run, keys, cached)

    def skipped(self, path, inner):
        def forward(x, *args, **kwargs):
            call = self.call
            if call is None or not call.cached:
                out = inner(x, *args, **kwargs)
                if call is not None:
                    call.run.shapes[path] = out.shape[1:]
                return out
            shape = (x.shape[0],) + tuple(call.run.shapes[path])   # never read: one zero tensor per shape
            if shape not in call.run.fillers:
                call.run.fillers[shape] = x.new_zeros(shape)
            return call.run.fillers[shape]
        return forward

    def junction(self, inner):
        def forward(x, *args, **kwargs):
            call = self.call
            if call is not None and call.cached:
                return call.run.cached[call.keys].clone()
            out = inner(x, *args, **kwargs)
            if call is not None:
                call.run.cached[call.keys] = out.clone()
            return out
        return forward


def apply_deepcache(model, depth: int, interval: int):
    unet = model.model.diffusion_model
    n = len(unet.output_blocks)
    if not 0 <= depth < n - 1:
        raise ValueError(f"depth must be 0..{n - 2} for this UNet (got {depth})")
    m = model.clone()
    holder = DeepCache(depth, interval, n)
    deep = [f"input_blocks.{i}" for i in range(depth + 1, len(unet.input_blocks))]
    if unet.middle_block is not None:
        deep.append("middle_block")
    deep += [f"output_blocks.{j}" for j in range(n - 1 - depth)]
    children = [f"{seq}.{k}" for seq in deep for k in range(len(unet.get_submodule(seq)))]
    for path in children:
        key = f"diffusion_model.{path}.forward"
        inner = m.get_model_object(key)
        last = path == children[-1]   # the last child of output_blocks[N-2-depth]: the junction
        m.add_object_patch(key, holder.junction(inner) if last else holder.skipped(path, inner))
    hooks.attach(m, holder)
    return m


class DeepCacheNode:
    """MODEL in, MODEL out: DeepCache with uniform interval (the baseline)."""
    CATEGORY = "A-SDM harness"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "depth": ("INT", {"default": 3, "min": 0, "max": 12}),
                             "interval": ("INT", {"default": 5, "min": 1, "max": 1000})}}

    def patch(self, model, depth, interval):
        return (apply_deepcache(model, depth, interval),)


def register() -> None:
    import nodes   # late: the host's modules exist once it runs (compat.start_host)
    nodes.NODE_CLASS_MAPPINGS[NODE] = DeepCacheNode
