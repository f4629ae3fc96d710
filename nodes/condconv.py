"""Node: A-SDM ME-CondConv (multi-expert conditional convolution, A-SDM §IV-B)."""
import logging
import os

import folder_paths   # ComfyUI's: the host loads the node modules
from comfy_api.v0_0_2 import io   # ComfyUI's V3 node API, pinned: the host loads the node modules

from ..asdm.condconv import (DEFAULT_EXPERTS, DEFAULT_UNITS, INIT_MODES, MAX_EXPERTS, CondConvError,
                             apply_condconv, load_experts, make_experts, select_convs)
from ..asdm.switch import refuse_switch
from .common import advanced, node_errors

FOLDER = "asdm_condconv"   # models/asdm_condconv: trained experts (from the A-SDM trainer)
log = logging.getLogger("A-SDM")


def _register_folder():
    if FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[FOLDER] = (
            [os.path.join(folder_paths.models_dir, FOLDER)], {".safetensors"})


def _expert_files():
    _register_folder()
    return ["none"] + folder_paths.get_filename_list(FOLDER)


class MECondConv(io.ComfyNode):
    NODE_ID = "ASDMMECondConv"
    TITLE = "A-SDM ME-CondConv"
    # words users search for (newer front ends search a node's SEARCH_ALIASES; the pinned API's
    # Schema has no field for them, so they stay a class attribute, as before)
    SEARCH_ALIASES = ["condconv", "conditional convolution", "experts", "mixture of experts",
                      "bk-sdm", "a-sdm"]

    @classmethod
    def define_schema(cls):
        # the experts list is read whenever the host asks for the schema (/object_info: the
        # front end's refresh shows new files)
        return io.Schema(
            node_id=cls.NODE_ID,
            display_name=cls.TITLE,
            category="A-SDM/models",
            description=(
                "ME-CondConv (A-SDM §IV-B): each chosen 3x3 convolution becomes N experts mixed per sample "
                "by an input-dependent router (CondConv); expert 1 is the original weight. Adds capacity to "
                "compressed UNets (BK-SDM Small/Tiny) at almost no time cost. Load trained experts from "
                "models/asdm_condconv (made by the A-SDM trainer), or start new ones: identity (output "
                "unchanged, the start for distillation), paper (random experts) or cross-layer (experts "
                "from the teacher block's layers). Stacks with LoRA and the other A-SDM nodes."),
            inputs=[
                io.Model.Input("model", tooltip="An SD-family MODEL, typically BK-SDM Small or Tiny."),
                io.Combo.Input("weights", options=_expert_files(), default="none", tooltip=
                    "Trained experts (.safetensors in models/asdm_condconv). When a file is chosen it "
                    "defines the convs and the number of experts, and units / experts / init / seed "
                    "are not used. none: new experts from the fields below."),
                io.String.Input("units", default=DEFAULT_UNITS, tooltip=
                    "Which ResNet units get ME-CondConv (both 3x3 convs of each), in the unit grammar of "
                    "A-SDM Feature Inheritance: 'dn*.*.R, up*.*.R' = every R unit of the down and up "
                    "blocks (paper Tab. II); 'dn0, up3' = the shallowest blocks."),
                io.Int.Input("experts", default=DEFAULT_EXPERTS, min=1, max=MAX_EXPERTS, tooltip=
                    "Number of experts N per conv (the paper uses 2). 1 = the plain conv (MODEL unchanged)."),
                advanced(io.Combo.Input("init", options=list(INIT_MODES), default="identity", tooltip=
                    "New experts: identity = other experts zero, output exactly unchanged (start for "
                    "distillation); paper = other experts random (changes the output until trained); "
                    "cross-layer = other experts from the teacher block's same-role convs (connect teacher).")),
                # Not a sampling seed: no control_after_generate widget (the front end adds one to
                # any INT named seed unless told not to), so it stays what the graph says.
                advanced(io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False, tooltip=
                    "Seed for random experts and router (paper, cross-layer).")),
                io.Model.Input("teacher", optional=True, tooltip=
                    "For init cross-layer: the UNet the student was compressed from (e.g. SD1.5)."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The MODEL with ME-CondConv in the chosen ResNet units.")],
        )

    @classmethod
    @node_errors
    def execute(cls, model, weights, units, experts, init, seed, teacher=None):
        unet = getattr(model.model, "diffusion_model", None)
        refuse_switch(model, cls.TITLE)
        if weights != "none":
            path = folder_paths.get_full_path(FOLDER, weights)
            if path is None:
                raise CondConvError(f"{weights} is not in models/{FOLDER}")
            me = load_experts(path, unet)
        else:
            if experts == 1:
                log.info("A-SDM ME-CondConv: 1 expert is the plain convolution; MODEL unchanged")
                return io.NodeOutput(model.clone())
            if teacher is not None and init != "cross-layer":
                raise CondConvError(f"a teacher is connected but init is {init!r}; the teacher is "
                                    "used only by init cross-layer — choose it or disconnect the teacher")
            paths = select_convs(unet, units)
            teacher_unet = teacher.model.diffusion_model if teacher is not None else None
            me = make_experts(unet, paths, experts, init, seed, teacher_unet)
        return io.NodeOutput(apply_condconv(model, me))


NODES = [MECondConv]
