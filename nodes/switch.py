"""Node: A-SDM UNet Switch (multi-UNet switching, A-SDM §IV-C)."""
from comfy_api.v0_0_2 import io   # ComfyUI's V3 node API, pinned: the host loads the node modules

from ..asdm.switch import TO_END, Range, make_switch
from .common import node_errors

_MAX = 4


def _range(i, start, end, optional=False):
    note = f" Used only when model_{i} is connected." if optional else ""
    # The front end shows as many decimals as the step has and rounds typed values to
    # "round": fractions (0.4) must show and stay; whole steps are typed as 10.
    return [
        io.Float.Input(f"start_{i}", default=start, min=0.0, max=10000.0, step=0.05, round=0.01,
                       optional=optional, tooltip=f"First step (or fraction) computed by model_{i}.{note}"),
        io.Float.Input(f"end_{i}", default=end, min=-1.0, max=10000.0, step=0.05, round=0.01,
                       optional=optional, tooltip=
            f"Step (or fraction) where model_{i}'s range ends, exclusive; -1 = until the end.{note}"),
    ]


class UNetSwitch(io.ComfyNode):
    NODE_ID = "ASDMUNetSwitch"
    TITLE = "A-SDM UNet Switch"
    # words users search for (newer front ends search a node's SEARCH_ALIASES; the pinned API's
    # Schema has no field for them, so they stay a class attribute, as before)
    SEARCH_ALIASES = ["switch", "unet switch", "model switch", "multi-unet", "switch model by step",
                      "bk-sdm", "speed up", "faster", "accelerate", "a-sdm"]

    @classmethod
    def define_schema(cls):
        inputs = [
            io.Combo.Input("unit", options=["steps", "fraction"], default="steps", tooltip=
                "steps: ranges in sampler steps (0-based); fraction: ranges as fractions of the "
                "schedule, 0 to 1 (0.4 of 25 steps = step 10)."),
            io.Model.Input("model_1", tooltip="The model of the first range (paper S1: BK-SDM Base)."),
            *_range(1, 0.0, 10.0),
            io.Model.Input("model_2", tooltip="The model of the second range (paper S1: SD)."),
            *_range(2, 10.0, float(TO_END)),
        ]
        for i in range(3, _MAX + 1):
            inputs.append(io.Model.Input(f"model_{i}", optional=True, tooltip=f"Optional model of range {i}."))
            inputs += _range(i, 0.0, float(TO_END), optional=True)
        return io.Schema(
            node_id=cls.NODE_ID,
            display_name=cls.TITLE,
            category="A-SDM/acceleration",
            description=(
                "Multi-UNet switching (A-SDM §IV-C): a small UNet draws the rough image early, the full "
                "UNet polishes it late. The paper's S1: BK-SDM Base for the first 10 of 25 steps, SD for "
                "the last 15. Ranges are [start, end) in sampler steps or fractions of the schedule; they "
                "must start at 0 and touch; end -1 = until the end. Steps count the steps the sampler "
                "samples: with KSamplerAdvanced's start_at_step, step 0 is that step. Each model keeps its own LoRA and A-SDM "
                "patches within its range (patch them before this node). All models must share a family "
                "(SD1.x with BK-SDM v1, SD2.x with v2)."),
            inputs=inputs,
            outputs=[io.Model.Output(display_name="model", tooltip=
                "One MODEL for any sampler: each step is computed by the model whose range holds it.")],
        )

    @classmethod
    @node_errors
    def execute(cls, unit, **kw):
        models, ranges = [], []
        for i in range(1, _MAX + 1):
            m = kw.get(f"model_{i}")
            if m is None:
                continue
            models.append(m)
            ranges.append(Range(kw[f"start_{i}"], kw[f"end_{i}"]))
        return io.NodeOutput(make_switch(models, ranges, unit))


NODES = [UNetSwitch]
