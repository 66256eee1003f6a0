"""Error metrics in the units users compare (meV/atom, meV/Å, meV/Å³), and the metrics of
predicted uncertainties (rank correlation, Gaussian NLL, calibration curve and area, ENCE)."""

from __future__ import annotations

import math

import numpy as np
import torch

from .. import keys as K
from ..data.fields import label_mask

__all__ = ["ErrorAccumulator", "UQAccumulator", "spearman", "gaussian_nll", "calibration_curve",
           "miscalibration_area", "ence", "TINY"]

TINY = 1e-12  # floor of standard deviations


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

    def _add(self, name: str, pred: torch.Tensor, ref: torch.Tensor) -> None:
        preds, refs = self.pairs.setdefault(name, ([], []))
        preds.append(pred.detach().double().cpu().numpy().reshape(-1))
        refs.append(ref.detach().double().cpu().numpy().reshape(-1))

    def _count(self, quantity: str, batch: dict[str, torch.Tensor], rows: torch.Tensor | None) -> None:
        n = int(batch[K.N_ATOMS].shape[0]) if rows is None else int(rows.numel())
        self.counts[quantity] = self.counts.get(quantity, 0) + n

    def add(self, batch: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        """Add one batch; labels absent from the batch (or, per structure, masked out) are skipped."""
        if K.ENERGY in batch and K.ENERGY in outputs:
            rows = _structures_with(batch, K.ENERGY)
            n = batch[K.N_ATOMS].to(outputs[K.ENERGY].dtype)
            self._add("energy_per_atom", _pick(outputs[K.ENERGY] / n, rows), _pick(batch[K.ENERGY] / n, rows))
            self._count("energy", batch, rows)
        if K.FORCES in batch and K.FORCES in outputs:
            atoms = _atoms_with(batch, K.FORCES)
            self._add("forces", _pick(outputs[K.FORCES], atoms), _pick(batch[K.FORCES], atoms))
            self._count("forces", batch, _structures_with(batch, K.FORCES))
        if K.STRESS in batch and K.STRESS in outputs:
            rows = _structures_with(batch, K.STRESS)
            self._add("stress", _pick(outputs[K.STRESS], rows), _pick(batch[K.STRESS], rows))
            self._count("stress", batch, rows)

    def arrays(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Concatenated (prediction, reference) of one quantity."""
        preds, refs = self.pairs[name]
        return np.concatenate(preds), np.concatenate(refs)

    def metrics(self) -> dict[str, float]:
        """MAE and RMSE of each quantity, in meV/atom, meV/Å or meV/Å³."""
        units = {"energy_per_atom": "energy", "forces": "forces", "stress": "stress"}
        out: dict[str, float] = {}
        for name, prefix in units.items():
            if name not in self.pairs:
                continue
            pred, ref = self.arrays(name)
            err = (pred - ref) * 1000.0
            out[f"{prefix}_mae"] = float(np.abs(err).mean())
            out[f"{prefix}_rmse"] = float(math.sqrt(float((err**2).mean())))
        return out


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
