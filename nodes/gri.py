"""Node: A-SDM GRI Attention (global-regional interactive self-attention, A-SDM early version §1)."""
from comfy_api.v0_0_2 import io   # ComfyUI's V3 node API, pinned: the host loads the node modules

from ..asdm.gri import DEFAULT_POOL, DEFAULT_UNITS, DEFAULT_WINDOW, apply_gri
from .common import advanced, node_errors


class GRIAttention(io.ComfyNode):
    NODE_ID = "ASDMGRIAttention"
    TITLE = "A-SDM GRI Attention"
    # words users search for (newer front ends search a node's SEARCH_ALIASES; the pinned API's
    # Schema has no field for them, so they stay a class attribute, as before)
    SEARCH_ALIASES = ["attention", "windowed attention", "regional attention", "global attention",
                      "gri", "speed up", "faster", "accelerate", "a-sdm"]

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=cls.NODE_ID,
            display_name=cls.TITLE,
            category="A-SDM/acceleration",
            description=(
                "Speeds up the self-attention of the high-resolution attention units (A-SDM's GRI "
                "attention): each latent token attends, in one softmax, to the tokens of its own region "
                "(a window of the latent, full resolution) and to a global set pooled over the whole "
                "latent, instead of to every token. Regions shift every step so no seam stays. Cost per "
                "token: window^2 + tokens/pool^2 keys instead of all tokens (a 64x64 grid, window 16, "
                "pool 4: 512 instead of 4096). Without training it approximates full attention; a UNet "
                "distilled with GRI (the A-SDM trainer) matches it best. Cross-attention is unchanged; "
                "outside start-end the MODEL computes exactly as before. Stacks with LoRA, FreeU and the "
                "other A-SDM nodes (units whose tokens ToMe or HyperTile changed keep full attention)."),
            inputs=[
                io.Model.Input("model", tooltip="An SD-style UNet MODEL: SD1.x/2.x, BK-SDM, assembled UNets, SDXL and its students (SSD-1B, Vega, KOALA)."),
                advanced(io.String.Input("units", default=DEFAULT_UNITS, multiline=False, tooltip=
                    "Which attention units use GRI self-attention. auto (default): the highest-resolution "
                    "level that has attention units, where self-attention costs the most (dn0, up3 on "
                    "SD1.x/2.x; dn1, up1 on the SDXL family, which has none at level 0). Or comma-separated "
                    "names: a block ('dn0', 'up3'), a layer ('dn0.1') or an A unit ('up3.2.A'); '*' is a "
                    "wildcard ('up3.*.A'). Blocks and layers mean their attention (A) units. Empty = MODEL "
                    "unchanged.")),
                io.Int.Input("window", default=DEFAULT_WINDOW, min=1, max=512, tooltip=
                    "Largest region side, in tokens of the unit's grid (1/8 of the image at level 0, 1/16 "
                    "at level 1): 16 splits a 64x64 grid (SD1.x's level 0 at 512 px, SDXL's level 1 at "
                    "1024 px) into 16 regions. Sides that do not divide are split into equal regions (a "
                    "90-token side: 6 of 15). A window at least the grid's side is plain attention there."),
                io.Int.Input("pool", default=DEFAULT_POOL, min=1, max=64, tooltip=
                    "Global set: keys and values averaged over pool x pool tokens (4: a 64x64 grid gives "
                    "256 global tokens). Larger is faster and coarser; 1 = every token "
                    "(full attention, slower)."),
                advanced(io.Float.Input("start", default=0.0, min=0.0, max=1.0, step=0.01, tooltip=
                    "First part of the schedule that uses GRI, as a fraction of the sampler's steps "
                    "(0 = from the first step). Steps before it compute exactly as the MODEL did.")),
                advanced(io.Float.Input("end", default=1.0, min=0.0, max=1.0, step=0.01, tooltip=
                    "Where GRI stops, as a fraction of the sampler's steps (1 = to the last step; "
                    "0.5 = the first half). Steps from it on compute exactly as the MODEL did.")),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip=
                "The MODEL with GRI self-attention in the chosen units; connect it to any sampler.")],
        )

    @classmethod
    @node_errors
    def execute(cls, model, units, window, pool, start, end):
        return io.NodeOutput(apply_gri(model, units, window, pool, start, end))


NODES = [GRIAttention]
