"""Host-side validation and model-side graphs: every validation error, neighbour lists."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, molecule
from ase.neighborlist import neighbor_list as ase_neighbor_list

from atomforge import (
    DataValidationError,
    GraphDataset,
    UnseenElementError,
    attach_labels,
    collate,
    get_labels,
    keys as K,
    load_calculator,
    neighbor_list,
)

from conftest import cu_structures, emt_label


def test_missing_label_for_a_requested_loss_term() -> None:
    atoms = cu_structures(1)[0]
    unlabeled = attach_labels(atoms, energy=get_labels(atoms).energy)  # no forces
    with pytest.raises(DataValidationError, match=r"structure 0.*needs a 'forces' label.*remove the 'forces' loss"):
        GraphDataset([unlabeled], 4.0, require=("energy", "forces"))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_labels(bad: float) -> None:
    atoms = cu_structures(1)[0]
    forces = get_labels(atoms).forces.copy()
    forces[2, 1] = bad
    with pytest.raises(DataValidationError, match="forces label has 1 NaN/inf"):
        GraphDataset([attach_labels(atoms, energy=1.0, forces=forces)], 4.0)
    with pytest.raises(DataValidationError, match="energy label has 1 NaN/inf"):
        GraphDataset([attach_labels(atoms, energy=bad)], 4.0)


def test_force_shape_mismatch() -> None:
    atoms = cu_structures(1)[0]
    atoms.info["energy"] = 1.0
    atoms.calc = None
    atoms.arrays["forces"] = np.zeros((len(atoms), 3))
    bad = atoms[:-1]  # drops one atom's row together with the atom — rebuild a mismatch by hand
    bad.calc = None
    labelled = attach_labels(bad, energy=1.0, forces=np.zeros((len(bad) + 1, 3)))
    with pytest.raises(DataValidationError, match=r"forces label has shape \(8, 3\); expected \(7, 3\)"):
        GraphDataset([labelled], 4.0)


def test_zero_volume_periodic_cell() -> None:
    atoms = Atoms("Cu2", positions=[[0, 0, 0], [1.5, 1.5, 0]], cell=[[3, 0, 0], [0, 3, 0], [0, 0, 0]], pbc=True)
    with pytest.raises(DataValidationError, match="zero-volume or degenerate cell"):
        GraphDataset([attach_labels(atoms, energy=0.0)], 4.0)


def test_atoms_closer_than_0_1_angstrom() -> None:
    atoms = molecule("H2O")
    atoms.positions[2] = atoms.positions[0] + [0.05, 0, 0]
    with pytest.raises(DataValidationError, match=r"atoms \d and \d are 0.05 Å apart"):
        GraphDataset([attach_labels(atoms, energy=0.0)], 4.0)


def test_close_contact_through_a_periodic_image() -> None:
    atoms = Atoms("Cu2", positions=[[0.02, 0, 0], [2.98, 0, 0]], cell=[3, 3, 3], pbc=True)
    with pytest.raises(DataValidationError, match="0.04 Å apart"):
        GraphDataset([atoms], 4.0)


def test_unseen_element_at_inference(tmp_path, cu_files) -> None:
    from atomforge import config_from_dict, make_registry
    from atomforge.workflows.train import train

    from conftest import tiny_config

    outcome = train(config_from_dict(tiny_config(cu_files, tmp_path / "run", max_epochs=1)), make_registry(),
                    verbose=False)
    calc = load_calculator(outcome.model_path)
    alloy = bulk("Cu", "fcc", a=3.61, cubic=True)
    alloy[0].symbol = "Au"
    alloy.calc = calc
    with pytest.raises(UnseenElementError, match=r"Z=\[79\].*knows Z=\[29\]"):
        alloy.get_potential_energy()


def _pairs(i, j, d):
    return sorted(zip(i.tolist(), j.tolist(), np.round(d, 8).tolist()))


@pytest.mark.parametrize(
    "atoms",
    [
        bulk("Cu", "fcc", a=3.61),  # primitive cell, smaller than the cutoff
        Atoms("CuAu", scaled_positions=[[0.1, 0.2, 0.3], [0.6, 0.5, 0.4]],
              cell=[[2.7, 0, 0], [1.1, 2.5, 0], [0.6, 0.9, 2.4]], pbc=True),  # triclinic
        Atoms("Cu3", positions=[[0, 0, 0], [2.5, 0, 0], [0, 2.5, 5]], cell=[3, 3, 0], pbc=[True, True, False]),
        molecule("CH3CH2OH"),
    ],
    ids=["primitive-fcc", "triclinic", "slab", "open"],
)
def test_neighbour_list_matches_ase(atoms: Atoms) -> None:
    i, j, shifts, d = neighbor_list(atoms, 4.0)
    ai, aj, ad = ase_neighbor_list("ijd", atoms, 4.0)
    assert _pairs(i, j, d) == _pairs(ai, aj, ad)
    vectors = atoms.positions[j] - atoms.positions[i] + shifts @ atoms.cell[:]
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), d, atol=1e-10)


def test_metadata_rides_along_in_the_batch() -> None:
    a, b = cu_structures(2)
    a.info.update(charge=-1, spin=2, fidelity=3, weight=0.5)
    batch = collate(GraphDataset([a, b], 4.0).graphs)
    assert batch[K.CHARGE].tolist() == [-1.0, 0.0]
    assert batch[K.SPIN].tolist() == [2.0, 0.0]
    assert batch[K.FIDELITY].tolist() == [3, 0]
    assert batch[K.WEIGHT].tolist() == [0.5, 1.0]
    assert batch[K.BATCH].bincount().tolist() == [8, 8]
    assert batch[K.EDGE_INDEX].max() < 16 and batch[K.EDGE_INDEX][:, batch[K.EDGE_INDEX][0] >= 8].min() >= 8


def test_labels_round_trip_through_extxyz(tmp_path) -> None:
    from ase.io import read, write

    atoms = cu_structures(1)[0]
    write(tmp_path / "x.extxyz", atoms)
    back = get_labels(read(tmp_path / "x.extxyz"))
    ref = get_labels(atoms)
    assert back.energy == pytest.approx(ref.energy)
    np.testing.assert_allclose(back.forces, ref.forces)
    np.testing.assert_allclose(back.stress, ref.stress)
    assert back.stress.shape == (3, 3)


def test_graph_dtype_follows_request() -> None:
    g = GraphDataset(cu_structures(1), 4.0, dtype=torch.float64).graphs[0]
    assert g[K.POSITIONS].dtype == torch.float64 and g[K.ENERGY].dtype == torch.float64
