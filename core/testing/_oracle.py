"""The conformance kit of label oracles: what every ``register_oracles`` plugin should pass.

    from atomforge.testing import check_oracle
    check_oracle(my_oracle, options={"method": "fast"})            # raises ConformanceError on failure
    check_oracle(my_molecular_oracle, structures=[molecule("H2O")])

Checks: the factory and its options pickle (campaigns send them to worker processes); the
factory returns an :class:`atomforge.Oracle`; for every structure, ``label(atoms)`` returns a
new ``ase.Atoms`` with the input's numbers and positions and leaves the input (positions,
numbers, cell, pbc, info, calculator) untouched; its energy is a finite number, its forces
finite and shaped (N, 3), its stress (on 3D-periodic cells, when present) finite and shaped
(3, 3) or Voigt (6,); labelling twice gives the same numbers; the forces agree with central
finite differences of the energy (h = 1e-3 Å on 3 random coordinates, within
``force_tolerance`` eV/Å; ``check_forces=False`` skips this); the energy is invariant under a
translation (1e-6 relative). Labels are read with :func:`atomforge.get_labels`.

The default structures suit EMT-like metals: a rattled 4-atom fcc Cu cell and a Cu3 cluster
(which carries a stale calculator, to check that it is left alone). Pass molecules of your
method's elements in ``structures`` for other oracles.
"""

from __future__ import annotations

import copy
import math
import pickle
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from .._specs import OracleSpec
from ..data.structures import get_labels
from ..exploration.oracle import Oracle
from ._common import CheckResult, central_difference_force, check, finish, translated

__all__ = ["check_oracle", "default_oracle_structures"]

FD_STEP = 1e-3  # Å
TRANSLATION_TOLERANCE = 1e-6  # relative
REPEAT_TOLERANCE = 1e-10  # relative


def default_oracle_structures() -> list[Atoms]:
    """A rattled 4-atom fcc Cu cell (3D periodic) and a Cu3 cluster with a stale calculator."""
    from ase.build import bulk

    rng = np.random.default_rng(0)
    crystal = bulk("Cu", "fcc", a=3.61, cubic=True)
    crystal.positions += rng.normal(0, 0.05, crystal.positions.shape)
    crystal.info["source"] = "check_oracle"
    cluster = Atoms("Cu3", positions=[[0.0, 0.0, 0.0], [2.5, 0.0, 0.0], [1.2, 2.1, 0.1]])
    cluster.info.update({"source": "check_oracle", "tags": [1, 2]})
    cluster.calc = SinglePointCalculator(cluster, energy=123.0)
    return [crystal, cluster]


# -- helpers -------------------------------------------------------------------------------------------
def _failure(name: str, error: BaseException) -> CheckResult:
    return check(f"{name} — raised {type(error).__name__}: {error}", False)


