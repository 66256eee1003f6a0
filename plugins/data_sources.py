"""Built-in data sources: ``ase`` (anything ``ase.io.read`` reads), ``pymatgen`` (CIF,
POSCAR/CONTCAR, vasprun.xml with energies/forces/stress, Structure JSON) and ``store`` (a
structure store written by ``atomforge data pack``, streamed during training)."""

from __future__ import annotations

import warnings
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from ase.units import GPa

from atomforge import (ConfigError, DataSourceSpec, DataValidationError, LabelKeys, StoreStructures, StructureStore,
                       attach_labels, get_labels, hookimpl, relabel)


def _paths(options: dict[str, Any], base_dir: Path) -> list[Path]:
    one, many = options.pop("path", None), options.pop("paths", None)
    if one is not None and many is not None:
        raise ConfigError("data source got both 'path' and 'paths'; give one of them")
    raw = one if one is not None else many
    if raw is None or (not isinstance(raw, (str, Path)) and len(raw) == 0):
        raise ConfigError("data source needs 'path' (a file) or 'paths' (a list of files)")
    raw_list = [raw] if isinstance(raw, (str, Path)) else list(raw)
    paths = [Path(p).expanduser() for p in raw_list]
    paths = [p if p.is_absolute() else Path(base_dir) / p for p in paths]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise ConfigError(f"data file(s) not found: {missing}")
    return paths


def read_ase(options: dict[str, Any], base_dir: Path) -> list[Atoms]:
    """Options: ``path``/``paths``, ``index`` (default ``":"``), ``format`` (default: guessed), and
    MACE's ``energy_key``, ``forces_key``, ``stress_key``, ``virials_key`` (where the labels are:
    ``info[energy_key]``, ``arrays[forces_key]``, ``info[stress_key]``, ``info[virials_key]`` or a
    calculator's results of that name; defaults ``energy``, ``forces``, ``stress``, ``virials``)."""
    import ase.io

    options = dict(options)
    paths = _paths(options, base_dir)
    index = options.pop("index", ":")
    fmt = options.pop("format", None)
    keys = LabelKeys.pop_from(options, "ase data source")
    if options:
        raise ConfigError(f"ase data source: unknown option(s) {sorted(options)}; valid: path, paths, index, format, "
                          + ", ".join(LabelKeys.OPTIONS))
    structures: list[Atoms] = []
    for path in paths:
        try:
            if _is_ase_db(path, fmt):
                read = _read_db(path, index)
            else:
                read = ase.io.read(path, index=index, format=fmt)
        except Exception as error:  # noqa: BLE001 - reader errors vary by format
            raise DataValidationError(f"ase.io.read could not read {path}: {error}") from error
        structures.extend(_with_keys(read if isinstance(read, list) else [read], keys, path))
    return structures


def _with_keys(structures: list[Atoms], keys: LabelKeys, path: Path) -> list[Atoms]:
    """``structures`` with their labels read from ``keys`` (as they are when the keys are the
    defaults and no structure has virials); warns when a chosen key is in none of them."""
    if keys.is_default and not any(keys.virials in a.info for a in structures):
        return structures
    out = [relabel(a, keys, where=f"structure {k} of {path}") for k, a in enumerate(structures)]
    for quantity in ("energy", "forces"):
        key = getattr(keys, quantity)
        if key != quantity and structures and not any(get_labels(a).has(quantity) for a in out):
            first = structures[0]
            warnings.warn(f"ase data source: {quantity}_key {key!r} is in none of the {len(out)} structures of "
                          f"{path}, which are therefore unlabelled for {quantity} (the first has info keys "
                          f"{sorted(first.info)}, arrays {sorted(first.arrays)} and calculator results "
                          f"{sorted(getattr(first.calc, 'results', {}) or {})})", stacklevel=3)
    return out


def _is_ase_db(path: Path, fmt: str | None) -> bool:
    return fmt == "db" or (fmt is None and path.suffix == ".db")


