"""``example_energy_std``: pick the candidates with the largest energy std per atom."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from atomforge import Candidate, ConfigError, Selection

__all__ = ["EnergyStdSelector"]


class EnergyStdSelector:
    """The ``budget`` candidates with the largest ``energy_std / n_atoms`` (eV/atom) above
    ``minimum`` — for models whose energy spread is better calibrated than their force spread."""

    def __init__(self, *, minimum: float = 0.0) -> None:
        if not isinstance(minimum, (int, float)) or minimum < 0:
            raise ConfigError(f"example_energy_std.minimum: expected a number ≥ 0 (eV/atom), got {minimum!r}")
        self.minimum = float(minimum)

    def select(self, candidates: Sequence[Candidate], budget: int, *, calibration: float | None = None,
               seed: int = 0) -> Selection:
        if any(c.energy_std is None for c in candidates):
            raise ConfigError("example_energy_std needs a model with a UQ head (candidates carry no energy_std)")
        per_atom = np.array([c.energy_std / len(c.atoms) for c in candidates], dtype=float)
        order = [int(i) for i in np.argsort(-per_atom, kind="stable") if per_atom[i] >= self.minimum]
        chosen = tuple(order[: max(0, budget)])
        return Selection(chosen, counts={"candidate": len(order), "accurate": len(candidates) - len(order)})
