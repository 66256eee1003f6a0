"""Start a training run from an existing model file (``model.init_from``): fine-tuning a
pre-trained model, or warm-starting an active-learning iteration from the previous one.

The run takes the file's architecture and normalisation (backbone, options, cutoff, dtype,
elements, atomic energies, scale, shift) and its weights; the training data, loss and training
settings are new, and so may be (docs/finetune.md):

* **heads** (``model.heads``): a run head takes the file's head of the same name, or — a new
  head — a copy of the file's first head (its readout rows, reference energies, scale, shift);
* **elements**: the data may bring elements the file does not know; the backbone's per-element
  parameters (``Backbone.element_parameters``) get a row for each, started at the mean of the
  known rows, and its reference energy is fitted (below);
* **reference energies** (``finetune.reference_energies``): ``auto`` refits a new head's and
  fits a new element's by least squares of the residual (label − the loaded model's prediction)
  over the training set (also every head of a file trained without energies — denoising
  pre-training; its config says ``energies_fitted: false``) and keeps the others; ``refit`` does it for every head; ``keep`` keeps
  the file's; or give eV per element.

A UQ head is taken from the run's config, not the file: the file's weights initialise the shared
Potential (and, for a deep ensemble, member *k* from the file's member *k* when it has one; for
a shallow ensemble, the readout heads when their shapes agree); calibration and latent
statistics are refitted. Freezing and per-group learning rates (``finetune.freeze``,
``finetune.lr``) are :func:`parameter_lrs`.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from ase.data import atomic_numbers, chemical_symbols

from .. import keys as K
from .._errors import ConfigError, DataValidationError
from .._specs import PluginKind
from ..registry import Registry
from .modelfile import read_or_import_model_file

__all__ = ["InitialModel", "read_initial_model", "merge_model_config", "MODEL_KEYS", "parameter_lrs",
           "fit_reference_energies", "reference_energy_plan"]

MODEL_KEYS = ("backbone", "cutoff", "dtype", "options")  # what init_from fixes
_NOT_HEAD = ("potential.", "calibration.")  # state-dict prefixes of a UQ head that are not its own weights


def merge_model_config(given: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """The ``model`` block with ``init_from``: keys not given come from the file; a given key that
    differs from the file's is an error (the weights would not fit it)."""
    # the weights are read later, by read_initial_model; a foreign file (a MACE .model) is read by the
    # importer of the backbone the block names
    config, _, _ = read_or_import_model_file(path, given.get("backbone"), mmap=True)
    options = {k: v for k, v in given.items() if k not in (*MODEL_KEYS, "init_from", "heads", "E0s")}
    merged: dict[str, Any] = {"init_from": str(path), "heads": given.get("heads", config.get("heads"))}
    if "E0s" in given:  # refused with init_from unless "fit" (config._e0s says why)
        merged["E0s"] = given["E0s"]
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
    # the file's backbone options, for display and checks (the model is built from the file itself);
    # a backbone option named like a model key (MACE's own ``heads``) must not become that key
    merged.update({k: v for k, v in config.get("options", {}).items() if k not in ("heads", *MODEL_KEYS)})
    return merged


def _differs(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) != float(b)
    return a != b


