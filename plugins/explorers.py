"""Built-in explorers: propose configurations for active learning with any ASE calculator.

- ``md`` — Langevin NVT (or Berendsen NPT where the calculator gives stress) at one or more
  temperatures; a trajectory stops as soon as its max force std reaches the upper trust level
  (read from ``calc.results['forces_std'|'forces_std_max']``), since beyond it the model's
  dynamics are no longer trustworthy. ``engine: torch_sim`` runs all trajectories of a call as
  one batch through torch-sim (NVT only; needs the ``torchsim`` extra and an atomforge model);
  the default ``ase`` runs them one by one with any ASE calculator;
- ``perturb`` — random rattles of the positions and (for periodic cells) random strains;
- ``normal_modes`` — normal-mode sampling for molecules: Boltzmann-distributed displacements
  along the modes of a finite-difference Hessian of the calculator;
- ``candidates_file`` — no simulation: the configurations that production runs flagged as
  uncertain (``atomforge md --flag-uncertain``, see ``atomforge.exploration.flagging``), read back from
  their candidates files, so a campaign labels them.

Explorers return unlabelled copies with ``info['explorer']`` (and what made them) set.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
from ase import Atoms, units
from ase.calculators.calculator import Calculator

from atomforge import (
    AtomforgeCalculator,
    ConfigError,
    DataValidationError,
    ExplorerSpec,
    OracleFailure,
    hookimpl,
    read_candidates,
    structure_hash,
    torchsim_available,
    torchsim_model,
    uncertainty_of,
)

_log = logging.getLogger("atomforge.explorers")


class _StopTrajectory(Exception):
    """Raised from an MD observer when the trajectory leaves the trust region."""


def _snapshot(atoms: Atoms, **info: object) -> Atoms:
    """A calculator-free copy with provenance in ``info``."""
    frame = Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
    frame.info.update({k: v for k, v in atoms.info.items() if k in ("charge", "spin", "fidelity")})
    frame.info.update(info)
    return frame


ENGINES = ("ase", "torch_sim")


class MDExplorer:
    """Molecular dynamics with the model, stopped at the upper trust level."""

    def __init__(self, *, temperatures: Sequence[float] = (300.0,), steps: int = 200, interval: int = 10,
                 timestep_fs: float = 1.0, friction_per_fs: float = 0.02, ensemble: str = "nvt",
                 pressure_gpa: float = 0.0, taut_fs: float = 100.0, taup_fs: float = 1000.0,
                 compressibility_per_gpa: float = 0.01, engine: str = "ase") -> None:
        if ensemble not in ("nvt", "npt"):
            raise ConfigError(f"md explorer: ensemble must be 'nvt' or 'npt'; got {ensemble!r}")
        if steps < 1 or interval < 1:
            raise ConfigError(f"md explorer: steps and interval must be ≥ 1; got {steps}, {interval}")
        _check_engine(engine, ensemble)
        self.engine = engine  # ase (one trajectory at a time, any calculator) | torch_sim (all at once)
        self.temperatures = [float(t) for t in np.atleast_1d(temperatures)]  # K, one run per start each
        self.steps = steps  # MD steps per trajectory (at most)
        self.interval = interval  # keep every interval-th frame as a candidate
        self.timestep_fs = timestep_fs
        self.friction_per_fs = friction_per_fs  # Langevin friction (NVT)
        self.ensemble = ensemble  # nvt (Langevin) | npt (Berendsen; needs stress)
        self.pressure_gpa, self.taut_fs, self.taup_fs = pressure_gpa, taut_fs, taup_fs
        self.compressibility_per_gpa = compressibility_per_gpa

    def _dynamics(self, atoms: Atoms, temperature: float, rng: np.random.Generator) -> object:
        from ase.constraints import FixCom
        from ase.md.langevin import Langevin
        from ase.md.nptberendsen import NPTBerendsen

        dt = self.timestep_fs * units.fs
        if self.ensemble == "nvt":
            atoms.set_constraint(FixCom())  # ASE's recommended way to keep the centre of mass still
            return Langevin(atoms, timestep=dt, temperature_K=temperature,
                            friction=self.friction_per_fs / units.fs, rng=rng, fixcm=False)
        if not atoms.pbc.all() or "stress" not in atoms.calc.implemented_properties:
            raise ConfigError("md explorer: NPT needs a 3D-periodic structure and a calculator with stress")
        return NPTBerendsen(atoms, timestep=dt, temperature_K=temperature,
                            pressure_au=self.pressure_gpa * units.GPa, taut=self.taut_fs * units.fs,
                            taup=self.taup_fs * units.fs,
                            compressibility_au=self.compressibility_per_gpa / units.GPa)

    def _trajectory(self, start: Atoms, calculator: Calculator, temperature: float, hi: float | None,
                    rng: np.random.Generator) -> list[Atoms]:
        from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary

        atoms = _snapshot(start)
        atoms.calc = calculator
        MaxwellBoltzmannDistribution(atoms, temperature_K=temperature, rng=rng)
        Stationary(atoms)
        dyn = self._dynamics(atoms, temperature, rng)
        frames: list[Atoms] = []

        def observe() -> None:
            sigma, _ = uncertainty_of(atoms.calc.results)
            beyond = hi is not None and sigma is not None and sigma >= hi
            if dyn.nsteps > 0 and (dyn.nsteps % self.interval == 0 or beyond):
                frames.append(_snapshot(atoms, explorer="md", temperature=temperature, step=dyn.nsteps))
            if beyond:
                raise _StopTrajectory

        dyn.attach(observe, interval=1)
        try:
            dyn.run(self.steps)
        except _StopTrajectory:
            pass
        except (DataValidationError, OracleFailure) as error:  # the dynamics blew up (e.g. overlapping
            # atoms), or an oracle driving them failed even after its retries (distillation teachers)
            _log.warning("md explorer: trajectory at %g K stopped at step %d: %s", temperature, dyn.nsteps, error)
        return frames

    def explore(self, starts: Sequence[Atoms], calculator: Calculator, *, hi: float | None,
                seed: int) -> list[Atoms]:
        if self.engine == "torch_sim":
            return _BatchedMD(self, calculator, hi, seed).run(starts)
        rng = np.random.default_rng(seed)
        return [frame for start in starts for temperature in self.temperatures
                for frame in self._trajectory(start, calculator, temperature, hi, rng)]


def _check_engine(engine: str, ensemble: str) -> None:
    """Fail when the campaign opens, not after its first training: an unknown engine, NPT
    through torch-sim, or torch-sim not installed."""
    if engine not in ENGINES:
        raise ConfigError(f"md explorer: engine must be one of {', '.join(ENGINES)}; got {engine!r}")
    if engine == "torch_sim" and ensemble != "nvt":
        raise ConfigError("md explorer: engine torch_sim runs NVT (Langevin) only; use ensemble: nvt, or "
                          "engine: ase for Berendsen NPT")
    if engine == "torch_sim" and not torchsim_available():
        raise ConfigError("md explorer: engine torch_sim needs torch-sim, which is not installed here: "
                          "pip install 'atomforge[torchsim]' (Python ≥ 3.11), or use engine: ase")


class _BatchedMD:
    """The ``md`` explorer's trajectories (every start at every temperature) as one torch-sim
    batch: BAOAB Langevin NVT with the centre of mass held still, each system stopped on its own
    at the first step with σ ≥ hi (that frame kept) or when the model refuses it (overlapping
    atoms, NaN/inf: a warning, the frames before kept) — the rules of the ASE path.

    σ of every step comes with the step: the adapter keeps the outputs of its latest call
    (``last_outputs``), which the integrator made at the new positions.
    """

    def __init__(self, explorer: MDExplorer, calculator: Calculator, hi: float | None, seed: int) -> None:
        if not isinstance(calculator, AtomforgeCalculator):
            raise ConfigError(f"md explorer: engine torch_sim runs an atomforge model, so it needs an atomforge "
                              f"calculator (load_calculator); got {type(calculator).__name__}. Use engine: ase")
        self.explorer, self.hi, self.seed = explorer, hi, seed
        self.model = torchsim_model(calculator.model, head=calculator.head, device=calculator.device,
                                    compute_stress=False, strict=False)

    def run(self, starts: Sequence[Atoms]) -> list[Atoms]:
        jobs = [(start, float(t)) for start in starts for t in self.explorer.temperatures]
        frames: list[list[Atoms]] = [[] for _ in jobs]
        for periodic in (False, True):  # a torch-sim state is periodic along all axes or none
            group = [k for k, (start, _) in enumerate(jobs) if bool(start.pbc.all()) == periodic]
            if group:
                self._group([jobs[k] for k in group], [frames[k] for k in group])
        return [frame for trajectory in frames for frame in trajectory]

    def _group(self, jobs: list[tuple[Atoms, float]], frames: list[list[Atoms]]) -> None:
        import torch
        import torch_sim as ts

        for start, _ in jobs:
            _check_batchable(start, self.model.head)
        md = self.explorer
        model = self.model
        kT = torch.tensor([t * units.kB for _, t in jobs], dtype=model.dtype, device=model.device)
        dt = torch.tensor(md.timestep_fs * units.fs, dtype=model.dtype, device=model.device)
        gamma = torch.tensor(md.friction_per_fs / units.fs, dtype=model.dtype, device=model.device)
        state = ts.io.atoms_to_state([start for start, _ in jobs], model.device, model.dtype)
        init, update = ts.nvt_langevin(model=model, dt=dt, kT=kT, gamma=gamma, seed=self.seed)
        devices = [model.device] if model.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # Langevin noise: seeded, the caller's RNG untouched
            torch.manual_seed(self.seed)
            state = init(state, kT=kT, seed=self.seed)
            rows = list(range(len(jobs)))  # the job of each system still in the state
            for step in range(md.steps + 1):
                if step > 0:
                    state = _hold_centre_of_mass(update(state, kT=kT))
                keep = self._observe(state, rows, jobs, frames, step)
                if not keep:
                    break
                if len(keep) < len(rows):
                    state, kT = state[keep], kT[keep]
                    rows = [rows[r] for r in keep]

    def _observe(self, state: object, rows: list[int], jobs: list[tuple[Atoms, float]],
                 frames: list[list[Atoms]], step: int) -> list[int]:
        """Record the frames of ``step`` and return the rows whose trajectories go on."""
        sigma = self.model.last_outputs.get("forces_std_max")
        keep = []
        for r, job in enumerate(rows):
            start, temperature = jobs[job]
            problem = self.model.last_problems[r]
            if problem is not None:
                _log.warning("md explorer: trajectory at %g K stopped at step %d: %s", temperature, step, problem)
                continue
            beyond = self.hi is not None and sigma is not None and float(sigma[r]) >= self.hi
            if step > 0 and (step % self.explorer.interval == 0 or beyond):
                frames[job].append(_frame(state, r, start, temperature=temperature, step=step))
            if not beyond and step < self.explorer.steps:
                keep.append(r)
        return keep


def _check_batchable(start: Atoms, head: str | int | None) -> None:
    """A start torch-sim can carry: open or 3D-periodic, and no metadata a SimState would drop
    (charge, spin; a fidelity unless the calculator fixes the head)."""
    if start.pbc.any() and not start.pbc.all():
        raise ConfigError(f"md explorer: engine torch_sim runs molecules or 3D-periodic cells; this start has "
                          f"pbc={start.pbc.tolist()}. Use engine: ase")
    for key, default in (("charge", 0), ("spin", 0), *((("fidelity", 0),) if head is None else ())):
        if float(start.info.get(key, default)) != default:
            raise ConfigError(f"md explorer: engine torch_sim cannot pass atoms.info[{key!r}] "
                              f"(= {start.info[key]}) to the model; use engine: ase")


def _hold_centre_of_mass(state: object) -> object:
    """Remove each system's total momentum (ASE's FixCom on the ASE path): the Langevin noise
    would otherwise make the molecules or cells drift."""
    masses, index = state.masses, state.system_idx
    total = masses.new_zeros(state.n_systems, 3).index_add_(0, index, state.momenta)
    mass = masses.new_zeros(state.n_systems).index_add_(0, index, masses)
    state.momenta = state.momenta - masses[:, None] * (total / mass[:, None])[index]
    return state


def _frame(state: object, row: int, start: Atoms, **info: object) -> Atoms:
    """System ``row`` of a torch-sim state as a calculator-free copy of ``start`` at its positions."""
    mask = (state.system_idx == row).cpu().numpy()
    atoms = Atoms(start.numbers, state.positions.detach().cpu().double().numpy()[mask],
                  cell=state.row_vector_cell[row].detach().cpu().double().numpy(), pbc=start.pbc)
    atoms.info.update(start.info)
    return _snapshot(atoms, explorer="md", **info)


class PerturbExplorer:
    """Random rattles (Gaussian, ``rattle_std`` Å) and, for periodic cells, strains (±``strain``)."""

    def __init__(self, *, n_per_start: int = 10, rattle_std: float = 0.05, strain: float = 0.02) -> None:
        if n_per_start < 1 or rattle_std < 0 or strain < 0:
            raise ConfigError("perturb explorer: n_per_start ≥ 1, rattle_std ≥ 0 and strain ≥ 0 required; "
                              f"got {n_per_start}, {rattle_std}, {strain}")
        self.n_per_start, self.rattle_std, self.strain = n_per_start, rattle_std, strain

    def _perturb(self, start: Atoms, rng: np.random.Generator) -> Atoms:
        atoms = _snapshot(start, explorer="perturb")
        if self.strain and atoms.pbc.all():
            eps = rng.uniform(-self.strain, self.strain, (3, 3))
            atoms.set_cell(atoms.cell[:] @ (np.eye(3) + 0.5 * (eps + eps.T)), scale_atoms=True)
        atoms.positions += rng.normal(0.0, self.rattle_std, atoms.positions.shape)
        return atoms

    def explore(self, starts: Sequence[Atoms], calculator: Calculator, *, hi: float | None,
                seed: int) -> list[Atoms]:
        rng = np.random.default_rng(seed)
        return [self._perturb(start, rng) for start in starts for _ in range(self.n_per_start)]


def finite_difference_hessian(atoms: Atoms, calculator: Calculator, delta: float = 0.01) -> np.ndarray:
    """[3N, 3N] Hessian (eV/Å²) by central differences of the calculator's forces, symmetrised."""
    work = _snapshot(atoms)
    work.calc = calculator
    n = len(work)
    hessian = np.zeros((3 * n, 3 * n))
    for index in range(3 * n):
        atom, axis = divmod(index, 3)
        columns = []
        for sign in (1, -1):
            work.positions[atom, axis] += sign * delta
            columns.append(work.get_forces().ravel())
            work.positions[atom, axis] -= sign * delta
        hessian[index] = -(columns[0] - columns[1]) / (2 * delta)
    return 0.5 * (hessian + hessian.T)


