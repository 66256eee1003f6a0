"""Host side of the data model: labelled ``ase.Atoms`` and their validation.

Labels live where ASE puts them: a ``SinglePointCalculator`` (what ``ase.io.read`` returns for
extxyz and ASE db files), or ``atoms.info['energy'|'stress']`` / ``atoms.arrays['forces']``.
Per-structure metadata lives in ``atoms.info``: ``charge`` (e), ``spin`` (multiplicity),
``fidelity`` (level-of-theory index) and ``weight`` (loss weight).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Iterable, Sequence

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.stress import full_3x3_to_voigt_6_stress, voigt_6_to_full_3x3_stress

from .._errors import ConfigError, DataValidationError

__all__ = [
    "Labels",
    "Metadata",
    "get_labels",
    "get_metadata",
    "attach_labels",
    "validate_structure",
    "validate_dataset",
    "check_geometry",
    "MIN_DISTANCE",
    "complete_extxyz_length",
    "LabelKeys",
    "relabel",
]

MIN_DISTANCE = 0.1  # Å; two atoms closer than this are an input error, not physics


@dataclass(frozen=True)
class Labels:
    """Reference labels of one structure; ``None`` where absent. Stress is 3x3 (ASE sign)."""

    energy: float | None
    forces: np.ndarray | None
    stress: np.ndarray | None

    def has(self, key: str) -> bool:
        """Whether the label ``key`` ('energy', 'forces' or 'stress') is present."""
        return getattr(self, key) is not None


@dataclass(frozen=True)
class Metadata:
    """Per-structure metadata carried into every batch."""

    charge: float = 0.0
    spin: float = 0.0
    fidelity: int = 0
    weight: float = 1.0


def _calc_results(atoms: Atoms) -> dict:
    calc = atoms.calc
    return dict(getattr(calc, "results", {}) or {}) if calc is not None else {}


def _as_stress(value: object) -> np.ndarray:
    arr = np.asarray(value, dtype=float)
    if arr.shape == (6,):
        return voigt_6_to_full_3x3_stress(arr)
    if arr.shape in ((3, 3), (9,)):
        return arr.reshape(3, 3)
    raise DataValidationError(
        f"stress label has shape {arr.shape}; expected (6,) Voigt or (3, 3). Fix the data file."
    )


def get_labels(atoms: Atoms) -> Labels:
    """Read energy, forces and stress labels from a calculator's results or info/arrays."""
    results = _calc_results(atoms)
    energy = results.get("energy", atoms.info.get("energy"))
    forces = results.get("forces", atoms.arrays.get("forces"))
    stress = results.get("stress", atoms.info.get("stress"))
    return Labels(
        energy=None if energy is None else _as_energy(energy),
        forces=None if forces is None else np.asarray(forces, dtype=float),
        stress=None if stress is None else _as_stress(stress),
    )


def _as_energy(value: object) -> float:
    arr = np.asarray(value, dtype=float)
    if arr.size != 1:
        raise DataValidationError(
            f"energy label must be one number per structure, got shape {arr.shape}"
        )
    return float(arr.reshape(-1)[0])


def get_metadata(atoms: Atoms) -> Metadata:
    """Charge, spin, fidelity and weight from ``atoms.info`` (defaults where absent; the charge
    defaults to the sum of ASE's per-atom initial charges, which is how an ASE db stores it).
    Read by the same field readers that put them into graphs (:data:`atomforge.DEFAULT_FIELDS`)."""
    from .fields import DEFAULT_FIELDS

    def value(key: str) -> object:
        spec = DEFAULT_FIELDS[key]
        read = spec.read(atoms) if spec.read is not None else None
        return spec.default if read is None else read

    return Metadata(charge=float(value("charge")), spin=float(value("spin")), fidelity=int(value("fidelity")),
                    weight=float(value("weight")))


def attach_labels(
    atoms: Atoms,
    *,
    energy: float | None = None,
    forces: np.ndarray | None = None,
    stress: np.ndarray | None = None,
) -> Atoms:
    """Return a copy of ``atoms`` carrying the given labels in a ``SinglePointCalculator``."""
    labelled = atoms.copy()
    results: dict = {}
    if energy is not None:
        results["energy"] = float(energy)
        results["free_energy"] = float(energy)
    if forces is not None:
        results["forces"] = np.asarray(forces, dtype=float)
    if stress is not None:
        results["stress"] = full_3x3_to_voigt_6_stress(_as_stress(stress))
    labelled.calc = SinglePointCalculator(labelled, **results)
    return labelled


