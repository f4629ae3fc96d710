"""Nodes: A-SDM Feature Inheritance (tuning-free, A-SDM §V), and the deprecated node of the same
name that graphs saved before it keep using."""
from comfy_api.v0_0_2 import io   # ComfyUI's V3 node API, pinned: the host loads the node modules

from ..asdm.errors import InheritanceError
from ..asdm.inheritance import DEFAULTS, FEATURES_ON, REUSE, apply_inheritance
from ..asdm.topology import PRESETS
from .common import advanced, node_errors

# What a user searches for when looking for a step cache (newer front ends search a node's
# SEARCH_ALIASES; the pinned API's Schema has no field for them, so they stay a class attribute).
SEARCH_ALIASES = ["cache", "deepcache", "feature cache", "step cache", "speed up", "faster",
                  "accelerate", "feature reuse", "a-sdm"]


def _preset(default):
    presets = list(PRESETS) + ["custom"]
    preset_help = "; ".join(f"{k}: {v[1]}" for k, v in PRESETS.items())
    return io.Combo.Input("preset", options=presets, default=default, tooltip=
        "Which units inherit on inheriting steps (paper Fig. 10), by level role, so each preset "
        "means the analogous parts on every layout (level pair k = the k-th down block and its "
        "mirrored up block, k = 0 the highest resolution). A preset that would inherit nothing, "
        "everything, or replay the stored output on this layout is refused with the nearest one "
        "that fits. 'custom' uses only the units field. " + preset_help)


def _units():
    return io.String.Input("units", default="", multiline=False, tooltip=
        "Extra units to inherit, added to the preset (with preset = custom: the whole set). "
        "Comma-separated names: a block ('dn0', 'mid', 'up3'), a layer ('dn1.1'), or a unit "
        "('up3.0.R', 'mid.A'); '*' is a wildcard ('up3.*.A', 'dn*.*.R'). dn0 and the last up "
        "block (up3 on SD1.x/2.x, up2 on the SDXL family) are the highest resolution; R = ResNet "
        "unit, A = attention unit.")


def _period():
    return io.Int.Input("period", default=DEFAULTS["period"], min=1, max=1000, tooltip=
        "n of Pn: one full step, then n-1 inheriting steps, repeating. 1 = every step full "
        "(the MODEL is unchanged).")


def _reuse(default, optional=False):
    return io.Combo.Input("reuse", options=list(REUSE), default=default, optional=optional, tooltip=
        "What inheriting steps reuse. residual (the paper's): each unit adds its stored "
        "residual to its current input, so the current latent still flows through every "
        "unit. output (span-output reuse, as DeepCache): the units are not run at all; "
        "the outputs leaving the chosen set (into the first computed block after it and "
        "across skip connections) are stored and reused whole. On a contiguous set such "
        "as EX3 that is one tensor, the deep part's output; on scattered units (LI "
        "presets) each unit's output.")


def _forecast(default, optional=False):
    return io.Boolean.Input("forecast", default=default, optional=optional, tooltip=
        "Inheriting steps use a first-order forecast from the last two full steps "
        "(F1 + (F1 - F2) x steps since F1 / steps between them) instead of the last "
        "stored feature; until two full steps are stored, the last one. Costs one more "
        "stored tensor per stored feature.")


def _model():
    return io.Model.Input("model", tooltip="An SD-style UNet MODEL: SD1.x/2.x, BK-SDM, assembled UNets, SDXL "
                                           "and its students (SSD-1B, Vega, KOALA).")


def _features_on():
    return advanced(io.Combo.Input("features_on", options=list(FEATURES_ON), default="compute", optional=True, tooltip=
        "Where stored features are kept between steps. compute: on the device that runs the "
        "UNet (fastest). offload: in system memory, moved back on each inheriting step: the same "
        "result for less VRAM, at the cost of the copies. Each run's log line says how much they "
        "held at most."))


def _output():
    return io.Model.Output(display_name="model", tooltip="The MODEL with feature inheritance; connect it to any sampler.")


