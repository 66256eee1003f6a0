"""Geometry optimisation: atom positions and, optionally, the cell, with ASE's optimisers.

``relax`` is what ``atomforge relax`` runs for each input structure. Positions are relaxed by an
ASE optimiser (BFGS, FIRE or LBFGS); with ``cell=True`` the cell is relaxed too, through ASE's
``FrechetCellFilter`` (cell degrees of freedom in the log of the deformation gradient, so the
criterion ``fmax`` applies to atomic forces and to the stress times the volume alike, and an
external ``pressure`` enters as an enthalpy term). Each optimiser step can be appended to an
extxyz trajectory with its energy, forces and stress; the result carries the relaxed structure
with those labels, so it can be written, labelled or relaxed again.

Convergence is reported, not raised: a relaxation that reaches ``steps`` without meeting
``fmax`` returns ``converged=False`` (``atomforge relax`` then exits with code 1).
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms, units
from ase.calculators.calculator import Calculator
from ase.calculators.singlepoint import SinglePointCalculator

from .._errors import ConfigError

__all__ = ["Optimizer", "RelaxResult", "relax"]


class Optimizer(str, enum.Enum):
    """ASE optimisers ``relax`` offers (names as ``atomforge relax --optimizer`` takes them)."""

    BFGS = "BFGS"  # quasi-Newton with a full Hessian estimate: few steps for small cells
    LBFGS = "LBFGS"  # limited-memory BFGS: large structures
    FIRE = "FIRE"  # damped MD: robust far from a minimum, more steps

    @classmethod
    def parse(cls, name: str | "Optimizer") -> "Optimizer":
        """The optimiser named ``name`` (any case); a clear error lists the valid names."""
        if isinstance(name, Optimizer):
            return name
        for member in cls:
            if member.value.lower() == str(name).strip().lower():
                return member
        raise ConfigError(f"optimizer: expected one of {', '.join(m.value for m in cls)}; got {name!r}")

    def ase_class(self) -> Any:
        """The ASE optimiser class (imported here: ``ase.optimize`` pulls in scipy)."""
        from ase import optimize

        return getattr(optimize, self.value)


@dataclass(frozen=True)
class RelaxResult:
    """What one relaxation did. ``atoms`` is the relaxed copy, labelled with the final energy,
    forces and (periodic cells) stress; ``fmax`` is the final value of the criterion (largest
    atomic force, or with ``cell=True`` also the cell's generalised force), eV/Å."""

    atoms: Atoms
    converged: bool
    steps: int  # optimiser steps taken
    initial_energy: float  # eV
    energy: float  # eV (with a pressure: the energy, not the enthalpy)
    initial_fmax: float  # eV/Å
    fmax: float  # eV/Å
    initial_volume: float | None  # Å³ (periodic cells), else None
    volume: float | None  # Å³
    seconds: float

    def summary(self) -> dict[str, Any]:
        """The result as plain JSON-ready data (no structure)."""
        return {"converged": self.converged, "steps": self.steps, "initial_energy": self.initial_energy,
                "energy": self.energy, "initial_fmax": self.initial_fmax, "fmax": self.fmax,
                "initial_volume": self.initial_volume, "volume": self.volume, "seconds": self.seconds}


def relax(
    atoms: Atoms,
    calculator: Calculator,
    *,
    fmax: float = 0.05,
    cell: bool = False,
    pressure: float = 0.0,
    hydrostatic: bool = False,
    optimizer: str | Optimizer = Optimizer.BFGS,
    steps: int = 500,
    trajectory: str | Path | None = None,
    logfile: str | None = None,
) -> RelaxResult:
    """Relax a copy of ``atoms`` with ``calculator`` until every force is below ``fmax`` (eV/Å)
    or ``steps`` optimiser steps have been taken.

    ``cell=True`` relaxes the cell as well (``FrechetCellFilter``; needs a 3D-periodic structure
    and a calculator with stress) under ``pressure`` (GPa); ``hydrostatic=True`` keeps the cell's
    shape and only scales it. ``trajectory`` (extxyz) gets every step appended, each frame with its
    energy, forces, stress and ``info['relax_step']``. ``logfile`` is ASE's optimiser log
    (``'-'``: stdout; default: none).
    """
    _check_settings(atoms, calculator, fmax=fmax, cell=cell, pressure=pressure, hydrostatic=hydrostatic, steps=steps)
    work = atoms.copy()
    work.calc = calculator
    target: Any = work
    if cell:
        from ase.filters import FrechetCellFilter

        target = FrechetCellFilter(work, hydrostatic_strain=hydrostatic, scalar_pressure=pressure * units.GPa)
    periodic = bool(np.all(work.pbc))
    initial_energy, initial_fmax = work.get_potential_energy(), _criterion(target)
    initial_volume = float(work.get_volume()) if periodic else None
    dyn = Optimizer.parse(optimizer).ase_class()(target, logfile=logfile)
    if trajectory is not None:
        Path(trajectory).parent.mkdir(parents=True, exist_ok=True)
        dyn.attach(lambda: _append_frame(work, trajectory, dyn.nsteps), interval=1)
    started = time.perf_counter()
    converged = bool(dyn.run(fmax=fmax, steps=steps))
    seconds = time.perf_counter() - started
    final = labelled_copy(work)
    final.info.update(relax_converged=converged, relax_steps=int(dyn.nsteps))
    return RelaxResult(final, converged, int(dyn.nsteps), float(initial_energy), float(work.get_potential_energy()),
                       initial_fmax, _criterion(target), initial_volume,
                       float(work.get_volume()) if periodic else None, seconds)


def _check_settings(atoms: Atoms, calculator: Calculator, *, fmax: float, cell: bool, pressure: float,
                    hydrostatic: bool, steps: int) -> None:
    """Clear errors before any calculation: bad numbers, a cell relaxation without a cell or stress."""
    if not (np.isfinite(fmax) and fmax > 0):
        raise ConfigError(f"fmax must be a positive force in eV/Å (e.g. 0.05); got {fmax}")
    if steps < 0:
        raise ConfigError(f"steps must be ≥ 0 (the most optimiser steps); got {steps}")
    if not cell and (pressure != 0.0 or hydrostatic):
        raise ConfigError("pressure and hydrostatic apply to the cell: pass cell=True (--cell) to relax the cell too")
    if not np.isfinite(pressure):
        raise ConfigError(f"pressure must be a finite number in GPa; got {pressure}")
    if cell and not np.all(atoms.pbc):
        raise ConfigError(f"a cell relaxation needs a structure periodic in x, y and z; got pbc={atoms.pbc.tolist()} "
                          f"({atoms.get_chemical_formula()}). Relax the positions only (no --cell), or give it a cell")
    if cell and "stress" not in getattr(calculator, "implemented_properties", ()):
        raise ConfigError(f"a cell relaxation needs the stress; the calculator {type(calculator).__name__} does not "
                          "provide it. Relax the positions only (no --cell)")


def _criterion(target: Any) -> float:
    """Largest generalised force of ``target`` (atoms, or a cell filter), eV/Å: ASE's ``fmax``."""
    forces = np.asarray(target.get_forces()).reshape(-1, 3)
    return float(np.sqrt((forces**2).sum(axis=1).max())) if len(forces) else 0.0


def labelled_copy(atoms: Atoms) -> Atoms:
    """A copy of ``atoms`` carrying its calculator's energy, forces and (periodic) stress as
    fixed results, so that writing it to extxyz keeps them (computed already: no new call)."""
    results: dict[str, Any] = {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces()}
    if np.all(atoms.pbc) and "stress" in getattr(atoms.calc, "implemented_properties", ()):
        results["stress"] = atoms.get_stress()
    copy = atoms.copy()
    copy.calc = SinglePointCalculator(copy, **results)
    return copy


def _append_frame(atoms: Atoms, path: str | Path, step: int) -> None:
    """Observer: append the current configuration with its labels to ``path`` (extxyz)."""
    from ase.io import write

    frame = labelled_copy(atoms)
    frame.info["relax_step"] = int(step)
    write(path, frame, format="extxyz", append=True)
