"""What every conformance kit shares: the result record and the final verdict."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from ase import Atoms

from .._errors import ConformanceError

__all__ = ["CheckResult", "check", "finish", "random_rotation", "central_difference_force", "translated"]


@dataclass(frozen=True)
class CheckResult:
    """One check: its name, the largest error found, the tolerance and whether it passed
    (``error <= tolerance``; a yes/no check uses error 0 or 1 against tolerance 0)."""

    name: str
    error: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return bool(self.error <= self.tolerance)


def check(name: str, ok: bool) -> CheckResult:
    """A yes/no check as a :class:`CheckResult`."""
    return CheckResult(name, 0.0 if ok else 1.0, 0.0)


def finish(results: Sequence[CheckResult]) -> list[CheckResult]:
    """``results`` if all passed, else a :class:`ConformanceError` listing every failure."""
    failed = [r for r in results if not r.passed]
    if failed:
        lines = "\n".join(f"  {r.name}: error {r.error:.3g} > tolerance {r.tolerance:.1g}" for r in failed)
        raise ConformanceError(f"{len(failed)} of {len(results)} conformance checks failed:\n{lines}")
    return list(results)


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A Haar-random proper rotation matrix [3, 3]."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def central_difference_force(energy: Callable[[Atoms], float], atoms: Atoms, atom: int, axis: int, h: float) -> float:
    """``-∂E/∂r[atom, axis]`` of ``energy(atoms)`` by a central difference with step ``h`` (Å)."""
    plus, minus = atoms.copy(), atoms.copy()
    plus.positions[atom, axis] += h
    minus.positions[atom, axis] -= h
    return -(energy(plus) - energy(minus)) / (2 * h)


def translated(atoms: Atoms, shift: np.ndarray) -> Atoms:
    """A copy of ``atoms`` moved by ``shift`` (Å), wrapped back into a fully periodic cell."""
    moved = atoms.copy()
    moved.positions += shift
    if moved.pbc.all():
        moved.wrap()
    return moved
