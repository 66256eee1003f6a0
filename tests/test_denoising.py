"""The ``denoising`` loss term: which structures it perturbs and how, the label masks it clears,
the value it computes (and its rotation invariance), its options, and that a PaiNN model learns
it from unlabelled structures."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk
from ase.cluster import Icosahedron

from atomforge import (
    DEFAULT_PLUGINS, CompositeLoss, ConfigError, GraphDataset, WeightedTerm, build_potential, collate, rotate_batch,
    random_rotations, split_batch,
)
from atomforge import keys as K
from atomforge.plugins.denoising import DISPLACEMENT, MASK
from conftest import emt_label

SIGMA, STIFFNESS = 0.05, 20.0
SMALL_PAINN = {"backbone": "painn", "provider": "atomforge", "cutoff": 4.0, "dtype": "float32",
               "options": {"hidden_channels": 16, "num_layers": 2, "num_rbf": 8},
               "elements": [29], "atomic_energies": [0.0], "scale": 1.0, "shift": 0.0}


def _cu_cell(seed: int, repeat: tuple[int, int, int] = (1, 1, 2)) -> Atoms:
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(repeat)
    atoms.positions += np.random.default_rng(seed).normal(0, 0.05, atoms.positions.shape)
    return atoms


def _cluster(seed: int) -> Atoms:
    atoms = Icosahedron("Cu", 2)  # 13 atoms, open boundaries
    atoms.positions += np.random.default_rng(seed).normal(0, 0.03, atoms.positions.shape)
    return atoms


def _batch(registry, structures: list[Atoms], dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    return collate(GraphDataset(structures, 4.0, dtype=dtype, fields=registry.fields).graphs, registry.fields)


def _mixed(registry) -> dict[str, torch.Tensor]:
    """Structures 0 and 2 labelled with EMT (energy, forces, stress), 1 and 3 unlabelled."""
    return _batch(registry, [emt_label(_cu_cell(0)), _cu_cell(1), emt_label(_cu_cell(2)), _cluster(3)])


def _term(registry, **options):
    return registry.get("losses", "denoising").factory(**options)


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_registered_as_a_builtin_with_its_fields(registry) -> None:
    assert "atomforge.plugins.denoising" in DEFAULT_PLUGINS
    assert registry.fields[DISPLACEMENT].per.value == "atom" and registry.fields[DISPLACEMENT].shape == (3,)
    assert registry.fields[MASK].per.value == "structure" and registry.fields[MASK].dtype == "bool"


def test_collate_masks_labels_carried_by_some_structures(registry) -> None:
    batch = _mixed(registry)
    for label in (K.ENERGY, K.FORCES, K.STRESS):
        assert batch[f"{label}_mask"].tolist() == [True, False, True, False], label


def test_augment_is_deterministic_and_perturbs_only_unlabelled_structures(registry) -> None:
    batch = _mixed(registry)
    before = {key: value.clone() for key, value in batch.items()}
    term = _term(registry)
    first, again = term.augment(batch, _generator(5)), term.augment(batch, _generator(5))
    other = term.augment(batch, _generator(6))
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert not torch.equal(first[K.POSITIONS], other[K.POSITIONS])
    assert first[MASK].tolist() == [False, True, False, True]
    moved = (first[K.POSITIONS] - batch[K.POSITIONS]).norm(dim=-1) > 0
    assert torch.equal(moved, first[MASK][batch[K.BATCH]])
    assert torch.allclose(first[K.POSITIONS] - batch[K.POSITIONS], first[DISPLACEMENT], atol=1e-12)
    for label in (K.ENERGY, K.FORCES, K.STRESS):  # the labelled structures keep their labels
        assert torch.equal(first[f"{label}_mask"], before[f"{label}_mask"]), label
        assert torch.equal(first[label], before[label]), label
    assert all(torch.equal(batch[key], before[key]) for key in before)  # nothing changed in place
    assert set(batch) == set(before)


def test_noise_has_std_sigma_and_no_net_translation(registry) -> None:
    batch = _batch(registry, [_cu_cell(seed, (2, 4, 4)) for seed in range(6)])  # 6 x 128 atoms, unlabelled
    out = _term(registry, sigma=SIGMA).augment(batch, _generator(1))
    noise = out[DISPLACEMENT]
    per_structure = torch.zeros(6, 3, dtype=noise.dtype).index_add_(0, batch[K.BATCH], noise)
    assert torch.allclose(per_structure, torch.zeros_like(per_structure), atol=1e-12)
    expected = SIGMA * (1 - 1 / 128) ** 0.5  # one atom's worth of variance per structure is the removed mean
    assert float(noise.std()) == pytest.approx(expected, rel=0.05)  # 2304 components: 1.5% standard error


def test_every_structure_with_labelled_fraction_one_and_its_labels_masked(registry) -> None:
    batch = _mixed(registry)
    out = _term(registry, labelled_fraction=1.0).augment(batch, _generator())
    assert out[MASK].all()
    for label in (K.ENERGY, K.FORCES, K.STRESS):
        assert not out[f"{label}_mask"].any(), label
    wrong = {K.ENERGY: out[K.ENERGY] + 5.0, K.FORCES: out[K.FORCES] + 1.0}
    assert float(registry.get("losses", "energy").factory()(out, wrong, None)) == 0.0
    assert float(registry.get("losses", "forces").factory()(out, wrong, None)) == 0.0
    # on the unaugmented batch the same outputs are scored on the labelled structures
    assert float(registry.get("losses", "forces").factory()(batch, wrong, None)) == pytest.approx(1.0)


def test_labelled_fraction_creates_masks_for_fully_labelled_batches(registry) -> None:
    batch = _batch(registry, [emt_label(_cu_cell(seed)) for seed in range(16)])
    assert "energy_mask" not in batch  # every structure carries every label
    out = _term(registry, labelled_fraction=0.5).augment(batch, _generator(2))
    chosen = out[MASK]
    assert 0 < int(chosen.sum()) < 16
    for label in (K.ENERGY, K.FORCES, K.STRESS):
        assert torch.equal(out[f"{label}_mask"], ~chosen), label
    unchanged = ~chosen[batch[K.BATCH]]
    assert torch.equal(out[K.POSITIONS][unchanged], batch[K.POSITIONS][unchanged])


def test_augmented_batches_split_by_the_registered_fields(registry) -> None:
    out = _term(registry).augment(_mixed(registry), _generator())
    graphs = split_batch(out, registry.fields)
    assert [bool(g[MASK]) for g in graphs] == [False, True, False, True]
    assert torch.equal(collate(graphs, registry.fields)[DISPLACEMENT], out[DISPLACEMENT])


def test_value_is_zero_at_the_restoring_force_and_the_weighted_mean_square_otherwise(registry) -> None:
    batch = _mixed(registry)
    batch[K.WEIGHT] = torch.tensor([1.0, 2.0, 1.0, 3.0], dtype=torch.float64)
    term = _term(registry, sigma=SIGMA, stiffness=STIFFNESS)
    out = term.augment(batch, _generator())
    exact = -STIFFNESS * out[DISPLACEMENT]
    assert float(term(out, {K.FORCES: exact}, None)) == pytest.approx(0.0, abs=1e-20)
    off = exact.clone()
    off[:, 0] += 0.3  # every component x off by 0.3: mean square per component 0.09 / 3, whatever the weights
    assert float(term(out, {K.FORCES: off}, None)) == pytest.approx(0.03, rel=1e-12)
    off = exact.clone()
    off[out[K.BATCH] == 1] += 1.0  # structure 1 (8 atoms, weight 2) off by 1, structure 3 (13 atoms, weight 3) exact
    assert float(term(out, {K.FORCES: off}, None)) == pytest.approx(2 * 8 / (2 * 8 + 3 * 13), rel=1e-12)
    labelled_only = exact.clone()
    labelled_only[out[K.BATCH] % 2 == 0] = 99.0  # unperturbed atoms do not count
    assert float(term(out, {K.FORCES: labelled_only}, None)) == pytest.approx(0.0, abs=1e-20)


def test_value_is_zero_with_a_graph_when_nothing_was_perturbed(registry) -> None:
    batch = _batch(registry, [emt_label(_cu_cell(0))])
    out = _term(registry).augment(batch, _generator())
    forces = torch.ones_like(batch[K.POSITIONS], requires_grad=True)
    value = _term(registry)(out, {K.FORCES: forces}, None)
    assert float(value.detach()) == 0.0
    value.backward()  # the lone term of a loss must still back-propagate
    assert torch.equal(forces.grad, torch.zeros_like(forces))


def test_value_is_invariant_under_rotating_the_batch_and_its_noise(registry) -> None:
    term = _term(registry)
    out = term.augment(_mixed(registry), _generator(3))
    forces = torch.randn(out[K.POSITIONS].shape, generator=_generator(4), dtype=torch.float64)
    rotations = random_rotations(4, _generator(7))
    turned = rotate_batch(out, rotations)
    per_atom = rotations[out[K.BATCH]]
    turned[DISPLACEMENT] = torch.einsum("nij,nj->ni", per_atom, out[DISPLACEMENT])
    turned_forces = torch.einsum("nij,nj->ni", per_atom, forces)
    want = float(term(out, {K.FORCES: forces}, None))
    assert want > 0.1
    assert float(term(turned, {K.FORCES: turned_forces}, None)) == pytest.approx(want, rel=1e-10)


def test_unaugmented_batches_are_scored_on_fixed_noise(registry) -> None:
    """Validation batches are not augmented: the term perturbs them itself, the same way each time."""
    torch.manual_seed(0)
    model = build_potential({**SMALL_PAINN, "dtype": "float64"}, registry).eval()
    batch = _mixed(registry)
    term = _term(registry)
    outputs = {K.ENERGY: torch.zeros(4, dtype=torch.float64)}
    first, second = float(term(batch, outputs, model)), float(term(batch, outputs, model))
    perturbed = term.augment(batch, _generator(0))
    manual = float(term(perturbed, model(perturbed, compute_forces=True), model))
    assert first == second == pytest.approx(manual, rel=1e-12)
    assert first > 0.1  # an untrained model does not restore the noise
    assert float(term(batch, outputs, None)) == 0.0  # no model to evaluate: nothing to measure


@pytest.mark.parametrize("options, message", [
    ({"sigma": 0.0}, r"sigma must be a number > 0.*got 0\.0"),
    ({"sigma": -0.1}, r"sigma must be a number > 0.*got -0\.1"),
    ({"sigma": "big"}, r"sigma must be a number > 0.*got 'big'"),
    ({"sigma": float("nan")}, r"sigma must be a number > 0.*got nan"),
    ({"stiffness": 0}, r"stiffness must be a number > 0 \(eV/Å²\); got 0"),
    ({"stiffness": True}, r"stiffness must be a number > 0.*got True"),
    ({"labelled_fraction": 1.5}, r"labelled_fraction must be a number in \[0, 1\]; got 1\.5"),
    ({"labelled_fraction": -0.1}, r"labelled_fraction must be a number in \[0, 1\]; got -0\.1"),
])
def test_bad_options_are_config_errors(registry, options, message) -> None:
    with pytest.raises(ConfigError, match=message):
        _term(registry, **options)


def test_only_a_loss_with_an_unlabelled_term_accepts_unlabelled_structures(registry) -> None:
    def loss(*names: str) -> CompositeLoss:
        return CompositeLoss([WeightedTerm(n, 1.0, registry.get("losses", n).factory()) for n in names])

    assert loss("energy", "forces").required_of_every_structure == ("energy", "forces")
    assert loss("energy", "forces", "denoising").required_of_every_structure == ()
    assert loss("energy", "forces", "denoising").requires == ("energy", "forces")
    assert loss("denoising").outputs == ("forces",)


def test_painn_learns_to_denoise_unlabelled_structures(registry) -> None:
    structures = [_cluster(seed) for seed in range(4)] + [_cu_cell(seed) for seed in (10, 11)]  # no labels
    batch = _batch(registry, structures, dtype=torch.float32)
    torch.manual_seed(0)
    model = build_potential(SMALL_PAINN, registry)
    term = _term(registry)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)

    def held_out() -> float:
        model.eval()
        value = float(term(batch, {K.ENERGY: torch.zeros(())}, model))  # fixed noise: comparable
        model.train()
        return value

    before = held_out()
    generator = _generator(1)
    for _ in range(20):
        augmented = term.augment(batch, generator)
        loss = term(augmented, model(augmented, compute_forces=True), model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = held_out()
    assert before > 0.5  # ≈ (kσ)² = 1 for a model that predicts ≈ 0
    assert after < 0.7 * before, (before, after)
