"""The exception tree of atomforge.

Every error raised on purpose by atomforge derives from :class:`AtomforgeError`, and its message
says what was expected, what was found and what to do about it.
"""

from __future__ import annotations

__all__ = [
    "AtomforgeError",
    "ConfigError",
    "DataValidationError",
    "PluginError",
    "UnknownPluginError",
    "DuplicatePluginError",
    "ModelFileError",
    "UnseenElementError",
    "ConformanceError",
]


class AtomforgeError(Exception):
    """Base class of all errors atomforge raises deliberately."""


class ConfigError(AtomforgeError, ValueError):
    """Raised when a configuration (YAML, ``--set`` override or keyword) is malformed."""


class DataValidationError(AtomforgeError, ValueError):
    """Raised when a structure or its labels cannot be used (NaN labels, bad shapes, overlaps...)."""


class UnseenElementError(DataValidationError):
    """Raised at inference when a structure holds an element the model was never trained on."""


class PluginError(AtomforgeError):
    """Raised when a plugin cannot be loaded or misbehaves (strict mode only; else a warning)."""


class UnknownPluginError(PluginError, KeyError):
    """Raised when a registry name is not provided by any plugin; lists the valid names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DuplicatePluginError(PluginError):
    """Raised when two plugins register the same name for the same kind; names both providers."""


class ModelFileError(AtomforgeError):
    """Raised when a model file is unreadable, of an unknown format, or needs a missing plugin."""


class ConformanceError(AtomforgeError, AssertionError):
    """Raised by :func:`atomforge.testing.check_backbone` when a backbone fails a physics check."""
