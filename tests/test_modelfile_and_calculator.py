"""Model files round-trip without pickled code; the ASE calculator is physical and consistent."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import bulk

from atomforge import (
    AtomforgeCalculator,
    ModelFileError,
    config_from_dict,
    load_calculator,
    load_model,
    make_plugin_manager,
    make_registry,
    read_model_file,
)
from atomforge.workflows.train import train

from conftest import cu_structures, tiny_config


@pytest.fixture(scope="module")
def trained(cu_files, tmp_path_factory):
    run = tmp_path_factory.mktemp("model") / "run"
    return train(config_from_dict(tiny_config(cu_files, run, max_epochs=2)), make_registry(), verbose=False)


def test_model_file_holds_only_weights_and_json(trained) -> None:
    payload = torch.load(trained.model_path, weights_only=True)  # no pickled code needed
    assert payload["format"] == "atomforge-model"
    config, metadata, state = read_model_file(trained.model_path)
    assert config["backbone"] == "painn" and config["provider"] == "atomforge"
    assert config["elements"] == [29] and metadata["epochs"] == 2
    assert all(isinstance(v, torch.Tensor) for v in state.values())


def test_round_trip_predicts_the_same(trained) -> None:
    atoms = cu_structures(1, seed=9)[0]
    a = load_calculator(trained.model_path)
    b = load_calculator(trained.model_path)
    atoms.calc = a
    e1, f1 = atoms.get_potential_energy(), atoms.get_forces()
    atoms.calc = b
    assert atoms.get_potential_energy() == e1
    np.testing.assert_array_equal(atoms.get_forces(), f1)


def test_missing_backbone_plugin_names_the_distribution(trained) -> None:
    no_backbones = make_registry(make_plugin_manager(entry_points=False, builtins=("atomforge.plugins.losses",)))
    with pytest.raises(ModelFileError, match=r"needs backbone 'painn' from distribution 'atomforge'.*Install"):
        load_model(trained.model_path, registry=no_backbones)


def test_foreign_files_are_refused_clearly(tmp_path) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    with pytest.raises(ModelFileError, match="not a readable atomforge model file"):
        load_model(junk)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ModelFileError, match="not an atomforge model file"):
        load_model(tmp_path / "other.pt")
    with pytest.raises(ModelFileError, match="does not exist"):
        load_model(tmp_path / "missing.pt")


def test_calculator_properties_and_finite_differences(trained) -> None:
    calc = load_calculator(trained.model_path, dtype=torch.float64)
    atoms = cu_structures(1, seed=5)[0]
    atoms.calc = calc
    energy = atoms.get_potential_energy()
    assert atoms.get_potential_energy(force_consistent=True) == energy  # free_energy
    forces, stress = atoms.get_forces(), atoms.get_stress()
    assert forces.shape == (8, 3) and stress.shape == (6,)
    np.testing.assert_allclose(calc.results["energies"].sum(), energy, rtol=1e-10)
    h = 1e-4
    for i, d in [(0, 0), (3, 2), (7, 1)]:
        plus, minus = atoms.copy(), atoms.copy()
        plus.positions[i, d] += h
        minus.positions[i, d] -= h
        plus.calc = minus.calc = calc
        fd = -(plus.get_potential_energy() - minus.get_potential_energy()) / (2 * h)
        assert fd == pytest.approx(forces[i, d], abs=1e-6)
    from ase.stress import full_3x3_to_voigt_6_stress

    eps, fd_stress = 1e-5, np.zeros((3, 3))
    for a in range(3):
        for b in range(3):
            e = np.zeros((3, 3))
            e[a, b] = e[b, a] = eps if a == b else eps / 2
            vals = []
            for sign in (1, -1):
                s = atoms.copy()
                s.set_cell(atoms.cell[:] @ (np.eye(3) + sign * e), scale_atoms=True)
                s.calc = calc
                vals.append(s.get_potential_energy())
            fd_stress[a, b] = (vals[0] - vals[1]) / (2 * eps) / atoms.get_volume()
    np.testing.assert_allclose(full_3x3_to_voigt_6_stress(fd_stress), stress, atol=1e-7)


def test_molecule_has_no_stress_but_energy_and_forces(trained) -> None:
    from ase import Atoms

    cluster = Atoms("Cu4", positions=[[0, 0, 0], [2.5, 0, 0], [0, 2.5, 0], [0, 0, 2.5]])
    cluster.calc = load_calculator(trained.model_path)
    assert np.isfinite(cluster.get_potential_energy())
    assert np.abs(cluster.get_forces().sum(0)).max() < 1e-4  # momentum conservation
    assert "stress" not in cluster.calc.results


def test_supercell_energy_is_extensive(trained) -> None:
    calc = AtomforgeCalculator(load_model(trained.model_path), dtype=torch.float64)
    cell = bulk("Cu", "fcc", a=3.6)
    cell.calc = calc
    big = cell.repeat((3, 2, 2))
    big.calc = calc
    assert big.get_potential_energy() / len(big) == pytest.approx(cell.get_potential_energy(), rel=1e-10)
