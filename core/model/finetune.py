"""Start a training run from an existing model file (``model.init_from``): fine-tuning a
pre-trained model, or warm-starting an active-learning iteration from the previous one.

The run takes the file's architecture and normalisation (backbone, options, cutoff, dtype,
elements, atomic energies, scale, shift) and its weights; only the training data, loss and
training settings are new. The training data may hold a subset of the file's elements, not new
ones (the per-element embeddings of an unseen element would be untrained). A UQ head is taken
from the run's config, not the file: the file's weights initialise the shared Potential (and, for
a deep ensemble, member *k* from the file's member *k* when it has one; for a shallow ensemble,
the readout heads when their shapes agree); calibration and latent statistics are refitted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from .._errors import ConfigError, DataValidationError
from .._specs import PluginKind
from ..registry import Registry
from .modelfile import read_or_import_model_file

__all__ = ["InitialModel", "read_initial_model", "merge_model_config", "MODEL_KEYS"]

MODEL_KEYS = ("backbone", "cutoff", "dtype", "options")  # what init_from fixes
_NOT_HEAD = ("potential.", "calibration.")  # state-dict prefixes of a UQ head that are not its own weights


def merge_model_config(given: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """The ``model`` block with ``init_from``: keys not given come from the file; a given key that
    differs from the file's is an error (the weights would not fit it)."""
    # the weights are read later, by read_initial_model; a foreign file (a MACE .model) is read by the
    # importer of the backbone the block names
    config, _, _ = read_or_import_model_file(path, given.get("backbone"), mmap=True)
    options = {k: v for k, v in given.items() if k not in (*MODEL_KEYS, "init_from")}
    merged: dict[str, Any] = {"init_from": str(path)}
    mismatches = []
    for key in ("backbone", "cutoff", "dtype"):
        if key in given and _differs(given[key], config.get(key)):
            mismatches.append(f"{key}: config {given[key]!r} vs file {config.get(key)!r}")
        merged[key] = config.get(key, given.get(key))
    for key, value in options.items():
        if _differs(value, config.get("options", {}).get(key)):
            mismatches.append(f"{key}: config {value!r} vs file {config.get('options', {}).get(key)!r}")
    if mismatches:
        raise ConfigError(
            f"model.init_from {path}: the model block disagrees with the file's architecture ("
            + "; ".join(mismatches) + "). Drop those keys (they are taken from the file) or start from scratch."
        )
    merged.update(config.get("options", {}))
    return merged


def _differs(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) != float(b)
    return a != b


@dataclass(frozen=True)
class InitialModel:
    """A model file's rebuild config (without its UQ record) and its weights, split by member."""

    path: Path
    spec: dict[str, Any]  # model-file config: backbone, options, normalisation (no "uq")
    uq_name: str | None
    potential: dict[str, torch.Tensor]  # weights of the (first) Potential
    members: tuple[dict[str, torch.Tensor], ...]  # deep-ensemble members 1…K-1 of the file, if any
    head: dict[str, torch.Tensor]  # the UQ head's own weights (e.g. shallow-ensemble readouts)

    def check_elements(self, numbers: list[int]) -> None:
        """The training data may only hold elements the file's model knows."""
        unknown = sorted(set(numbers) - set(self.spec["elements"]))
        if unknown:
            raise DataValidationError(
                f"model.init_from {self.path}: the training data holds element(s) Z={unknown} that this "
                f"model has no weights for (it knows Z={self.spec['elements']}); train from scratch, or "
                "start from a model that covers them"
            )

    def member_weights(self, index: int) -> dict[str, torch.Tensor]:
        """Initial weights of deep-ensemble member ``index`` (0 = the file's first Potential)."""
        return self.members[index - 1] if 1 <= index <= len(self.members) else self.potential

    def load_into(self, module: torch.nn.Module, index: int = 0) -> list[str]:
        """Copy the weights into ``module`` (a Potential, or a UQ head that trains with it);
        returns the names of head weights left freshly initialised."""
        potential = getattr(module, "potential", module)
        _load_strict(potential, self.member_weights(index), self.path)
        if potential is module:
            return []
        own = {k: v for k, v in module.state_dict().items() if not k.startswith(_NOT_HEAD)}
        fits = {k: v for k, v in self.head.items() if k in own and own[k].shape == v.shape}
        module.load_state_dict(fits, strict=False)
        return sorted(set(own) - set(fits))


def _load_strict(potential: torch.nn.Module, state: Mapping[str, torch.Tensor], path: Path) -> None:
    target = potential.state_dict()
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    shapes = sorted(k for k in set(target) & set(state) if target[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        raise ConfigError(
            f"model.init_from {path}: its weights do not fit the model built from its own config "
            f"(missing {missing[:4]}, unexpected {unexpected[:4]}, other shapes {shapes[:4]}); "
            "the backbone plugin has changed since the file was written"
        )
    potential.load_state_dict({k: v.to(target[k].dtype) for k, v in state.items()})


def read_initial_model(path: Path | str, registry: Registry, backbone: str | None = None) -> InitialModel:
    """Read ``path`` for ``model.init_from`` (errors name the file and what to do)."""
    path = Path(path)
    config, _, state = read_or_import_model_file(path, backbone, registry)
    if config["backbone"] not in registry.names(PluginKind.BACKBONE):
        raise ConfigError(f"model.init_from {path}: backbone {config['backbone']!r} is not installed here")
    uq = config.pop("uq", None) or {}
    config["provider"] = registry.provided(PluginKind.BACKBONE, config["backbone"]).distribution
    if not uq:
        return InitialModel(path, config, None, dict(state), (), {})
    potential = {k[len("potential."):]: v for k, v in state.items() if k.startswith("potential.")}
    members: dict[int, dict[str, torch.Tensor]] = {}
    head = {}
    for key, value in state.items():
        if key.startswith("others."):
            _, index, rest = key.split(".", 2)
            members.setdefault(int(index), {})[rest] = value
        elif not key.startswith(_NOT_HEAD):
            head[key] = value
    return InitialModel(path, config, str(uq.get("name")), potential,
                        tuple(members[k] for k in sorted(members)), head)
