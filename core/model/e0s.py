"""Reference energies (E0s) of a model trained from scratch, as ``model.E0s`` chooses them.

``fit`` (the default; MACE calls it ``average``) fits them by least squares to the training
energies (:func:`atomforge.model.potential.fit_normalization`). The other two take them from
the user, and then the learnt part of the energy is measured from them (``shift`` = 0: an atom
whose backbone contribution is zero — any atom of a MACE-like backbone with no neighbour — has
exactly its E0):

* ``isolated`` — from the training data's isolated atoms, marked as MACE marks them
  (``config_type: IsolatedAtom``, one atom); those structures then leave the training and
  validation batches (their energy *is* the model's E0, not something to learn);
* ``{element: eV}`` — as given; every element of the training data needs one.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
from ase import Atoms
from ase.data import atomic_numbers, chemical_symbols

from .. import keys as K
from .._errors import ConfigError, DataValidationError
from ..data.streaming import StoreStructures
from ..data.structures import get_labels

__all__ = ["ISOLATED_ATOM", "is_isolated_atom", "split_isolated_atoms", "e0_tables", "normalization_with_e0s"]

ISOLATED_ATOM = "IsolatedAtom"  # MACE's config_type of an isolated-atom reference calculation

Isolated = dict[int, dict[int, float]]  # head index → {Z: energy of the isolated atom, eV}


def is_isolated_atom(atoms: Atoms) -> bool:
    """Whether ``atoms`` is an isolated-atom reference (MACE: ``config_type`` IsolatedAtom, one atom)."""
    return len(atoms) == 1 and atoms.info.get("config_type") == ISOLATED_ATOM


def _record(found: Isolated, atoms: Atoms, where: str) -> None:
    energy = get_labels(atoms).energy
    if energy is None:
        raise DataValidationError(f"{where}: an isolated atom ({ISOLATED_ATOM}) without an energy label cannot give "
                                  "an E0; label it or drop it")
    head, z = int(atoms.info.get(K.FIDELITY, 0) or 0), int(atoms.numbers[0])
    known = found.setdefault(head, {}).get(z)
    if known is not None and abs(known - energy) > 1e-6:
        raise DataValidationError(f"{where}: a second isolated {chemical_symbols[z]} atom with another energy "
                                  f"({energy:.6f} eV, the first has {known:.6f} eV); keep one")
    found[head][z] = float(energy)


def split_isolated_atoms(structures: Sequence[Atoms], found: Isolated,
                         source: str = "data.train") -> Sequence[Atoms]:
    """``structures`` without their isolated atoms, whose energies are added to ``found`` (per
    head: the structure's fidelity). A store's are found from its columns (no other structure is read)."""
    if isinstance(structures, StoreStructures):
        store, indices = structures.store, structures.indices
        table = store.config_types
        code = table.index(ISOLATED_ATOM) if ISOLATED_ATOM in table else -2
        marked = (store.column("config_type")[indices] == code) & (store.column("n_atoms")[indices] == 1)
        for position in np.flatnonzero(marked).tolist():
            _record(found, structures[position], f"structure {int(indices[position])} of {source}")
        return structures.take(np.flatnonzero(~marked))
    kept = []
    for index, atoms in enumerate(structures):
        if is_isolated_atom(atoms):
            _record(found, atoms, f"structure {index} of {source}")
        else:
            kept.append(atoms)
    return kept


def _element(key: Any) -> int:
    if isinstance(key, int) or (isinstance(key, str) and key.isdigit()):
        return int(key)
    if isinstance(key, str) and key in atomic_numbers:
        return atomic_numbers[key]
    raise ConfigError(f"model.E0s: {key!r} is not an element (a symbol such as H, or an atomic number)")


def e0_tables(setting: Any, elements: Sequence[int], heads: Sequence[str],
              isolated: Isolated | None = None) -> dict[int, dict[int, float]] | None:
    """Each head's ``{Z: E0}`` for ``model.E0s`` (``None`` for ``fit``); a clear error names the
    elements of the training data that have no E0."""
    if setting == "fit":
        return None
    if isinstance(setting, Mapping):
        table = {_element(k): float(v) for k, v in setting.items()}
        tables = {h: table for h in range(len(heads))}
        hint = "add them to model.E0s"
    else:
        tables = {h: dict((isolated or {}).get(h, {})) for h in range(len(heads))}
        hint = (f"add an isolated-atom structure (one atom, config_type: {ISOLATED_ATOM}, with its energy) for each "
                "to data.train, give model.E0s as {element: eV}, or use model.E0s: fit")
    for h, table in tables.items():
        missing = sorted(set(int(z) for z in elements) - set(table))
        if missing:
            where = f" of head {heads[h]!r}" if len(heads) > 1 else ""
            raise ConfigError(f"model.E0s: {setting if isinstance(setting, str) else 'the given table'} has no E0 for "
                              f"{', '.join(chemical_symbols[z] for z in missing)} (element(s) of the training data"
                              f"{where}); {hint}")
    return tables


def normalization_with_e0s(numbers: Sequence[np.ndarray], energies: np.ndarray, forces: Sequence[np.ndarray] | None,
                           elements: Sequence[int], table: Mapping[int, float]) -> tuple[np.ndarray, float, float]:
    """``(atomic_energies, scale, shift)`` with the E0s fixed to ``table``: ``scale`` as
    :func:`~atomforge.model.potential.fit_normalization` makes it (RMS force component, else the
    standard deviation of the per-atom energy above the E0s), ``shift`` 0."""
    atomic = np.array([table[int(z)] for z in elements], dtype=float)
    if forces is not None and len(forces):
        scale = float(np.sqrt(np.mean(np.concatenate([np.asarray(f).reshape(-1) for f in forces]) ** 2)))
    else:
        residual = [(e - sum(table[int(z)] for z in zs)) / len(zs) for zs, e in zip(numbers, energies)]
        scale = float(np.std(residual)) if residual else 1.0
    return atomic, (scale if scale > 1e-8 else 1.0), 0.0
