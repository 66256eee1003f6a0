"""Error metrics in the units users compare (meV/atom, meV/Å, meV/Å³), overall and per
``config_type`` (MACE's per-type error table), and the metrics of predicted uncertainties (rank
correlation, Gaussian NLL, calibration curve and area, ENCE)."""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

import numpy as np
import torch

from .. import keys as K
from ..data.fields import label_mask

__all__ = ["ErrorAccumulator", "UQAccumulator", "spearman", "gaussian_nll", "calibration_curve",
           "miscalibration_area", "ence", "TINY", "config_types_of", "format_config_type_table",
           "DEFAULT_CONFIG_TYPE"]

TINY = 1e-12  # floor of standard deviations
DEFAULT_CONFIG_TYPE = "Default"  # MACE's name for the structures without a config_type
_QUANTITIES = {"energy_per_atom": "energy", "forces": "forces", "stress": "stress"}  # pairs name → metric prefix
_REPEAT = {"energy_per_atom": 1, "forces": 3, "stress": 9}  # values per scored row (structure or atom)


def _raw_config_types(dataset: Any) -> list[Any] | None:
    """``info['config_type']`` (or None) of each structure of ``dataset`` by position; a store's
    are read from its column (no structure is read), a mixture's from its parts; ``None`` for a
    dataset of another kind (no per-type table then)."""
    if hasattr(dataset, "parts"):  # MixedDataset
        parts = [_raw_config_types(part) for part in dataset.parts]
        if any(part is None for part in parts):
            return None
        return [t for part in parts for t in part]  # type: ignore[union-attr]
    store = getattr(dataset, "store", None)
    if store is not None and hasattr(dataset, "indices"):  # StoreDataset, StoreStructures
        table = store.config_types
        return [None if c < 0 else table[c] for c in store.column("config_type")[dataset.indices].tolist()]
    structures = getattr(dataset, "structures", dataset)
    if not isinstance(structures, Sequence) or getattr(dataset, "streaming", False):
        return None  # not read structure by structure just for a table
    return [getattr(atoms, "info", {}).get("config_type") for atoms in structures]


def config_types_of(dataset: Any) -> list[str] | None:
    """The ``config_type`` of each structure of ``dataset`` (a list of ``ase.Atoms``, a
    :class:`GraphDataset`, a store-backed or mixed dataset), :data:`DEFAULT_CONFIG_TYPE` where a
    structure has none; ``None`` when no structure has one (no per-type table is made then)."""
    raw = _raw_config_types(dataset)
    if raw is None or all(t is None for t in raw):
        return None
    return [DEFAULT_CONFIG_TYPE if t is None else str(t) for t in raw]


def _metric_name(config_type: str) -> str:
    """A config type as a tracker-safe metric-name suffix (MLflow allows letters, digits, _ . - space : /)."""
    return re.sub(r"[^\w.\- ]", "_", config_type)


