"""Thin ComfyUI V3 node classes, one module per capability; the work is done in ../asdm. The pack
reaches ComfyUI as a V3 extension: ``comfy_entrypoint`` gives the host the node classes, and the
host registers each under its schema's ``node_id`` and ``display_name``."""
from comfy_api.v0_0_2 import ComfyExtension, io   # ComfyUI's V3 node API, pinned: the host loads the node modules

from . import autocache, compressed, condconv, embedded, gri, inheritance, switch

_MODULES = (autocache, inheritance, compressed, switch, condconv, embedded, gri)

NODES: list[type[io.ComfyNode]] = [cls for m in _MODULES for cls in m.NODES]


class ASDMExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> ASDMExtension:
    return ASDMExtension()