def _read_db(path: Path, index: Any) -> list[Atoms]:
    """Rows of an ASE db with their labels, and their key-value pairs (charge, spin, fidelity,
    weight, ...) copied into ``atoms.info`` — ``ase.io.read`` drops those."""
    import ase.db
    from ase.io.formats import string2index

    rows = list(ase.db.connect(path).select())
    chosen = string2index(index) if isinstance(index, str) else index
    rows = rows[chosen] if isinstance(chosen, slice) else [rows[chosen]]
    structures = []
    for row in rows:
        atoms = row.toatoms()
        atoms.info.update(row.key_value_pairs)
        structures.append(atoms)
    return structures


def _pv_per_volume(run: Any) -> float:
    """The external pressure ``PSTRESS`` of a VASP run, eV/Å³ (0 without one). VASP adds P·V to the
    ionic step's ``e_fr_energy`` in vasprun.xml (an enthalpy; OUTCAR's TOTEN and the SCF steps'
    energies do not have it), so the source takes it off again, as ASE's vasprun reader does."""
    for table in (getattr(run, "parameters", None) or {}, getattr(run, "incar", None) or {}):
        if table.get("PSTRESS") is not None:
            return float(table["PSTRESS"]) * 0.1 * GPa  # kBar → eV/Å³
    return 0.0


def _vasprun_frames(path: Path) -> list[Atoms]:
    from pymatgen.io.ase import AseAtomsAdaptor
    from pymatgen.io.vasp import Vasprun

    try:
        run = Vasprun(str(path), parse_dos=False, parse_eigen=False, parse_potcar_file=False)
    except Exception as error:  # noqa: BLE001 - XML syntax errors, truncated runs, ...
        raise DataValidationError(f"pymatgen could not read {path} as a vasprun.xml: {error}") from error
    if not run.ionic_steps:
        raise DataValidationError(
            f"{path} has no ionic steps with energies and forces (an ML_LMLFF molecular-dynamics "
            "run, or a run that stopped before its first ionic step?)"
        )
    frames = []
    pressure = _pv_per_volume(run)
    for step in run.ionic_steps:
        atoms = AseAtomsAdaptor.get_atoms(step["structure"])
        stress = step.get("stress")
        frames.append(attach_labels(
            atoms,
            # the free energy (TOTEN, which VASP's forces are the derivative of) without PSTRESS's P·V
            energy=step["e_fr_energy"] - pressure * atoms.get_volume(),
            forces=np.asarray(step["forces"]),
            # VASP reports stress in kBar with pressure positive; ASE wants eV/Å³, tension positive.
            stress=None if stress is None else -0.1 * GPa * np.asarray(stress),
        ))
    return frames


def read_pymatgen(options: dict[str, Any], base_dir: Path) -> list[Atoms]:
    """Options: ``path``/``paths``. vasprun.xml yields every ionic step with its labels (energy:
    VASP's free energy TOTEN without the P·V of ``PSTRESS`` — ASE's ``free_energy``; forces;
    stress); CIF, POSCAR/CONTCAR and Structure JSON yield unlabelled structures (e.g. MD
    starting points)."""
    try:
        from pymatgen.core import Structure
        from pymatgen.io.ase import AseAtomsAdaptor
    except ImportError as error:  # pragma: no cover - pymatgen is a core dependency
        raise ConfigError("the pymatgen data source needs pymatgen: pip install pymatgen") from error
    options = dict(options)
    paths = _paths(options, base_dir)
    if options:
        raise ConfigError(f"pymatgen data source: unknown option(s) {sorted(options)}; valid: path, paths")
    structures: list[Atoms] = []
    for path in paths:
        # Also custodian's vasprun.xml.relax1(.gz): Structure.from_file would give the final
        # structure alone, unlabelled.
        if fnmatch(path.name.lower(), "*vasprun*.xml*"):
            structures.extend(_vasprun_frames(path))
            continue
        try:
            structure = Structure.from_file(str(path))
        except Exception as error:  # noqa: BLE001
            raise DataValidationError(f"pymatgen could not read {path}: {error}") from error
        structures.append(AseAtomsAdaptor.get_atoms(structure))
    return structures


