"""The oracle interface: something that labels structures (energy, forces, stress)."""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator

from .data import attach_labels

__all__ = ["Oracle", "CalculatorOracle"]


@runtime_checkable
class Oracle(Protocol):
    """Labels structures; ``label`` returns a labelled copy and never mutates its input."""

    name: str

    def label(self, atoms: Atoms) -> Atoms: ...


class CalculatorOracle:
    """An oracle backed by any ASE calculator (built anew per call by ``make_calculator``)."""

    def __init__(self, name: str, make_calculator: "type[Calculator] | callable", *, stress: bool = True) -> None:
        self.name = name
        self.make_calculator = make_calculator
        self.stress = stress  # also label stress for 3D-periodic structures

    def label(self, atoms: Atoms) -> Atoms:
        work = atoms.copy()
        work.set_constraint()  # labels are the raw physics; constraints belong to the simulation
        work.calc = self.make_calculator()
        energy = work.get_potential_energy()
        forces = work.get_forces()
        stress = work.get_stress(voigt=True) if self.stress and bool(np.all(work.pbc)) else None
        return attach_labels(atoms, energy=energy, forces=forces, stress=stress)

    def label_many(self, structures: Sequence[Atoms]) -> list[Atoms]:
        """Label each structure in turn."""
        return [self.label(a) for a in structures]
