"""The conformance kit of UQ heads: what every ``register_uq_heads`` plugin should pass.

    from atomforge.testing import check_uq_head
    check_uq_head(MyHead, options={"num_members": 3})      # raises ConformanceError on failure

The head wraps a small random :class:`~atomforge.Potential` built on a tiny smooth radial
backbone defined here (element embedding, radial filters under a cosine cutoff; it returns
per-atom energies, ``NODE_FEATURES`` [N, F] and equivariant ``NODE_VECTORS`` [N, 3, F]). A head
that is not trained with the model (``trains_with_model`` false) is fitted through
:class:`~atomforge.UQFitContext` on a few tiny Lennard-Jones-labelled structures, its members
being slightly perturbed copies of the potential (no real training); every head is then
calibrated on a validation set (:func:`atomforge.calibrate`) and checked in eval mode:

* the std keys are present, shaped, finite and non-negative; ``forces_std_max`` is the
  per-structure maximum of ``forces_std``; stress on a periodic cell works;
* reproducible for a fixed torch seed (a head that samples, like MC dropout, draws from torch's
  global generator; the kit reseeds it before every prediction);
* the mean forces are ``-∂(mean energy)/∂r`` (central finite differences, float64);
* the stds are invariant (and the mean outputs invariant/equivariant) under a translation and
  a random rotation; under an atom permutation ``forces_std`` is permuted;
* a batch gives what each structure gives alone;
* the model-file round trip: a fresh head built from the same factory, options plus
  ``uq_config()``, on a potential of the same architecture, with the ``state_dict`` passed
  through ``torch.save``/``torch.load(weights_only=True)`` and the calibration through JSON,
  gives identical outputs.

A *stochastic* head (different outputs for different torch seeds) is exempt from the
permutation and batch-vs-single checks, since its random draws depend on the atoms' order and
the batch's size.
"""

from __future__ import annotations

import copy
import io
import json
import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from ase import Atoms

from .. import keys as K
from .._specs import UQHeadSpec
from ..analysis.calibration import calibrate
from ..data.fields import collate
from ..data.graph import GraphDataset, atoms_to_graph
from ..data.structures import attach_labels
from ..model.potential import Potential
from ..model.uncertainty import UQFitContext, UQHead
from ._backbone import make_test_potential, sample_structures
from ._common import CheckResult, central_difference_force, check, finish, random_rotation, translated
from ._models import RadialTestBackbone

__all__ = ["check_uq_head"]

CUTOFF = 4.0
_OUTPUT_KEYS = (K.ENERGY, K.FORCES, K.ENERGY_STD, K.FORCES_STD, K.FORCES_STD_MAX)
_STD_KEYS = (K.ENERGY_STD, K.FORCES_STD)


# -- helpers -------------------------------------------------------------------------------------------
def _failure(name: str, error: BaseException) -> CheckResult:
    return check(f"{name} — raised {type(error).__name__}: {error}", False)


def _labelled(structures: Sequence[Atoms]) -> list[Atoms]:
    """Copies labelled with a smooth Lennard-Jones energy, forces and (periodic) stress."""
    from ase.calculators.lj import LennardJones

    out = []
    for atoms in structures:
        work = atoms.copy()
        work.calc = LennardJones(sigma=1.0, epsilon=0.05, rc=3.0, smooth=True)
        stress = work.get_stress() if work.pbc.all() else None
        out.append(attach_labels(atoms, energy=work.get_potential_energy(), forces=work.get_forces(), stress=stress))
    return out


def _data(seed: int, dtype: torch.dtype) -> tuple[GraphDataset, GraphDataset]:
    train = [a for k in range(1, 5) for a in sample_structures(seed + k).values()]
    valid = [a for k in range(5, 8) for a in sample_structures(seed + k).values()]
    return (GraphDataset(_labelled(train), CUTOFF, dtype=dtype, source="check_uq_head train"),
            GraphDataset(_labelled(valid), CUTOFF, dtype=dtype, source="check_uq_head valid"))


def _member_maker(template: Potential, seed: int) -> Callable[[int], Potential]:
    """``train_member(k)``: a deep copy of the potential with slightly perturbed weights (seeded)."""

    def train_member(k: int) -> Potential:
        member = copy.deepcopy(template)
        generator = torch.Generator().manual_seed(seed * 7919 + 1000 + int(k))
        with torch.no_grad():
            for parameter in member.parameters():
                noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float64)
                spread = 0.05 * max(float(parameter.detach().abs().mean()), 1e-3)
                parameter.add_((spread * noise).to(parameter.dtype))
        return member

    return train_member