def _index_option(value: Any, count: int) -> np.ndarray:
    """``indices``: a list of integers or a ``"start:stop[:step]"`` slice of the store."""
    if isinstance(value, str):
        try:
            parts = [int(p) if p.strip() else None for p in value.split(":")]
            chosen = np.arange(count, dtype=np.int64)[slice(*parts)]
        except (TypeError, ValueError):
            raise ConfigError(f"store data source: indices {value!r} is not a slice like '0:1000'") from None
        if len(chosen) == 0 or (len(parts) > 1 and parts[1] is not None and parts[1] > count):
            raise ConfigError(f"store data source: indices {value!r} reach past the store's {count} structures")
        return chosen
    indices = np.asarray(value, dtype=np.int64)
    if indices.ndim != 1 or (indices.size and (indices.min() < 0 or indices.max() >= count)):
        raise ConfigError(f"store data source: indices must be a list of 0 ≤ i < {count} (the store's size)")
    return indices


def read_store(options: dict[str, Any], base_dir: Path) -> Any:
    """Options: ``path`` (a store written by ``atomforge data pack``), ``split`` (a named split,
    e.g. ``train``) or ``indices`` (a list or ``"start:stop"``). Training streams the structures
    (read and turned into graphs when a batch needs them); nothing is loaded up front."""
    options = dict(options)
    given_keys = sorted(k for k in LabelKeys.OPTIONS if k in options)
    if given_keys:
        raise ConfigError(f"store data source: {', '.join(given_keys)} cannot be applied to a store (its labels were "
                          "read when it was packed); pack with them instead: atomforge data pack OUT FILES "
                          "--energy-key REF_energy --forces-key REF_forces ... (docs/data.md)")
    paths = _paths(options, base_dir)
    split, indices = options.pop("split", None), options.pop("indices", None)
    fidelity, config_type = options.pop("fidelity", None), options.pop("config_type", None)
    if options:
        raise ConfigError(f"store data source: unknown option(s) {sorted(options)}; valid: path, split, indices, "
                          "fidelity, config_type")
    if len(paths) != 1:
        raise ConfigError("store data source: give one store as 'path' (mix several with data.train as a list)")
    if split is not None and indices is not None:
        raise ConfigError("store data source: give 'split' or 'indices', not both")
    store = StructureStore(paths[0])
    chosen = store.split(str(split)) if split is not None else (
        np.arange(len(store), dtype=np.int64) if indices is None else _index_option(indices, len(store)))
    chosen = _filtered(store, chosen, fidelity, config_type)
    return StoreStructures(store, chosen)


def _filtered(store: Any, chosen: np.ndarray, fidelity: Any, config_type: Any) -> np.ndarray:
    """Keep the structures of one fidelity and/or config type (from the store's columns: mixing
    levels of theory or kinds of structure by ratio, without re-packing)."""
    if fidelity is not None:
        if isinstance(fidelity, bool) or not isinstance(fidelity, int):
            raise ConfigError(f"store data source: fidelity must be an integer; got {fidelity!r}")
        chosen = chosen[store.column("fidelity")[chosen] == fidelity]
    if config_type is not None:
        if str(config_type) not in store.config_types:
            raise ConfigError(f"store data source: config_type {config_type!r} is not in {store.path}; "
                              f"its config types: {store.config_types or 'none'}")
        chosen = chosen[store.column("config_type")[chosen] == store.config_types.index(str(config_type))]
    if len(chosen) == 0:
        raise ConfigError(f"store data source: no structure of {store.path} has fidelity {fidelity!r}"
                          + (f" and config_type {config_type!r}" if config_type is not None else ""))
    return chosen


@hookimpl
def register_data_sources(register) -> None:  # noqa: ANN001
    register(DataSourceSpec("ase", read_ase, "any file ase.io.read reads (extxyz, ASE db, ...)"))
    register(DataSourceSpec("pymatgen", read_pymatgen, "CIF, POSCAR, vasprun.xml (with labels), Structure JSON"))
    register(DataSourceSpec("store", read_store, "a structure store (atomforge data pack), streamed; split, indices"))
