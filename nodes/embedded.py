"""Node: A-SDM Load Embedded Model (the pack's own small text-to-image model, weights/embedded)."""
import os

import folder_paths   # ComfyUI's: the host loads the node modules
from comfy_api.v0_0_2 import io   # ComfyUI's V3 node API, pinned: the host loads the node modules

from ..asdm import embedded
from .common import node_errors
from .condconv import FOLDER as CONDCONV_FOLDER, _register_folder


def register_family() -> None:
    """The embedded model's ME-CondConv experts appear in A-SDM ME-CondConv like a user's own
    files (models/asdm_condconv is the pack's own folder). Its UNets are listed by A-SDM Load
    Compressed UNet itself, not added to ComfyUI's UNet folder: the stock loaders list that folder
    and cannot read the family's derived files."""
    if os.path.isdir(embedded.FAMILY_EXPERTS):
        _register_folder()
        folder_paths.add_model_folder_path(CONDCONV_FOLDER, embedded.FAMILY_EXPERTS)


class LoadEmbeddedModel(io.ComfyNode):
    NODE_ID = "ASDMLoadEmbeddedModel"
    TITLE = "A-SDM Load Embedded Model"
    # words users search for (newer front ends search a node's SEARCH_ALIASES; the pinned API's
    # Schema has no field for them, so they stay a class attribute, as before)
    SEARCH_ALIASES = ["embedded model", "demo model", "tiny model", "load checkpoint", "a-sdm"]

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=cls.NODE_ID,
            display_name=cls.TITLE,
            category="A-SDM/models",
            description=(
                "Loads the small text-to-image model that ships with A-SDM (weights/embedded): no download, "
                "runs on a CPU. It draws 64x64 scenes of one or two coloured shapes, e.g. 'a red circle on the "
                "left and a blue square on the right'. Its compressed family (BK-SDM Base/Small/Tiny, M2, "
                "ME-CondConv experts) appears in A-SDM Load Compressed UNet and A-SDM ME-CondConv as "
                "asdm-embedded-*. Use 64x64 latents' worth of pixels (Empty Latent Image 64x64)."),
            inputs=[],
            outputs=[
                io.Model.Output(display_name="model", tooltip=
                    "The embedded UNet (SD1.5 layout, 32 channels wide) as a MODEL for the stock samplers and every A-SDM node."),
                io.Clip.Output(display_name="clip", tooltip=
                    "Its text encoder, for the stock CLIP Text Encode node. It knows the words of its captions: "
                    "colours (red, green, blue, yellow, purple, orange), shapes (circle, square, triangle) and "
                    "places (on the left, on the right, at the top, at the bottom, in the center)."),
                io.Vae.Output(display_name="vae", tooltip=
                    "Its VAE (SD's latent shape and scale), for the stock VAE Decode / Encode nodes."),
            ],
        )

    @classmethod
    @node_errors
    def execute(cls):
        return io.NodeOutput(*embedded.load())


register_family()
NODES = [LoadEmbeddedModel]
