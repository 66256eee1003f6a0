"""UQ heads: spread where it should be (zero for identical members, larger far from the data),
calibration that helps, model files that round-trip, a calculator that reports the std keys."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from atomforge import (
    ConfigError,
    Potential,
    UQFitContext,
    atoms_to_graph,
    collate,
    config_from_dict,
    load_calculator,
    load_model,
    read_model_file,
)
from atomforge import keys as K
from atomforge.cli import main
from atomforge.data.graph import GraphDataset
from atomforge.model.potential import differentiable_inputs, energy_derivatives
from atomforge.analysis.metrics import miscalibration_area, spearman
from atomforge.analysis.calibration import fit_isotonic, fit_variance_scale
from atomforge.model.uncertainty import member_statistics, replicate_batch
from atomforge.workflows.train import train

from conftest import cu_structures, tiny_config

SMALL = {"hidden_channels": 16, "num_layers": 2, "num_rbf": 8}


def _potential(registry, seed: int = 0) -> Potential:
    """A random float64 Cu PaiNN potential with a non-trivial scale."""
    torch.manual_seed(seed)
    backbone = registry.get("backbones", "painn").factory(num_elements=1, cutoff=4.0, **SMALL)
    return Potential(backbone, elements=[29], atomic_energies=[-3.0], scale=0.7).double().eval()


def _head(registry, name: str, potential, **options):
    return registry.get("uq_heads", name).factory(potential, **options)


def _batch(structures, dtype=torch.float64, cutoff: float = 4.0):
    return collate([atoms_to_graph(a, cutoff, dtype=dtype) for a in structures])


def _compressed(atoms, factor: float = 0.85):
    out = atoms.copy()
    out.set_cell(out.cell[:] * factor, scale_atoms=True)
    return out


# -- heads as modules ----------------------------------------------------------------------------
@pytest.mark.parametrize("vectorize", [True, False])
def test_ensemble_of_identical_members_has_zero_spread(registry, vectorize: bool) -> None:
    potential = _potential(registry)
    head = _head(registry, "deep_ensemble", potential, num_members=3, vectorize=vectorize).eval()
    for member in head.others:
        member.load_state_dict(potential.state_dict())
    batch = _batch(cu_structures(2, seed=4))
    out = head(batch, compute_forces=True, compute_stress=True)
    single = potential(batch, compute_forces=True, compute_stress=True)
    # zero up to float64 rounding of the vectorised kernels (forces are O(1) eV/Å here)
    for key in (K.ENERGY_STD, K.FORCES_STD, K.FORCES_STD_MAX):
        assert float(out[key].detach().abs().max()) < 1e-15
    for key in (K.ENERGY, K.FORCES, K.STRESS):
        torch.testing.assert_close(out[key], single[key], rtol=1e-12, atol=1e-12)


def test_vectorised_ensemble_equals_member_loop(registry) -> None:
    head = _head(registry, "deep_ensemble", _potential(registry), num_members=3).eval()
    batch = _batch(cu_structures(2, seed=4))
    fast = head(batch, compute_forces=True, compute_stress=True)
    head.vectorize = False
    slow = head(batch, compute_forces=True, compute_stress=True)
    assert float(fast[K.ENERGY_STD].detach().min()) > 0
    for key in (K.ENERGY, K.FORCES, K.STRESS, K.ENERGY_STD, K.FORCES_STD):
        torch.testing.assert_close(fast[key], slow[key], rtol=1e-9, atol=1e-12)


def test_shallow_heads_forces_are_each_heads_gradient(registry) -> None:
    head = _head(registry, "shallow_ensemble", _potential(registry), num_heads=3).eval()
    batch = _batch(cu_structures(1, seed=4))
    out = head(batch, compute_forces=True)
    per_head = []
    for k in range(3):  # one separate backward pass per head
        positions, _ = differentiable_inputs(batch, True, False)
        raw = head.potential.energy_outputs(batch, positions, None)
        offsets = head.heads(raw[K.NODE_FEATURES]) * head.potential.scale
        energy = (raw[K.NODE_ENERGY] + offsets[:, k]).sum().reshape(1)
        per_head.append(energy_derivatives(energy, batch, positions, None, create_graph=False)[K.FORCES])
    expected = member_statistics({K.FORCES: torch.stack(per_head)})
    torch.testing.assert_close(out[K.FORCES], expected[K.FORCES])
    torch.testing.assert_close(out[K.FORCES_STD], expected[K.FORCES_STD])


def test_replicated_batch_gives_tiled_predictions(registry) -> None:
    potential = _potential(registry)
    batch = _batch(cu_structures(2, seed=4))
    single = potential(batch)
    tiled = potential(replicate_batch(batch, 3))
    torch.testing.assert_close(tiled[K.ENERGY], single[K.ENERGY].repeat(3))
    torch.testing.assert_close(tiled[K.FORCES], single[K.FORCES].repeat(3, 1))


def test_mc_dropout_samples_differ_only_at_inference(registry) -> None:
    head = _head(registry, "mc_dropout", _potential(registry), p=0.2, samples=6).eval()
    batch = _batch(cu_structures(2, seed=4))
    out = head(batch)
    assert float(out[K.ENERGY_STD].min()) > 0 and float(out[K.FORCES_STD].min()) > 0
    plain = head.potential(batch)  # outside the head's sampling, dropout is off in eval mode
    torch.testing.assert_close(head.potential(batch)[K.ENERGY], plain[K.ENERGY], rtol=0, atol=0)
    with pytest.raises(ConfigError, match="p must be in"):
        _head(registry, "mc_dropout", _potential(registry), p=1.5)


@pytest.mark.parametrize("method", ["knn", "gmm"])
def test_latent_distance_grows_far_from_the_training_data(registry, method: str) -> None:
    potential = _potential(registry)
    train_set = GraphDataset(cu_structures(12, seed=1), 4.0, dtype=torch.float64)
    head = _head(registry, "latent_distance", potential, method=method, components=2).eval()
    head.fit(UQFitContext(train_set, train_set, train_member=None, batch_size=8))
    near = cu_structures(4, seed=7)
    far = [_compressed(a) for a in near]
    std_near = head(_batch(near))[K.FORCES_STD_MAX]
    std_far = head(_batch(far))[K.FORCES_STD_MAX]
    assert torch.all(std_far > 1.5 * std_near)


def test_unknown_head_option_is_a_config_error(registry) -> None:
    from atomforge.model.uncertainty import build_uq_head

    with pytest.raises(ConfigError, match="rejected its options"):
        build_uq_head(_potential(registry), {"name": "deep_ensemble", "options": {"bogus": 1}}, registry)
    with pytest.raises(ConfigError, match="force_spread"):
        _head(registry, "shallow_ensemble", _potential(registry), force_spread="nope")


# -- calibration and metrics -------------------------------------------------------------------
def test_calibration_reduces_miscalibration_area_on_a_misscaled_case() -> None:
    rng = np.random.default_rng(0)
    true_std = rng.uniform(0.1, 1.0, 4000)
    errors = rng.normal(0.0, true_std)
    predicted = true_std / 3.0  # over-confident by a factor 3
    before = miscalibration_area(errors, predicted)
    scale = fit_variance_scale(errors, predicted)
    after = miscalibration_area(errors, scale * predicted)
    assert 2.7 < scale < 3.3
    assert before > 0.2 and after < 0.03
    knots = fit_isotonic(errors, predicted)
    isotonic = np.interp(predicted, knots["x"], knots["y"])
    assert miscalibration_area(errors, isotonic) < 0.5 * before
    assert spearman(predicted, np.abs(errors)) > 0.2


def test_energy_nll_loss_matches_hand_computation(registry) -> None:
    term = registry.get("losses", "energy_nll").factory(eps=0.0)
    batch = {K.N_ATOMS: torch.tensor([2, 4]), K.ENERGY: torch.tensor([1.0, 2.0]), K.WEIGHT: torch.tensor([1.0, 3.0])}
    outputs = {K.ENERGY: torch.tensor([1.2, 1.6]), K.ENERGY_STD: torch.tensor([0.2, 0.8])}
    per = [0.5 * (np.log(0.1**2) + 0.1**2 / 0.1**2), 0.5 * (np.log(0.2**2) + 0.1**2 / 0.2**2)]
    assert float(term(batch, outputs, None)) == pytest.approx((per[0] + 3 * per[1]) / 4, rel=1e-6)


def test_uq_config_is_validated(cu_files, tmp_path, registry) -> None:
    config = config_from_dict({**tiny_config(cu_files, tmp_path / "a"), "uq": {"name": "deep_ensemble",
                                                                             "num_members": 3}})
    assert config.uq.name == "deep_ensemble" and config.uq.options == {"num_members": 3}
    assert config.uq.calibration == "scale"
    with pytest.raises(ConfigError, match="uq.calibration"):
        config_from_dict({**tiny_config(cu_files, tmp_path / "b"), "uq": {"name": "x", "calibration": "magic"}})
    shallow = config_from_dict({**tiny_config(cu_files, tmp_path / "c"), "uq": "shallow_ensemble"})
    with pytest.raises(ConfigError, match="energy_nll"):
        train(shallow, registry, verbose=False)


# -- through `atomforge train`, the model file and the calculator --------------------------------
@pytest.fixture(scope="module")
def ensemble_run(cu_files, tmp_path_factory):
    from atomforge import make_registry

    run = tmp_path_factory.mktemp("uq") / "run"
    cfg = {**tiny_config(cu_files, run, max_epochs=6), "uq": {"name": "deep_ensemble", "num_members": 3}}
    return train(config_from_dict(cfg), make_registry(), verbose=False)


def test_deep_ensemble_model_file_round_trips(ensemble_run, registry) -> None:
    config, _, state = read_model_file(ensemble_run.model_path)
    assert config["uq"]["name"] == "deep_ensemble" and config["uq"]["options"]["num_members"] == 3
    assert config["uq"]["calibration"]["method"] == "scale"
    assert any(k.startswith("others.1.") for k in state)
    a, b = load_model(ensemble_run.model_path), load_model(ensemble_run.model_path)
    batch = _batch(cu_structures(2, seed=9), dtype=torch.float32)
    out_a, out_b = a(batch), b(batch)
    for key in (K.ENERGY, K.FORCES, K.ENERGY_STD, K.FORCES_STD):
        torch.testing.assert_close(out_a[key], out_b[key], rtol=0, atol=0)
    metrics = json.loads((ensemble_run.run_dir / "metrics.json").read_text())
    assert "test_uq_forces_spearman_structure" in metrics and "valid_uq_forces_nll" in metrics
    assert (ensemble_run.run_dir / "calibration_test.png").exists()
    assert (ensemble_run.run_dir / "uncertainty_valid.png").exists()


def test_calculator_reports_std_and_spread_grows_when_compressed(ensemble_run) -> None:
    calc = load_calculator(ensemble_run.model_path)
    assert "forces_std" in calc.implemented_properties
    atoms = cu_structures(1, seed=11)[0]
    atoms.calc = calc
    atoms.get_forces()
    near = dict(calc.results)
    assert near["forces_std"].shape == (len(atoms),) and isinstance(near["energy_std"], float)
    assert near["forces_std_max"] == pytest.approx(near["forces_std"].max())
    squeezed = _compressed(atoms)
    squeezed.calc = calc
    squeezed.get_forces()
    far = calc.results
    assert far["forces_std_max"] > 2 * near["forces_std_max"]
    assert far["energy_std"] > 2 * near["energy_std"]


def test_evaluate_command_reports_uncertainty(ensemble_run, cu_files, capsys) -> None:
    assert main(["evaluate", str(ensemble_run.model_path), str(cu_files["test"]), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)[str(cu_files["test"])]
    assert {"uq_forces_spearman_structure", "uq_forces_nll", "uq_energy_std_mean"} <= set(report)
    assert main(["evaluate", str(ensemble_run.model_path), str(cu_files["test"])]) == 0
    assert "Spearman" in capsys.readouterr().out


def test_shallow_ensemble_trains_with_nll_and_round_trips(cu_files, tmp_path, registry) -> None:
    cfg = {**tiny_config(cu_files, tmp_path / "run", max_epochs=2),
           "loss": [{"name": "energy_nll", "weight": 1.0}, {"name": "forces", "weight": 10.0}],
           "uq": {"name": "shallow_ensemble", "num_heads": 4, "calibration": "isotonic"}}
    outcome = train(config_from_dict(cfg), registry, verbose=False)
    config, _, _ = read_model_file(outcome.model_path)
    assert "x" in config["uq"]["calibration"]["forces"]
    model = load_model(outcome.model_path)
    out = model(_batch(cu_structures(2, seed=9), dtype=torch.float32))
    assert out[K.FORCES_STD].shape == (16,) and torch.all(out[K.ENERGY_STD] >= 0)


@pytest.mark.parametrize("uq", [{"name": "mc_dropout", "samples": 4},
                                {"name": "latent_distance", "method": "gmm", "components": 2}])
def test_other_heads_train_calibrate_and_round_trip(cu_files, tmp_path, registry, uq) -> None:
    cfg = {**tiny_config(cu_files, tmp_path / "run", max_epochs=1), "uq": uq}
    outcome = train(config_from_dict(cfg), registry, verbose=False)
    config, _, _ = read_model_file(outcome.model_path)
    assert config["uq"]["calibration"]["forces"]["scale"] > 0
    batch = _batch(cu_structures(2, seed=9), dtype=torch.float32)
    a, b = load_model(outcome.model_path)(batch), load_model(outcome.model_path)(batch)
    if uq["name"] == "latent_distance":  # deterministic: identical after reloading
        torch.testing.assert_close(a[K.FORCES_STD], b[K.FORCES_STD], rtol=0, atol=0)
    assert float(a[K.FORCES_STD].detach().min()) > 0


def test_forces_nll_loss_matches_hand_computation(registry) -> None:
    term = registry.get("losses", "forces_nll").factory(eps=0.0)
    batch = {K.FORCES: torch.zeros(3, 3), K.BATCH: torch.tensor([0, 0, 1]), K.WEIGHT: torch.tensor([1.0, 2.0])}
    outputs = {K.FORCES: torch.tensor([[0.1, 0.0, 0.0], [0.0, 0.2, 0.0], [0.0, 0.0, 0.3]]),
               K.FORCES_STD: torch.tensor([0.1, 0.1, 0.3])}
    per = [0.5 * (3 * np.log(s**2) + e**2 / s**2) for e, s in ((0.1, 0.1), (0.2, 0.1), (0.3, 0.3))]
    assert float(term(batch, outputs, None)) == pytest.approx((per[0] + per[1] + 2 * per[2]) / (3 * 4), rel=1e-6)
    with pytest.raises(ConfigError, match="force_spread: vector"):
        term(batch, {K.FORCES: outputs[K.FORCES]}, None)


def test_shallow_ensemble_vector_heads_learn_a_force_spread(cu_files, tmp_path, registry) -> None:
    """Equivariant force heads on PaiNN's vector features: a per-atom spread without any extra
    backward pass, trained by forces_nll, rotation invariant, leaving the model's forces alone."""
    uq = {"name": "shallow_ensemble", "num_heads": 4, "force_spread": "vector"}
    missing = config_from_dict({**tiny_config(cu_files, tmp_path / "a", max_epochs=1), "uq": uq,
                                "loss": [{"name": "energy_nll", "weight": 1.0}, {"name": "forces", "weight": 10.0}]})
    with pytest.raises(ConfigError, match="forces_nll"):
        train(missing, registry, verbose=False)
    cfg = {**tiny_config(cu_files, tmp_path / "run", max_epochs=3), "uq": uq,
           "loss": [{"name": "energy", "weight": 1.0}, {"name": "forces", "weight": 10.0},
                    {"name": "energy_nll", "weight": 0.01, "detach_mean": True},
                    {"name": "forces_nll", "weight": 0.01}]}
    outcome = train(config_from_dict(cfg), registry, verbose=False)
    model = load_model(outcome.model_path)
    atoms = cu_structures(1, seed=9)[0]
    out = model(_batch([atoms], dtype=torch.float32))
    assert out[K.FORCES_STD].shape == (8,) and float(out[K.FORCES_STD].min()) > 0
    rotated = atoms.copy()
    rotated.rotate(40, (1, 2, 3), rotate_cell=True)
    out_rot = model(_batch([rotated], dtype=torch.float32))
    torch.testing.assert_close(out_rot[K.FORCES_STD], out[K.FORCES_STD], rtol=1e-4, atol=1e-6)
    calc = load_calculator(outcome.model_path)
    atoms.calc = calc
    atoms.get_forces()
    assert calc.results["forces_std_max"] == pytest.approx(float(out[K.FORCES_STD].max()), rel=1e-5)
