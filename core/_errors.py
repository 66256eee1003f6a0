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
    "ExportError",
    "ModelOutputError",
    "TrainingDivergedError",
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


class StoreError(AtomforgeError):
    """Raised when a structure store (``atomforge data pack``) cannot be read or written: not a
    store, truncated or corrupted, written by a newer format version, another writer holds it."""


class ModelFileError(AtomforgeError):
    """Raised when a model file is unreadable, corrupted (content hash mismatch), of an unknown
    format, has an invalid config, or needs a missing plugin."""


class ExportError(AtomforgeError):
    """Raised by ``atomforge export`` when a model cannot be exported in the requested format: a
    backbone TorchScript cannot compile, a format this torch or a missing package cannot write, an
    exported file that disagrees with the eager model."""


class ForeignModelFileError(ModelFileError):
    """A readable file that is not an atomforge model file (another package's model, a pickle):
    a backbone plugin with an ``importer`` may read it."""


class ModelOutputError(AtomforgeError, ArithmeticError):
    """Raised when a model returns non-finite (NaN/inf) energies, forces or stress — by the
    calculator (so MD stops), ``evaluate`` and the CLI — never passed on as numbers."""


class TrainingDivergedError(AtomforgeError, ArithmeticError):
    """Raised when the training loss becomes non-finite (NaN/inf); the last checkpoint is kept."""


class ConformanceError(AtomforgeError, AssertionError):
    """Raised by a conformance kit (:mod:`atomforge.testing`) when a plugin fails a check."""