@dataclass(frozen=True)
class LabelKeys:
    """Where a structure's labels are found (MACE's ``energy_key``, ``forces_key``, ``stress_key``,
    ``virials_key``): ``atoms.info[energy]``, ``atoms.arrays[forces]``, ``atoms.info[stress]``
    (3x3, 9 or Voigt 6, eV/Å³, ASE sign) and ``atoms.info[virials]`` (eV; stress = −virials / V),
    each also taken from a calculator's results under the same name (what ``ase.io.read`` makes of
    an extxyz ``energy=``). A structure without a key is unlabelled for that quantity."""

    energy: str = "energy"  # MACE's default: REF_energy
    forces: str = "forces"  # MACE's default: REF_forces
    stress: str = "stress"  # MACE's default: REF_stress
    virials: str = "virials"  # MACE's default: REF_virials; used only where there is no stress

    #: the data-source options that set them
    OPTIONS: ClassVar[tuple[str, ...]] = ("energy_key", "forces_key", "stress_key", "virials_key")

    @classmethod
    def pop_from(cls, options: dict, where: str) -> "LabelKeys":
        """The keys given as ``<quantity>_key`` options (removed from ``options``; defaults for the rest)."""
        given = {name[: -len("_key")]: options.pop(name) for name in cls.OPTIONS if name in options}
        bad = {k: v for k, v in given.items() if not isinstance(v, str) or not v}
        if bad:
            raise ConfigError(f"{where}: {', '.join(f'{k}_key' for k in bad)} must name an info/arrays "
                              f"entry (e.g. energy_key: REF_energy); got {bad}")
        return cls(**given)

    @property
    def is_default(self) -> bool:
        return self == LabelKeys()

    def as_options(self) -> dict[str, str]:
        """The keys that differ from the defaults, as data-source options."""
        default = LabelKeys()
        return {f"{name}_key": getattr(self, name) for name in ("energy", "forces", "stress", "virials")
                if getattr(self, name) != getattr(default, name)}


_LABEL_RESULTS = ("energy", "free_energy", "forces", "stress")


def _stress_from_virials(atoms: Atoms, virials: object, where: str) -> np.ndarray:
    """stress = −virials / V (MACE's convention; ASE's stress sign)."""
    volume = abs(float(np.linalg.det(np.asarray(atoms.cell[:], dtype=float)))) if np.all(atoms.pbc) else 0.0
    if volume < 1e-9:
        raise DataValidationError(f"{where}: a virials label needs a periodic cell with a volume to become a "
                                  f"stress; this structure has pbc={np.asarray(atoms.pbc).tolist()} and volume "
                                  f"{volume:.3g} Å^3. Drop the virials of non-periodic structures.")
    return -_as_stress(virials) / volume


def relabel(atoms: Atoms, keys: LabelKeys, *, where: str = "structure") -> Atoms:
    """A copy of ``atoms`` whose labels are those found under ``keys``, in a
    ``SinglePointCalculator`` (where every reader downstream looks). The entries read are removed
    from ``info``/``arrays``, and so are entries under the default names (``energy``, ``stress``,
    ``forces``) when other keys are chosen — they would otherwise be taken for labels. Other
    calculator results (charges, magmoms, ...) are kept."""
    results = _calc_results(atoms)
    out = atoms.copy()
    taken: dict[str, object] = {}
    for quantity, container in (("energy", out.info), ("forces", out.arrays), ("stress", out.info),
                                ("virials", out.info)):
        key = getattr(keys, quantity)
        value = results.get(key) if key in results else container.get(key)
        container.pop(key, None)
        if quantity != "virials" and key != quantity:
            container.pop(quantity, None)
        taken[quantity] = value
    if taken["stress"] is None and taken["virials"] is not None:
        taken["stress"] = _stress_from_virials(out, taken["virials"], where)
    kept = {k: v for k, v in results.items() if k not in _LABEL_RESULTS and k != keys.virials}
    labelled = attach_labels(out, energy=None if taken["energy"] is None else _as_energy(taken["energy"]),
                             forces=taken["forces"], stress=taken["stress"])
    labelled.calc.results.update(kept)
    return labelled


