"""The deployable model file: weights + the JSON config needed to rebuild through the registry.

One ``torch.save`` file holding only tensors, strings and numbers, loaded with
``torch.load(weights_only=True)`` — no pickled code. The ``config`` names the backbone by its
registry name and the distribution that provided it, so a missing plugin gives a clear error.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Mapping

import torch

from .._errors import ConfigError, ForeignModelFileError, ModelFileError, PluginError
from .._io import atomic_save
from .._specs import PluginKind
from ..registry import Registry, make_registry
from .potential import Potential

__all__ = [
    "FORMAT", "VERSION", "content_hash", "check_model_config", "build_model", "build_potential", "save_model", "load_model", "read_model_file",
    "read_or_import_model_file", "import_model",
]

FORMAT = "atomforge-model"
VERSION = 2  # 2: content hash (sha256) in the header; version-1 files load without one


def build_potential(config: Mapping[str, Any], registry: Registry) -> Potential:
    """Build an (untrained) :class:`Potential` from a model-file config dict."""
    provided = registry.provided(PluginKind.BACKBONE, config["backbone"])
    heads = list(config.get("heads") or ["default"])
    options = dict(config.get("options", {}))
    if len(heads) > 1:
        if not getattr(provided.spec.factory, "supports_heads", False):
            raise ConfigError(f"model.heads {heads}: backbone {config['backbone']!r} has no per-head readouts "
                              "(Backbone.supports_heads); use one head, or a backbone that has them (painn)")
        options["readout_heads"] = len(heads)
    try:
        backbone = provided.spec.factory(
            num_elements=len(config["elements"]), cutoff=float(config["cutoff"]), **options
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
        heads=heads,
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
    config_json, metadata_json = json.dumps(dict(config)), json.dumps(dict(metadata or {}))
    state = {k: v.detach().cpu() for k, v in potential.state_dict().items()}
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "config": config_json,
        "metadata": metadata_json,
        "state_dict": state,
        "sha256": content_hash(config_json, metadata_json, state),
    }
    atomic_save(payload, Path(path))
    return Path(path)


def content_hash(config_json: str, metadata_json: str, state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of a model file's payload: its config and metadata JSON, then every tensor's name,
    dtype, shape and bytes in name order. Stored in the header, verified on load."""
    digest = hashlib.sha256()
    for text in (config_json, metadata_json):
        digest.update(text.encode())
        digest.update(b"\0")
    for name in sorted(state):
        tensor = state[name].detach().cpu()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


_REQUIRED = ("backbone", "cutoff", "elements", "atomic_energies", "scale", "shift")


def check_model_config(config: Any, path: Path) -> dict[str, Any]:
    """The model-file config, or a :class:`ModelFileError` saying what in it is wrong."""
    if not isinstance(config, dict):
        raise ModelFileError(f"{path}: the embedded config is not a JSON object")
    missing = [key for key in _REQUIRED if key not in config]
    problems = [f"missing {missing}"] if missing else []
    if not missing:
        cutoff, elements, energies = config["cutoff"], config["elements"], config["atomic_energies"]
        if not isinstance(cutoff, (int, float)) or not math.isfinite(cutoff) or cutoff <= 0:
            problems.append(f"cutoff must be a positive number of Å, got {cutoff!r}")
        if not isinstance(elements, list) or not elements or not all(
                isinstance(z, int) and 0 < z < 119 for z in elements):
            problems.append(f"elements must be a non-empty list of atomic numbers, got {elements!r}")
        heads = config.get("heads") or ["default"]
        if not isinstance(heads, list) or not all(isinstance(h, str) and h for h in heads) or len(set(heads)) < len(heads):
            problems.append(f"heads must be a list of distinct names, got {heads!r}")
            heads = ["default"]
        rows = energies if len(heads) > 1 else [energies]
        if isinstance(elements, list) and (not isinstance(energies, list) or len(rows) != len(heads) or any(
                not isinstance(r, list) or len(r) != len(elements) for r in rows)):
            problems.append(f"atomic_energies must have one entry per element ({len(elements)})"
                            + (f" for each of {len(heads)} heads" if len(heads) > 1 else "") + f", got {energies!r}")
        for key in ("scale", "shift"):
            values = config[key] if len(heads) > 1 and isinstance(config[key], list) else [config[key]]
            if len(heads) > 1 and len(values) != len(heads) or not all(
                    isinstance(v, (int, float)) and math.isfinite(v) for v in values):
                problems.append(f"{key} must be a finite number (a list of one per head with several heads), "
                                f"got {config[key]!r}")
        if config.get("dtype", "float32") not in ("float32", "float64"):
            problems.append(f"dtype must be float32 or float64, got {config.get('dtype')!r}")
    if problems:
        raise ModelFileError(f"{path}: invalid model config ({'; '.join(problems)}); the file is damaged or was "
                             "not written by atomforge's save_model")
    return config


