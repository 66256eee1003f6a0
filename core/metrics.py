"""Error metrics in the units users compare: meV/atom, meV/Å and meV/Å³."""

from __future__ import annotations

import math

import numpy as np
import torch

from . import keys as K

__all__ = ["ErrorAccumulator"]


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