def _where(index: int | None, source: str) -> str:
    parts = [f"structure {index}" if index is not None else "structure"]
    if source:
        parts.append(f"of {source}")
    return " ".join(parts)


def _check_finite(name: str, value: np.ndarray | float, where: str) -> None:
    arr = np.asarray(value, dtype=float)
    if not np.all(np.isfinite(arr)):
        bad = int(np.size(arr) - np.isfinite(arr).sum())
        raise DataValidationError(
            f"{where}: {name} label has {bad} NaN/inf value(s); expected finite numbers. "
            "Drop or relabel this structure."
        )


def _check_labels(atoms: Atoms, labels: Labels, require: Iterable[str], where: str) -> None:
    for key in require:
        if not labels.has(key):
            raise DataValidationError(
                f"{where}: the loss needs a {key!r} label but this structure has none. "
                f"Label it, drop it, or remove the {key!r} loss term."
            )
    if labels.energy is not None:
        _check_finite("energy", labels.energy, where)
    if labels.forces is not None:
        if labels.forces.shape != (len(atoms), 3):
            raise DataValidationError(
                f"{where}: forces label has shape {labels.forces.shape}; expected "
                f"({len(atoms)}, 3) for {len(atoms)} atoms. The data file is inconsistent."
            )
        _check_finite("forces", labels.forces, where)
    if labels.stress is not None:
        _check_finite("stress", labels.stress, where)


def check_geometry(atoms: Atoms, where: str = "structure") -> None:
    """Raise a clear error for NaN positions or a degenerate periodic cell."""
    if not np.all(np.isfinite(atoms.positions)):
        raise DataValidationError(f"{where}: positions contain NaN/inf.")
    pbc = np.asarray(atoms.pbc, dtype=bool)
    if pbc.any():
        cell = np.asarray(atoms.cell[:], dtype=float)
        periodic_vectors = cell[pbc]
        rank = np.linalg.matrix_rank(periodic_vectors, tol=1e-6) if len(periodic_vectors) else 0
        volume = abs(np.linalg.det(cell))
        if rank < int(pbc.sum()) or (pbc.all() and volume < 1e-6):
            raise DataValidationError(
                f"{where}: periodic structure (pbc={pbc.tolist()}) has a zero-volume or degenerate "
                f"cell (volume {volume:.3g} Å^3). Set a proper cell or pbc=False."
            )


def validate_structure(
    atoms: Atoms, *, require: Iterable[str] = (), index: int | None = None, source: str = ""
) -> Labels:
    """Check one structure's geometry and labels; return its labels or raise a clear error.

    Close contacts (< :data:`MIN_DISTANCE`) are checked where the neighbour list is built.
    """
    where = _where(index, source)
    check_geometry(atoms, where)
    labels = get_labels(atoms)
    _check_labels(atoms, labels, require, where)
    return labels


def validate_dataset(
    structures: Sequence[Atoms], *, require: Iterable[str] = (), source: str = ""
) -> list[Labels]:
    """Validate every structure (see :func:`validate_structure`); empty data sets are errors."""
    if len(structures) == 0:
        raise DataValidationError(f"data set {source or ''} is empty; expected ≥ 1 structure.")
    require = tuple(require)
    return [
        validate_structure(a, require=require, index=i, source=source)
        for i, a in enumerate(structures)
    ]


def complete_extxyz_length(data: bytes) -> int:
    """Bytes of extxyz ``data`` up to the end of its last complete frame (a file being appended
    to, or cut short by a kill, may end in a partial frame)."""
    lines = data.splitlines(keepends=True)
    good, at = 0, 0
    while at < len(lines):
        try:
            n_atoms = int(lines[at].strip())
        except ValueError:
            break
        end = at + 2 + n_atoms
        if end > len(lines) or not lines[end - 1].endswith(b"\n"):
            break
        good, at = good + sum(len(line) for line in lines[at:end]), end
    return good