def read_model_file(
    path: Path | str, *, mmap: bool = False, verify: bool | None = None
) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
    """(config, metadata, state_dict) of a model file, with clear errors (:class:`ModelFileError`)
    for foreign, damaged or corrupted files.

    ``verify`` (default: unless ``mmap``) recomputes the content hash and refuses a file whose
    bytes changed since it was written. ``mmap=True`` maps the tensors instead of reading them:
    cheap when only the config is wanted."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file {str(path)!r} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:  # noqa: BLE001 - any unreadable file gets one clear message
        raise ForeignModelFileError(
            f"{path} is not a readable atomforge model file ({type(error).__name__}: {str(error)[:300]})"
        ) from error
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ForeignModelFileError(f"{path} is not an atomforge model file (no '{FORMAT}' header)")
    if int(payload.get("version", 0)) > VERSION:
        raise ModelFileError(
            f"{path} has format version {payload['version']}; this atomforge reads ≤ {VERSION}. Upgrade."
        )
    state = payload.get("state_dict")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelFileError(f"{path}: the file holds no weights (state_dict) it can use; it is damaged")
    if (not mmap if verify is None else verify) and "sha256" in payload:
        actual = content_hash(str(payload["config"]), str(payload["metadata"]), state)
        if actual != payload["sha256"]:
            raise ModelFileError(
                f"{path} is corrupted: its content hash is {actual[:16]}…, but it was written with "
                f"{str(payload['sha256'])[:16]}… (bytes changed on disk or in transfer). Restore or re-export it.")
    try:
        config, metadata = json.loads(payload["config"]), json.loads(payload["metadata"])
    except (TypeError, ValueError) as error:
        raise ModelFileError(f"{path}: its embedded config is not valid JSON ({error}); the file is damaged") from error
    return check_model_config(config, path), metadata if isinstance(metadata, dict) else {}, state


def read_or_import_model_file(
    path: Path | str, backbone: str | None, registry: Registry | None = None, *, mmap: bool = False
) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
    """:func:`read_model_file`, or — for a file of another package (a MACE ``.model``) when
    ``backbone`` names a backbone plugin with an ``importer`` — that importer's translation:
    (config, metadata, state dict of the Potential); ``pretrained:NAME`` is the backbone
    plugin's shipped pretrained model ``NAME``. Any other failure is the usual
    :class:`ModelFileError`."""
    if is_pretrained_ref(path):
        return _pretrained(str(path)[len(PRETRAINED_PREFIX):], backbone, registry)
    try:
        return read_model_file(path, mmap=mmap)
    except ForeignModelFileError as error:
        if backbone is None:
            raise ModelFileError(f"{error}. To start from another package's model file, name its backbone in the "
                                 "model block (e.g. backbone: mace) so that its importer can read it") from error
        registry = registry or make_registry()
        if backbone not in registry.names(PluginKind.BACKBONE):
            raise
        provided = registry.provided(PluginKind.BACKBONE, backbone)
        if provided.spec.importer is None:
            raise ModelFileError(f"{error}; backbone {backbone!r} (from {provided.distribution}) cannot import "
                                 "other packages' model files") from error
        config, metadata, state = provided.spec.importer(Path(path))
        config = check_model_config(dict(config), Path(path))
        config.setdefault("provider", provided.distribution)
        return config, dict(metadata), dict(state)


PRETRAINED_PREFIX = "pretrained:"


def is_pretrained_ref(path: Any) -> bool:
    """Whether ``path`` names a shipped pretrained model (``pretrained:NAME``), not a file."""
    return isinstance(path, (str, Path)) and str(path).startswith(PRETRAINED_PREFIX)


def _pretrained(name: str, backbone: str | None,
                registry: Registry | None) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
    registry = registry or make_registry()
    if backbone is None:
        raise ConfigError(f"pretrained model {name!r}: name the backbone whose package ships it "
                          "(model.backbone, e.g. sevennet)")
    if backbone not in registry.names(PluginKind.BACKBONE):
        raise ConfigError(f"pretrained model {name!r}: backbone {backbone!r} is not installed; installed: "
                          f"{', '.join(registry.names(PluginKind.BACKBONE))}")
    provided = registry.provided(PluginKind.BACKBONE, backbone)
    if provided.spec.pretrained is None:
        raise ConfigError(f"backbone {backbone!r} (from {provided.distribution}) ships no pretrained models; "
                          "give model.init_from a model file instead")
    if provided.spec.pretrained_names and name not in provided.spec.pretrained_names:
        raise ConfigError(f"backbone {backbone!r} has no pretrained model {name!r}; it ships "
                          f"{', '.join(provided.spec.pretrained_names)}")
    config, metadata, state = provided.spec.pretrained(name)
    config = check_model_config(dict(config), Path(f"{PRETRAINED_PREFIX}{name}"))
    config.setdefault("provider", provided.distribution)
    return config, {**dict(metadata), "pretrained": name}, dict(state)


def import_model(path: Path | str, backbone: str, out: Path | str, registry: Registry | None = None) -> Path:
    """Translate another package's model file into an atomforge model file ``out`` (weights only)."""
    registry = registry or make_registry()
    config, metadata, state = read_or_import_model_file(path, backbone, registry)
    potential = build_potential(config, registry)
    try:
        potential.load_state_dict(state)
    except RuntimeError as error:
        raise ModelFileError(f"{path}: the imported weights do not fit backbone {backbone!r} ({str(error)[:300]})") from error
    return save_model(potential, out, config=config, metadata={**metadata, "imported_from": str(path)})


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
    try:
        potential.load_state_dict(state)
    except RuntimeError as error:
        raise ModelFileError(f"{path}: its weights do not fit the model its config describes ({str(error)[:300]}); "
                             "the file is damaged or its backbone plugin changed since it was written") from error
    if dtype is not None:
        potential = potential.to(dtype)
    return potential.eval()
