"""UNet time of a sampling run, measured through ComfyUI's patching: the main job puts a timer
node between the last model node and the sampler. Not part of the pack: registered only in the
process that measures (``register()``)."""
from __future__ import annotations

import time
from collections import defaultdict

from .. import hooks
from ..evaluation.timing import sync

KEY = "asdm_harness_unet_timer"
NODE = "ASDMHarnessUNetTimer"
SECONDS: dict[str, float] = defaultdict(float)   # tag -> UNet seconds of the runs with that tag
CALLS: dict[str, int] = defaultdict(int)


class UNetTimer:
    """MODEL in, MODEL out: the same model, every UNet call timed into SECONDS[tag]. A new tag
    per run also keeps the executor from serving the sampler's output from its cache."""
    CATEGORY = "A-SDM harness"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "tag": ("STRING", {"default": ""})}}

    def patch(self, model, tag):
        m = model.clone()

        def timed_call(call, x, t, c):
            sync()
            t0 = time.perf_counter()
            out = call.next(x, t, c)
            sync()
            SECONDS[tag] += time.perf_counter() - t0
            CALLS[tag] += 1
            return out

        hooks.wrap_unet_calls(m, KEY, timed_call)
        return (m,)


def register() -> None:
    import nodes
    nodes.NODE_CLASS_MAPPINGS[NODE] = UNetTimer