@dataclass
class InitialModel:
    """A model file's rebuild config (without its UQ record) and its weights, split by member."""

    path: Path
    spec: dict[str, Any]  # model-file config: backbone, options, normalisation (no "uq")
    uq_name: str | None
    potential: dict[str, torch.Tensor]  # weights of the (first) Potential
    members: tuple[dict[str, torch.Tensor], ...]  # deep-ensemble members 1…K-1 of the file, if any
    head: dict[str, torch.Tensor]  # the UQ head's own weights (e.g. shallow-ensemble readouts)
    #: reference energies [heads, elements] fitted for this run (set once by the first load; later
    #: loads — deep-ensemble members — take the same table)
    fitted_energies: torch.Tensor | None = field(default=None, repr=False)

    @property
    def heads(self) -> list[str]:
        return list(self.spec.get("heads") or ["default"])

    def check_elements(self, numbers: list[int], registry: Registry | None = None) -> None:
        """New elements in the training data are allowed when the backbone can add them
        (``Backbone.element_parameters``); otherwise a clear error before anything is built."""
        unknown = self.new_elements(numbers)
        if not unknown or registry is None:
            return
        factory = registry.provided(PluginKind.BACKBONE, self.spec["backbone"]).spec.factory
        if not getattr(factory, "element_parameters", ()):
            raise DataValidationError(
                f"model.init_from {self.path}: the training data holds element(s) Z={unknown} that this model has "
                f"no weights for (it knows Z={self.spec['elements']}), and backbone {self.spec['backbone']!r} "
                "cannot add elements at fine-tune time (no per-element parameters to extend); train from "
                "scratch, or start from a model that covers them")

    def new_elements(self, numbers: Iterable[int]) -> list[int]:
        """Elements of ``numbers`` the file's model does not know."""
        return sorted(set(int(z) for z in numbers) - set(self.spec["elements"]))

    def head_map(self, heads: Sequence[str]) -> list[int]:
        """For each run head, the file head it starts from (same name, else the file's first)."""
        own = self.heads
        return [own.index(h) if h in own else 0 for h in heads]

    def run_spec(self, heads: Sequence[str] | None, numbers: Iterable[int]) -> dict[str, Any]:
        """The run's model spec: the file's, with the run's ``heads`` (default the file's) and the
        file's elements plus those of ``numbers``. Reference energies, scale and shift of each
        run head come from its file head; a new element's reference energy starts at 0."""
        spec = dict(self.spec)
        heads = list(heads) if heads else self.heads
        elements = sorted(set(self.spec["elements"]) | set(int(z) for z in numbers))
        energies, scale, shift = _per_head(self.spec)
        column = {z: k for k, z in enumerate(self.spec["elements"])}
        rows = [[energies[f][column[z]] if z in column else 0.0 for z in elements] for f in self.head_map(heads)]
        spec.update(elements=elements, heads=heads if len(heads) > 1 or heads != ["default"] else None,
                    atomic_energies=rows if len(heads) > 1 else rows[0],
                    scale=[scale[f] for f in self.head_map(heads)] if len(heads) > 1 else scale[self.head_map(heads)[0]],
                    shift=[shift[f] for f in self.head_map(heads)] if len(heads) > 1 else shift[self.head_map(heads)[0]])
        if spec["heads"] is None:
            spec.pop("heads")
        return spec

    def member_weights(self, index: int) -> dict[str, torch.Tensor]:
        """Initial weights of deep-ensemble member ``index`` (0 = the file's first Potential)."""
        return self.members[index - 1] if 1 <= index <= len(self.members) else self.potential

    def adapted(self, state: Mapping[str, torch.Tensor], potential: torch.nn.Module) -> dict[str, torch.Tensor]:
        """``state`` (the file's Potential) mapped onto ``potential`` (built from
        :meth:`run_spec`): head rows by :meth:`head_map`, element rows by atomic number (a new
        element: the mean of the known rows), the run's element map and normalisation buffers."""
        target = potential.state_dict()
        heads = self.head_map(potential.heads)
        rows = {z: k for k, z in enumerate(self.spec["elements"])}
        known = [k for k, z in enumerate(potential.elements) if z in rows]
        order = torch.tensor([rows[z] for z in potential.elements if z in rows])
        out = dict(state)
        for name in ("z_to_index", "atomic_energies", "scale", "shift"):
            out[name] = target[name]
        backbone = potential.backbone
        for name in getattr(backbone, "head_parameters", ()):
            key = f"backbone.{name}"
            if key in out and out[key].shape != target[key].shape:
                out[key] = out[key][torch.tensor(heads)].clone()
        for name in getattr(backbone, "element_parameters", ()):
            key = f"backbone.{name}"
            if key in out and out[key].shape != target[key].shape:
                old = out[key]
                new = old.mean(0, keepdim=True).expand(len(potential.elements), *old.shape[1:]).clone()
                new[torch.tensor(known)] = old[order]
                out[key] = new
        if len(potential.elements) != len(self.spec["elements"]) and not getattr(backbone, "element_parameters", ()):
            raise ConfigError(
                f"model.init_from {self.path}: the training data holds element(s) "
                f"Z={sorted(set(potential.elements) - set(rows))} this model has no weights for, and backbone "
                f"{self.spec['backbone']!r} declares no per-element parameters to extend "
                "(Backbone.element_parameters); train from scratch or start from a model that covers them")
        return out

    def load_into(self, module: torch.nn.Module, index: int = 0) -> list[str]:
        """Copy the weights into ``module`` (a Potential, or a UQ head that trains with it);
        returns the names of head weights left freshly initialised."""
        potential = getattr(module, "potential", module)
        _load_strict(potential, self.adapted(self.member_weights(index), potential), self.path)
        if self.fitted_energies is not None:
            potential.atomic_energies.copy_(self.fitted_energies)
        if potential is module:
            return []
        own = {k: v for k, v in module.state_dict().items() if not k.startswith(_NOT_HEAD)}
        fits = {k: v for k, v in self.head.items() if k in own and own[k].shape == v.shape}
        module.load_state_dict(fits, strict=False)
        return sorted(set(own) - set(fits))


