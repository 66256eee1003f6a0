"""Molecular dynamics with an atomforge calculator (ASE integrators): NVE, NVT and NPT.

- ``nve``: velocity Verlet. The total energy is conserved by the dynamics, so its drift (slope)
  and largest deviation measure the model's energy conservation and the time step.
- ``nvt``: Langevin. The thermostat adds and removes energy, so a total-energy "drift" means
  nothing; the summary reports the mean temperature (and, for a periodic cell with stress, the
  mean pressure) instead.
- ``npt``: ASE's isotropic Martyna–Tobias–Klein integrator (``IsotropicMTKNPT``: Nosé–Hoover
  chains for temperature and pressure, samples the NPT ensemble), or Berendsen's weak coupling
  (``NPTBerendsen``: robust for equilibration, not an ensemble). Needs a 3D-periodic cell and a
  calculator with stress; the summary reports mean temperature, pressure and volume.

Units: temperature K, time fs, pressure GPa (1 GPa = 10 kbar), volume Å³.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from ase import Atoms, units
from ase.calculators.calculator import Calculator
from ase.io import write

from .._errors import ConfigError

__all__ = ["ENSEMBLES", "BAROSTATS", "MDSummary", "run_md"]

ENSEMBLES = ("nve", "nvt", "npt")
BAROSTATS = ("mtk", "berendsen")


@dataclass(frozen=True)
class MDSummary:
    """What happened in an MD run. Quantities that mean nothing for the ensemble are ``None``:
    the energy drift and deviation exist for NVE only; pressure and volume for 3D-periodic cells."""

    steps: int
    seconds: float
    ms_per_step: float
    mean_temperature: float  # K, over every step (the start included)
    energy_drift_meV_per_atom_per_ps: float | None  # NVE only: slope of the total energy
    max_energy_deviation_meV_per_atom: float | None  # NVE only: largest |E(t) - E(0)|
    frames_written: int
    flagged: int = 0  # configurations the calculator's flagger wrote to its candidates file in this run
    ensemble: str = "nvt"
    mean_pressure_GPa: float | None = None  # 3D-periodic cells with stress; includes the kinetic term
    mean_volume_A3: float | None = None  # 3D-periodic cells
    final_volume_A3: float | None = None  # 3D-periodic cells (changes under NPT only)


def run_md(
    atoms: Atoms,
    calculator: Calculator,
    *,
    steps: int,
    temperature: float,
    ensemble: str = "nvt",
    timestep_fs: float = 1.0,
    friction_per_fs: float = 0.01,
    pressure_GPa: float = 0.0,
    barostat: str = "mtk",
    thermostat_time_fs: float = 100.0,
    barostat_time_fs: float = 1000.0,
    compressibility_per_GPa: float = 0.01,
    out: Path | None = None,
    interval: int = 10,
    seed: int = 0,
    progress: bool = True,
) -> MDSummary:
    """Run NVE, NVT (Langevin, ``friction_per_fs``) or NPT MD from ``atoms`` with velocities drawn
    at ``temperature``; write every ``interval``-th frame to ``out`` (extxyz).

    NPT holds ``pressure_GPa`` with ``barostat`` ``mtk`` (time constants ``thermostat_time_fs``
    and ``barostat_time_fs``; ASE suggests ~100 and ~1000 time steps) or ``berendsen`` (the same
    time constants and the material's ``compressibility_per_GPa``, 1/bulk modulus; 0.01 ≈ 100 GPa).
    A calculator with a flagger (``calculator.flagger``, see :mod:`atomforge.flagging`) records
    the MD step of each flagged configuration (0 = the start); the summary counts them.
    """
    _check(atoms, calculator, ensemble=ensemble, barostat=barostat, steps=steps, interval=interval)
    atoms = atoms.copy()
    atoms.calc = calculator
    rng = np.random.default_rng(seed)
    _draw_velocities(atoms, temperature, rng)
    dt = timestep_fs * units.fs
    dyn = _integrator(atoms, ensemble, dt, temperature, rng, friction_per_fs=friction_per_fs,
                      pressure_GPa=pressure_GPa, barostat=barostat, thermostat_time_fs=thermostat_time_fs,
                      barostat_time_fs=barostat_time_fs, compressibility_per_GPa=compressibility_per_GPa)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        if Path(out).exists():
            Path(out).unlink()
    periodic = bool(np.all(atoms.pbc))
    with_stress = periodic and "stress" in getattr(calculator, "implemented_properties", ())
    series: dict[str, list[float]] = {"energy": [], "temperature": [], "volume": [], "pressure": []}
    frames = 0

    def record() -> None:
        nonlocal frames
        series["energy"].append(atoms.get_total_energy())
        series["temperature"].append(atoms.get_temperature())
        if periodic:
            series["volume"].append(atoms.get_volume())
        if with_stress:  # computed with the forces already (cached); ASE sign: pressure = -trace/3
            series["pressure"].append(-float(np.mean(atoms.get_stress(include_ideal_gas=True)[:3])) / units.GPa)
        if out is not None and dyn.nsteps % interval == 0:
            write(out, atoms, format="extxyz", append=True)
            frames += 1

    label = f"MD {ensemble.upper()} {temperature:g} K" + (f" {pressure_GPa:g} GPa" if ensemble == "npt" else "")
    seconds, flagged = _run(dyn, steps, record, calculator, label if progress else None)
    return _summary(series, ensemble, steps, seconds, timestep_fs, len(atoms), frames, flagged)


def _check(atoms: Atoms, calculator: Calculator, *, ensemble: str, barostat: str, steps: int, interval: int) -> None:
    """Clear errors before anything runs."""
    if ensemble not in ENSEMBLES:
        raise ConfigError(f"ensemble must be one of {', '.join(ENSEMBLES)}; got {ensemble!r}")
    if barostat not in BAROSTATS:
        raise ConfigError(f"barostat must be one of {', '.join(BAROSTATS)}; got {barostat!r}")
    if steps < 1 or interval < 1:
        raise ConfigError(f"steps and interval must be ≥ 1; got steps={steps}, interval={interval}")
    if ensemble == "npt" and not np.all(atoms.pbc):
        raise ConfigError(f"NPT needs a structure periodic in x, y and z (a volume to change); got "
                          f"pbc={atoms.pbc.tolist()} ({atoms.get_chemical_formula()}). Use --ensemble nvt, or give "
                          "the structure a periodic cell")
    if ensemble == "npt" and "stress" not in getattr(calculator, "implemented_properties", ()):
        raise ConfigError(f"NPT needs the stress; the calculator {type(calculator).__name__} does not provide it. "
                          "Use --ensemble nvt")


def _draw_velocities(atoms: Atoms, temperature: float, rng: np.random.Generator) -> None:
    """Maxwell–Boltzmann velocities at ``temperature``, no net momentum (nor rotation if open)."""
    from ase.md import velocitydistribution as vd

    if hasattr(vd, "thermalize_momenta"):  # ASE ≥ 3.29; the same draw as MaxwellBoltzmannDistribution
        vd.thermalize_momenta(atoms, temperature, rng=rng)
    else:
        vd.MaxwellBoltzmannDistribution(atoms, temperature_K=temperature, rng=rng)
    vd.Stationary(atoms)
    if not atoms.pbc.any():
        vd.ZeroRotation(atoms)


def _integrator(atoms: Atoms, ensemble: str, dt: float, temperature: float, rng: np.random.Generator, *,
                friction_per_fs: float, pressure_GPa: float, barostat: str, thermostat_time_fs: float,
                barostat_time_fs: float, compressibility_per_GPa: float) -> Any:
    """The ASE dynamics object of ``ensemble`` (imports here: ``ase.md`` pulls in scipy)."""
    if ensemble == "nve":
        from ase.md.verlet import VelocityVerlet

        return VelocityVerlet(atoms, timestep=dt)
    if ensemble == "nvt":
        from ase.constraints import FixCom
        from ase.md.langevin import Langevin

        if not atoms.constraints:
            atoms.set_constraint(FixCom())  # keep the centre of mass still (ASE's recommended way)
        return Langevin(atoms, timestep=dt, temperature_K=temperature, friction=friction_per_fs / units.fs,
                        rng=rng, fixcm=False)
    if barostat == "berendsen":
        from ase.md.nptberendsen import NPTBerendsen

        return NPTBerendsen(atoms, timestep=dt, temperature_K=temperature, pressure_au=pressure_GPa * units.GPa,
                            taut=thermostat_time_fs * units.fs, taup=barostat_time_fs * units.fs,
                            compressibility_au=compressibility_per_GPa / units.GPa)
    from ase.md.nose_hoover_chain import IsotropicMTKNPT

    return IsotropicMTKNPT(atoms, timestep=dt, temperature_K=temperature, pressure_au=pressure_GPa * units.GPa,
                           tdamp=thermostat_time_fs * units.fs, pdamp=barostat_time_fs * units.fs)


def _run(dyn: Any, steps: int, record: Callable[[], None], calculator: Calculator,
         label: str | None) -> tuple[float, int]:
    """Run ``steps`` steps calling ``record`` at every one (the start included) with an optional
    progress bar; tells the calculator's flagger the step. Returns seconds and flags raised."""
    bar = None
    if label is not None:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=label, unit="step", file=sys.stderr)
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
        if bar is not None:
            bar.close()
    return time.perf_counter() - started, (flagger.flagged - flagged_before if flagger is not None else 0)


def _summary(series: dict[str, list[float]], ensemble: str, steps: int, seconds: float, timestep_fs: float,
             n_atoms: int, frames: int, flagged: int) -> MDSummary:
    """The :class:`MDSummary` of the recorded series (drift and deviation for NVE only)."""
    drift = deviation = None
    if ensemble == "nve":
        e = np.asarray(series["energy"]) / n_atoms * 1000.0  # meV/atom
        t_ps = np.arange(len(e)) * timestep_fs / 1000.0
        drift = float(np.polyfit(t_ps, e, 1)[0]) if len(e) > 2 else 0.0
        deviation = float(np.max(np.abs(e - e[0])))
    volume, pressure = series["volume"], series["pressure"]
    return MDSummary(steps, seconds, 1000 * seconds / steps, float(np.mean(series["temperature"])), drift, deviation,
                     frames, flagged, ensemble, float(np.mean(pressure)) if pressure else None,
                     float(np.mean(volume)) if volume else None, float(volume[-1]) if volume else None)
