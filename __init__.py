"""A-SDM for ComfyUI: ComfyUI's entry point (the V3 extension's entry point, nothing else).

No NODE_CLASS_MAPPINGS here: the host's loader takes a module's NODE_CLASS_MAPPINGS first and then
never asks for its ``comfy_entrypoint``."""
from .nodes import comfy_entrypoint

__all__ = ["comfy_entrypoint"]
