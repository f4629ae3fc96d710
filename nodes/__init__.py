"""Thin ComfyUI node classes, one module per capability; the work is done in ../asdm."""
from . import autocache, compressed, condconv, embedded, gri, inheritance, switch

_MODULES = (autocache, inheritance, compressed, switch, condconv, embedded, gri)

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
for _m in _MODULES:
    NODE_CLASS_MAPPINGS.update(_m.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_m.NODE_DISPLAY_NAME_MAPPINGS)
