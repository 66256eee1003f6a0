"""Data of the example campaign: 12 EMT-labelled Cu cells to start from, a fixed test set of
16 cells from EMT MD at 300–1200 K (perfect, strained, vacancy), and unlabelled starting
points for exploration. Writes initial.extxyz, test.extxyz and starts.extxyz next to this file.

    python make_data.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from ase import units
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import write
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

HERE = Path(__file__).resolve().parent


def cell(strain: float = 0.0, vacancy: bool = False):  # noqa: ANN201
    """A 32-atom fcc Cu cell, optionally strained, optionally with a vacancy."""
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 2))
    atoms.set_cell(atoms.cell[:] * (1 + strain), scale_atoms=True)
    if vacancy:
        del atoms[0]
    return atoms


def labelled(atoms):  # noqa: ANN001, ANN201
    work = atoms.copy()
    work.calc = EMT()
    energy, forces, stress = work.get_potential_energy(), work.get_forces(), work.get_stress()
    out = atoms.copy()
    out.calc = SinglePointCalculator(out, energy=energy, forces=forces, stress=stress)
    return out


def md_frames(atoms, temperature: float, frames: int, seed: int):  # noqa: ANN001, ANN201
    work = atoms.copy()
    work.calc = EMT()
    rng = np.random.default_rng(seed)
    MaxwellBoltzmannDistribution(work, temperature_K=temperature, rng=rng)
    dyn = Langevin(work, 2 * units.fs, temperature_K=temperature, friction=0.02, rng=rng)
    out = []
    for _ in range(frames):
        dyn.run(25)
        out.append(labelled(work))
    return out


def main() -> None:
    rng = np.random.default_rng(0)
    initial = []
    for k in range(12):
        atoms = cell(strain=float(rng.uniform(-0.01, 0.01)))
        atoms.positions += rng.normal(0, 0.05, atoms.positions.shape)
        initial.append(labelled(atoms))
    test = []
    for k, (temperature, strain, vacancy) in enumerate([(300, 0, False), (700, 0.02, False),
                                                         (1000, -0.02, True), (1200, 0, True)]):
        test += md_frames(cell(strain, vacancy), temperature, 4, seed=100 + k)
    starts = [cell(s, v) for s in (-0.02, 0.0, 0.02) for v in (False, True)]
    write(HERE / "initial.extxyz", initial)
    write(HERE / "test.extxyz", test)
    write(HERE / "starts.extxyz", starts)
    print(f"wrote {len(initial)} initial, {len(test)} test and {len(starts)} start structures to {HERE}")


if __name__ == "__main__":
    main()