def _equal(a: Any, b: Any) -> bool:
    """Deep equality of info dicts and calculator results (numpy arrays compared exactly)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.shape(a) == np.shape(b) and bool(np.array_equal(a, b, equal_nan=True))
    try:
        return bool(a == b) or (a != a and b != b)  # noqa: PLR0124 - NaN equals NaN here
    except Exception:  # noqa: BLE001 - objects without a truth value of ==
        return a is b


def _snapshot(atoms: Atoms) -> dict[str, Any]:
    calc = atoms.calc
    return {"positions": atoms.positions.copy(), "numbers": atoms.numbers.copy(), "cell": atoms.cell[:].copy(),
            "pbc": atoms.pbc.copy(), "info": copy.deepcopy(atoms.info), "calc": calc,
            "results": copy.deepcopy(dict(getattr(calc, "results", {}) or {}))}


def _changed(atoms: Atoms, before: Mapping[str, Any]) -> list[str]:
    now = _snapshot(atoms)
    changed = [key for key in ("positions", "numbers", "cell", "pbc", "info") if not _equal(now[key], before[key])]
    if now["calc"] is not before["calc"] or not _equal(now["results"], before["results"]):
        changed.append("calc")
    return changed


def _raw_stress(atoms: Atoms) -> np.ndarray | None:
    calc = atoms.calc
    results = dict(getattr(calc, "results", {}) or {}) if calc is not None else {}
    value = results.get("stress", atoms.info.get("stress"))
    return None if value is None else np.asarray(value, dtype=float)


def _energy(oracle: Oracle, atoms: Atoms) -> float:
    energy = get_labels(oracle.label(atoms)).energy
    if energy is None:
        raise ValueError("the labelled copy carries no energy")
    return float(energy)


def _relative(a: Any, b: Any) -> float:
    if a is None and b is None:
        return 0.0
    if a is None or b is None:
        return math.inf
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.shape != b.shape:
        return math.inf
    if a.size == 0:
        return 0.0
    return float(np.abs(a - b).max()) / max(1.0, float(np.abs(a).max()))


# -- the checks ----------------------------------------------------------------------------------------
def _label_checks(oracle: Oracle, atoms: Atoms, where: str, rng: np.random.Generator, force_tolerance: float,
                  check_forces: bool, results: list[CheckResult]) -> None:
    n = len(atoms)
    before = _snapshot(atoms)
    try:
        labelled = oracle.label(atoms)
    except Exception as error:  # noqa: BLE001
        results.append(_failure(f"label(atoms) labels it ({where})", error))
        return
    changed = _changed(atoms, before)
    results.append(check(f"input left unchanged: positions, numbers, cell, pbc, info, calc ({where}; "
                         f"changed: {changed or 'none'})", not changed))
    is_atoms = isinstance(labelled, Atoms)
    results.append(check(f"label(atoms) returns an ase.Atoms ({where}; found {type(labelled).__name__})", is_atoms))
    if not is_atoms:
        return
    results.append(check(f"label(atoms) returns a new object, not its input ({where})", labelled is not atoms))
    same = (len(labelled) == n and np.array_equal(labelled.numbers, atoms.numbers)
            and np.allclose(labelled.positions, atoms.positions, rtol=0, atol=1e-10))
    results.append(check(f"labelled copy has the input's numbers and positions ({where})", bool(same)))
    try:
        labels = get_labels(labelled)
    except Exception as error:  # noqa: BLE001 - e.g. an energy with several numbers
        results.append(_failure(f"get_labels(labelled copy) reads its labels ({where})", error))
        return
    energy_ok = labels.energy is not None and math.isfinite(labels.energy)
    results.append(check(f"energy is a finite number ({where}; found {labels.energy!r})", energy_ok))
    forces = labels.forces
    shape = None if forces is None else forces.shape
    results.append(check(f"forces shape: expected ({n}, 3), found {'missing' if shape is None else shape} ({where})",
                         shape == (n, 3)))
    if forces is not None:
        results.append(check(f"forces finite ({where})", bool(np.isfinite(forces).all())))
    if atoms.pbc.all():
        stress = _raw_stress(labelled)
        if stress is not None:
            ok = stress.shape in ((6,), (3, 3))
            results.append(check(f"stress shape: expected (3, 3) or Voigt (6,), found {stress.shape} ({where})", ok))
            results.append(check(f"stress finite ({where})", bool(np.isfinite(stress).all())))
    try:
        again = get_labels(oracle.label(atoms))
        error = max(_relative(labels.energy, again.energy), _relative(labels.forces, again.forces),
                    _relative(labels.stress, again.stress))
        results.append(CheckResult(f"deterministic: labelling twice gives the same energy, forces, stress ({where})",
                                   error, REPEAT_TOLERANCE))
    except Exception as error:  # noqa: BLE001
        results.append(_failure(f"deterministic: labelling twice ({where})", error))
    if not energy_ok:
        return
    if check_forces and shape == (n, 3):
        try:
            worst = 0.0
            for flat in rng.choice(3 * n, size=min(3, 3 * n), replace=False):
                i, d = divmod(int(flat), 3)
                fd = central_difference_force(lambda a: _energy(oracle, a), atoms, i, d, FD_STEP)
                worst = max(worst, abs(fd - float(forces[i, d])))
            results.append(CheckResult(f"forces = -dE/dr by central differences, |error| in eV/Å ({where})",
                                       worst if math.isfinite(worst) else math.inf, force_tolerance))
        except Exception as error:  # noqa: BLE001
            results.append(_failure(f"forces = -dE/dr by central differences ({where})", error))
    try:
        moved = translated(atoms, rng.normal(0, 1.5, 3))
        shifted = _energy(oracle, moved)
        error = abs(shifted - labels.energy) / max(1.0, abs(labels.energy))
        results.append(CheckResult(f"translation invariance of the energy ({where})", error, TRANSLATION_TOLERANCE))
    except Exception as error:  # noqa: BLE001
        results.append(_failure(f"translation invariance of the energy ({where})", error))


def check_oracle(
    factory_or_spec: Callable[..., Any] | OracleSpec,
    *,
    options: Mapping[str, Any] | None = None,
    structures: Sequence[Atoms] | None = None,
    force_tolerance: float = 1e-3,
    check_forces: bool = True,
) -> list[CheckResult]:
    """Run every check on ``factory(**options)`` and ``structures`` (default
    :func:`default_oracle_structures`); raise :class:`~atomforge.ConformanceError` listing the
    failures, else return the results."""
    factory = factory_or_spec.factory if isinstance(factory_or_spec, OracleSpec) else factory_or_spec
    options = dict(options or {})
    structures = list(default_oracle_structures() if structures is None else structures)
    results: list[CheckResult] = []
    try:
        pickle.loads(pickle.dumps((factory, options)))
        results.append(check("factory and options pickle (campaigns send them to worker processes)", True))
    except Exception as error:  # noqa: BLE001
        results.append(_failure("factory and options pickle (campaigns send them to worker processes)", error))
    try:
        oracle = factory(**options)
    except Exception as error:  # noqa: BLE001
        results.append(_failure(f"factory(**{options!r}) builds an oracle", error))
        return finish(results)
    is_oracle = isinstance(oracle, Oracle)
    results.append(check(f"factory returns an atomforge.Oracle with name and label() "
                         f"(found {type(oracle).__name__})", is_oracle))
    if not is_oracle:
        return finish(results)
    results.append(check(f"at least one structure to label (found {len(structures)})", len(structures) > 0))
    rng = np.random.default_rng(0)
    for index, atoms in enumerate(structures):
        where = f"structure {index}: {atoms.get_chemical_formula()}{', periodic' if atoms.pbc.all() else ''}"
        _label_checks(oracle, atoms, where, rng, force_tolerance, check_forces, results)
    return finish(results)
