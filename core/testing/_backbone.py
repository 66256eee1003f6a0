"""The conformance kit: physics checks every backbone plugin should pass.

    from atomforge.testing import check_backbone
    check_backbone(MyNet, options={"hidden": 16})          # raises ConformanceError on failure

Checks (float64 by default): finite-difference forces (central differences) and stress (finite
strain), both always evaluated on a float64 copy, a smooth cutoff (a dimer's energy and forces
vanish continuously at the cutoff), translation, rotation (only for backbones equivariant by construction; pass
``equivariant=False`` for ones that are not), permutation, batch-vs-single consistency and a
periodic cell vs its supercell (same energy per atom, tiled forces). The small periodic cell is
smaller than the cutoff, so several images of one atom are neighbours.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Mapping

import numpy as np
import torch
from ase import Atoms

from .. import keys as K
from .._specs import BackboneSpec
from ..data.graph import atoms_to_graph, collate
from ..model.potential import Potential
from ._common import CheckResult, central_difference_force, finish, random_rotation, translated

__all__ = ["CheckResult", "check_backbone", "make_test_potential", "sample_structures", "predict"]

_ELEMENTS = (1, 8)


def make_test_potential(
    factory: Callable[..., Any] | BackboneSpec,
    *,
    options: Mapping[str, Any] | None = None,
    cutoff: float = 4.0,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
) -> Potential:
    """A randomly initialised potential (non-trivial baseline, scale and shift) for checks."""
    if isinstance(factory, BackboneSpec):
        factory = factory.factory
    torch.manual_seed(seed)
    backbone = factory(num_elements=len(_ELEMENTS), cutoff=cutoff, **dict(options or {}))
    return Potential(backbone, elements=_ELEMENTS, atomic_energies=[-0.5, -2.0], scale=1.3, shift=0.1).to(dtype).eval()


def sample_structures(seed: int = 0) -> dict[str, Atoms]:
    """A small open cluster and a small triclinic periodic cell (cell < cutoff)."""
    rng = np.random.default_rng(seed)
    grid = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1]], float) * 1.3
    molecule = Atoms([8, 1, 1, 8, 1, 1], positions=grid + rng.normal(0, 0.12, grid.shape))
    cell = np.array([[2.6, 0.0, 0.0], [0.7, 2.8, 0.0], [0.4, 0.6, 3.0]])
    crystal = Atoms([8, 1, 1], cell=cell, pbc=True,
                    scaled_positions=np.array([[0.05, 0.1, 0.0], [0.4, 0.5, 0.45], [0.7, 0.2, 0.75]]))
    crystal.positions += rng.normal(0, 0.05, (3, 3))
    return {"molecule": molecule, "crystal": crystal}


def predict(potential: Potential, *structures: Atoms, stress: bool = False) -> dict[str, np.ndarray]:
    """Energies [B], forces [N, 3] (and stress [B, 3, 3]) of ``structures`` as one batch."""
    dtype = next((p.dtype for p in potential.parameters() if p.is_floating_point()), torch.float64)
    batch = collate([atoms_to_graph(a, potential.cutoff, dtype=dtype) for a in structures])
    out = potential(batch, compute_forces=True, compute_stress=stress)
    return {k: v.detach().double().numpy() for k, v in out.items() if k in (K.ENERGY, K.FORCES, K.STRESS)}


def _energy(potential: Potential, atoms: Atoms) -> float:
    return float(predict(potential, atoms)[K.ENERGY][0])


def _fd_forces(potential: Potential, atoms: Atoms, h: float) -> np.ndarray:
    return np.array([[central_difference_force(lambda a: _energy(potential, a), atoms, i, d, h) for d in range(3)]
                     for i in range(len(atoms))])


def _strained(atoms: Atoms, eps: np.ndarray) -> Atoms:
    out = atoms.copy()
    out.set_cell(atoms.cell[:] @ (np.eye(3) + eps), scale_atoms=True)
    return out


def _fd_stress(potential: Potential, atoms: Atoms, h: float) -> np.ndarray:
    stress = np.zeros((3, 3))
    for a in range(3):
        for b in range(3):
            eps = np.zeros((3, 3))
            eps[a, b] = eps[b, a] = h / 2 if a != b else h
            diff = _energy(potential, _strained(atoms, eps)) - _energy(potential, _strained(atoms, -eps))
            stress[a, b] = diff / (2 * h) / atoms.get_volume()
    return stress


def _scale(*arrays: np.ndarray) -> float:
    return max(1.0, *(float(np.abs(a).max()) for a in arrays))


def _cutoff_check(potential: Potential, tol_cutoff: float) -> CheckResult:
    """Energy and forces of a dimer must vanish continuously at the cutoff (no hard step)."""
    rc = potential.cutoff

    def dimer(r: float) -> dict[str, np.ndarray]:
        return predict(potential, Atoms([8, 1], positions=[[0, 0, 0], [r, 0, 0]]))

    apart = dimer(rc * (1 + 1e-5))
    inside = dimer(rc * (1 - 1e-5))
    typical = dimer(0.5 * rc)
    scale = max(1e-3, abs(float(typical[K.ENERGY][0] - apart[K.ENERGY][0])))
    jump = abs(float(inside[K.ENERGY][0] - apart[K.ENERGY][0])) / scale
    force = float(np.abs(inside[K.FORCES]).max()) / max(scale, float(np.abs(typical[K.FORCES]).max()))
    return CheckResult("smooth cutoff (dimer at the cutoff)", max(jump, force), tol_cutoff)


def _checks(potential: Potential, systems: dict[str, Atoms], equivariant: bool, rng: np.random.Generator,
            tol: float, fd_tol: float, conservative: bool) -> list[CheckResult]:
    mol, xtal = systems["molecule"], systems["crystal"]
    results = []
    ref = {name: predict(potential, a, stress=a.pbc.all()) for name, a in systems.items()}
    if conservative:  # finite differences always in float64, whatever dtype is checked
        exact = copy.deepcopy(potential).double()
        exact_ref = {name: predict(exact, a, stress=a.pbc.all()) for name, a in systems.items()}
        for name, atoms in systems.items():
            fd = _fd_forces(exact, atoms, 1e-4)
            err = np.abs(fd - exact_ref[name][K.FORCES]).max() / _scale(fd)
            results.append(CheckResult(f"finite-difference forces ({name})", float(err), fd_tol))
        fd_s = _fd_stress(exact, xtal, 1e-5)
        err = np.abs(fd_s - exact_ref["crystal"][K.STRESS][0]).max() / max(1e-3, float(np.abs(fd_s).max()))
        results.append(CheckResult("finite-strain stress (crystal)", float(err), fd_tol))
    shift = rng.normal(0, 2.0, 3)
    for name, atoms in systems.items():
        moved = translated(atoms, shift)
        out = predict(potential, moved)
        err = max(abs(out[K.ENERGY][0] - ref[name][K.ENERGY][0]) / _scale(ref[name][K.ENERGY]),
                  np.abs(out[K.FORCES] - ref[name][K.FORCES]).max() / _scale(ref[name][K.FORCES]))
        results.append(CheckResult(f"translation ({name})", float(err), tol))
    if equivariant:
        for name, atoms in systems.items():
            rot = random_rotation(rng)
            turned = atoms.copy()
            turned.positions = atoms.positions @ rot.T
            if atoms.pbc.any():
                turned.set_cell(atoms.cell[:] @ rot.T, scale_atoms=False)
            out = predict(potential, turned)
            err = max(abs(out[K.ENERGY][0] - ref[name][K.ENERGY][0]) / _scale(ref[name][K.ENERGY]),
                      np.abs(out[K.FORCES] - ref[name][K.FORCES] @ rot.T).max() / _scale(ref[name][K.FORCES]))
            results.append(CheckResult(f"rotation ({name})", float(err), tol))
    perm = rng.permutation(len(mol))
    out = predict(potential, mol[perm])
    err = max(abs(out[K.ENERGY][0] - ref["molecule"][K.ENERGY][0]) / _scale(ref["molecule"][K.ENERGY]),
              np.abs(out[K.FORCES] - ref["molecule"][K.FORCES][perm]).max() / _scale(ref["molecule"][K.FORCES]))
    results.append(CheckResult("permutation (molecule)", float(err), tol))
    together = predict(potential, mol, xtal, mol)
    single_f = np.concatenate([ref["molecule"][K.FORCES], ref["crystal"][K.FORCES], ref["molecule"][K.FORCES]])
    single_e = np.array([ref["molecule"][K.ENERGY][0], ref["crystal"][K.ENERGY][0], ref["molecule"][K.ENERGY][0]])
    err = max(np.abs(together[K.ENERGY] - single_e).max() / _scale(single_e),
              np.abs(together[K.FORCES] - single_f).max() / _scale(single_f))
    results.append(CheckResult("batch vs single", float(err), tol))
    results.append(_cutoff_check(potential, tol_cutoff=1e-3))
    reps = (2, 1, 2)
    big = predict(potential, xtal.repeat(reps))
    per_atom = big[K.ENERGY][0] / (len(xtal) * 4) - ref["crystal"][K.ENERGY][0] / len(xtal)
    tiled = np.tile(ref["crystal"][K.FORCES], (4, 1))
    err = max(abs(per_atom) / _scale(ref["crystal"][K.ENERGY]),
              np.abs(big[K.FORCES] - tiled).max() / _scale(tiled))
    results.append(CheckResult("supercell 2x1x2 (energy per atom, forces)", float(err), tol))
    return results


def check_backbone(
    factory: Callable[..., Any] | BackboneSpec,
    *,
    options: Mapping[str, Any] | None = None,
    equivariant: bool | None = None,
    cutoff: float = 4.0,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
) -> list[CheckResult]:
    """Run every check on a freshly initialised backbone; raise :class:`ConformanceError` listing
    the failures, else return the results. ``equivariant`` defaults to the spec's declaration
    (``True`` for a bare factory)."""
    if equivariant is None:
        equivariant = factory.equivariant if isinstance(factory, BackboneSpec) else True
    potential = make_test_potential(factory, options=options, cutoff=cutoff, dtype=dtype, seed=seed)
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    fd_tol = 1e-6
    conservative = not potential.backbone.direct_forces
    results = _checks(potential, sample_structures(seed), equivariant, np.random.default_rng(seed),
                      tol, fd_tol, conservative)
    return finish(results)
