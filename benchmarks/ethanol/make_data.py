"""Generate GFN2-xTB reference data for the ethanol benchmark.

Runs with the project venv (needs only ``ase``, ``numpy`` and ``tblite``; it does
not import atomforge)::

    .venv/bin/python benchmarks/ethanol/make_data.py                # defaults
    .venv/bin/python benchmarks/ethanol/make_data.py --out /tmp/eth --n-train 200 --n-test 100

What it writes into ``--out`` (default ``benchmarks/ethanol/data``):

``train.extxyz``
    ``--n-train`` frames (default 1000) of Langevin MD at 600 K, one frame every
    ``--stride`` steps (default 10) after ``--n-therm`` thermalisation steps.
``test.extxyz``
    ``--n-test`` frames (default 500) at 600 K from an *independent* trajectory:
    different RNG seed, its own randomly rattled start and its own thermalisation.
``test_1000K.extxyz``
    ``--n-hot`` frames (default 300) from a third, independent trajectory at
    1000 K (out-of-distribution set for uncertainty quantification).
``ethanol_999.extxyz``
    111 randomly oriented ethanol molecules on a 5x5x5 grid (``--grid-spacing``,
    default 4.8 A) in a periodic cubic box: 999 atoms, no labels; used only to time
    calculator calls on a larger system.

Every labelled frame carries the GFN2-xTB energy (eV) and forces (eV/A) through a
``SinglePointCalculator``, so extxyz stores them as the standard ``energy`` info key
and ``forces`` per-atom array; ``info`` also records ``temperature_K``, ``md_step``
and ``trajectory``.

MD settings: ``tblite.ase.TBLite(method="GFN2-xTB")``, BFGS pre-relaxation
(fmax 0.05 eV/A, at most 100 steps), ASE ``Langevin`` with timestep 0.5 fs,
friction 0.01 1/fs, and the centre of mass held by ``FixCom``. Output is
deterministic for a given ``--seed`` (trajectory k uses ``seed + k``);
``OMP_NUM_THREADS`` defaults to 1 so the xTB arithmetic does not depend on the
thread count.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # deterministic and fast for 9 atoms

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ase import Atoms, units
from ase.build import molecule
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixCom
from ase.io import write
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import Stationary, ZeroRotation, thermalize_momenta
from ase.optimize import BFGS
from tblite.ase import TBLite

DEFAULT_OUT = Path(__file__).resolve().parent / "data"
TIMESTEP_FS = 0.5
FRICTION_PER_FS = 0.01


@dataclass(frozen=True)
class TrajSpec:
    """One MD trajectory to sample."""

    name: str
    filename: str
    temperature_k: float
    n_frames: int
    seed: int


def make_calculator() -> TBLite:
    """A fresh GFN2-xTB calculator (silent)."""
    return TBLite(method="GFN2-xTB", verbosity=0)


def relaxed_ethanol() -> Atoms:
    """Ethanol from ``ase.build.molecule``, briefly relaxed with GFN2-xTB."""
    atoms = molecule("CH3CH2OH")
    atoms.calc = make_calculator()
    opt = BFGS(atoms, logfile=None)
    opt.run(fmax=0.05, steps=100)
    print(
        f"[relax] {opt.get_number_of_steps()} BFGS steps, "
        f"E = {atoms.get_potential_energy():.4f} eV, "
        f"max|F| = {np.abs(atoms.get_forces()).max():.4f} eV/A",
        flush=True,
    )
    atoms.calc = None
    return atoms


def labelled_frame(
    atoms: Atoms, energy: float, forces: np.ndarray, info: dict[str, object]
) -> Atoms:
    """A clean copy of ``atoms`` (no momenta) carrying energy/forces via SinglePointCalculator."""
    frame = Atoms(
        numbers=atoms.get_atomic_numbers(),
        positions=atoms.get_positions(),
        cell=atoms.get_cell(),
        pbc=atoms.get_pbc(),
    )
    frame.info.update(info)
    frame.calc = SinglePointCalculator(
        frame, energy=float(energy), forces=np.array(forces, dtype=float)
    )
    return frame


def max_bond_stretch(atoms: Atoms) -> float:
    """Largest nearest-neighbour distance (A); a crude check that the molecule stayed intact."""
    d = atoms.get_all_distances()
    np.fill_diagonal(d, np.inf)
    return float(d.min(axis=1).max())


def run_trajectory(
    start: Atoms, spec: TrajSpec, n_therm: int, stride: int
) -> list[Atoms]:
    """Thermalise, then sample ``spec.n_frames`` frames every ``stride`` Langevin steps."""
    rng = np.random.RandomState(spec.seed)
    atoms = start.copy()
    # Independent start: a random rattle plus fresh Maxwell-Boltzmann velocities.
    atoms.positions += rng.normal(scale=0.05, size=atoms.positions.shape)
    atoms.calc = make_calculator()
    thermalize_momenta(atoms, spec.temperature_k, rng=rng)
    Stationary(atoms)
    ZeroRotation(atoms)
    # Keep the centre of mass fixed with a constraint (Langevin's ``fixcm=True`` over-heats
    # a 9-atom molecule by ~25 %); with FixCom, get_temperature() uses the 3N-3 true DOF.
    atoms.set_constraint(FixCom())
    dyn = Langevin(
        atoms,
        timestep=TIMESTEP_FS * units.fs,
        temperature_K=spec.temperature_k,
        friction=FRICTION_PER_FS / units.fs,
        rng=rng,
        fixcm=False,
    )

    t0 = time.perf_counter()
    dyn.run(n_therm)
    t_therm = time.perf_counter() - t0
    print(
        f"[{spec.name}] thermalised {n_therm} steps at {spec.temperature_k:.0f} K in {t_therm:.1f} s "
        f"(T_inst = {atoms.get_temperature():.0f} K)",
        flush=True,
    )

    frames: list[Atoms] = []
    temps: list[float] = []
    worst_stretch = 0.0
    net_force = 0.0
    t0 = time.perf_counter()
    report_every = max(1, spec.n_frames // 5)
    for i in range(spec.n_frames):
        dyn.run(stride)
        energy = atoms.get_potential_energy()
        # apply_constraint=False: FixCom.adjust_forces subtracts m_i * lambda from every
        # atom (a uniform acceleration that leaves the internal dynamics untouched), so
        # the constrained forces are NOT the xTB gradient. Save the raw gradient.
        forces = atoms.get_forces(apply_constraint=False)
        net_force = max(net_force, float(np.linalg.norm(forces.sum(axis=0))))
        temps.append(atoms.get_temperature())
        worst_stretch = max(worst_stretch, max_bond_stretch(atoms))
        frames.append(
            labelled_frame(
                atoms,
                energy,
                forces,
                {
                    "temperature_K": spec.temperature_k,
                    "md_step": n_therm + (i + 1) * stride,
                    "trajectory": spec.name,
                },
            )
        )
        if (i + 1) % report_every == 0 or i + 1 == spec.n_frames:
            elapsed = time.perf_counter() - t0
            ms_per_step = 1e3 * elapsed / ((i + 1) * stride)
            print(
                f"[{spec.name}] {i + 1}/{spec.n_frames} frames, {elapsed:.1f} s ({ms_per_step:.2f} ms/step)",
                flush=True,
            )
    energies = np.array([f.get_potential_energy() for f in frames])
    fmax = max(float(np.abs(f.get_forces()).max()) for f in frames)
    print(
        f"[{spec.name}] <T> = {np.mean(temps):.0f} K, E range = {energies.min():.3f}..{energies.max():.3f} eV "
        f"(std {energies.std():.3f}), max|F| = {fmax:.2f} eV/A, worst NN distance = {worst_stretch:.2f} A, "
        f"max |sum F| = {net_force:.1e} eV/A",
        flush=True,
    )
    if net_force > 1e-2:
        raise RuntimeError(
            f"[{spec.name}] saved forces have a net force of {net_force:.2e} eV/A"
        )
    if worst_stretch > 1.6:
        print(
            f"[{spec.name}] WARNING: a nearest-neighbour distance exceeded 1.6 A (bond breaking?)",
            flush=True,
        )
    return frames


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """Uniformly random 3x3 rotation matrix (QR of a Gaussian matrix, sign-fixed)."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q *= np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1.0
    return q