class FeatureInheritance(io.ComfyNode):
    NODE_ID = "ASDMFeatureInheritance2"
    TITLE = "A-SDM Feature Inheritance"
    SEARCH_ALIASES = SEARCH_ALIASES

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=cls.NODE_ID,
            display_name=cls.TITLE,
            category="A-SDM/acceleration",
            description=(
                "Speeds up sampling without training (A-SDM §V), a step cache like DeepCache: on a full "
                "step the chosen units store what they computed; on the following inheriting steps they "
                "reuse it instead of computing it. Pn = one full step then n-1 inheriting steps; "
                "final_full_fraction makes the last part of the schedule all full (Pn†). The defaults "
                "(EX3 P3, span-output reuse with forecast) do the work of DeepCache at depth 2, "
                "interval 3. Periods count the steps the sampler samples "
                "(with KSamplerAdvanced's start_at_step, from that step), so multi-call samplers (heun, "
                "dpm_2, uni_pc) and CFG keep the pattern. Stacks with LoRA, FreeU, ToMe and the other "
                "A-SDM nodes."),
            inputs=[
                _model(),
                _preset(DEFAULTS["preset"]),
                _period(),
                advanced(_units()),
                advanced(_reuse(DEFAULTS["reuse"])),
                advanced(_forecast(DEFAULTS["forecast"])),
                advanced(io.Float.Input("final_full_fraction", default=DEFAULTS["final_full_steps"], min=0.0,
                                        max=1.0, step=0.05, tooltip=
                    "Pn†: the last part of the schedule is all full steps, as a fraction of the "
                    "sampler's steps (0.2 = the last 20 %, the paper's 10 of 50; 4 of a 20-step run). "
                    "0 = plain Pn; 1 = every step full.")),
                _features_on(),
            ],
            outputs=[_output()],
        )

    @classmethod
    @node_errors
    def execute(cls, model, preset, period, units, reuse, forecast, final_full_fraction, features_on="compute"):
        if not 0.0 <= final_full_fraction <= 1.0:
            raise InheritanceError(f"must be a fraction from 0 to 1 (got {final_full_fraction!r}); "
                                   "0.2 = the last 20 % of the steps are full", input="final_full_fraction")
        if final_full_fraction >= 1.0:
            # The engine reads a tail of 1 or more as a count of steps; all steps full is period 1.
            period, final_full_fraction = 1, 0.0
        return io.NodeOutput(apply_inheritance(model, preset, units, period, float(final_full_fraction), reuse,
                                               bool(forecast), features_on=features_on))


class FeatureInheritanceV1(io.ComfyNode):
    """The node as graphs saved before ASDMFeatureInheritance2 know it. Its inputs and their order
    stay as they were (a UI-format graph stores widget values by position), and its optional
    inputs default to what graphs saved before them meant: residual reuse, no forecast."""
    NODE_ID = "ASDMFeatureInheritance"
    TITLE = "A-SDM Feature Inheritance (deprecated)"
    SEARCH_ALIASES = SEARCH_ALIASES

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=cls.NODE_ID,
            display_name=cls.TITLE,
            category="A-SDM/acceleration",
            is_deprecated=True,
            description=(
                "Deprecated: replaced by A-SDM Feature Inheritance (ASDMFeatureInheritance2), which has "
                "the current defaults and takes final_full_fraction as a fraction only. This node stays so "
                "that saved graphs keep their settings: a graph saved before reuse and forecast existed "
                "runs with residual reuse and no forecast, as it did then. Feature inheritance (A-SDM §V): "
                "on a full step the chosen units store their residual-branch output; on the following "
                "inheriting steps they compute only their identity path and reuse it. Pn = one full step "
                "then n-1 inheriting steps; with final_full_steps the last part of the schedule is all "
                "full (Pn†)."),
            inputs=[
                _model(),
                _preset(DEFAULTS["preset"]),
                _units(),
                _period(),
                io.Float.Input("final_full_steps", default=DEFAULTS["final_full_steps"], min=0.0, max=10000.0,
                               step=0.05, tooltip=
                    "Pn†: the last part of the schedule is all full steps. Below 1: a fraction of the "
                    "sampler's steps (0.2 = the last 20 %, the paper's 10 of 50; 4 of a 20-step run). "
                    "1 or more: a number of steps (graphs saved with the older integer setting keep "
                    "their meaning). 0 = plain Pn."),
                # Optional, defaulting to what graphs saved before these inputs existed meant (residual
                # reuse, no forecast): the front end fills widgets missing from a saved graph with
                # these defaults.
                _reuse("residual", optional=True),
                _forecast(False, optional=True),
                _features_on(),
            ],
            outputs=[_output()],
        )

    @classmethod
    @node_errors
    def execute(cls, model, preset, units, period, final_full_steps, reuse="residual", forecast=False,
                features_on="compute"):
        return io.NodeOutput(apply_inheritance(model, preset, units, period, final_full_steps, reuse,
                                               bool(forecast), features_on=features_on))


NODES = [FeatureInheritance, FeatureInheritanceV1]
