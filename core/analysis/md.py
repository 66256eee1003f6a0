"""Molecular dynamics with an atomforge calculator (ASE integrators)."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ase import Atoms, units
from ase.calculators.calculator import Calculator
from ase.constraints import FixCom
from ase.io import write
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary, ZeroRotation
from ase.md.verlet import VelocityVerlet

from .._errors import ConfigError

__all__ = ["MDSummary", "run_md"]


@dataclass(frozen=True)
class MDSummary:
    """What happened in an MD run."""

    steps: int
    seconds: float
    ms_per_step: float
    mean_temperature: float
    energy_drift_meV_per_atom_per_ps: float  # slope of total energy (meaningful for NVE)
    max_energy_deviation_meV_per_atom: float
    frames_written: int
    flagged: int = 0  # configurations the calculator's flagger wrote to its candidates file in this run


def run_md(
    atoms: Atoms,
    calculator: Calculator,
    *,
    steps: int,
    temperature: float,
    ensemble: str = "nvt",
    timestep_fs: float = 1.0,
    friction_per_fs: float = 0.01,
    out: Path | None = None,
    interval: int = 10,
    seed: int = 0,
    progress: bool = True,
) -> MDSummary:
    """Run NVE (velocity Verlet) or NVT (Langevin) MD; write every ``interval``-th frame.

    A calculator with a flagger (``calculator.flagger``, see :mod:`atomforge.flagging`) records
    the MD step of each flagged configuration (0 = the start); the summary counts them.
    """
    if ensemble not in ("nve", "nvt"):
        raise ConfigError(f"ensemble must be 'nve' or 'nvt'; got {ensemble!r}")
    if steps < 1 or interval < 1:
        raise ConfigError(f"steps and interval must be ≥ 1; got steps={steps}, interval={interval}")
    atoms = atoms.copy()
    atoms.calc = calculator
    rng = np.random.default_rng(seed)
    MaxwellBoltzmannDistribution(atoms, temperature_K=temperature, rng=rng)
    Stationary(atoms)
    if not atoms.pbc.any():
        ZeroRotation(atoms)
    dt = timestep_fs * units.fs
    if ensemble == "nvt" and not atoms.constraints:
        atoms.set_constraint(FixCom())  # keep the centre of mass still (ASE's recommended way)
    dyn = (VelocityVerlet(atoms, timestep=dt) if ensemble == "nve" else
           Langevin(atoms, timestep=dt, temperature_K=temperature, friction=friction_per_fs / units.fs,
                    rng=rng, fixcm=False))
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        if Path(out).exists():
            Path(out).unlink()
    energies, temps, frames = [], [], 0

    def record() -> None:
        nonlocal frames
        energies.append(atoms.get_total_energy())
        temps.append(atoms.get_temperature())
        if out is not None and dyn.nsteps % interval == 0:
            write(out, atoms, format="extxyz", append=True)
            frames += 1

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=f"MD {ensemble.upper()} {temperature:g} K", unit="step", file=sys.stderr)
    flagger = getattr(calculator, "flagger", None)
    flagged_before = flagger.flagged if flagger is not None else 0

    def record_and_tick() -> None:
        record()
        if bar is not None and dyn.nsteps > 0:
            bar.update(1)
        if flagger is not None:  # ASE computes step n + 1's forces inside dyn.step(), after this observer
            flagger.step = dyn.nsteps + 1

    dyn.attach(record_and_tick, interval=1)
    started = time.perf_counter()
    if flagger is not None:
        flagger.step = 0  # the first calculation is of the starting configuration
    try:
        dyn.run(steps)
    finally:
        if flagger is not None:
            flagger.step = None
    seconds = time.perf_counter() - started
    if bar is not None:
        bar.close()
    e = np.asarray(energies) / len(atoms) * 1000.0  # meV/atom
    t_ps = np.arange(len(e)) * timestep_fs / 1000.0
    drift = float(np.polyfit(t_ps, e, 1)[0]) if len(e) > 2 else 0.0
    return MDSummary(steps, seconds, 1000 * seconds / steps, float(np.mean(temps)), drift,
                     float(np.max(np.abs(e - e[0]))), frames,
                     flagger.flagged - flagged_before if flagger is not None else 0)