def _per_head(spec: Mapping[str, Any]) -> tuple[list[list[float]], list[float], list[float]]:
    """(reference energies per head, scale per head, shift per head) of a model-file config."""
    heads = spec.get("heads") or ["default"]
    energies = spec["atomic_energies"] if len(heads) > 1 else [spec["atomic_energies"]]
    scale = spec["scale"] if isinstance(spec["scale"], list) else [spec["scale"]] * len(heads)
    shift = spec["shift"] if isinstance(spec["shift"], list) else [spec["shift"]] * len(heads)
    return [list(map(float, e)) for e in energies], list(map(float, scale)), list(map(float, shift))


def _element(key: Any, where: str) -> int:
    if isinstance(key, int) or (isinstance(key, str) and key.isdigit()):
        return int(key)
    if isinstance(key, str) and key in atomic_numbers:
        return atomic_numbers[key]
    raise ConfigError(f"{where}: {key!r} is not an element (symbol such as H, or atomic number)")


def reference_energy_plan(setting: Any, initial: InitialModel | None, heads: Sequence[str],
                          elements: Sequence[int]) -> dict[int, Any]:
    """What happens to each head's reference energies: ``keep``, ``refit``, ``new`` (fit only
    the new elements') or a ``{Z: eV}`` table, from ``finetune.reference_energies``."""
    new_heads = set(heads) - set(initial.heads) if initial is not None else set()
    if initial is not None and initial.spec.get("energies_fitted") is False:  # never saw energies (denoising only)
        new_heads |= set(heads)
    new_elements = initial.new_elements(elements) if initial is not None else []
    per_head: dict[str, Any] = {}
    if isinstance(setting, Mapping) and setting and all(str(k) in heads for k in setting):
        per_head = {str(k): v for k, v in setting.items()}
    elif isinstance(setting, Mapping):
        per_head = {h: setting for h in heads}
    plan: dict[int, Any] = {}
    for index, head in enumerate(heads):
        value = per_head.get(head, setting if isinstance(setting, str) else "auto")
        if value == "auto":
            value = "refit" if head in new_heads else ("new" if new_elements else "keep")
        if isinstance(value, Mapping):
            value = {_element(k, f"finetune.reference_energies[{head}]"): float(v) for k, v in value.items()}
            missing = sorted(set(elements) - set(value))
            if missing:
                raise ConfigError(f"finetune.reference_energies for head {head!r}: no value for "
                                  f"{[chemical_symbols[z] for z in missing]}; give every element of the model")
        elif value not in ("keep", "refit", "new"):
            raise ConfigError(f"finetune.reference_energies for head {head!r}: expected auto, keep, refit or a "
                              f"mapping of element to eV; got {value!r}")
        plan[index] = value
    return plan