def _errors(prefix: str, pred: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    err = (pred - ref) * 1000.0
    return {f"{prefix}_mae": float(np.abs(err).mean()), f"{prefix}_rmse": float(math.sqrt(float((err**2).mean())))}


def _structures_with(batch: dict[str, torch.Tensor], label: str) -> torch.Tensor | None:
    """Indices of the structures that carry ``label`` (``None``: all of them)."""
    mask = label_mask(batch, label)
    return None if mask is None else torch.nonzero(mask.to(batch[K.N_ATOMS].device)).reshape(-1)


def _atoms_with(batch: dict[str, torch.Tensor], label: str) -> torch.Tensor | None:
    """Indices of the atoms whose structure carries ``label`` (``None``: all of them)."""
    mask = label_mask(batch, label)
    return None if mask is None else torch.nonzero(mask.to(batch[K.BATCH].device)[batch[K.BATCH]]).reshape(-1)


def _pick(values: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    return values if rows is None else values.index_select(0, rows)


class ErrorAccumulator:
    """Accumulates predictions against labels batch by batch; keeps arrays for parity plots.

    Each label is scored per structure wherever it exists (a batch mixing structures with and
    without, say, an energy scores the energy of those that have one); :attr:`counts` says how
    many structures each quantity covers."""

    def __init__(self) -> None:
        self.pairs: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {}
        self.counts: dict[str, int] = {}  # structures scored per quantity (energy, forces, stress)
        self.groups: dict[str, list[np.ndarray]] = {}  # config type of every value in ``pairs`` (when given)
        self.type_counts: dict[str, int] = {}  # structures seen per config type
        self.grouped: bool | None = None  # whether every batch came with config types (None: no batch yet)

    def _add(self, name: str, pred: torch.Tensor, ref: torch.Tensor) -> None:
        preds, refs = self.pairs.setdefault(name, ([], []))
        preds.append(pred.detach().double().cpu().numpy().reshape(-1))
        refs.append(ref.detach().double().cpu().numpy().reshape(-1))

    def _count(self, quantity: str, batch: dict[str, torch.Tensor], rows: torch.Tensor | None) -> None:
        n = int(batch[K.N_ATOMS].shape[0]) if rows is None else int(rows.numel())
        self.counts[quantity] = self.counts.get(quantity, 0) + n

    def add(self, batch: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor],
            config_types: Sequence[str] | None = None) -> None:
        """Add one batch; labels absent from the batch (or, per structure, masked out) are skipped.
        ``config_types``: the config type of each structure of the batch, for the per-type tables
        (:meth:`config_type_table`; kept only if every batch brings them)."""
        types = None if config_types is None else np.asarray(list(config_types), dtype=object)
        self.grouped = (types is not None) if self.grouped is None else (self.grouped and types is not None)
        if types is not None:
            for name in types.tolist():
                self.type_counts[name] = self.type_counts.get(name, 0) + 1
        owner = batch[K.BATCH].cpu().numpy()
        if K.ENERGY in batch and K.ENERGY in outputs:
            rows = _structures_with(batch, K.ENERGY)
            n = batch[K.N_ATOMS].to(outputs[K.ENERGY].dtype)
            self._add("energy_per_atom", _pick(outputs[K.ENERGY] / n, rows), _pick(batch[K.ENERGY] / n, rows))
            self._group("energy_per_atom", types, None if rows is None else rows.cpu().numpy(), len(n))
            self._count("energy", batch, rows)
        if K.FORCES in batch and K.FORCES in outputs:
            atoms = _atoms_with(batch, K.FORCES)
            self._add("forces", _pick(outputs[K.FORCES], atoms), _pick(batch[K.FORCES], atoms))
            self._group("forces", types, owner if atoms is None else owner[atoms.cpu().numpy()], None)
            self._count("forces", batch, _structures_with(batch, K.FORCES))
        if K.STRESS in batch and K.STRESS in outputs:
            rows = _structures_with(batch, K.STRESS)
            self._add("stress", _pick(outputs[K.STRESS], rows), _pick(batch[K.STRESS], rows))
            self._group("stress", types, None if rows is None else rows.cpu().numpy(), int(batch[K.N_ATOMS].shape[0]))
            self._count("stress", batch, rows)

    def _group(self, name: str, types: np.ndarray | None, rows: np.ndarray | None, size: int | None) -> None:
        """Record the config type of each value just added to ``pairs[name]``: ``rows`` are the
        structures scored (None: all ``size`` of them), for forces the owner structure of each atom."""
        if types is None:
            return
        rows = np.arange(size) if rows is None else rows
        self.groups.setdefault(name, []).append(np.repeat(types[rows], _REPEAT[name]))

    def state(self) -> dict[str, Any]:
        """What :meth:`absorb` needs (picklable: gathered from every rank by the training loop)."""
        return {"pairs": self.pairs, "counts": self.counts, "groups": self.groups, "type_counts": self.type_counts,
                "grouped": self.grouped}

    def absorb(self, state: dict[str, Any]) -> None:
        """Add another accumulator's :meth:`state` (another rank's share of the same data set)."""
        for name, (preds, refs) in state["pairs"].items():
            mine = self.pairs.setdefault(name, ([], []))
            mine[0].extend(preds)
            mine[1].extend(refs)
        for name, values in state["groups"].items():
            self.groups.setdefault(name, []).extend(values)
        for table, other in ((self.counts, state["counts"]), (self.type_counts, state["type_counts"])):
            for key, n in other.items():
                table[key] = table.get(key, 0) + n
        if state["grouped"] is not None:
            self.grouped = state["grouped"] if self.grouped is None else (self.grouped and state["grouped"])

    def arrays(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Concatenated (prediction, reference) of one quantity."""
        preds, refs = self.pairs[name]
        return np.concatenate(preds), np.concatenate(refs)

    def metrics(self) -> dict[str, float]:
        """MAE and RMSE of each quantity, in meV/atom, meV/Å or meV/Å³."""
        out: dict[str, float] = {}
        for name, prefix in _QUANTITIES.items():
            if name in self.pairs:
                out.update(_errors(prefix, *self.arrays(name)))
        return out

    def config_type_table(self) -> dict[str, dict[str, float]]:
        """Per config type (in order of appearance): ``count`` (structures) and the MAE/RMSE of
        energy per atom, forces and stress of its structures, in the units of :meth:`metrics`
        (MACE's per-``config_type`` error table). Empty unless every batch came with config types."""
        if not self.grouped:
            return {}
        table: dict[str, dict[str, float]] = {name: {"count": n} for name, n in self.type_counts.items()}
        for name, prefix in _QUANTITIES.items():
            if name not in self.pairs:
                continue
            pred, ref = self.arrays(name)
            groups = np.concatenate(self.groups[name]) if self.groups.get(name) else np.zeros(0, dtype=object)
            for config_type, row in table.items():
                chosen = groups == config_type
                if chosen.any():
                    row.update(_errors(prefix, pred[chosen], ref[chosen]))
        return table

    def config_type_metrics(self) -> dict[str, float]:
        """:meth:`config_type_table` as flat metrics: ``forces_mae/<config_type>``, ``count/<config_type>``, …"""
        return {f"{key}/{_metric_name(config_type)}": value
                for config_type, row in self.config_type_table().items() for key, value in row.items()}


def format_config_type_table(table: dict[str, dict[str, float]]) -> list[str]:
    """The rows of a printed per-``config_type`` table (:meth:`ErrorAccumulator.config_type_table`)."""
    if not table:
        return []
    width = max(11, *(len(name) for name in table))
    head = (f"  {'config_type':<{width}} {'count':>6}  {'E MAE':>9} {'E RMSE':>9}  {'F MAE':>9} {'F RMSE':>9}  "
            f"{'S MAE':>9} {'S RMSE':>9}")
    units = f"  {'':<{width}} {'':>6}  {'meV/atom':>19}  {'meV/Å':>19}  {'meV/Å³':>19}"
    rows = [head, units]
    for name, row in table.items():
        cells = [f"{row[key]:9.2f}" if key in row else f"{'-':>9}" for key in
                 ("energy_mae", "energy_rmse", "forces_mae", "forces_rmse", "stress_mae", "stress_rmse")]
        rows.append(f"  {name:<{width}} {int(row['count']):>6}  {cells[0]} {cells[1]}  {cells[2]} {cells[3]}  "
                    f"{cells[4]} {cells[5]}")
    return rows


# -- uncertainty metrics -----------------------------------------------------------------------------
def spearman(predicted: np.ndarray, actual: np.ndarray) -> float:
    """Spearman rank correlation (nan when either side is constant)."""
    from scipy.stats import spearmanr

    predicted, actual = np.asarray(predicted, float).ravel(), np.asarray(actual, float).ravel()
    if len(predicted) < 3 or np.ptp(predicted) == 0 or np.ptp(actual) == 0:
        return float("nan")
    return float(spearmanr(predicted, actual).statistic)


def gaussian_nll(errors: np.ndarray, stds: np.ndarray) -> float:
    """Mean negative log-likelihood of ``errors`` under ``N(0, σ²)`` (σ floored at 1e-12·max)."""
    errors, stds = np.asarray(errors, float).ravel(), np.asarray(stds, float).ravel()
    var = np.maximum(stds, max(float(stds.max(initial=0.0)) * 1e-6, TINY)) ** 2
    return float(np.mean(0.5 * np.log(2 * np.pi * var) + errors**2 / (2 * var)))


def calibration_curve(errors: np.ndarray, stds: np.ndarray, n: int = 99) -> tuple[np.ndarray, np.ndarray]:
    """(expected, observed) fractions of errors inside the central Gaussian interval of
    probability ``p`` for ``n`` values of ``p`` in (0, 1)."""
    from scipy.stats import norm

    errors, stds = np.abs(np.asarray(errors, float).ravel()), np.asarray(stds, float).ravel()
    expected = np.linspace(0.01, 0.99, n)
    z = norm.ppf(0.5 + expected / 2)
    observed = np.array([(errors <= zi * stds).mean() for zi in z])
    return expected, observed


def miscalibration_area(errors: np.ndarray, stds: np.ndarray) -> float:
    """Area between the calibration curve and the diagonal (0 = perfect, 0.5 = worst)."""
    expected, observed = calibration_curve(errors, stds)
    return float(np.trapezoid(np.abs(observed - expected), expected))


def ence(errors: np.ndarray, stds: np.ndarray, bins: int = 10) -> float:
    """Expected normalised calibration error (Levi et al. 2022): mean over equal-count bins of
    σ of ``|RMV − RMSE| / RMV``."""
    errors, stds = np.asarray(errors, float).ravel(), np.asarray(stds, float).ravel()
    order = np.argsort(stds)
    values = []
    for chunk in np.array_split(order, min(bins, len(order))):
        rmv = math.sqrt(float(np.mean(stds[chunk] ** 2)))
        rmse = math.sqrt(float(np.mean(errors[chunk] ** 2)))
        if rmv > TINY:
            values.append(abs(rmv - rmse) / rmv)
    return float(np.mean(values)) if values else float("nan")


class UQAccumulator:
    """Collects errors and predicted stds batch by batch; :meth:`metrics` summarises them.

    Energy is per structure (eV). Forces are per component, each with its atom's std; the
    per-atom error is the RMS over the atom's components, the per-structure error the RMS over
    its atoms' components, compared with the RMS of its atoms' stds.
    """

    def __init__(self) -> None:
        self.parts: dict[str, list[np.ndarray]] = {}

    def _put(self, name: str, values: torch.Tensor) -> None:
        self.parts.setdefault(name, []).append(values.detach().double().cpu().numpy())

    def add(self, batch: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        """Add one batch; quantities without both a label and a std are skipped."""
        if K.ENERGY in batch and K.ENERGY_STD in outputs:
            rows = _structures_with(batch, K.ENERGY)
            self._put("energy_error", _pick(outputs[K.ENERGY] - batch[K.ENERGY], rows))
            self._put("energy_std", _pick(outputs[K.ENERGY_STD], rows))
        if K.FORCES in batch and K.FORCES_STD in outputs:
            size = int(batch[K.N_ATOMS].shape[0])
            error = outputs[K.FORCES] - batch[K.FORCES]
            n = batch[K.N_ATOMS].to(error.dtype)
            per_structure = torch.zeros(size, dtype=error.dtype, device=error.device).index_add(
                0, batch[K.BATCH], error.pow(2).sum(-1))
            std_structure = torch.zeros(size, dtype=error.dtype, device=error.device).index_add(
                0, batch[K.BATCH], outputs[K.FORCES_STD].pow(2))
            rows, atoms = _structures_with(batch, K.FORCES), _atoms_with(batch, K.FORCES)
            self._put("forces_error", _pick(error, atoms))
            self._put("forces_std", _pick(outputs[K.FORCES_STD], atoms))
            self._put("structure_forces_error", _pick((per_structure / (3 * n)).sqrt(), rows))
            self._put("structure_forces_std", _pick((std_structure / n).sqrt(), rows))

    def array(self, name: str) -> np.ndarray:
        return np.concatenate(self.parts[name])

    def pairs(self, quantity: str) -> tuple[np.ndarray, np.ndarray]:
        """(errors, stds) with one std per error: per structure for energy, per component for forces."""
        errors, stds = self.array(f"{quantity}_error"), self.array(f"{quantity}_std")
        if quantity == "forces":
            stds = np.repeat(stds, 3)
        return errors.ravel(), stds

    def metrics(self) -> dict[str, float]:
        """Spearman ρ, Gaussian NLL, miscalibration area, ENCE and mean std of energy and forces."""
        out: dict[str, float] = {}
        if "energy_error" in self.parts:
            errors, stds = self.pairs("energy")
            out["energy_std_mean"] = float(stds.mean())
            out["energy_spearman"] = spearman(stds, np.abs(errors))
            out.update(_calibration_metrics("energy", errors, stds))
        if "forces_error" in self.parts:
            errors, stds = self.pairs("forces")
            atom_error = np.sqrt((self.array("forces_error") ** 2).mean(-1))
            out["forces_std_mean"] = float(self.array("forces_std").mean())
            out["forces_spearman_atom"] = spearman(self.array("forces_std"), atom_error)
            out["forces_spearman_structure"] = spearman(self.array("structure_forces_std"),
                                                        self.array("structure_forces_error"))
            out.update(_calibration_metrics("forces", errors, stds))
        return out


def _calibration_metrics(prefix: str, errors: np.ndarray, stds: np.ndarray) -> dict[str, float]:
    return {f"{prefix}_nll": gaussian_nll(errors, stds),
            f"{prefix}_miscalibration_area": miscalibration_area(errors, stds),
            f"{prefix}_ence": ence(errors, stds)}