def _predict(head: UQHead, structures: Sequence[Atoms], *, seed: int, stress: bool = False,
             dtype: torch.dtype | None = None) -> dict[str, np.ndarray]:
    """Every tensor output of ``head`` on ``structures`` as one batch, torch reseeded first."""
    if dtype is None:
        dtype = next((p.dtype for p in head.parameters() if p.is_floating_point()), torch.float64)
    batch = collate([atoms_to_graph(a, head.cutoff, dtype=dtype) for a in structures], head.fields)
    torch.manual_seed(seed)
    out = head(batch, compute_forces=True, compute_stress=stress)
    return {k: v.detach().double().cpu().numpy() for k, v in out.items() if isinstance(v, torch.Tensor)}


def _rel(a: np.ndarray, b: np.ndarray, floor: float) -> float:
    """Largest absolute difference relative to the larger magnitude (at least ``floor``)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.shape != b.shape:
        return math.inf
    if a.size == 0:
        return 0.0
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return math.inf
    scale = max(floor, float(np.abs(a).max()), float(np.abs(b).max()))
    return float(np.abs(a - b).max()) / scale


def _compare(out: Mapping[str, np.ndarray], ref: Mapping[str, np.ndarray], keys: Sequence[str]) -> float:
    """Largest relative difference over ``keys`` (stds relative to themselves, mean outputs to ≥ 1)."""
    errors = [0.0]
    for key in keys:
        if key not in out or key not in ref:
            return math.inf
        errors.append(_rel(out[key], ref[key], 1e-12 if key in K.STD_KEYS else 1.0))
    return max(errors)


def _fd_error(head: UQHead, atoms: Atoms, seed: int, h: float = 1e-4) -> float:
    """Relative difference of the mean forces and ``-∂(mean energy)/∂r`` by central differences."""
    forces = _predict(head, [atoms], seed=seed)[K.FORCES]
    energy = lambda a: float(_predict(head, [a], seed=seed)[K.ENERGY][0])  # noqa: E731
    fd = np.array([[central_difference_force(energy, atoms, i, d, h) for d in range(3)] for i in range(len(atoms))])
    if forces.shape != fd.shape or not np.isfinite(forces).all():
        return math.inf
    return float(np.abs(fd - forces).max()) / max(1.0, float(np.abs(fd).max()))


def _shape(value: np.ndarray | None) -> str:
    return "missing" if value is None else str(tuple(value.shape))


# -- the checks ----------------------------------------------------------------------------------------
def _build(factory: Callable[..., Any], options: Mapping[str, Any], dtype: torch.dtype, seed: int,
           results: list[CheckResult]) -> tuple[UQHead, Potential] | None:
    """The calibrated head in eval mode, or ``None`` after recording why not."""
    potential = make_test_potential(RadialTestBackbone, cutoff=CUTOFF, dtype=dtype, seed=seed)
    template = copy.deepcopy(potential)
    name = f"factory(potential, **{dict(options)!r}) builds a head"
    try:
        head = factory(potential, **options)
    except Exception as error:  # noqa: BLE001 - reported as a failed check
        results.append(_failure(name, error))
        return None
    ok = isinstance(head, UQHead)
    results.append(check(f"factory returns an atomforge.UQHead (found {type(head).__name__})", ok))
    if not ok:
        return None
    train, valid = _data(seed, dtype)
    if not head.trains_with_model:
        try:
            head.fit(UQFitContext(train, valid, _member_maker(template, seed), batch_size=4))
            results.append(check("fit(UQFitContext) runs (trains_with_model is False)", True))
        except Exception as error:  # noqa: BLE001
            results.append(_failure("fit(UQFitContext) runs (trains_with_model is False)", error))
            return None
    head.eval()
    try:  # the keys first: calibration needs them
        raw = _predict(head, list(sample_structures(seed).values())[:1], seed=seed)
        missing = [k for k in _OUTPUT_KEYS if k not in raw]
    except Exception as error:  # noqa: BLE001
        results.append(_failure("forward(batch, compute_forces=True) on one structure", error))
        return None
    if missing:
        results.append(check(f"outputs contain {', '.join(_OUTPUT_KEYS)} (missing: {missing})", False))
        return None
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            calibrate(head, valid, batch_size=4)
        results.append(check("calibrate(head, valid) runs", True))
    except Exception as error:  # noqa: BLE001
        results.append(_failure("calibrate(head, valid) runs", error))
        return None
    return head, potential


def _output_checks(head: UQHead, systems: Mapping[str, Atoms], seed: int, tol: float,
                   results: list[CheckResult]) -> bool:
    """Keys, shapes, finiteness, signs and the max of a batch; ``False`` if keys are missing."""
    mol, xtal = systems["molecule"], systems["crystal"]
    try:
        out = _predict(head, [mol, xtal], seed=seed)
    except Exception as error:  # noqa: BLE001
        results.append(_failure("forward(batch, compute_forces=True) on a batch of 2 structures", error))
        return False
    missing = [k for k in _OUTPUT_KEYS if k not in out]
    results.append(check(f"outputs contain {', '.join(_OUTPUT_KEYS)} (missing: {missing or 'none'})", not missing))
    if missing:
        return False
    n, b = len(mol) + len(xtal), 2
    expected = {K.ENERGY: (b,), K.FORCES: (n, 3), K.ENERGY_STD: (b,), K.FORCES_STD: (n,), K.FORCES_STD_MAX: (b,)}
    for key, shape in expected.items():
        results.append(check(f"{key} shape: expected {shape}, found {_shape(out.get(key))}", out[key].shape == shape))
    bad = [k for k in _OUTPUT_KEYS if not np.isfinite(out[k]).all()]
    results.append(check(f"outputs finite (non-finite: {bad or 'none'})", not bad))
    lowest = min((float(out[k].min()) for k in (*_STD_KEYS, K.FORCES_STD_MAX) if out[k].size), default=0.0)
    results.append(CheckResult("stds non-negative (error: magnitude of the most negative std)", max(0.0, -lowest), 0.0))
    if out[K.FORCES_STD].shape == (n,) and out[K.FORCES_STD_MAX].shape == (b,):
        per_structure = np.array([out[K.FORCES_STD][: len(mol)].max(), out[K.FORCES_STD][len(mol):].max()])
        results.append(CheckResult("forces_std_max is the per-structure max of forces_std",
                                   _rel(out[K.FORCES_STD_MAX], per_structure, 1e-12), tol))
    try:
        stress = _predict(head, [xtal], seed=seed, stress=True).get(K.STRESS)
        ok = stress is not None and stress.shape == (1, 3, 3) and bool(np.isfinite(stress).all())
        found = _shape(stress) + ("" if stress is None or np.isfinite(stress).all() else ", non-finite")
        results.append(check(f"stress on the periodic cell: expected finite (1, 3, 3), found {found}", ok))
    except Exception as error:  # noqa: BLE001
        results.append(_failure("stress on the periodic cell (compute_stress=True)", error))
    return True


def _symmetry_checks(head: UQHead, systems: Mapping[str, Atoms], seed: int, tol: float, stochastic: bool,
                     results: list[CheckResult]) -> None:
    rng = np.random.default_rng(seed)
    ref = {name: _predict(head, [a], seed=seed) for name, a in systems.items()}
    mean_keys = (K.ENERGY,)
    shift = rng.normal(0, 2.0, 3)
    for name, atoms in systems.items():
        moved = translated(atoms, shift)
        out = _predict(head, [moved], seed=seed)
        results.append(CheckResult(f"translation invariance of energy_std, forces_std ({name})",
                                   _compare(out, ref[name], _STD_KEYS), tol))
        results.append(CheckResult(f"translation invariance of mean energy, forces ({name})",
                                   _compare(out, ref[name], (K.ENERGY, K.FORCES)), tol))
    for name, atoms in systems.items():
        rot = random_rotation(rng)
        turned = atoms.copy()
        turned.positions = atoms.positions @ rot.T
        if atoms.pbc.any():
            turned.set_cell(atoms.cell[:] @ rot.T, scale_atoms=False)
        out = _predict(head, [turned], seed=seed)
        results.append(CheckResult(f"rotation invariance of energy_std, forces_std ({name})",
                                   _compare(out, ref[name], _STD_KEYS), tol))
        rotated_ref = {K.ENERGY: ref[name][K.ENERGY], K.FORCES: ref[name][K.FORCES] @ rot.T}
        results.append(CheckResult(f"rotation equivariance of mean energy, forces ({name})",
                                   _compare(out, rotated_ref, (K.ENERGY, K.FORCES)), tol))
    if stochastic:
        return
    mol, xtal = systems["molecule"], systems["crystal"]
    perm = rng.permutation(len(mol))
    out = _predict(head, [mol[perm]], seed=seed)
    permuted = {K.ENERGY_STD: ref["molecule"][K.ENERGY_STD], K.FORCES_STD: ref["molecule"][K.FORCES_STD][perm],
                K.ENERGY: ref["molecule"][K.ENERGY], K.FORCES: ref["molecule"][K.FORCES][perm]}
    results.append(CheckResult("permutation: energy_std invariant, forces_std permuted (molecule)",
                               _compare(out, permuted, _STD_KEYS), tol))
    results.append(CheckResult("permutation: mean energy invariant, forces permuted (molecule)",
                               _compare(out, permuted, mean_keys + (K.FORCES,)), tol))
    together = _predict(head, [mol, xtal, mol], seed=seed)
    single: dict[str, np.ndarray] = {}
    for key in _OUTPUT_KEYS:
        parts = [ref["molecule"][key], ref["crystal"][key], ref["molecule"][key]]
        single[key] = np.concatenate(parts)
    results.append(CheckResult(f"batch vs single ({', '.join(_OUTPUT_KEYS)})",
                               _compare(together, single, _OUTPUT_KEYS), tol))


def _round_trip(factory: Callable[..., Any], options: Mapping[str, Any], head: UQHead, dtype: torch.dtype,
                seed: int, systems: Mapping[str, Atoms], results: list[CheckResult]) -> None:
    """A fresh head from the same factory and options, loaded like a model file, predicts the same."""
    name = "model-file round trip (state_dict via torch.save/load(weights_only), calibration via JSON)"
    try:
        extra = head.uq_config()
        record = json.loads(json.dumps({"options": {**options, **extra}, "calibration": head.calibration.to_dict()}))
    except Exception as error:  # noqa: BLE001
        results.append(_failure("uq_config() and calibration.to_dict() are JSON", error))
        return
    results.append(check("uq_config() and calibration.to_dict() are JSON", True))
    try:
        buffer = io.BytesIO()
        torch.save({k: v.detach().cpu() for k, v in head.state_dict().items()}, buffer)
        buffer.seek(0)
        state = torch.load(buffer, map_location="cpu", weights_only=True)
        other = make_test_potential(RadialTestBackbone, cutoff=CUTOFF, dtype=dtype, seed=seed + 101)
        fresh = factory(other, **record["options"])
        fresh.load_state_dict(state)
        fresh.calibration.load(record["calibration"])
        fresh.fields = head.fields
        fresh.eval()
        structures = [systems["molecule"], systems["crystal"]]
        want = _predict(head, structures, seed=seed)
        got = _predict(fresh, structures, seed=seed)
        results.append(CheckResult(f"{name}: identical outputs", _compare(got, want, _OUTPUT_KEYS), 1e-12))
    except Exception as error:  # noqa: BLE001
        results.append(_failure(name, error))


def _guarded(name: str, results: list[CheckResult], run: Callable[[], None]) -> None:
    try:
        run()
    except Exception as error:  # noqa: BLE001 - an unexpected error is a failed check, not a crash
        results.append(_failure(name, error))


def check_uq_head(
    factory_or_spec: Callable[..., Any] | UQHeadSpec,
    *,
    options: Mapping[str, Any] | None = None,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
) -> list[CheckResult]:
    """Run every check on ``factory(potential, **options)`` wrapping a small random potential;
    raise :class:`~atomforge.ConformanceError` listing the failures, else return the results.
    Torch's global random state is restored afterwards."""
    factory = factory_or_spec.factory if isinstance(factory_or_spec, UQHeadSpec) else factory_or_spec
    options = dict(options or {})
    tol = 1e-8 if dtype == torch.float64 else 1e-4
    results: list[CheckResult] = []
    with torch.random.fork_rng(devices=[]):
        built = _build(factory, options, dtype, seed, results)
        if built is None:
            return finish(results)
        head, _ = built
        systems = sample_structures(seed)
        if not _output_checks(head, systems, seed, tol, results):
            return finish(results)
        mol = systems["molecule"]
        first, again = _predict(head, [mol], seed=seed), _predict(head, [mol], seed=seed)
        results.append(CheckResult("reproducible for a fixed torch seed (same outputs twice)",
                                   _compare(first, again, _OUTPUT_KEYS), 0.0))
        stochastic = _compare(_predict(head, [mol], seed=seed + 1), first, _OUTPUT_KEYS) > 0.0
        exact = head if dtype == torch.float64 else copy.deepcopy(head).double()  # the test backbone is conservative
        for name, atoms in systems.items():
            _guarded(f"finite-difference mean forces ({name})", results, lambda a=atoms, n=name: results.append(
                CheckResult(f"finite-difference mean forces ({n}): forces = -d(mean energy)/dr",
                            _fd_error(exact, a, seed), 1e-6)))
        _guarded("symmetry and batch checks", results,
                 lambda: _symmetry_checks(head, systems, seed, tol, stochastic, results))
        _round_trip(factory, options, head, dtype, seed, systems, results)
    return finish(results)
