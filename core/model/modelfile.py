"""The deployable model file: weights + the JSON config needed to rebuild through the registry.

One ``torch.save`` file holding only tensors, strings and numbers, loaded with
``torch.load(weights_only=True)`` — no pickled code. The ``config`` names the backbone by its
registry name and the distribution that provided it, so a missing plugin gives a clear error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch

from .._errors import ModelFileError, PluginError
from .._io import atomic_save
from .._specs import PluginKind
from ..registry import Registry, make_registry
from .potential import Potential

__all__ = [
    "FORMAT", "VERSION", "build_model", "build_potential", "save_model", "load_model", "read_model_file",
]

FORMAT = "atomforge-model"
VERSION = 1


def build_potential(config: Mapping[str, Any], registry: Registry) -> Potential:
    """Build an (untrained) :class:`Potential` from a model-file config dict."""
    provided = registry.provided(PluginKind.BACKBONE, config["backbone"])
    try:
        backbone = provided.spec.factory(
            num_elements=len(config["elements"]), cutoff=float(config["cutoff"]), **config.get("options", {})
        )
    except TypeError as error:
        raise PluginError(
            f"backbone {config['backbone']!r} rejected its options {sorted(config.get('options', {}))}: "
            f"{error}. Check the model block of the config."
        ) from error
    potential = Potential(
        backbone,
        elements=config["elements"],
        atomic_energies=config["atomic_energies"],
        scale=config["scale"],
        shift=config["shift"],
    )
    return potential.to(getattr(torch, config.get("dtype", "float32")))


def build_model(config: Mapping[str, Any], registry: Registry) -> torch.nn.Module:
    """:func:`build_potential`, wrapped in its UQ head when the config has a ``uq`` record
    (``{name, options, calibration}``; see ``docs/uq.md``)."""
    potential = build_potential(config, registry)
    if not config.get("uq"):
        return potential
    from .uncertainty import build_uq_head

    return build_uq_head(potential, config["uq"], registry)


def save_model(
    potential: torch.nn.Module,
    path: Path | str,
    *,
    config: Mapping[str, Any],
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``potential`` (or a UQ head around one) and its rebuild ``config`` atomically."""
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "config": json.dumps(dict(config)),
        "metadata": json.dumps(dict(metadata or {})),
        "state_dict": {k: v.detach().cpu() for k, v in potential.state_dict().items()},
    }
    atomic_save(payload, Path(path))
    return Path(path)


def read_model_file(
    path: Path | str, *, mmap: bool = False
) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
    """(config, metadata, state_dict) of a model file, with clear errors for foreign files.

    ``mmap=True`` maps the tensors instead of reading them: cheap when only the config is wanted."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file {str(path)!r} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:  # noqa: BLE001 - any unreadable file gets one clear message
        raise ModelFileError(
            f"{path} is not a readable atomforge model file ({type(error).__name__}: {error})"
        ) from error
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ModelFileError(f"{path} is not an atomforge model file (no '{FORMAT}' header)")
    if int(payload.get("version", 0)) > VERSION:
        raise ModelFileError(
            f"{path} has format version {payload['version']}; this atomforge reads ≤ {VERSION}. Upgrade."
        )
    return json.loads(payload["config"]), json.loads(payload["metadata"]), payload["state_dict"]


def load_model(
    path: Path | str, *, registry: Registry | None = None, dtype: torch.dtype | None = None
) -> torch.nn.Module:
    """Rebuild a :class:`Potential` (or its UQ head) from a model file (eval mode, on CPU)."""
    config, _, state = read_model_file(path)
    registry = registry or make_registry()
    kind = PluginKind.BACKBONE
    uq = config.get("uq") or {}
    if uq and uq["name"] not in registry.names(PluginKind.UQ_HEAD):
        raise ModelFileError(
            f"{path} needs UQ head {uq['name']!r} from distribution {uq.get('provider', 'unknown')!r}, "
            f"which is not installed here (available: {', '.join(registry.names(PluginKind.UQ_HEAD))})."
        )
    if config["backbone"] not in registry.names(kind):
        provider = config.get("provider", "unknown")
        raise ModelFileError(
            f"{path} needs backbone {config['backbone']!r} from distribution {provider!r}, which is "
            f"not installed here (available: {', '.join(registry.names(kind))}). "
            f"Install {provider!r} and try again."
        )
    potential = build_model(config, registry)
    potential.load_state_dict(state)
    if dtype is not None:
        potential = potential.to(dtype)
    return potential.eval()
