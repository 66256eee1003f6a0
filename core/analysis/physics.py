"""Physics as measurements: how equivariant, conservative and stable is a trained model?

Used by ``atomforge evaluate --physics``, by ``atomforge train`` when ``evaluation.physics`` is
on, by the ``rotation_augmentation`` and ``curl_penalty`` loss plugins, and by the tests. See
``docs/physics.md`` for what each number means.

* **Rotations** (:func:`random_rotations`, :func:`rotate_batch`): Haar-random rotations (optionally
  with reflections) applied to positions, cell, forces and stress of a batch; edges and integer
  cell shifts are unchanged because a rotation maps the neighbour list onto itself.
* **Curl** (:func:`jacobian_probes`, :func:`curl_estimate`): the non-conservative part of a force
  field ``F(r)`` is the antisymmetric part ``A = (J − Jᵀ)/2`` of its Jacobian ``J = ∂F/∂r``
  ([3N, 3N]; a gradient field has ``J = −Hessian``, symmetric, so ``A = 0``). For random probes
  ``v`` with ``E[v vᵀ] = I`` (Rademacher or Gaussian), ``E‖A v‖² = ‖A‖_F²`` (Hutchinson), and
  ``A v = (J v − Jᵀ v)/2`` needs one Jacobian-vector and one vector-Jacobian product, i.e.
  ``E‖J v − Jᵀ v‖² / 4 = ‖A‖_F² = ‖J − Jᵀ‖_F² / 4`` — never the [3N, 3N] matrix. ``Jᵀv`` is one
  backward pass through the forces; ``J v`` uses the double-backward trick (differentiate
  ``Jᵀu`` with respect to a dummy ``u``), so each probe costs about two extra backward passes
  (plus their backward when the estimate is a training loss).
* **Metrics** (:func:`physics_metrics`): rotation error, curl, NVE energy drift and MD stability.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import numpy as np
import torch
from ase import Atoms, units
from ase.data import covalent_radii

from .. import keys as K
from .._errors import ConfigError
from ..config import EvaluationConfig
from ..data.graph import GraphDataset, iterate_batches, neighbor_list
from ..model.potential import Potential, differentiable_inputs, energy_derivatives

__all__ = [
    "CurlEstimate", "MDStability", "random_rotations", "rotate_batch", "jacobian_probes",
    "curl_estimate", "model_forces", "model_curl", "rotation_error", "curl_metrics", "nve_stability",
    "checked_md", "FailureLimits", "physics_metrics",
]


# -- rotations ------------------------------------------------------------------------------------
def random_rotations(n: int, generator: torch.Generator, *, reflections: bool = False,
                     dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``n`` Haar-random orthogonal matrices [n, 3, 3]: rotations, or with ``reflections`` each
    one improper (det −1) with probability ½. Drawn from ``generator`` (CPU)."""
    q, r = torch.linalg.qr(torch.randn(n, 3, 3, generator=generator, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)  # Haar measure on O(3)
    want = torch.ones(n, dtype=torch.float64)
    if reflections:
        want = torch.where(torch.rand(n, generator=generator, dtype=torch.float64) < 0.5, -want, want)
    q = q * (torch.linalg.det(q) * want).reshape(n, 1, 1)  # flip all axes to the wanted sign of det
    return q.to(dtype)


def rotate_batch(batch: dict[str, torch.Tensor], rotations: torch.Tensor) -> dict[str, torch.Tensor]:
    """A new batch with structure b rotated by ``rotations[b]`` ([B, 3, 3], acting on column
    vectors): positions, cell rows and forces ``x → R x``, stress ``σ → R σ Rᵀ``. Energies,
    edges and integer shifts are unchanged (the neighbour list maps onto itself)."""
    rot = rotations.to(device=batch[K.POSITIONS].device, dtype=batch[K.POSITIONS].dtype)
    per_atom = rot[batch[K.BATCH]]
    out = dict(batch)
    out[K.POSITIONS] = torch.einsum("nij,nj->ni", per_atom, batch[K.POSITIONS])
    out[K.CELL] = torch.einsum("bij,bkj->bki", rot, batch[K.CELL])
    if K.FORCES in batch:
        out[K.FORCES] = torch.einsum("nij,nj->ni", per_atom, batch[K.FORCES])
    if K.STRESS in batch:
        out[K.STRESS] = rot @ batch[K.STRESS] @ rot.transpose(-1, -2)
    return out


# -- curl -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CurlEstimate:
    """Hutchinson estimates over a batch (sums over all its atoms, averaged over probes)."""

    antisymmetric: torch.Tensor  # ‖A‖_F² with A = (J − Jᵀ)/2, (eV/Å²)²; differentiable if asked
    jacobian: torch.Tensor  # ‖J‖_F², (eV/Å²)², for a relative measure
    components: int  # 3N, for per-component averages


def _probe(like: torch.Tensor, generator: torch.Generator | None, kind: str) -> torch.Tensor:
    if kind == "gaussian":
        return torch.randn(like.shape, generator=generator, dtype=like.dtype)
    if kind == "rademacher":
        return torch.randint(0, 2, like.shape, generator=generator).to(like.dtype) * 2 - 1
    raise ConfigError(f"curl probes must be 'rademacher' or 'gaussian'; got {kind!r}")


def jacobian_probes(forces: torch.Tensor, positions: torch.Tensor, v: torch.Tensor, *,
                    create_graph: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(J v, Jᵀ v)`` for ``J = ∂forces/∂positions``; ``forces`` must carry a graph to
    ``positions`` (for gradient forces: computed with ``create_graph=True``)."""
    if not forces.requires_grad:  # forces independent of positions (and parameters): J = 0
        return torch.zeros_like(v), torch.zeros_like(v)
    u = torch.zeros_like(forces, requires_grad=True)
    (jt_u,) = torch.autograd.grad(forces, positions, grad_outputs=u, create_graph=True, allow_unused=True)
    (jt_v,) = torch.autograd.grad(forces, positions, grad_outputs=v, create_graph=create_graph,
                                  retain_graph=True, allow_unused=True)
    if jt_u is None:  # forces independent of positions: J = 0
        return torch.zeros_like(v), torch.zeros_like(v)
    (j_v,) = torch.autograd.grad(jt_u, u, grad_outputs=v, create_graph=create_graph, allow_unused=True)
    return _or_zeros(j_v, v), _or_zeros(jt_v, v)


def _or_zeros(value: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if value is None else value


def curl_estimate(forces: torch.Tensor, positions: torch.Tensor, *, probes: int = 1,
                  generator: torch.Generator | None = None, kind: str = "rademacher",
                  create_graph: bool = False) -> CurlEstimate:
    """Hutchinson estimate of ``‖A‖_F²`` (and ``‖J‖_F²``) of the field ``forces(positions)``
    from ``probes`` random vectors: ``mean_v ‖(J v − Jᵀ v)/2‖²``. Unbiased; its variance falls
    as 1/probes. ``create_graph`` keeps it differentiable (a training loss)."""
    if probes < 1:
        raise ConfigError(f"curl estimate needs probes ≥ 1; got {probes}")
    antisymmetric = forces.new_zeros(())
    jacobian = forces.new_zeros(())
    for _ in range(probes):
        v = _probe(forces, generator, kind)
        j_v, jt_v = jacobian_probes(forces, positions, v, create_graph=create_graph)
        antisymmetric = antisymmetric + (0.5 * (j_v - jt_v)).pow(2).sum()
        jacobian = jacobian + j_v.detach().pow(2).sum()
    return CurlEstimate(antisymmetric / probes, jacobian / probes, forces.numel())


def _potential_of(model: torch.nn.Module) -> Potential:
    """The :class:`Potential` inside ``model`` (itself, or a UQ head's ``potential``)."""
    potential = model if isinstance(model, Potential) else getattr(model, "potential", None)
    if not isinstance(potential, Potential):
        raise ConfigError(f"physics metrics and the curl penalty need an atomforge Potential; got "
                          f"{type(model).__name__} without a `potential` attribute")
    return potential


def model_forces(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(forces, positions)`` with forces differentiable with respect to the positions leaf —
    a direct-force head's output or ``−∂E/∂r`` with ``create_graph`` — whatever the model's mode."""
    potential = _potential_of(model)
    positions, _ = differentiable_inputs(batch, True, False)
    results = potential.energy_outputs(batch, positions, None)
    if K.DIRECT_FORCES in results:
        return results[K.DIRECT_FORCES], positions
    derivatives = energy_derivatives(results[K.ENERGY], batch, positions, None, create_graph=True)
    return derivatives[K.FORCES], positions


def model_curl(model: torch.nn.Module, batch: dict[str, torch.Tensor], *, probes: int = 1,
               generator: torch.Generator | None = None, kind: str = "rademacher",
               create_graph: bool = False) -> CurlEstimate:
    """:func:`curl_estimate` of a model's force field on ``batch`` (one extra forward pass)."""
    forces, positions = model_forces(model, batch)
    return curl_estimate(forces, positions, probes=probes, generator=generator, kind=kind,
                         create_graph=create_graph)


# -- metrics --------------------------------------------------------------------------------------
def _dataset(model: torch.nn.Module, structures: Sequence[Atoms] | GraphDataset) -> GraphDataset:
    if isinstance(structures, GraphDataset):
        return structures
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    return GraphDataset(list(structures), _potential_of(model).cutoff, dtype=dtype, source="physics metrics")


def _energy_forces(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    out = model(batch, compute_forces=True)
    return out[K.ENERGY].detach().double().numpy(), out[K.FORCES].detach().double().numpy()


def rotation_error(model: torch.nn.Module, structures: Sequence[Atoms] | GraphDataset, *,
                   rotations: int = 8, seed: int = 0, batch_size: int = 32) -> dict[str, float]:
    """Equivariance error over ``rotations`` random rotations per structure.

    ``rotation_forces_relative`` = ‖F(Rx) − R F(x)‖ / ‖F(x)‖ (RMS over all atoms, components and
    rotations: relative to the force scale of the model's own predictions);
    ``rotation_forces_rmse`` in meV/Å and ``rotation_energy_mae`` in meV/atom (E(Rx) − E(x)).
    """
    if rotations < 1:
        raise ConfigError(f"evaluation.rotations must be ≥ 1; got {rotations}")
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    diff2 = ref2 = energy_abs = 0.0
    count = n_energies = 0
    for batch in iterate_batches(_dataset(model, structures), batch_size):
        e0, f0 = _energy_forces(model, batch)
        n_atoms = batch[K.N_ATOMS].double().numpy()
        for _ in range(rotations):
            rot = random_rotations(int(n_atoms.shape[0]), generator)
            e, f = _energy_forces(model, rotate_batch(batch, rot))
            expected = np.einsum("nij,nj->ni", rot.numpy()[batch[K.BATCH].numpy()], f0)
            diff2 += float(((f - expected) ** 2).sum())
            ref2 += float((f0 ** 2).sum())
            count += f.size
            energy_abs += float(np.abs((e - e0) / n_atoms).sum())
            n_energies += e.size
    return {"rotation_forces_relative": math.sqrt(diff2 / max(ref2, 1e-300)),
            "rotation_forces_rmse": 1000.0 * math.sqrt(diff2 / count),
            "rotation_energy_mae": 1000.0 * energy_abs / n_energies}


def curl_metrics(model: torch.nn.Module, structures: Sequence[Atoms] | GraphDataset, *,
                 probes: int = 4, seed: int = 0, batch_size: int = 8) -> dict[str, float]:
    """``curl_rms`` = sqrt(‖A‖_F² / 3N) in meV/Å² (RMS entry of the antisymmetric Jacobian part;
    0 for a conservative field) and ``curl_relative`` = ‖A‖_F / ‖J‖_F (0 conservative, 1 for a
    purely rotational field)."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    antisymmetric = jacobian = 0.0
    components = 0
    for batch in iterate_batches(_dataset(model, structures), batch_size):
        estimate = model_curl(model, batch, probes=probes, generator=generator)
        antisymmetric += float(estimate.antisymmetric.detach())
        jacobian += float(estimate.jacobian)
        components += estimate.components
    return {"curl_rms": 1000.0 * math.sqrt(antisymmetric / components),
            "curl_relative": math.sqrt(antisymmetric / max(jacobian, 1e-300))}


@dataclass(frozen=True)
class MDStability:
    """Outcome of :func:`nve_stability` / :func:`checked_md`."""

    steps: int  # steps run (the requested number unless the run became unstable)
    stable_steps: int  # steps before the first failed check (= steps if none failed)
    failure: str  # "" or what went wrong first: overlap, broken bond, energy, temperature, non-finite
    energy_drift: float  # meV/atom/ps: slope of the total energy over the stable part (NaN when thermostatted)
    max_energy_deviation: float  # meV/atom: largest |E(t) − E(0)| over the stable part (NaN when thermostatted)
    ms_per_step: float
    frames: tuple[Atoms, ...] = field(default=(), repr=False, compare=False)  # checked frames (``keep_frames``)


class FailureLimits(Protocol):
    """What the stability checks read: :class:`~atomforge.config.EvaluationConfig`, or the
    stability suite's ``StabilityConfig``."""

    min_distance: float  # Å; two atoms closer than this = overlap
    bond_stretch: float  # open structures: a starting bond longer than this × Σ r_cov is broken
    max_energy_deviation: float  # eV/atom; NVE total energy leaving this window = blow-up


def _failure(atoms: Atoms, e0: float | None, bonds: np.ndarray, bond_limits: np.ndarray,
             settings: FailureLimits, *, max_temperature: float | None = None) -> str:
    """What is wrong with the current frame, or ``""``. ``e0``: the starting total energy, which
    NVE must keep within ``settings.max_energy_deviation`` per atom; a thermostatted run (whose
    total energy is not conserved) passes ``None`` and a ``max_temperature`` ceiling instead."""
    positions = atoms.positions
    energy = atoms.get_total_energy()
    if not (np.isfinite(positions).all() and math.isfinite(energy)):
        return "non-finite positions or energy"
    if e0 is not None and abs(energy - e0) / len(atoms) > settings.max_energy_deviation:
        return f"total energy moved by more than {settings.max_energy_deviation} eV/atom"
    if max_temperature is not None and atoms.get_temperature() > max_temperature:
        return f"temperature {atoms.get_temperature():.0f} K above {max_temperature:.0f} K"
    i, j, _, _ = neighbor_list(atoms, settings.min_distance)
    if i.size:
        return f"atoms {int(i[0])} and {int(j[0])} closer than {settings.min_distance} Å"
    if bonds.size:
        lengths = np.linalg.norm(positions[bonds[:, 1]] - positions[bonds[:, 0]], axis=1)
        broken = np.flatnonzero(lengths > bond_limits)
        if broken.size:
            a, b = bonds[broken[0]]
            return f"bond {int(a)}-{int(b)} broken ({lengths[broken[0]]:.2f} Å)"
    return ""


def _bonds(atoms: Atoms, stretch: float) -> tuple[np.ndarray, np.ndarray]:
    """Covalent bonds of an open structure (d < 1.2 Σr_cov) and their break lengths
    (``stretch`` Σr_cov). Periodic structures get none: diffusion is not a failure."""
    if atoms.pbc.any():
        return np.zeros((0, 2), int), np.zeros(0)
    radii = covalent_radii[atoms.numbers]
    d = atoms.get_all_distances()
    sums = radii[:, None] + radii[None, :]
    a, b = np.nonzero(np.triu(d < 1.2 * sums, k=1))
    return np.stack([a, b], 1), stretch * sums[a, b]


def nve_stability(atoms: Atoms, calculator: object, settings: EvaluationConfig,
                  check_every: int = 10) -> MDStability:
    """NVE (velocity Verlet) from ``atoms`` with Maxwell–Boltzmann velocities at
    ``settings.temperature``; stops at the first failed stability check. Energy drift is the
    slope of the total energy per atom, as in :func:`atomforge.analysis.md.run_md`."""
    return checked_md(atoms, calculator, settings, steps=settings.nve_steps, temperature=settings.temperature,
                      timestep_fs=settings.timestep_fs, seed=settings.seed, check_every=check_every)


def checked_md(atoms: Atoms, calculator: object, limits: FailureLimits, *, steps: int, temperature: float,
               timestep_fs: float, seed: int = 0, check_every: int = 10, friction_per_fs: float | None = None,
               max_temperature: float | None = None, keep_frames: bool = False) -> MDStability:
    """MD from ``atoms`` with Maxwell–Boltzmann velocities at ``temperature`` (seeded), checked
    every ``check_every`` steps by :func:`_failure`; stops at the first failed check.

    ``friction_per_fs=None``: NVE (velocity Verlet; the total energy is checked and its drift
    reported). Otherwise Langevin NVT at ``temperature`` with that friction (centre of mass fixed,
    as in :func:`atomforge.analysis.md.run_md`): the total energy is not conserved, so it is not
    checked (drift and deviation are NaN) and ``max_temperature`` (K) is the blow-up check instead.
    ``keep_frames`` keeps a copy of every checked frame up to the first failure (for RDFs)."""
    from ase.md.verlet import VelocityVerlet  # ase.md: on use

    from .md import _draw_velocities

    atoms = atoms.copy()
    atoms.calc = calculator
    rng = np.random.default_rng(seed)
    _draw_velocities(atoms, temperature, rng)  # Maxwell–Boltzmann, no net momentum (nor rotation if open)
    bonds, bond_limits = _bonds(atoms, limits.bond_stretch)
    if friction_per_fs is None:
        dyn = VelocityVerlet(atoms, timestep=timestep_fs * units.fs)
    else:
        dyn = _langevin(atoms, timestep_fs, temperature, friction_per_fs, rng)
    energies = [atoms.get_total_energy()]
    e0 = energies[0] if friction_per_fs is None else None
    frames: list[Atoms] = []
    failure, stable, step = "", steps, 0
    started = time.perf_counter()
    for step in range(1, steps + 1):
        dyn.run(1)
        energies.append(atoms.get_total_energy())
        if step % check_every == 0 or step == steps:
            failure = _failure(atoms, e0, bonds, bond_limits, limits, max_temperature=max_temperature)
            if failure:
                stable = step - check_every if step % check_every == 0 else step - step % check_every
                break
            if keep_frames:
                frames.append(Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=atoms.pbc))
    seconds = time.perf_counter() - started
    summary = _summary(np.asarray(energies[: stable + 1]), len(atoms), timestep_fs, step, stable, failure, seconds)
    drift, deviation = summary.energy_drift, summary.max_energy_deviation
    if friction_per_fs is not None:  # a thermostat: the total energy is not a conserved quantity
        drift = deviation = math.nan
    return MDStability(summary.steps, summary.stable_steps, failure, drift, deviation, summary.ms_per_step,
                       tuple(frames))


def _langevin(atoms: Atoms, timestep_fs: float, temperature: float, friction_per_fs: float,
              rng: np.random.Generator) -> object:
    """ASE's Langevin integrator with the centre of mass held by ``FixCom`` (ASE's recommended way)."""
    from ase.constraints import FixCom
    from ase.md.langevin import Langevin

    if not atoms.constraints:
        atoms.set_constraint(FixCom())
    return Langevin(atoms, timestep=timestep_fs * units.fs, temperature_K=temperature,
                    friction=friction_per_fs / units.fs, rng=rng, fixcm=False)


def _summary(energies: np.ndarray, n_atoms: int, timestep_fs: float, steps: int, stable: int,
             failure: str, seconds: float) -> MDStability:
    e = energies / n_atoms * 1000.0  # meV/atom
    t_ps = np.arange(len(e)) * timestep_fs / 1000.0
    finite = np.isfinite(e)
    drift = float(np.polyfit(t_ps[finite], e[finite], 1)[0]) if finite.sum() > 2 else float("nan")
    deviation = float(np.max(np.abs(e[finite] - e[0]))) if finite.any() else float("nan")
    return MDStability(steps, max(stable, 0), failure, drift, deviation, 1000.0 * seconds / max(steps, 1))


def physics_metrics(model: torch.nn.Module, structures: Sequence[Atoms], settings: EvaluationConfig,
                    *, progress: Callable[[str], None] | None = None) -> dict[str, float]:
    """All physics metrics of ``model`` on (the first ``settings.structures`` of) ``structures``;
    the NVE run starts from the first structure. Keys are prefixed ``physics_``."""
    if not structures:
        raise ConfigError("physics metrics need at least one structure")
    subset = list(structures[: settings.structures])
    dataset = _dataset(model, subset)
    say = progress or (lambda message: None)
    say(f"physics: rotation error ({settings.rotations} rotations x {len(subset)} structures)")
    metrics = rotation_error(model, dataset, rotations=settings.rotations, seed=settings.seed)
    say(f"physics: curl ({settings.curl_probes} probes)")
    metrics.update(curl_metrics(model, dataset, probes=settings.curl_probes, seed=settings.seed))
    if settings.nve_steps > 0:
        from ..model.calculator import AtomforgeCalculator

        say(f"physics: NVE, {settings.nve_steps} steps of {settings.timestep_fs} fs")
        md = nve_stability(subset[0], AtomforgeCalculator(model), settings)
        metrics.update({"nve_energy_drift": md.energy_drift, "nve_max_energy_deviation": md.max_energy_deviation,
                        "nve_ps": md.steps * settings.timestep_fs / 1000.0, "md_stable_steps": float(md.stable_steps),
                        "md_stable_ps": md.stable_steps * settings.timestep_fs / 1000.0,
                        "nve_ms_per_step": md.ms_per_step})
    return {f"physics_{k}": float(v) for k, v in metrics.items()}