def ethanol_box(
    template: Atoms,
    n_molecules: int = 111,
    n_grid: int = 5,
    spacing: float = 4.8,
    min_dist: float = 1.5,
    seed: int = 0,
    max_tries: int = 200,
) -> Atoms:
    """``n_molecules`` randomly oriented copies of ``template`` on a periodic cubic grid."""
    rng = np.random.default_rng(seed)
    length = n_grid * spacing
    base = template.get_positions() - template.get_center_of_mass()
    sites = np.array(
        [
            (i, j, k)
            for i in range(n_grid)
            for j in range(n_grid)
            for k in range(n_grid)
        ],
        dtype=float,
    )
    chosen = rng.choice(len(sites), size=n_molecules, replace=False)
    placed = np.zeros((0, 3))
    numbers: list[int] = []
    closest = np.inf
    for site in sites[np.sort(chosen)]:
        centre = (site + 0.5) * spacing
        for _ in range(max_tries):
            pos = base @ random_rotation(rng).T + centre
            if len(placed) == 0:
                break
            delta = pos[:, None, :] - placed[None, :, :]
            delta -= length * np.round(delta / length)
            dmin = float(np.sqrt((delta**2).sum(-1)).min())
            if dmin >= min_dist:
                closest = min(closest, dmin)
                break
        else:
            raise RuntimeError(
                f"could not place a molecule without overlap after {max_tries} tries"
            )
        placed = np.vstack([placed, pos])
        numbers.extend(template.get_atomic_numbers().tolist())
    box = Atoms(numbers=numbers, positions=placed, cell=[length] * 3, pbc=True)
    box.wrap()
    print(
        f"[box] {n_molecules} molecules, {len(box)} atoms, cubic box {length:.2f} A, "
        f"closest intermolecular distance {closest:.2f} A, "
        f"density {box.get_masses().sum() / units.mol / (length * 1e-8) ** 3:.3f} g/cm^3",
        flush=True,
    )
    return box


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    p.add_argument("--n-train", type=int, default=1000, help="training frames (600 K)")
    p.add_argument(
        "--n-test",
        type=int,
        default=500,
        help="test frames (independent 600 K trajectory)",
    )
    p.add_argument(
        "--n-hot", type=int, default=300, help="frames of the 1000 K trajectory"
    )
    p.add_argument(
        "--stride", type=int, default=10, help="MD steps between saved frames"
    )
    p.add_argument(
        "--n-therm", type=int, default=500, help="thermalisation steps before sampling"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="base RNG seed (trajectory k uses seed + k)"
    )
    p.add_argument(
        "--grid-spacing",
        type=float,
        default=4.8,
        help="grid spacing (A) of the 999-atom box",
    )
    return p.parse_args()


def main() -> None:
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    start = relaxed_ethanol()
    specs = [
        TrajSpec("train", "train.extxyz", 600.0, args.n_train, args.seed),
        TrajSpec("test", "test.extxyz", 600.0, args.n_test, args.seed + 1),
        TrajSpec("test_1000K", "test_1000K.extxyz", 1000.0, args.n_hot, args.seed + 2),
    ]
    for spec in specs:
        if spec.n_frames <= 0:
            continue
        frames = run_trajectory(start, spec, args.n_therm, args.stride)
        path = args.out / spec.filename
        write(path, frames, format="extxyz")
        print(f"[{spec.name}] wrote {len(frames)} frames -> {path}", flush=True)

    box = ethanol_box(start, spacing=args.grid_spacing, seed=args.seed + 3)
    box_path = args.out / "ethanol_999.extxyz"
    write(box_path, box, format="extxyz")
    print(f"[box] wrote -> {box_path}", flush=True)
    print(f"[done] total {time.perf_counter() - t_start:.1f} s", flush=True)


if __name__ == "__main__":
    main()
