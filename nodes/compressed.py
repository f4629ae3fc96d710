"""Nodes: A-SDM Load Compressed UNet, A-SDM Assemble UNet, A-SDM Save UNet (A-SDM §IV-A,
BK-SDM §3.1)."""
import os

import folder_paths   # ComfyUI's: the host loads the node modules
from comfy_api.v0_0_2 import io   # ComfyUI's V3 node API, pinned: the host loads the node modules

from ..asdm import compat, embedded
from ..asdm.assembly import RECIPES, assemble, recipe_spec, save_unet
from ..asdm.derived_files import load_unet
from ..asdm.errors import ASDMError, UNetFileError
from ..asdm.switch import refuse_switch
from ..asdm.unet_files import PICKLE_EXTENSIONS
from .common import advanced, node_errors


def _family_files() -> list[str]:
    """The embedded model's family (weights/embedded/unet): listed and read by this node only, so
    the stock UNet loaders, which cannot read its derived files, never list them. Their names
    (asdm-embedded-*) are the ones graphs saved while they were in the UNet folder use."""
    if not os.path.isdir(embedded.FAMILY_UNETS):
        return []
    return sorted(n for n in os.listdir(embedded.FAMILY_UNETS) if n.endswith(".safetensors"))


def _unet_files():
    family = _family_files()
    names = folder_paths.get_filename_list(compat.unet_folder())
    return [n for n in names if n.lower().endswith((".safetensors",) + PICKLE_EXTENSIONS)
            and n not in family] + family


class LoadCompressedUNet(io.ComfyNode):
    NODE_ID = "ASDMLoadCompressedUNet"
    TITLE = "A-SDM Load Compressed UNet"
    # words users search for (newer front ends search a node's SEARCH_ALIASES; the pinned API's
    # Schema has no field for them, so they stay a class attribute, as before)
    SEARCH_ALIASES = ["unet loader", "load unet", "load diffusion model", "bk-sdm", "bk sdm",
                      "compressed unet", "small sd", "tiny sd", "segmind", "sdxl", "ssd-1b", "vega", "koala",
                      "a-sdm"]

    @classmethod
    def define_schema(cls):
        # the file list is read whenever the host asks for the schema (/object_info: the front
        # end's refresh shows new files)
        return io.Schema(
            node_id=cls.NODE_ID,
            display_name=cls.TITLE,
            category="A-SDM/models",
            description=(
                "Loads a block-removed or assembled SD or SDXL UNet from the UNet models folder: BK-SDM Base / "
                "Small / Tiny (v1 and v2, -2m retrains), Segmind small/tiny SD, SDXL, SSD-1B, Vega, KOALA-700M "
                "/ 1B, A-SDM assembled UNets, or any other layer and depth mix. Reads diffusers files (unet/"
                "diffusion_pytorch_model.safetensors, with or without its config.json) and single-file "
                "ComfyUI/ldm UNets; the "
                "layout is read from the weights themselves. safetensors only. The embedded model's "
                "compressed family is listed too (asdm-embedded-*)."),
            inputs=[
                io.Combo.Input("unet_name", options=_unet_files(), tooltip=
                    "A UNet file in ComfyUI's UNet folder (models/unet or models/diffusion_models), or a "
                    "member of the embedded model's family (asdm-embedded-*, shipped with the pack). For "
                    "a diffusers download, pick unet/diffusion_pytorch_model.safetensors inside its folder."),
                advanced(io.Combo.Input("prediction", options=["auto", "eps", "v"], default="auto", tooltip=
                    "What the UNet predicts. auto: what the file records (an A-SDM saved file, or the "
                    "'v_pred' / 'ztsnr' marks of SDXL v-prediction fine-tunes), else eps (BK-SDM v1 and "
                    "v2-base, SDXL, SSD-1B, Vega and KOALA are eps). Choose v for UNets distilled from a "
                    "768-v SD2 model or an SDXL v-prediction fine-tune.")),
                advanced(io.Boolean.Input("zsnr", default=False, optional=True, tooltip=
                    "Sample with the zero-terminal-SNR schedule, as v-prediction fine-tunes trained with it "
                    "need (ComfyUI's ModelSamplingDiscrete zsnr). With prediction auto, a file that records "
                    "it turns it on too.")),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip=
                "The UNet as a MODEL; use it with the SD1.x, SD2.x or SDXL CLIP and VAE of its family.")],
        )

    @classmethod
    @node_errors
    def execute(cls, unet_name, prediction, zsnr=False):
        if unet_name in _family_files():
            path = os.path.join(embedded.FAMILY_UNETS, unet_name)
        else:
            path = folder_paths.get_full_path(compat.unet_folder(), unet_name)
        if path is None:
            raise UNetFileError(f"{unet_name} is not in the UNet models folder")
        return io.NodeOutput(load_unet(path, prediction, name=unet_name, zsnr=zsnr))


