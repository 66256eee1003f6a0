"""Built-in data sources: ``ase`` (anything ``ase.io.read`` reads) and ``pymatgen``
(CIF, POSCAR/CONTCAR, vasprun.xml with energies/forces/stress, Structure JSON)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from ase.units import GPa

from atomforge import ConfigError, DataSourceSpec, DataValidationError, attach_labels, hookimpl


def _paths(options: dict[str, Any], base_dir: Path) -> list[Path]:
    raw = options.pop("paths", None) or options.pop("path", None)
    if raw is None:
        raise ConfigError("data source needs 'path' (a file) or 'paths' (a list of files)")
    paths = [Path(p) if Path(p).is_absolute() else base_dir / p for p in ([raw] if isinstance(raw, (str, Path)) else raw)]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise ConfigError(f"data file(s) not found: {missing}")
    return paths


def read_ase(options: dict[str, Any], base_dir: Path) -> list[Atoms]:
    """Options: ``path``/``paths``, ``index`` (default ``":"``), ``format`` (default: guessed)."""
    import ase.io

    options = dict(options)
    paths = _paths(options, base_dir)
    index = options.pop("index", ":")
    fmt = options.pop("format", None)
    if options:
        raise ConfigError(f"ase data source: unknown option(s) {sorted(options)}; valid: path, paths, index, format")
    structures: list[Atoms] = []
    for path in paths:
        try:
            read = ase.io.read(path, index=index, format=fmt)
        except Exception as error:  # noqa: BLE001 - reader errors vary by format
            raise DataValidationError(f"ase.io.read could not read {path}: {error}") from error
        structures.extend(read if isinstance(read, list) else [read])
    return structures


def _vasprun_frames(path: Path) -> list[Atoms]:
    from pymatgen.io.ase import AseAtomsAdaptor
    from pymatgen.io.vasp import Vasprun

    run = Vasprun(str(path), parse_dos=False, parse_eigen=False, parse_potcar_file=False)
    frames = []
    for step in run.ionic_steps:
        atoms = AseAtomsAdaptor.get_atoms(step["structure"])
        stress = step.get("stress")
        frames.append(attach_labels(
            atoms,
            energy=step["e_fr_energy"],
            forces=np.asarray(step["forces"]),
            # VASP reports stress in kBar with pressure positive; ASE wants eV/Å³, tension positive.
            stress=None if stress is None else -0.1 * GPa * np.asarray(stress),
        ))
    return frames


def read_pymatgen(options: dict[str, Any], base_dir: Path) -> list[Atoms]:
    """Options: ``path``/``paths``. vasprun.xml yields every ionic step with its labels; CIF,
    POSCAR/CONTCAR and Structure JSON yield unlabelled structures (e.g. MD starting points)."""
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
        if "vasprun" in path.name and path.name.endswith((".xml", ".xml.gz")):
            structures.extend(_vasprun_frames(path))
            continue
        try:
            structure = Structure.from_file(str(path))
        except Exception as error:  # noqa: BLE001
            raise DataValidationError(f"pymatgen could not read {path}: {error}") from error
        structures.append(AseAtomsAdaptor.get_atoms(structure))
    return structures


@hookimpl
def register_data_sources(register) -> None:  # noqa: ANN001
    register(DataSourceSpec("ase", read_ase, "any file ase.io.read reads (extxyz, ASE db, ...)"))
    register(DataSourceSpec("pymatgen", read_pymatgen, "CIF, POSCAR, vasprun.xml (with labels), Structure JSON"))
