"""``example_md17``: the sGDML / MD17 / rMD17 ``.npz`` format as a data source.

Those files hold one molecule's trajectory: ``z`` [N] atomic numbers, ``R`` [S, N, 3] positions
(Å), ``E`` [S] or [S, 1] energies and ``F`` [S, N, 3] forces — in kcal/mol and kcal/mol/Å for
MD17/rMD17 (``energy_unit: kcal/mol``, the default) or eV and eV/Å (``energy_unit: eV``).
rMD17 names them ``nuclear_charges``, ``coords``, ``energies``, ``forces``; both spellings are
read. Options: ``path`` (resolved against the config file's folder), ``energy_unit``,
``stride`` (every n-th frame), ``limit`` (at most this many frames)::

    data:
      train: {source: example_md17, path: rmd17_ethanol.npz, stride: 10}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms, units

from atomforge import ConfigError, DataValidationError, attach_labels

__all__ = ["read_md17", "UNITS"]

UNITS = {"kcal/mol": units.kcal / units.mol, "eV": 1.0}  # → eV
_KEYS = {"numbers": ("z", "nuclear_charges"), "positions": ("R", "coords"), "energy": ("E", "energies"),
         "forces": ("F", "forces")}
_OPTIONS = ("path", "energy_unit", "stride", "limit")


def _array(data: Any, name: str, path: Path) -> np.ndarray | None:
    for key in _KEYS[name]:
        if key in data.files:
            return np.asarray(data[key])
    if name in ("numbers", "positions"):
        raise DataValidationError(f"{path}: no {' or '.join(_KEYS[name])} array; expected an MD17/sGDML .npz "
                                  f"(keys found: {sorted(data.files)})")
    return None


def _options(options: dict[str, Any], base_dir: Path) -> tuple[Path, float, int, int | None]:
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise ConfigError(f"example_md17: unknown option(s) {unknown}; valid: {', '.join(_OPTIONS)}")
    if "path" not in options:
        raise ConfigError("example_md17 needs 'path' (an .npz file)")
    path = Path(options["path"]).expanduser()
    path = path if path.is_absolute() else Path(base_dir) / path
    if not path.is_file():
        raise DataValidationError(f"example_md17: {path} does not exist")
    unit = options.get("energy_unit", "kcal/mol")
    if unit not in UNITS:
        raise ConfigError(f"example_md17.energy_unit: expected one of {sorted(UNITS)}, got {unit!r}")
    stride, limit = options.get("stride", 1), options.get("limit")
    if not isinstance(stride, int) or stride < 1 or (limit is not None and (not isinstance(limit, int) or limit < 1)):
        raise ConfigError(f"example_md17: stride and limit must be integers ≥ 1; got {stride!r}, {limit!r}")
    return path, UNITS[unit], stride, limit


def read_md17(options: dict[str, Any], base_dir: Path) -> list[Atoms]:
    """The frames of an MD17-style ``.npz`` as labelled ``ase.Atoms`` (eV, eV/Å)."""
    path, to_ev, stride, limit = _options(dict(options), base_dir)
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise DataValidationError(f"example_md17: {path} is not a readable .npz file ({error})") from error
    numbers, positions = _array(data, "numbers", path), _array(data, "positions", path)
    energy, forces = _array(data, "energy", path), _array(data, "forces", path)
    frames = range(0, len(positions), stride)
    frames = frames[:limit] if limit is not None else frames
    out = []
    for s in frames:
        atoms = Atoms(numbers=numbers.astype(int), positions=positions[s])
        out.append(attach_labels(atoms, energy=None if energy is None else float(np.ravel(energy[s])[0]) * to_ev,
                                 forces=None if forces is None else forces[s] * to_ev))
    return out