def _internal_projector(atoms: Atoms) -> np.ndarray:
    """[3N, 3N] projector (mass-weighted coordinates) removing rigid translations and rotations."""
    sqrt_m = np.sqrt(atoms.get_masses())
    centred = atoms.positions - atoms.get_center_of_mass()
    rigid = []
    for axis in np.eye(3):
        rigid.append((sqrt_m[:, None] * axis).ravel())
        rigid.append((sqrt_m[:, None] * np.cross(axis, centred)).ravel())
    q, r = np.linalg.qr(np.array(rigid).T)
    q = q[:, np.abs(np.diag(r)) > 1e-8]  # a linear molecule has one rotation fewer
    return np.eye(q.shape[0]) - q @ q.T


class NormalModeExplorer:
    """Normal-mode sampling (molecules): displacements along each vibrational mode with a
    classical Boltzmann amplitude at ``temperature``, from the calculator's FD Hessian."""

    def __init__(self, *, temperature: float = 300.0, n_per_start: int = 10, delta: float = 0.01,
                 min_eigenvalue: float = 1e-3) -> None:
        if temperature <= 0 or n_per_start < 1:
            raise ConfigError(f"normal_modes explorer: temperature > 0 and n_per_start ≥ 1; got "
                              f"{temperature}, {n_per_start}")
        self.temperature, self.n_per_start, self.delta = temperature, n_per_start, delta
        self.min_eigenvalue = min_eigenvalue  # eV/Å²/amu; softer modes (rotations, translations) are skipped

    def _modes(self, start: Atoms, calculator: Calculator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if start.pbc.any():
            raise ConfigError("normal_modes explorer samples molecules; this structure is periodic")
        masses = np.repeat(start.get_masses(), 3)
        weighted = finite_difference_hessian(start, calculator, self.delta) / np.sqrt(np.outer(masses, masses))
        project = _internal_projector(start)
        values, vectors = np.linalg.eigh(project @ weighted @ project)
        keep = values > self.min_eigenvalue  # drops translations, rotations and unstable modes
        return values[keep], vectors[:, keep], masses

    def explore(self, starts: Sequence[Atoms], calculator: Calculator, *, hi: float | None,
                seed: int) -> list[Atoms]:
        rng, out = np.random.default_rng(seed), []
        kT = units.kB * self.temperature
        for start in starts:
            values, vectors, masses = self._modes(start, calculator)
            for _ in range(self.n_per_start):
                amplitudes = rng.normal(0.0, np.sqrt(kT / values))
                frame = _snapshot(start, explorer="normal_modes", temperature=self.temperature)
                frame.positions += ((vectors @ amplitudes) / np.sqrt(masses)).reshape(-1, 3)
                out.append(frame)
        return out


class CandidatesFileExplorer:
    """The configurations in one or more candidates files (written by a flagging calculator),
    each once: duplicates, by the label journal's key (:func:`structure_hash`), are dropped.

    Files are read again at every ``explore`` call, so a campaign sees what running production
    jobs flagged since. ``starts``, the calculator and ``hi`` are not used.
    """

    def __init__(self, *, path: str | None = None, paths: Sequence[str] | None = None) -> None:
        files = [path] if path is not None else []
        files += [paths] if isinstance(paths, str) else list(paths or [])
        if not files:
            raise ConfigError("candidates_file explorer: give `path` (or `paths`, a list): the candidates "
                              "file(s) of `atomforge md --flag-uncertain LEVEL --candidates FILE`")
        self.paths = [Path(p).expanduser() for p in files]  # resolved by the campaign config
        for file in self.paths:  # fail before the first training, not after it
            if not file.is_file():
                read_candidates(file)  # raises a ConfigError naming the file and what to do

    def explore(self, starts: Sequence[Atoms], calculator: Calculator, *, hi: float | None,
                seed: int) -> list[Atoms]:
        out, seen = [], set()
        for file in self.paths:
            for atoms in read_candidates(file):
                key = structure_hash(atoms)
                if key not in seen:
                    seen.add(key)
                    out.append(_snapshot(atoms, explorer="candidates_file", candidates_file=str(file),
                                         step=int(atoms.info.get("step", -1)),
                                         flagged_std=float(atoms.info.get("forces_std_max", np.nan))))
        return out


@hookimpl
def register_explorers(register) -> None:  # noqa: ANN001
    register(ExplorerSpec("md", MDExplorer, "Langevin NVT / Berendsen NPT MD, stopped at the upper trust level; "
                                            "engine: ase (default) or torch_sim (batched)"))
    register(ExplorerSpec("perturb", PerturbExplorer, "random rattles and strains"))
    register(ExplorerSpec("normal_modes", NormalModeExplorer, "normal-mode sampling of molecules (FD Hessian)"))
    register(ExplorerSpec("candidates_file", CandidatesFileExplorer,
                          "configurations flagged as uncertain in production (candidates files)"))