class AssembleUNet(io.ComfyNode):
    NODE_ID = "ASDMAssembleUNet"
    TITLE = "A-SDM Assemble UNet"
    SEARCH_ALIASES = ["assembly", "model assembly", "merge unet", "splice blocks", "bk-sdm", "a-sdm"]

    @classmethod
    def define_schema(cls):
        recipes = list(RECIPES) + ["custom"]
        return io.Schema(
            node_id=cls.NODE_ID,
            display_name=cls.TITLE,
            category="A-SDM/models",
            description=(
                "Model assembly (A-SDM §IV-A): builds a new UNet from the blocks of an original UNet (A) "
                "and a compressed one (B, e.g. BK-SDM Base). M1/M2/M3 are the paper's recipes (M2, the "
                "best: Base's shallow blocks dn0, dn1, up2, up3 with SD's deep part). The result is what "
                "A-SDM distils further; save it with A-SDM Save UNet."),
            inputs=[
                io.Model.Input("original", tooltip="Source A: the original UNet (e.g. SD1.5)."),
                io.Model.Input("compressed", tooltip=
                    "Source B: the compressed UNet of the same family and levels (e.g. BK-SDM Base or Small)."),
                io.Combo.Input("recipe", options=recipes, default="M2", tooltip="Which blocks come from B. " + "; ".join(
                    f"{k}: {v[1]}" for k, v in RECIPES.items()) + "; custom: the custom_recipe field."),
                advanced(io.String.Input("custom_recipe", default="dn0=B, up3=B", tooltip=
                    "Used when recipe = custom. part=A|B pairs: part is a block (dn0..dn3, mid, up0..up3), "
                    "a level pair (pair0 = dn0 with the last up block, pair1, ...), "
                    "a stem part (in = conv_in, time = time embedding, out = final conv) or * (all parts "
                    "not named). Unnamed parts come from A; in follows dn0, out the last up block, time "
                    "follows mid. A level's up block must have one layer more than its down block.")),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip=
                "The assembled UNet as a MODEL: each block's weights from the source the recipe names.")],
        )

    @classmethod
    @node_errors
    def execute(cls, original, compressed, recipe, custom_recipe):
        refuse_switch(original, cls.TITLE)
        refuse_switch(compressed, cls.TITLE)
        spec = custom_recipe if recipe == "custom" else recipe_spec(recipe)
        return io.NodeOutput(assemble(original, compressed, spec))


class SaveUNet(io.ComfyNode):
    NODE_ID = "ASDMSaveUNet"
    TITLE = "A-SDM Save UNet"
    SEARCH_ALIASES = ["save unet", "save diffusion model", "export unet", "a-sdm"]
    PATH_INPUTS = ("filename_prefix",)   # becomes a file path: control characters refused (common.check_inputs)

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=cls.NODE_ID,
            display_name=cls.TITLE,
            category="A-SDM/models",
            is_output_node=True,
            description=(
                "Saves a MODEL's UNet to output/<prefix>_NNNNN_.safetensors in ComfyUI's UNet layout, with "
                "its layout and assembly recipe in the metadata. Move it to models/unet to load it with A-SDM "
                "Load Compressed UNet (or, for SD-width UNets, ComfyUI's own UNet loader). Weight patches "
                "(LoRA) are baked in; A-SDM patch nodes (feature inheritance, ME-CondConv) are not weights "
                "and are refused."),
            inputs=[
                io.Model.Input("model", tooltip="The UNet to save (an assembled or loaded compressed UNet)."),
                io.String.Input("filename_prefix", default="unet/asdm", tooltip=
                    "File name prefix inside ComfyUI's output folder; a counter is appended."),
            ],
            outputs=[],
        )

    @classmethod
    @node_errors
    def execute(cls, model, filename_prefix):
        refuse_switch(model, cls.TITLE)
        if model.object_patches:
            raise ASDMError(
                f"this MODEL carries {len(model.object_patches)} object patches (e.g. "
                "A-SDM Feature Inheritance or ME-CondConv); they are not weights and would be lost. "
                "Connect the MODEL from before those nodes")
        out_dir = folder_paths.get_output_directory()
        try:
            full, name, counter, _, _ = folder_paths.get_save_image_path(filename_prefix, out_dir)
        except Exception as e:   # the host refuses prefixes that leave the output folder
            raise ASDMError(f"filename_prefix {filename_prefix[:80]!r}: {e}; give a "
                            "prefix inside the output folder, e.g. unet/asdm") from None
        path = os.path.join(full, f"{name}_{counter:05}_.safetensors")
        if max(len(os.fsencode(p)) for p in os.path.relpath(path, out_dir).split(os.sep)) > 250:
            raise ASDMError(f"filename_prefix {filename_prefix[:80]!r}... makes a file or folder "
                            "name longer than the filesystem allows; choose a shorter or simpler filename_prefix")
        # The host checks the prefix as written; a link inside the output folder could still lead
        # out of it, so the resolved path is checked too.
        real_out = os.path.realpath(out_dir)
        if os.path.commonpath([real_out, os.path.realpath(path)]) != real_out:
            raise ASDMError(f"filename_prefix {filename_prefix[:80]!r} leads outside the "
                            f"output folder (through a link to {os.path.realpath(full)}); choose another prefix")
        try:
            os.makedirs(full, exist_ok=True)
            save_unet(model, path)
        except OSError as e:
            raise ASDMError(f"cannot write {os.path.relpath(path, out_dir)[:120]} "
                            f"({e.strerror or e}); choose a shorter or simpler filename_prefix") from None
        return io.NodeOutput(ui={"text": [os.path.relpath(path, out_dir)]})


NODES = [LoadCompressedUNet, AssembleUNet, SaveUNet]
