"""The calculator's per-call shortcuts change no number: its reused batches equal freshly built
ones, its check of what changed is ASE's, and its results equal the model's on a fresh batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, molecule
from ase.calculators.calculator import compare_atoms

from atomforge import (
    DEFAULT_FIELDS,
    AtomforgeCalculator,
    FieldSpec,
    ModelOutputError,
    atoms_to_graph,
    collate,
)
from atomforge import keys as K
from atomforge.data.graph import SMALL_OPEN_STRUCTURE, StructureBatcher, _vesin, neighbor_list
from atomforge.model.calculator import _all_finite, _system_changes
from atomforge.model.modelfile import build_potential

CUTOFF = 4.0


def _painn(registry, dtype: str = "float64", **options):
    torch.manual_seed(0)
    config = {"backbone": "painn", "cutoff": CUTOFF, "elements": [1, 6, 8, 29], "dtype": dtype,
              "atomic_energies": [-1.0, -5.0, -4.0, -3.0], "scale": 1.3, "shift": 0.1,
              "options": {"hidden_channels": 8, "num_layers": 2, **options}}
    potential = build_potential(config, registry)
    with torch.no_grad():  # weights far from zero, so that every term of the energy matters
        for parameter in potential.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return potential


def _assert_same_batch(ours: dict[str, torch.Tensor], fresh: dict[str, torch.Tensor]) -> None:
    assert list(ours) == list(fresh)  # same keys in the same order
    for key in fresh:
        assert ours[key].dtype == fresh[key].dtype and torch.equal(ours[key], fresh[key]), key


def _steps(atoms: Atoms) -> list[Atoms]:
    """One structure through what a calculator sees: motion, then every kind of change."""
    out, rng = [], np.random.default_rng(0)
    work = atoms.copy()
    for _ in range(3):
        work.positions += rng.normal(0, 0.01, work.positions.shape)
        out.append(work.copy())
    changes = [lambda a: a.info.update(charge=1.0), lambda a: a.info.update(charge=1.0, fidelity=0),
               lambda a: a.info.update(spin=np.float64(2.0)), lambda a: a.set_atomic_numbers([8] + list(a.numbers[1:])),
               lambda a: a.set_pbc(True), lambda a: a.set_cell(a.cell[:] * 1.01), lambda a: a.info.update(weight=0.5)]
    for change in changes:
        change(work)
        out.append(work.copy())
    return out


@pytest.mark.parametrize("start", [molecule("CH3CH2OH"), bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 1, 1))])
def test_reused_batches_equal_fresh_ones(start: Atoms) -> None:
    if not start.cell.rank:
        start.center(vacuum=3.0)  # a cell for the step that switches periodicity on
    batcher = StructureBatcher(CUTOFF, dtype=torch.float64)
    for atoms in _steps(start):
        _assert_same_batch(batcher(atoms), collate([atoms_to_graph(atoms, CUTOFF, dtype=torch.float64)]))


def test_a_field_read_as_an_array_is_read_every_call() -> None:
    fields = DEFAULT_FIELDS.extended([FieldSpec("tag", "atom", read=lambda atoms: atoms.get_tags())])
    batcher, atoms = StructureBatcher(CUTOFF, dtype=torch.float32, fields=fields), molecule("H2O")
    for tags in ([0, 0, 0], [1, 2, 3], [1, 2, 3]):
        atoms.set_tags(tags)
        batch = batcher(atoms)
        _assert_same_batch(batch, collate([atoms_to_graph(atoms, CUTOFF, fields=fields)], fields))
        assert batch["tag"].tolist() == tags


def _variants(atoms: Atoms) -> list[Atoms]:
    out = [atoms.copy() for _ in range(10)]
    out[1].positions[0, 0] += 1e-16  # below ASE's tolerance (1e-15 Å): no change
    out[2].positions[0, 0] += 1e-14
    out[3].positions[1, 2] = np.nan
    out[4].positions[1, 2] = np.inf
    out[5].numbers[0] = 8
    out[6].set_initial_charges(np.arange(len(atoms)))
    out[7].cell[0, 0] += 1e-12
    out[8].pbc = [True, False, False]
    out[9].set_momenta(np.ones((len(atoms), 3)))  # not a system change
    return out


def test_the_check_of_what_changed_is_ases() -> None:
    atoms = molecule("CH3CH2OH")
    atoms.center(vacuum=2.0)
    with_inf = atoms.copy()
    with_inf.positions[1, 2] = np.inf
    for before in [None, *_variants(atoms), with_inf]:
        for after in _variants(atoms):
            for excluded in (set(), {"positions", "initial_charges"}):
                ase = compare_atoms(before, after, 1e-15, excluded)
                ours = _system_changes(before, after, 1e-15, excluded)
                assert sorted(ours) == sorted(ase), (ours, ase)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_calculator_results_equal_the_model_on_a_fresh_batch(registry, dtype: str) -> None:
    """Bit for bit: over MD-like steps, a change of cell, periodicity and metadata."""
    potential = _painn(registry, dtype)
    calculator = AtomforgeCalculator(potential, fields=registry.fields)
    start = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 1, 1))
    start.numbers[:3] = [1, 6, 8]
    for atoms in _steps(start):
        batch = collate([atoms_to_graph(atoms, CUTOFF, dtype=getattr(torch, dtype), fields=registry.fields)],
                        registry.fields)
        out = {key: value.detach() for key, value in
               calculator.model(batch, compute_forces=True, compute_stress=bool(atoms.pbc.all())).items()}
        atoms.calc = calculator
        assert atoms.get_potential_energy() == float(out[K.ENERGY][0])
        assert np.array_equal(atoms.get_forces(), out[K.FORCES].double().numpy())
        assert np.array_equal(atoms.get_potential_energies(), out[K.NODE_ENERGY].double().numpy())
        if atoms.pbc.all():
            assert np.array_equal(atoms.get_stress(voigt=False), out[K.STRESS][0].double().numpy())


def test_the_quick_finiteness_check_never_passes_a_nan_or_inf() -> None:
    finite = (1.0, np.ones((9, 3)), np.zeros(0))
    assert _all_finite(*finite)
    for bad in (np.nan, np.inf, -np.inf):
        assert not _all_finite(*finite, np.array([[0.0, bad]]))
        assert not _all_finite(bad, *finite)
    assert not _all_finite(np.array([np.inf, -np.inf]))  # inf - inf: NaN, still caught
    assert not _all_finite(np.array([1e308, 1e308]))  # an overflow: the exact check decides


def test_non_finite_results_are_refused_naming_the_structure(registry) -> None:
    potential = _painn(registry)
    with torch.no_grad():
        potential.backbone.readout[2].bias.fill_(float("nan"))
    atoms = molecule("CH3CH2OH")
    atoms.calc = AtomforgeCalculator(potential)
    with pytest.raises(ModelOutputError, match=r"9-atom C2H6O: the model returned NaN/inf \(energy of structure"):
        atoms.get_forces()
    assert atoms.calc.results == {}


def test_small_open_structures_get_vesins_neighbour_list() -> None:
    """All pairs in numpy (small open structures): vesin's pairs and distances; in vesin's order
    too for a molecule (less than two cutoffs across), so that the model's sums run in the same
    order and its numbers stay bit for bit those of vesin's list."""
    rng = np.random.default_rng(0)
    for n in (1, 2, 9, 20, SMALL_OPEN_STRUCTURE):
        for spread in (5.0, 60.0):  # compact (every pair within the cutoff) and sparse (> two cutoffs across)
            atoms = Atoms(numbers=rng.integers(1, 9, n), positions=rng.uniform(0, (n * spread) ** (1 / 3), (n, 3)))
            i, j, shifts, dist = neighbor_list(atoms, CUTOFF)
            vi, vj, vshifts, vdist = _vesin(atoms, CUTOFF, "ijSd")
            ours, theirs = np.lexsort((j, i)), np.lexsort((vj, vi))
            assert np.array_equal(i[ours], vi[theirs]) and np.array_equal(j[ours], vj[theirs])
            np.testing.assert_allclose(dist[ours], vdist[theirs], rtol=1e-15)
            assert not shifts.any() and not vshifts.any()
            assert i.dtype == j.dtype == np.int64 and shifts.dtype == dist.dtype == np.float64
    ethanol = molecule("CH3CH2OH")
    got, expected = neighbor_list(ethanol, 5.0), _vesin(ethanol, 5.0, "ijSd")
    assert all(np.array_equal(a, b) for a, b in zip(got[:3], expected[:3]))


def test_a_batch_of_one_gives_the_numbers_of_a_batch_of_two(registry) -> None:
    """A batch of one structure (cell shifts by one matrix product) and the same structure in a
    batch of two (per-edge cells) give the same energy, forces and stress."""
    potential = _painn(registry).eval()
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 1, 1))
    atoms.set_cell(atoms.cell[:] @ np.array([[1.0, 0.1, 0.0], [0.0, 1.0, 0.05], [0.0, 0.0, 1.0]]), scale_atoms=True)
    atoms.numbers[:3] = [1, 6, 8]
    atoms.rattle(0.05, seed=1)
    graph = atoms_to_graph(atoms, CUTOFF, dtype=torch.float64)
    one = {k: v.detach() for k, v in potential(collate([graph]), compute_stress=True).items()}
    two = {k: v.detach() for k, v in potential(collate([graph, graph]), compute_stress=True).items()}
    n = len(atoms)
    for key, rows in ((K.ENERGY, 1), (K.FORCES, n), (K.STRESS, 1)):
        mine, batched = one[key], two[key][:rows]
        torch.testing.assert_close(mine, batched, rtol=1e-12, atol=1e-12 * float(batched.abs().max()), msg=key)