@torch.no_grad()
def fit_reference_energies(potential: torch.nn.Module, dataset: Any, plan: Mapping[int, Any],
                           new_elements: Sequence[int] = (), *, batch_size: int = 32,
                           max_structures: int = 20000) -> dict[str, Any]:
    """Apply ``plan`` (:func:`reference_energy_plan`) to ``potential``'s reference energies:
    ``refit`` adds to a head's table the least-squares per-element offset (minimum norm: a
    single composition fixes only the sum) of the residual label − prediction over the
    structures of ``dataset`` on that head; ``new`` fits only ``new_elements``' entries; a table
    sets them. Returns a report (per head: structures used, residual mean before/after, eV/atom)."""
    wanted = {h: v for h, v in plan.items() if v in ("refit", "new")}
    for h, table in plan.items():
        if isinstance(table, Mapping):
            potential.atomic_energies[h] = torch.tensor([table[z] for z in potential.elements],
                                                        dtype=potential.atomic_energies.dtype)
    report: dict[str, Any] = {}
    if not wanted:
        return report
    n = min(len(dataset), max_structures)
    positions = np.linspace(0, len(dataset) - 1, n).astype(np.int64) if len(dataset) > max_structures else np.arange(n)
    plan_batches = [positions[s : s + batch_size] for s in range(0, n, batch_size)]
    rows: dict[int, list[tuple[np.ndarray, float, int]]] = {h: [] for h in wanted}
    device = potential.atomic_energies.device
    was_training = potential.training
    potential.eval()
    for batch in dataset.batches(plan_batches):
        batch = {k: v.to(device) for k, v in batch.items()}
        if K.ENERGY not in batch:
            continue
        predicted = potential(batch, compute_forces=False)[K.ENERGY].double()
        labels = batch[K.ENERGY].double()
        heads = batch.get(K.FIDELITY, torch.zeros_like(labels, dtype=torch.long))
        index = potential.element_index(batch[K.NUMBERS])
        counts = torch.zeros(len(labels), len(potential.elements), dtype=torch.float64, device=device)
        counts.index_put_((batch[K.BATCH], index), torch.ones_like(index, dtype=torch.float64), accumulate=True)
        mask = batch.get(K.ENERGY + "_mask")
        has = torch.isfinite(labels) if mask is None else mask.bool() & torch.isfinite(labels)
        for b in torch.nonzero(has).flatten().tolist():
            h = int(heads[b])
            if h in rows:
                rows[h].append((counts[b].cpu().numpy(), float(labels[b] - predicted[b]), int(counts[b].sum())))
    potential.train(was_training)
    for h, mode in wanted.items():
        if not rows[h]:
            continue
        counts = np.stack([c for c, _, _ in rows[h]])
        residual = np.array([r for _, r, _ in rows[h]])
        atoms = np.array([a for _, _, a in rows[h]], dtype=float)
        columns = (np.arange(len(potential.elements)) if mode == "refit"
                   else np.array([potential.elements.index(z) for z in new_elements if z in potential.elements]))
        if len(columns) == 0:
            continue
        delta, *_ = np.linalg.lstsq(counts[:, columns], residual, rcond=None)
        potential.atomic_energies[h, torch.as_tensor(columns)] += torch.as_tensor(delta, dtype=potential.atomic_energies.dtype)
        after = residual - counts[:, columns] @ delta
        report[potential.heads[h]] = {"mode": mode, "structures": len(residual),
                                      "residual_per_atom_before": float(np.mean(residual / atoms)),
                                      "residual_per_atom_after": float(np.mean(after / atoms))}
    return report


def parameter_lrs(model: torch.nn.Module, freeze: Sequence[str], lrs: Mapping[str, float]) -> dict[str, float | None]:
    """Each trainable parameter's learning rate (``None``: the run's ``training.lr``) after
    ``finetune.freeze`` (frozen ones get ``requires_grad = False`` and are left out) and
    ``finetune.lr``. Entries name groups of ``Backbone.parameter_groups()`` (``embedding``,
    ``interaction.0``, ``readout``, …), ``all_but_readout``, or ``fnmatch`` patterns of the
    model's parameter names (``backbone.layers.0.*``, ``heads.*``)."""
    potential = getattr(model, "potential", model)
    prefix = "potential." if potential is not model else ""
    backbone = getattr(potential, "backbone", None)
    groups = backbone.parameter_groups() if backbone is not None and hasattr(backbone, "parameter_groups") else {}
    names = [name for name, _ in model.named_parameters()]

    def match(entry: str, where: str) -> set[str]:
        if entry == "all_but_readout":
            entries = [g for g in groups if g != "readout"]
        elif entry in groups:
            entries = [entry]
        else:
            hits = {n for n in names if fnmatch.fnmatchcase(n, entry)}
            if not hits:
                raise ConfigError(f"{where}: {entry!r} is neither a parameter group of backbone "
                                  f"{type(backbone).__name__} ({', '.join(groups) or 'none'}, all_but_readout) nor a "
                                  f"pattern matching a parameter name (e.g. {names[0] if names else '…'})")
            return hits
        out = set()
        for group in entries:
            for start in groups[group]:
                full = f"{prefix}backbone.{start}"
                out |= {n for n in names if n == full or n.startswith(full + ".")}
        return out

    frozen = set().union(*(match(e, "finetune.freeze") for e in freeze)) if freeze else set()
    chosen: dict[str, float | None] = {}
    for entry, lr in lrs.items():
        for name in match(entry, "finetune.lr"):
            chosen[name] = float(lr)
    result: dict[str, float | None] = {}
    for name, param in model.named_parameters():
        if name in frozen:
            param.requires_grad_(False)
        elif param.requires_grad:
            result[name] = chosen.get(name)
    if not result:
        raise ConfigError("finetune.freeze leaves no parameter to train")
    return result


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
