"""The one error type of the engine.

Every error the engine raises about what a user gave it (a node input, a file, a config key) is
an ``ASDMError``: a ``ValueError`` whose message says what is wrong and what to change, and,
where it concerns one input, that input's name (``input``). The capability modules subclass it
(``TopologyError``, ``InheritanceError``, ...) so callers can tell them apart; an error raised
deep inside one capability passes through another unchanged, since its message is already the
one to show. Nodes turn it into their message with one adapter (``nodes/common.py``).
"""
from __future__ import annotations


class ASDMError(ValueError):
    """A user-facing error: the message says what is wrong and how to fix it; ``input`` names
    the node input (or config key) it concerns, when it concerns one."""

    def __init__(self, message: str, input: str | None = None):
        super().__init__(message)
        self.input = input

    def message(self) -> str:
        """The message with the input's name in front, unless the message already starts with it."""
        text = str(self)
        if self.input and not text.startswith((self.input + " ", self.input + ":")):
            return f"{self.input}: {text}"
        return text


# One subclass per capability, named where each is raised; callers that must tell them apart
# (the trainer names the config key each comes from) catch these.
class TopologyError(ASDMError):
    """A unit name, unit set or UNet layout the paper's vocabulary cannot name (``topology``)."""


class InheritanceError(ASDMError):
    """Feature inheritance settings (``inheritance``)."""


class SwitchError(ASDMError):
    """UNet switch ranges and models (``switch``)."""


class GRIError(ASDMError):
    """GRI attention settings (``gri``)."""


class CondConvError(ASDMError):
    """ME-CondConv experts and their files (``condconv``)."""


class AssemblyError(ASDMError):
    """Model assembly, block removal and saving UNets (``assembly``, ``derived_files``)."""


class UNetFileError(ASDMError):
    """A UNet file that cannot be read as one (``unet_files``, ``derived_files``)."""


class EmbeddedModelError(ASDMError):
    """The embedded model's files (``embedded``)."""


class AutoCacheError(ASDMError):
    """Auto Cache settings (``autocache``)."""


class HostModelError(ASDMError):
    """A MODEL the host rebuilt after the pack patched it (hooks: compat's UNet call wrapper)."""
