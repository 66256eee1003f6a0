"""Records and interfaces shared by explorers, selectors and the active-learning loop.

An **explorer** (:func:`atomforge.hookspecs.register_explorers`) proposes configurations, driven
by any ASE calculator (in a campaign: the current model's UQ calculator). The loop scores each
one into a :class:`Candidate` (uncertainties, latent features), and a **selector**
(:func:`atomforge.hookspecs.register_selectors`) picks which to label, returning a
:class:`Selection`. Uncertainties are read from the calculator's documented extra result keys
(``forces_std`` per atom, ``forces_std_max`` and ``energy_std`` per structure) by
:func:`uncertainty_of`. :func:`structure_hash` is the key a configuration is known by (the label
journal's key, and how explorers deduplicate).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator

__all__ = ["Candidate", "Selection", "Explorer", "Selector", "uncertainty_of", "structure_hash", "TRUST_CLASSES",
           "min_distance_ratio", "unphysical_reason"]

#: DP-GEN's classes of a candidate by its max force std σ: accurate (σ < lo), candidate
#: (lo ≤ σ < hi, worth labelling) and failed (σ ≥ hi, too far off to learn from).
TRUST_CLASSES = ("accurate", "candidate", "failed")


@dataclass(frozen=True)
class Candidate:
    """One explored configuration with the model's uncertainty about it."""

    atoms: Atoms  # the configuration (no labels)
    max_force_std: float | None = None  # eV/Å, largest per-atom force std; None without a UQ head
    energy_std: float | None = None  # eV, std of the structure's energy; None without a UQ head
    features: np.ndarray | None = None  # [F] latent descriptor for diversity selection
    explorer: str = ""  # which explorer proposed it
    key: str = ""  # structure hash (the label journal's key)


@dataclass(frozen=True)
class Selection:
    """What a selector picked, and how the candidates fell into the trust window."""

    indices: tuple[int, ...]  # indices into the candidate list, in labelling order
    lo: float | None = None  # lower trust level used (eV/Å); None if not applicable
    hi: float | None = None  # upper trust level used (eV/Å)
    counts: Mapping[str, int] = field(default_factory=dict)  # accurate / candidate / failed


@runtime_checkable
class Explorer(Protocol):
    """Proposes configurations starting from ``starts``; never labels them."""

    def explore(self, starts: Sequence[Atoms], calculator: Calculator, *, hi: float | None,
                seed: int) -> list[Atoms]:
        """Candidates (copies, without calculators); ``hi`` is the upper trust level (eV/Å) at which
        a trajectory-based explorer stops, ``None`` when the calculator gives no uncertainty."""
        ...


@runtime_checkable
class Selector(Protocol):
    """Picks at most ``budget`` candidates to label."""

    def select(self, candidates: Sequence[Candidate], budget: int, *, calibration: float | None = None,
               seed: int = 0) -> Selection:
        """``calibration`` is the model's typical max force std on its validation set (eV/Å), the
        unit of adaptive trust levels; ``None`` when unknown."""
        ...


def uncertainty_of(results: Mapping[str, Any]) -> tuple[float | None, float | None]:
    """``(max force std, energy std)`` from ASE calculator results; ``None`` where absent.

    Reads ``forces_std_max`` if given, else the largest of ``forces_std`` ([N] per atom, or [N, 3]
    per component, then the per-atom norm).
    """
    energy_std = results.get("energy_std")
    energy_std = None if energy_std is None else float(np.asarray(energy_std).ravel()[0])
    if results.get("forces_std_max") is not None:
        return float(np.asarray(results["forces_std_max"]).ravel()[0]), energy_std
    forces_std = results.get("forces_std")
    if forces_std is None:
        return None, energy_std
    forces_std = np.asarray(forces_std, dtype=float)
    per_atom = np.linalg.norm(forces_std, axis=-1) if forces_std.ndim == 2 else forces_std
    return float(per_atom.max()), energy_std


def structure_hash(atoms: Atoms, decimals: int = 5) -> str:
    """A stable key of a configuration: atomic numbers, positions and cell rounded to
    ``decimals`` Å, and periodicity (16 hex digits of SHA-256)."""
    digest = hashlib.sha256()
    digest.update(np.asarray(atoms.numbers, dtype=np.int64).tobytes())
    for array in (atoms.positions, atoms.cell[:]):
        rounded = np.round(np.asarray(array, dtype=float), decimals) + 0.0  # +0.0 folds -0.0 into 0.0
        digest.update(rounded.tobytes())
    digest.update(np.asarray(atoms.pbc, dtype=bool).tobytes())
    return digest.hexdigest()[:16]


def min_distance_ratio(atoms: Atoms) -> float:
    """The smallest interatomic distance divided by the sum of the two atoms' covalent radii
    (ASE's table), over periodic images; ``inf`` for fewer than two atoms. A healthy structure is
    near 1 or above; an exploded MD frame (atoms run into each other) far below."""
    from ase.data import covalent_radii
    from ase.neighborlist import neighbor_list

    if len(atoms) < 2 and not atoms.pbc.any():
        return float("inf")
    radii = covalent_radii[atoms.numbers]
    i, j, d = neighbor_list("ijd", atoms, float(2.0 * radii.max()), self_interaction=False)
    if len(d) == 0:
        return float("inf")
    return float(np.min(d / (radii[i] + radii[j])))


def unphysical_reason(atoms: Atoms, min_ratio: float | None) -> str | None:
    """Why ``atoms`` is not worth labelling (two atoms closer than ``min_ratio`` × the sum of
    their covalent radii, or non-finite positions); ``None`` if it passes or the check is off."""
    if not np.isfinite(atoms.positions).all():
        return "non-finite positions"
    if min_ratio is None:
        return None
    ratio = min_distance_ratio(atoms)
    if ratio < min_ratio:
        return f"atoms overlap: closest pair at {ratio:.2f} × the sum of covalent radii (< {min_ratio:g})"
    return None
