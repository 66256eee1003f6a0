"""Error metrics in the units users compare (meV/atom, meV/Å, meV/Å³), and the metrics of
predicted uncertainties (rank correlation, Gaussian NLL, calibration curve and area, ENCE)."""

from __future__ import annotations

import math

import numpy as np
import torch

from .. import keys as K

__all__ = ["ErrorAccumulator", "UQAccumulator", "spearman", "gaussian_nll", "calibration_curve",
           "miscalibration_area", "ence", "TINY"]

TINY = 1e-12  # floor of standard deviations


class ErrorAccumulator:
    """Accumulates predictions against labels batch by batch; keeps arrays for parity plots."""

    def __init__(self) -> None:
        self.pairs: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {}

    def _add(self, name: str, pred: torch.Tensor, ref: torch.Tensor) -> None:
        preds, refs = self.pairs.setdefault(name, ([], []))
        preds.append(pred.detach().double().cpu().numpy().reshape(-1))
        refs.append(ref.detach().double().cpu().numpy().reshape(-1))

    def add(self, batch: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        """Add one batch; labels absent from the batch are skipped."""
        if K.ENERGY in batch and K.ENERGY in outputs:
            n = batch[K.N_ATOMS].to(outputs[K.ENERGY].dtype)
            self._add("energy_per_atom", outputs[K.ENERGY] / n, batch[K.ENERGY] / n)
        if K.FORCES in batch and K.FORCES in outputs:
            self._add("forces", outputs[K.FORCES], batch[K.FORCES])
        if K.STRESS in batch and K.STRESS in outputs:
            self._add("stress", outputs[K.STRESS], batch[K.STRESS])

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
            self._put("energy_error", outputs[K.ENERGY] - batch[K.ENERGY])
            self._put("energy_std", outputs[K.ENERGY_STD])
        if K.FORCES in batch and K.FORCES_STD in outputs:
            size = int(batch[K.N_ATOMS].shape[0])
            error = outputs[K.FORCES] - batch[K.FORCES]
            n = batch[K.N_ATOMS].to(error.dtype)
            per_structure = torch.zeros(size, dtype=error.dtype, device=error.device).index_add(0, batch[K.BATCH], error.pow(2).sum(-1))
            std_structure = torch.zeros(size, dtype=error.dtype, device=error.device).index_add(
                0, batch[K.BATCH], outputs[K.FORCES_STD].pow(2))
            self._put("forces_error", error)
            self._put("forces_std", outputs[K.FORCES_STD])
            self._put("structure_forces_error", (per_structure / (3 * n)).sqrt())
            self._put("structure_forces_std", (std_structure / n).sqrt())

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
