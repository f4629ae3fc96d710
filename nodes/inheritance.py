"""Node: A-SDM Feature Inheritance (tuning-free, A-SDM §V)."""
from ..asdm.inheritance import DEFAULTS, FEATURES_ON, REUSE, apply_inheritance
from ..asdm.topology import PRESETS
from .common import mappings, node_errors


class FeatureInheritance:
    NODE_ID = "ASDMFeatureInheritance"
    TITLE = "A-SDM Feature Inheritance"
    CATEGORY = "A-SDM/acceleration"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The MODEL with feature inheritance; connect it to any sampler.",)
    FUNCTION = "patch"
    DESCRIPTION = (
        "Speeds up sampling without training (A-SDM §V): on a full step the chosen units store "
        "their residual-branch output; on the following inheriting steps they compute only their "
        "identity path and reuse it. Pn = one full step then n-1 inheriting steps; with "
        "final_full_steps the last part of the schedule is all full (Pn†). The defaults (EX3 P3, "
        "span-output reuse with forecast) do the work of DeepCache at depth 2, interval 3. "
        "Periods count the steps the sampler samples (with KSamplerAdvanced's start_at_step, from that step), "
        "so multi-call samplers (heun, dpm_2, uni_pc) and CFG keep the pattern. Stacks with LoRA, "
        "FreeU, ToMe and the other A-SDM nodes.")

    @classmethod
    def INPUT_TYPES(cls):
        presets = list(PRESETS) + ["custom"]
        preset_help = "; ".join(f"{k}: {v[1]}" for k, v in PRESETS.items())
        return {"required": {
            "model": ("MODEL", {"tooltip": "An SD1.x/SD2.x-family MODEL (SD, BK-SDM, assembled UNets)."}),
            "preset": (presets, {"default": DEFAULTS["preset"], "tooltip":
                "Which units inherit on inheriting steps (paper Fig. 10). 'custom' uses only the "
                "units field. " + preset_help}),
            "units": ("STRING", {"default": "", "multiline": False, "tooltip":
                "Extra units to inherit, added to the preset (with preset = custom: the whole set). "
                "Comma-separated names: a block ('dn0', 'mid', 'up3'), a layer ('dn1.1'), or a unit "
                "('up3.0.R', 'mid.A'); '*' is a wildcard ('up3.*.A', 'dn*.*.R'). dn0 and up3 are the "
                "highest resolution; R = ResNet unit, A = attention unit."}),
            "period": ("INT", {"default": DEFAULTS["period"], "min": 1, "max": 1000, "tooltip":
                "n of Pn: one full step, then n-1 inheriting steps, repeating. 1 = every step full "
                "(the MODEL is unchanged)."}),
            "final_full_steps": ("FLOAT", {"default": DEFAULTS["final_full_steps"], "min": 0.0, "max": 10000.0, "step": 0.05, "tooltip":
                "Pn†: the last part of the schedule is all full steps. Below 1: a fraction of the "
                "sampler's steps (0.2 = the last 20 %, the paper's 10 of 50; 4 of a 20-step run). "
                "1 or more: a number of steps (graphs saved with the older integer setting keep "
                "their meaning). 0 = plain Pn."}),
        }, "optional": {
            # Optional so that graphs saved before these inputs existed keep their meaning
            # (residual reuse, no forecast).
            "reuse": (list(REUSE), {"default": DEFAULTS["reuse"], "tooltip":
                "What inheriting steps reuse. residual (the paper's): each unit adds its stored "
                "residual to its current input, so the current latent still flows through every "
                "unit. output (span-output reuse, as DeepCache): the units are not run at all; "
                "the outputs leaving the chosen set (into the first computed block after it and "
                "across skip connections) are stored and reused whole. On a contiguous set such "
                "as EX3 that is one tensor, the deep part's output; on scattered units (LI "
                "presets) each unit's output."}),
            "forecast": ("BOOLEAN", {"default": DEFAULTS["forecast"], "tooltip":
                "Inheriting steps use a first-order forecast from the last two full steps "
                "(F1 + (F1 - F2) x steps since F1 / steps between them) instead of the last "
                "stored feature; until two full steps are stored, the last one. Costs one more "
                "stored tensor per stored feature."}),
            "features_on": (list(FEATURES_ON), {"default": "compute", "advanced": True, "tooltip":
                "Where stored features are kept between steps. compute: on the GPU that runs the "
                "UNet (fastest). offload: in system memory, moved back to the GPU on each "
                "inheriting step: the same result for less VRAM, at the cost of the copies. The "
                "log line of each run says how much they held at most."}),
        }}

    @node_errors
    def patch(self, model, preset, units, period, final_full_steps, reuse="residual", forecast=False,
              features_on="compute"):
        return (apply_inheritance(model, preset, units, period, final_full_steps, reuse, bool(forecast),
                                  features_on),)


NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = mappings(FeatureInheritance)
