"""What every node module shares: the one adapter from the engine's errors to a node's message,
and the node mappings."""
import functools

from ..asdm.errors import ASDMError


def node_errors(method):
    """Decorates a node's FUNCTION: an ``ASDMError`` (the engine's, or one the node raises about
    its own inputs) reaches ComfyUI as ``ValueError("<the node's TITLE>: <message>")``, the message
    led by the input it concerns. Any other exception is a bug and passes unchanged."""
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except ASDMError as e:
            raise ValueError(f"{self.TITLE}: {e.message()}") from None
    return call


def mappings(*classes) -> tuple[dict, dict]:
    """(NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS) of node classes with ``NODE_ID`` and ``TITLE``."""
    return {c.NODE_ID: c for c in classes}, {c.NODE_ID: c.TITLE for c in classes}
