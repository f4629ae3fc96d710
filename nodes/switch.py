"""Node: A-SDM UNet Switch (multi-UNet switching, A-SDM §IV-C)."""
from ..asdm.switch import TO_END, Range, make_switch
from .common import mappings, node_errors

_MAX = 4


class UNetSwitch:
    NODE_ID = "ASDMUNetSwitch"
    TITLE = "A-SDM UNet Switch"
    CATEGORY = "A-SDM/acceleration"
    SEARCH_ALIASES = ["switch", "unet switch", "model switch", "multi-unet", "switch model by step",
                      "bk-sdm", "speed up", "faster", "accelerate", "a-sdm"]
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("One MODEL for any sampler: each step is computed by the model whose range holds it.",)
    FUNCTION = "switch"
    DESCRIPTION = (
        "Multi-UNet switching (A-SDM §IV-C): a small UNet draws the rough image early, the full "
        "UNet polishes it late. The paper's S1: BK-SDM Base for the first 10 of 25 steps, SD for "
        "the last 15. Ranges are [start, end) in sampler steps or fractions of the schedule; they "
        "must start at 0 and touch; end -1 = until the end. Steps count the steps the sampler "
        "samples: with KSamplerAdvanced's start_at_step, step 0 is that step. Each model keeps its own LoRA and A-SDM "
        "patches within its range (patch them before this node). All models must share a family "
        "(SD1.x with BK-SDM v1, SD2.x with v2).")

    @classmethod
    def INPUT_TYPES(cls):
        def rng(i, start, end, optional=False):
            note = f" Used only when model_{i} is connected." if optional else ""
            # The front end shows as many decimals as the step has and rounds typed values to
            # "round": fractions (0.4) must show and stay; whole steps are typed as 10.
            return {
                f"start_{i}": ("FLOAT", {"default": start, "min": 0.0, "max": 10000.0, "step": 0.05,
                                         "round": 0.01, "tooltip":
                    f"First step (or fraction) computed by model_{i}.{note}"}),
                f"end_{i}": ("FLOAT", {"default": end, "min": -1.0, "max": 10000.0, "step": 0.05,
                                       "round": 0.01, "tooltip":
                    f"Step (or fraction) where model_{i}'s range ends, exclusive; -1 = until the end.{note}"}),
            }
        req = {"unit": (["steps", "fraction"], {"default": "steps", "tooltip":
                   "steps: ranges in sampler steps (0-based); fraction: ranges as fractions of the "
                   "schedule, 0 to 1 (0.4 of 25 steps = step 10)."}),
               "model_1": ("MODEL", {"tooltip": "The model of the first range (paper S1: BK-SDM Base)."})}
        req.update(rng(1, 0.0, 10.0))
        req["model_2"] = ("MODEL", {"tooltip": "The model of the second range (paper S1: SD)."})
        req.update(rng(2, 10.0, float(TO_END)))
        opt = {}
        for i in range(3, _MAX + 1):
            opt[f"model_{i}"] = ("MODEL", {"tooltip": f"Optional model of range {i}."})
            opt.update(rng(i, 0.0, float(TO_END), optional=True))
        return {"required": req, "optional": opt}

    @node_errors
    def switch(self, unit, **kw):
        models, ranges = [], []
        for i in range(1, _MAX + 1):
            m = kw.get(f"model_{i}")
            if m is None:
                continue
            models.append(m)
            ranges.append(Range(kw[f"start_{i}"], kw[f"end_{i}"]))
        return (make_switch(models, ranges, unit),)


NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = mappings(UNetSwitch)
