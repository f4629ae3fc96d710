"""Node: A-SDM Auto Cache (one knob: a target speed-up; what to reuse and when, calibrated on the
user's own model)."""
from comfy_api.v0_0_2 import io   # ComfyUI's V3 node API, pinned: the host loads the node modules

from ..asdm.autocache import CALIBRATION, apply_auto_cache
from .common import node_errors


class AutoCache(io.ComfyNode):
    NODE_ID = "ASDMAutoCache"
    TITLE = "A-SDM Auto Cache"
    # words users search for (newer front ends search a node's SEARCH_ALIASES; the pinned API's
    # Schema has no field for them, so they stay a class attribute, as before)
    SEARCH_ALIASES = ["cache", "auto cache", "deepcache", "easycache", "teacache", "block cache",
                      "speed up", "faster", "accelerate"]

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=cls.NODE_ID,
            display_name=cls.TITLE,
            category="A-SDM/acceleration",
            description=(
                "Speeds up sampling by a target factor with one knob. Nested spans of the UNet (the middle "
                "block, then the up path one layer further at a time, with the down blocks they read) "
                "reuse their output from an earlier step, each on its own steps: deep spans stay stale "
                "for long stretches while shallow layers refresh around them. With calibration 'auto' "
                "the first run with this model, sampler, schedule and size computes fully (its image is "
                "full compute's) and profiles how each span's output changes from step to step and what "
                "that does to the UNet's output; the profile is saved in ComfyUI's user folder "
                "(asdm/autocache) and every later run picks the schedule that meets the target at the "
                "least predicted error. 'off' decides during the run instead, from how much each span's "
                "input changed. The log says per run the FLOP ratio reached and the steps each span "
                "refreshed. Works on SD1.x/2.x, BK-SDM and assembled UNets and the SDXL family; stacks "
                "with LoRA, ControlNet, the A-SDM switch and GRI, and ComfyUI's caches."),
            inputs=[
                io.Model.Input("model", tooltip="An SD1.x/SD2.x or SDXL-family MODEL (SD, BK-SDM, assembled UNets)."),
                io.Float.Input("speed", default=2.0, min=1.0, max=10.0, step=0.05, tooltip=
                    "Target UNet speed-up, as a FLOP ratio: the UNet's FLOPs with full compute over its FLOPs "
                    "with the cache, over the whole run. 1.0 = the MODEL unchanged. Wall time follows FLOPs at "
                    "SD's usual sizes on a GPU; small latents gain more time than FLOPs."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01, tooltip=
                    "Reuse may start at this point of the sampling run (ComfyUI's percent of the schedule, as its "
                    "own caches read it); earlier steps compute fully."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01, tooltip=
                    "Reuse may happen up to this point of the sampling run; later steps compute fully."),
                io.Combo.Input("calibration", options=list(CALIBRATION), default="auto", tooltip=
                    "auto: the first run with a new model, sampler, schedule or size computes fully and "
                    "profiles the model (a little slower than a plain run); later runs use the profile. off: no "
                    "profile; each span refreshes when its input changed enough since its last refresh, with "
                    "the threshold steered to meet the target during the run."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The MODEL with Auto Cache; connect it to any sampler.")],
        )

    @classmethod
    @node_errors
    def execute(cls, model, speed, start_percent, end_percent, calibration):
        return io.NodeOutput(apply_auto_cache(model, speed, start_percent, end_percent, calibration))


NODES = [AutoCache]
