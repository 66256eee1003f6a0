"""The native ``tensornet`` backbone: physics kit, clear option errors, training with stress, and
the UQ heads (the deep ensemble's vectorised path runs it under ``torch.func.vmap``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from atomforge import ConfigError, config_from_dict, load_calculator
from atomforge.plugins.tensornet import TensorNet, _basis
from atomforge.testing import check_backbone, make_test_potential, predict, sample_structures
from atomforge.workflows.train import train

from conftest import cu_structures, tiny_config

SMALL = {"hidden_channels": 8, "num_layers": 2, "num_rbf": 6}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_tensornet_passes_the_physics_kit(dtype) -> None:
    results = check_backbone(TensorNet, options=SMALL, dtype=dtype)
    assert all(r.passed for r in results)
    results = check_backbone(TensorNet, options={**SMALL, "radial_hidden": 8, "num_layers": 1})
    assert all(r.passed for r in results)


def test_the_packed_basis_is_orthonormal_and_splits_into_l0_l1_l2() -> None:
    basis = _basis()
    assert torch.allclose(basis.T @ basis, torch.eye(9, dtype=torch.float64), atol=1e-12)
    matrices = basis.T.reshape(9, 3, 3)
    assert torch.allclose(matrices[1:4], -matrices[1:4].transpose(-1, -2))  # antisymmetric (l = 1)
    assert torch.allclose(matrices[4:], matrices[4:].transpose(-1, -2))  # symmetric …
    assert torch.allclose(matrices[4:].diagonal(dim1=-2, dim2=-1).sum(-1), torch.zeros(5, dtype=torch.float64))  # traceless


def test_reflections_leave_energies_unchanged_and_mirror_forces() -> None:
    potential = make_test_potential(TensorNet, options=SMALL)
    atoms = sample_structures()["molecule"]
    mirrored = atoms.copy()
    mirrored.positions[:, 0] *= -1
    a, b = predict(potential, atoms), predict(potential, mirrored)
    assert b["energy"][0] == pytest.approx(a["energy"][0], rel=1e-10)
    np.testing.assert_allclose(b["forces"][:, 0], -a["forces"][:, 0], atol=1e-10)


@pytest.mark.parametrize("options, message", [({"hidden_channels": 0}, "hidden_channels must be an integer ≥ 1"),
                                              ({"activation": "relu"}, "activation 'relu' is not one of"),
                                              ({"num_rbf": 2.5}, "num_rbf must be an integer")])
def test_bad_options_are_clear_errors(options, message) -> None:
    with pytest.raises(ConfigError, match=message):
        TensorNet(num_elements=1, cutoff=4.0, **options)


def test_training_with_stress_and_a_vectorised_deep_ensemble(cu_files, tmp_path, registry) -> None:
    raw = tiny_config(cu_files, tmp_path / "run")
    raw["model"] = {"backbone": "tensornet", "cutoff": 4.0, **SMALL}
    raw["loss"].append({"name": "stress", "weight": 1.0})
    raw["uq"] = {"name": "deep_ensemble", "num_members": 2, "vectorize": True}
    outcome = train(config_from_dict(raw), registry, verbose=False)
    assert np.isfinite(outcome.test_metrics["test_forces_mae"]) and np.isfinite(outcome.test_metrics["test_stress_mae"])
    atoms = cu_structures(1, seed=5)[0]
    atoms.calc = load_calculator(outcome.model_path)
    assert np.all(np.isfinite(atoms.get_forces())) and np.isfinite(atoms.calc.results["energy_std"])
