"""One way to time an ASE calculator, shared by every benchmark (and by the MACE peer's venv:
only numpy and ASE are imported here)."""

from __future__ import annotations

import time

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator


def median_call_ms(calc: Calculator, atoms: Atoms, n_calls: int, n_warmup: int = 20, seed: int = 0) -> float:
    """Median ms per ``get_forces()``; positions nudged by ~1e-4 Å before every call so nothing
    is served from a cache."""
    atoms = atoms.copy()
    atoms.calc = calc
    rng = np.random.default_rng(seed)
    times = []
    for i in range(n_warmup + n_calls):
        atoms.positions = atoms.positions + rng.normal(scale=1e-4, size=atoms.positions.shape)
        start = time.perf_counter()
        atoms.get_forces()
        if i >= n_warmup:
            times.append(1e3 * (time.perf_counter() - start))
    return float(np.median(times))
