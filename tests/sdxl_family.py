"""Test models of the SDXL family: the narrow UNets of ``tm.TINY_SDXL`` (the host's SDXL-family
topologies at 32 channels, a 64-wide text context, SDXL's 2816-wide y), built with the host's
own class for each (SDXL, SSD1B, Segmind_Vega, KOALA_700M, KOALA_1B), so models that the host
names differently meet as they would in a user's graph."""
import torch

from asdm.harness import models as tm

HOST_CLASS = {"sdxl": "SDXL", "ssd-1b": "SSD1B", "vega": "Segmind_Vega", "koala-700m": "KOALA_700M",
              "koala-1b": "KOALA_1B"}
CONTEXT = 64


def family_model(name: str, seed: int, cls: str | None = None):
    """A narrow SDXL-family MODEL with seeded weights, built with the host class ``cls`` (default:
    the host's own class for that UNet)."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models as sm
    model = getattr(sm, cls or HOST_CLASS[name])(dict(tm.TINY_SDXL[name])).get_model({})
    tm.fill_(model.diffusion_model, seed)
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def sdxl_conds():
    """Positive and negative CONDITIONING with SDXL's pooled text output (the host encodes y from it)."""
    return tm.conditioning(CONTEXT, 1, pooled=tm.SDXL_POOLED), tm.conditioning(CONTEXT, 2, pooled=tm.SDXL_POOLED)


def data(n: int = 8, size: int = 8, seed: int = 0, y: int | None = 2816) -> dict:
    """A trainer data file's tensors: latents, context and (``y``: its width) SDXL's y."""
    g = torch.Generator().manual_seed(seed)
    out = {"latents": torch.randn(n, 4, size, size, generator=g), "context": torch.randn(n, 77, CONTEXT, generator=g)}
    if y:
        out["y"] = torch.randn(n, y, generator=g)
    return out
