"""Physics as losses and metrics: the transformer backbone, rotation augmentation, the curl
penalty and the physics metrics, checked against analytic force fields."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from ase import Atoms, units
from ase.calculators.lj import LennardJones
from ase.io import read

from atomforge import Backbone, ConformanceError, attach_labels, config_from_dict, load_model, read_training_state
from atomforge import keys as K
from atomforge.config import EvaluationConfig
from atomforge.data.graph import atoms_to_graph, collate
from atomforge.analysis.physics import (curl_estimate, curl_metrics, model_curl, nve_stability, physics_metrics,
                               random_rotations, rotation_error)
from atomforge.model.potential import Potential
from atomforge.testing import check_backbone, make_test_potential, sample_structures
from atomforge.workflows.train import train

from conftest import tiny_config

SMALL = {"hidden_channels": 16, "num_layers": 2, "num_heads": 2, "num_rbf": 8}


def _transformer(forces: str):
    """The registered factory, with the (zero-initialised) direct-force output layer randomised
    so that the kit checks a non-trivial force head."""
    from atomforge.plugins.transformer import GraphTransformer

    def factory(**options):
        backbone = GraphTransformer(forces=forces, **options)
        if backbone.force_head is not None:
            torch.nn.init.normal_(backbone.force_head.out.weight, std=0.5)
        return backbone

    return factory


# -- the transformer backbone ---------------------------------------------------------------------
@pytest.mark.parametrize("forces", ["conservative", "direct"])
def test_transformer_passes_the_kit_except_rotation(forces) -> None:
    results = check_backbone(_transformer(forces), options=SMALL, equivariant=False)
    names = {r.name.split(" (")[0] for r in results}
    assert {"translation", "permutation", "batch vs single", "smooth cutoff"} <= names
    assert ("finite-difference forces" in names) == (forces == "conservative")
    with pytest.raises(ConformanceError, match="rotation"):  # it is not equivariant by construction
        check_backbone(_transformer(forces), options=SMALL, equivariant=True)


def test_transformer_spec_and_options(registry) -> None:
    spec = registry.get("backbones", "transformer")
    assert spec.equivariant is False
    assert spec.factory(num_elements=2, cutoff=4.0, forces="direct").direct_forces is True
    assert spec.factory(num_elements=2, cutoff=4.0).direct_forces is False
    from atomforge import ConfigError

    with pytest.raises(ConfigError, match="forces 'curl'"):
        spec.factory(num_elements=2, cutoff=4.0, forces="curl")
    with pytest.raises(ConfigError, match="divisible"):
        spec.factory(num_elements=2, cutoff=4.0, hidden_channels=10, num_heads=4)


def test_direct_transformer_trains_on_a_tiny_set(registry, cu_files, tmp_path) -> None:
    raw = tiny_config(cu_files, tmp_path / "run", max_epochs=8, ema_decay=None, scheduler="none")
    raw["model"] = {"backbone": "transformer", "cutoff": 4.0, "forces": "direct", **SMALL}
    raw["loss"] += [{"name": "rotation_augmentation"}, {"name": "curl_penalty", "weight": 1.0}]
    outcome = train(config_from_dict(raw), registry, verbose=False)
    history = read_training_state(outcome.run_dir)["history"]
    first, last = history[0]["valid_metrics"]["forces_mae"], history[-1]["valid_metrics"]["forces_mae"]
    assert last < 0.7 * first, (first, last)
    assert load_model(outcome.model_path).backbone.direct_forces


# -- rotation augmentation -------------------------------------------------------------------------
def _lj_labelled(atoms: Atoms) -> Atoms:
    work = atoms.copy()
    work.calc = LennardJones(sigma=1.1, epsilon=0.3, rc=3.5, smooth=True)
    stress = work.get_stress(voigt=False) if work.pbc.all() else None
    return attach_labels(atoms, energy=work.get_potential_energy(), forces=work.get_forces(), stress=stress)


def _atoms_of(batch: dict[str, torch.Tensor], b: int, like: Atoms) -> Atoms:
    mask = batch[K.BATCH] == b
    return Atoms(like.numbers, positions=batch[K.POSITIONS][mask].double().numpy(),
                 cell=batch[K.CELL][b].double().numpy(), pbc=like.pbc)


@pytest.mark.parametrize("reflections", [False, True])
def test_rotation_augmentation_maps_an_equivariant_field_onto_itself(registry, reflections) -> None:
    """Labels rotated by the augmentation equal the analytic (Lennard-Jones) labels of the
    rotated structure: forces, stress and energy, periodic and open."""
    term = registry.get("losses", "rotation_augmentation").factory(reflections=reflections)
    for kind in ("molecule", "crystal"):  # a batch of two of each (stress is batched only if all have it)
        structures = [_lj_labelled(sample_structures(seed)[kind]) for seed in (1, 2)]
        batch = collate([atoms_to_graph(a, 3.5, dtype=torch.float64, labels=_labels(a)) for a in structures])
        turned = term.augment(batch, torch.Generator().manual_seed(4))
        assert not torch.allclose(turned[K.POSITIONS], batch[K.POSITIONS])
        assert (K.STRESS in turned) == (kind == "crystal")
        for b, atoms in enumerate(structures):
            expected = _lj_labelled(_atoms_of(turned, b, atoms))
            mask = (turned[K.BATCH] == b).numpy()
            np.testing.assert_allclose(turned[K.FORCES][mask].numpy(), expected.get_forces(), atol=1e-10)
            np.testing.assert_allclose(float(turned[K.ENERGY][b]), expected.get_potential_energy(), atol=1e-10)
            if kind == "crystal":
                np.testing.assert_allclose(turned[K.STRESS][b].numpy(), expected.get_stress(voigt=False),
                                           atol=1e-10)


def _labels(atoms: Atoms):
    from atomforge import get_labels

    return get_labels(atoms)


def test_random_rotations_are_orthogonal_with_the_requested_handedness() -> None:
    g = torch.Generator().manual_seed(0)
    proper = random_rotations(500, g)
    mixed = random_rotations(500, g, reflections=True)
    eye = torch.eye(3, dtype=torch.float64)
    assert torch.allclose(proper @ proper.transpose(1, 2), eye.expand(500, 3, 3), atol=1e-12)
    assert torch.allclose(torch.linalg.det(proper), torch.ones(500, dtype=torch.float64))
    share = float((torch.linalg.det(mixed) < 0).double().mean())
    assert 0.4 < share < 0.6
    assert abs(float(proper[:, 0, 0].mean())) < 0.1  # Haar: no preferred axis


# -- the curl penalty ------------------------------------------------------------------------------
def test_curl_of_a_rotational_field_and_of_a_gradient_field() -> None:
    positions = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    swirl = torch.stack([-positions[:, 1], positions[:, 0], torch.zeros(7, dtype=torch.float64)], 1)
    estimate = curl_estimate(swirl, positions, probes=3, generator=torch.Generator().manual_seed(0))
    # J per atom = [[0,-1,0],[1,0,0],[0,0,0]] is antisymmetric: ‖A‖_F² = 2 per atom, exactly for ±1 probes
    assert float(estimate.antisymmetric) == pytest.approx(2.0 * 7, rel=1e-12)
    energy = (positions ** 4).sum() + (positions[:, 0] * positions[:, 2]).sum()
    gradient = -torch.autograd.grad(energy, positions, create_graph=True)[0]
    estimate = curl_estimate(gradient, positions, probes=3, generator=torch.Generator().manual_seed(0))
    assert float(estimate.antisymmetric) < 1e-20 * float(estimate.jacobian) + 1e-24
    assert float(estimate.jacobian) > 1.0


def test_curl_of_models_conservative_zero_direct_positive() -> None:
    batch = collate([atoms_to_graph(a, 4.0, dtype=torch.float64) for a in sample_structures(0).values()])
    curls = {}
    for forces in ("conservative", "direct"):
        potential = make_test_potential(_transformer(forces), options=SMALL, dtype=torch.float64)
        estimate = model_curl(potential, batch, probes=4, generator=torch.Generator().manual_seed(1))
        curls[forces] = float(estimate.antisymmetric) / float(estimate.jacobian)
    assert curls["conservative"] < 1e-24
    assert curls["direct"] > 1e-3


def test_curl_penalty_is_differentiable_for_a_direct_model(registry) -> None:
    potential = make_test_potential(_transformer("direct"), options=SMALL, dtype=torch.float64).train()
    batch = collate([atoms_to_graph(a, 4.0, dtype=torch.float64) for a in sample_structures(0).values()])
    term = registry.get("losses", "curl_penalty").factory(probes=2)
    outputs = potential(batch, compute_forces=True)
    assert batch[K.POSITIONS].grad_fn is None and not batch[K.POSITIONS].requires_grad
    value = term(batch, outputs, potential)
    value.backward()
    head = potential.backbone.force_head.out.weight.grad
    assert float(value.detach()) > 0 and head is not None and float(head.abs().sum()) > 0


# -- metrics against analytic potentials -----------------------------------------------------------
class _FieldBackbone(Backbone):
    """An analytic direct-force 'model': zero energy, forces ``kind``: a constant vector field
    (translation invariant, not rotation equivariant, curl-free) or ``-k r`` (pulls to the origin)."""

    def __init__(self, *, num_elements: int, cutoff: float, kind: str, strength: float) -> None:
        super().__init__(num_elements=num_elements, cutoff=cutoff)
        self.direct_forces = True
        self.kind, self.strength = kind, strength
        self.dummy = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        positions = batch[K.POSITIONS]
        if self.kind == "constant":
            forces = torch.zeros_like(positions) + torch.tensor([self.strength, 0.0, 0.0], dtype=positions.dtype)
        else:
            forces = -self.strength * positions
        return {K.NODE_ENERGY: positions[:, 0] * 0 + self.dummy, K.DIRECT_FORCES: forces}


def _field_model(kind: str, strength: float, elements=(29,)) -> Potential:
    backbone = _FieldBackbone(num_elements=len(elements), cutoff=3.0, kind=kind, strength=strength)
    return Potential(backbone, elements=elements, atomic_energies=[0.0] * len(elements)).double().eval()


def _cu_cluster() -> Atoms:
    grid = (np.array([[x, y, z] for x in range(2) for y in range(2) for z in range(2)], float) - 0.5) * 2.5
    return Atoms("Cu8", positions=grid + np.random.default_rng(0).normal(0, 0.05, grid.shape))


def test_rotation_error_of_a_constant_field_matches_the_hand_computed_value() -> None:
    model, atoms = _field_model("constant", 0.7), _cu_cluster()
    metrics = rotation_error(model, [atoms], rotations=5, seed=3)
    generator = torch.Generator().manual_seed(3)  # the same draws, by hand: |f e_x - R f e_x|²
    diffs = [2 * 0.7 ** 2 * (1 - float(random_rotations(1, generator)[0, 0, 0])) for _ in range(5)]
    assert metrics["rotation_forces_rmse"] == pytest.approx(1000 * math.sqrt(np.mean(diffs) / 3), rel=1e-9)
    assert metrics["rotation_forces_relative"] == pytest.approx(math.sqrt(np.mean(diffs) / 0.7 ** 2), rel=1e-9)
    assert metrics["rotation_energy_mae"] == pytest.approx(0.0, abs=1e-12)
    assert curl_metrics(model, [atoms], probes=2)["curl_rms"] == pytest.approx(0.0, abs=1e-12)


def test_nve_drift_of_a_constant_force_matches_the_hand_computed_value() -> None:
    """Zero energy and a constant force f on equal masses with zero total momentum: the kinetic
    energy grows as N f² t² / 2m, so the fitted drift over [0, T] is (f²/2m) T per atom."""
    f, steps, dt = 0.02, 200, 1.0
    settings = EvaluationConfig(physics=True, nve_steps=steps, timestep_fs=dt, temperature=50.0, seed=1)
    from atomforge.model.calculator import AtomforgeCalculator

    md = nve_stability(_cu_cluster(), AtomforgeCalculator(_field_model("constant", f)), settings)
    mass = _cu_cluster().get_masses()[0]
    t = np.arange(steps + 1) * dt * units.fs
    per_atom = 1000 * f ** 2 * t ** 2 / (2 * mass)  # meV/atom, kinetic-energy gain
    expected_drift = np.polyfit(t / (1000 * units.fs), per_atom, 1)[0]
    assert md.failure == "" and md.stable_steps == steps
    assert md.energy_drift == pytest.approx(expected_drift, rel=1e-6)
    assert md.max_energy_deviation == pytest.approx(per_atom[-1], rel=1e-6)


def test_md_stability_catches_collapsing_atoms() -> None:
    """-k r with zero energy pulls every atom through the origin: overlap and energy blow-up."""
    settings = EvaluationConfig(physics=True, nve_steps=400, timestep_fs=2.0, temperature=10.0)
    from atomforge.model.calculator import AtomforgeCalculator

    md = nve_stability(_cu_cluster(), AtomforgeCalculator(_field_model("pull", 0.5)), settings)
    assert 0 < md.stable_steps < 400
    assert md.failure


def test_physics_metrics_of_a_conservative_model(registry) -> None:
    potential = make_test_potential(_transformer("conservative"), options=SMALL, dtype=torch.float64)
    structures = list(sample_structures(0).values())
    settings = EvaluationConfig(physics=True, rotations=2, curl_probes=2, nve_steps=40, timestep_fs=0.25,
                                temperature=100.0, max_energy_deviation=10.0, min_distance=0.05)
    metrics = physics_metrics(potential, structures, settings)
    assert metrics["physics_curl_relative"] < 1e-10
    assert metrics["physics_rotation_forces_relative"] > 1e-6  # not equivariant by construction
    assert abs(metrics["physics_nve_max_energy_deviation"]) < 50.0  # meV/atom over 10 fs
    assert metrics["physics_md_stable_steps"] == 40


# -- training integration ----------------------------------------------------------------------------
def test_augmentation_runs_only_on_training_batches(registry) -> None:
    """The engine calls CompositeLoss.augment before each training step, never in validation."""
    from atomforge import CompositeLoss, GraphDataset, TorchBackend, Trainer, TrainSettings, WeightedTerm, make_optimizer

    make = registry.get("losses", "rotation_augmentation").factory
    loss = CompositeLoss([WeightedTerm("forces", 1.0, registry.get("losses", "forces").factory()),
                          WeightedTerm("rotation_augmentation", 1.0, make())])
    calls = []
    original = loss.augment
    loss.augment = lambda batch, generator: calls.append(len(batch[K.N_ATOMS])) or original(batch, generator)
    data = [_lj_labelled(a) for seed in range(3) for a in sample_structures(seed).values()]
    train_set = GraphDataset(data[:4], 4.0, dtype=torch.float64, require=("forces",))
    valid_set = GraphDataset(data[4:], 4.0, dtype=torch.float64)
    model = make_test_potential(_transformer("direct"), options=SMALL, dtype=torch.float64).train()
    settings = TrainSettings(max_epochs=1, batch_size=2, ema_decay=None)
    trainer = Trainer(model=model, loss=loss, optimizer=make_optimizer(model, lr=1e-3), settings=settings,
                      backend=TorchBackend.from_settings(settings))
    trainer.fit(train_set, valid_set)
    assert calls == [2, 2]


def test_resume_is_exact_with_augmentation_and_curl(registry, cu_files, tmp_path) -> None:
    def run(output, epochs, resume=False):
        raw = tiny_config(cu_files, output, max_epochs=epochs)
        raw["model"] = {"backbone": "transformer", "cutoff": 4.0, "forces": "direct", **SMALL}
        raw["loss"] += [{"name": "rotation_augmentation", "reflections": True},
                        {"name": "curl_penalty", "weight": 0.5}]
        return train(config_from_dict(raw), registry, resume=resume, verbose=False)

    reference = run(tmp_path / "straight", 3)
    run(tmp_path / "split", 1)
    resumed = run(tmp_path / "split", 3, resume=True)
    a = torch.load(reference.model_path, weights_only=True)["state_dict"]
    b = torch.load(resumed.model_path, weights_only=True)["state_dict"]
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-7, msg=name)
