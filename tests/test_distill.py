"""Distillation (docs/distill.md): Hessian rows (autograd = finite differences), their batch fields,
the ``hessian`` loss, and ``atomforge distill`` end to end — teacher sampling, cached and resumable
teacher labels, a student with every atomforge capability, MLflow lineage, bad configs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from ase.build import bulk, molecule
from ase.calculators.emt import EMT
from ase.io import read, write

from atomforge import ConfigError, atoms_to_graph, config_from_dict, make_registry
from atomforge.analysis.hessian import (
    HESSIAN_INDEX, HESSIAN_ROWS, attach_hessian_rows, fd_hessian_rows, hessian_rows, pick_rows)
from atomforge.data.fields import collate
from atomforge.model.calculator import AtomforgeCalculator
from atomforge.model.modelfile import build_potential
from atomforge.workflows import distill as distill_module
from atomforge.workflows.distill import distill, distill_config_from_dict, teacher_labels
from atomforge.workflows.train import train

from conftest import cu_structures, tiny_config

SMALL = {"backbone": "painn", "provider": "atomforge", "cutoff": 4.0, "dtype": "float64",
         "options": {"hidden_channels": 16, "num_layers": 2, "num_rbf": 8},
         "elements": [1, 6, 8, 29], "atomic_energies": [0.0] * 4, "scale": 1.0, "shift": 0.0}


@pytest.fixture(scope="module")
def reg():
    return make_registry()


@pytest.fixture(scope="module")
def random_potential(reg):
    """A float64 PaiNN with large random weights: a non-trivial, smooth energy surface."""
    model = build_potential(SMALL, reg).eval()
    torch.manual_seed(0)
    for p in model.parameters():
        p.data.normal_(0.0, 0.3)
    return model


def _batch(structures, reg, dtype=torch.float64):
    return collate([atoms_to_graph(a, 4.0, dtype=dtype, fields=reg.fields) for a in structures], reg.fields)


# -- Hessian rows ---------------------------------------------------------------------------------
def test_autograd_hessian_rows_equal_central_differences_of_the_forces(random_potential, reg) -> None:
    """Rows by double backward (batched, two structures of different sizes, one periodic) match
    central differences of the model's own forces (float64, h = 1e-4 Å: error O(h²))."""
    mol, cell = molecule("CH3CH2OH"), bulk("Cu", "fcc", a=3.6, cubic=True)
    mol.rattle(0.05, seed=1)
    cell.rattle(0.05, seed=2)
    rng = np.random.default_rng(0)
    index = [pick_rows(len(a), 3, rng) for a in (mol, cell)]
    rows = hessian_rows(random_potential, _batch([mol, cell], reg), torch.as_tensor(np.stack(index))).detach().numpy()
    calc = AtomforgeCalculator(random_potential)
    start = 0
    for atoms, idx in zip((mol, cell), index):
        fd = fd_hessian_rows(atoms, calc, idx, step=1e-4)
        ours = rows[start:start + len(atoms)]
        start += len(atoms)
        assert np.abs(ours).max() > 1.0  # a non-trivial surface
        np.testing.assert_allclose(ours, fd, atol=1e-5 * np.abs(fd).max())  # O(h²) of a rough surface


def test_finite_difference_hessian_of_emt_is_symmetric() -> None:
    """Every row of a 4-atom EMT cell by central differences: H ≈ Hᵀ and rows sum to zero
    (translation invariance) — the calculator-teacher path."""
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.rattle(0.05, seed=3)
    index = np.arange(12)
    rows = fd_hessian_rows(atoms, EMT(), index, step=0.002)  # [N, 12, 3]
    hessian = rows.transpose(1, 0, 2).reshape(12, 12)
    np.testing.assert_allclose(hessian, hessian.T, atol=2e-3 * np.abs(hessian).max())
    np.testing.assert_allclose(rows.sum(axis=0), 0.0, atol=1e-3 * np.abs(hessian).max())


def test_rows_travel_through_extxyz_fields_and_batches(reg, tmp_path) -> None:
    """Stored rows round-trip through extxyz; a batch mixing structures with and without rows
    masks the missing ones; a data set with different row counts is a clear error."""
    a, b, c = molecule("H2O"), molecule("CH4"), molecule("H2O")
    attach_hessian_rows(a, [0, 4], np.arange(18, dtype=float).reshape(3, 2, 3))
    attach_hessian_rows(c, [1, 2, 3], np.ones((3, 3, 3)))
    write(tmp_path / "h.extxyz", [a, b])
    back = read(tmp_path / "h.extxyz", index=":")
    batch = _batch(back, reg)
    assert batch[HESSIAN_ROWS].shape == (8, 2, 3) and batch[HESSIAN_INDEX].tolist() == [[0, 4], [0, 0]]
    np.testing.assert_allclose(batch[HESSIAN_ROWS][:3].numpy(), np.arange(18).reshape(3, 2, 3))
    assert batch["hessian_rows_mask"].tolist() == [True, False]
    from atomforge import DataValidationError

    with pytest.raises(DataValidationError, match="same number of entries"):
        _batch([a, c], reg)


def test_the_hessian_loss_is_zero_on_the_models_own_rows_and_trains(random_potential, reg) -> None:
    from atomforge.plugins.hessian import HessianLoss

    mol = molecule("CH3CH2OH")
    mol.rattle(0.05, seed=4)
    index = pick_rows(len(mol), 4, np.random.default_rng(1))
    own = hessian_rows(random_potential, _batch([mol], reg), torch.as_tensor(index[None])).detach().numpy()
    labelled = attach_hessian_rows(mol.copy(), index, own)
    batch = _batch([labelled], reg)
    outputs = {"energy": torch.zeros(1, dtype=torch.float64)}
    loss = HessianLoss()
    assert float(loss(batch, outputs, random_potential)) < 1e-20
    shifted = attach_hessian_rows(mol.copy(), index, own + 0.1)
    random_potential.train()
    try:
        value = loss(_batch([shifted], reg), outputs, random_potential)
        assert float(value.detach()) == pytest.approx(0.01, rel=1e-6)
        value.backward()  # double backward reaches the weights
        assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in random_potential.parameters())
    finally:
        random_potential.eval()
        random_potential.zero_grad()
    with pytest.raises(ConfigError, match="rows must be"):
        HessianLoss(rows=0)


# -- the workflow ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory, reg):
    """A small trained Cu teacher and its data."""
    folder = tmp_path_factory.mktemp("teacher")
    files = {"train": folder / "train.extxyz", "test": folder / "test.extxyz"}
    write(files["train"], cu_structures(16, seed=1))
    write(files["test"], cu_structures(6, seed=2))
    outcome = train(config_from_dict(tiny_config(files, folder / "run", max_epochs=4)), reg, verbose=False)
    return outcome.model_path, files


def _raw(teacher_file, output, **extra):
    model, files = teacher_file
    raw = {"output": str(output), "teacher": {"model": str(model)},
           "configurations": {"data": str(files["train"]), "starts": 2, "max_structures": 24,
                              "sampling": [{"name": "md", "temperatures": [600], "steps": 20, "interval": 5},
                                           {"name": "perturb", "n_per_start": 3, "rattle_std": 0.05}]},
           "labels": {"hessian_rows": 2, "batch_size": 8},
           "student": {"model": {"backbone": "painn", "cutoff": 4.0, "hidden_channels": 8, "num_layers": 1, "num_rbf": 6},
                       "loss": [{"name": "energy", "weight": 1.0}, {"name": "forces", "weight": 10.0},
                                {"name": "hessian", "weight": 0.1}],
                       "training": {"max_epochs": 2, "batch_size": 4, "lr": 0.005}},
           "test": str(files["test"]), "tracking": "none", "seed": 0}
    raw.update(extra)
    return raw


def test_distill_samples_labels_trains_and_reuses_the_teachers_labels(teacher_file, reg, tmp_path, monkeypatch) -> None:
    config = distill_config_from_dict(_raw(teacher_file, tmp_path / "run"))
    outcome = distill(config, reg, verbose=False)
    labels = read(outcome.labels, index=":")
    samplers = {a.info["sampler"] for a in labels}
    assert len(labels) == 24 and samplers == {"data", "md", "perturb"}
    assert all(np.asarray(a.info[HESSIAN_INDEX]).shape == (2,) and a.arrays[HESSIAN_ROWS].shape == (len(a), 6)
               for a in labels)
    # the labels are the teacher's: its own calculator gives them back
    teacher = AtomforgeCalculator.__new__  # noqa: F841  (readability: compare through load_calculator)
    from atomforge import load_calculator

    calc = load_calculator(teacher_file[0])
    probe = labels[-1].copy()
    probe.calc = calc
    np.testing.assert_allclose(probe.get_forces(), labels[-1].get_forces(), atol=1e-5)
    report = outcome.report
    assert report["teacher"]["kind"] == "model" and len(report["teacher"]["sha256"]) == 64
    assert report["test"]["frames"] == 6 and report["test"]["student"]["forces_mae"] > 0
    assert report["call_seconds"]["student"] > 0 and report["teacher"]["hessian"] == "autograd"
    assert json.loads((tmp_path / "run" / "distill.json").read_text())["labelled"] == 24
    # a second student on the same teacher and sampling: no teacher call at all
    monkeypatch.setattr(distill_module.Teacher, "label", lambda *a, **k: pytest.fail("the teacher was called again"))
    raw = _raw(teacher_file, tmp_path / "run2", labels={"hessian_rows": 2, "batch_size": 8,
                                                        "dir": str(tmp_path / "run" / "labels")})
    again = distill(distill_config_from_dict(raw), reg, verbose=False)
    assert again.labels == outcome.labels and again.model_path.exists()


def test_labelling_resumes_after_a_kill_without_duplicates(teacher_file, reg, tmp_path, monkeypatch) -> None:
    config = distill_config_from_dict(_raw(teacher_file, tmp_path / "run", labels={"hessian_rows": 0, "batch_size": 5}))
    real = distill_module.Teacher.label
    calls = {"n": 0}

    def dies_on_third_batch(self, *args, **kwargs):  # noqa: ANN001, ANN202
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(distill_module.Teacher, "label", dies_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        teacher_labels(config, reg)
    path = next((tmp_path / "run" / "labels").glob("*/teacher.extxyz"))
    assert len(read(path, index=":")) == 10
    with open(path, "a") as handle:  # a torn frame, as a kill mid-write leaves it
        handle.write("8\nLattice=")
    monkeypatch.setattr(distill_module.Teacher, "label", real)
    assert teacher_labels(config, reg) == path
    frames = read(path, index=":")
    configurations = read(path.with_name("configurations.extxyz"), index=":")
    assert len(frames) == len(configurations) == 24
    np.testing.assert_allclose(frames[12].positions, configurations[12].positions)


def test_an_oracle_teacher_labels_with_finite_difference_rows(reg, tmp_path, teacher_file) -> None:
    raw = _raw(teacher_file, tmp_path / "run", teacher={"oracle": {"name": "emt"}})
    raw["configurations"] = {"data": str(teacher_file[1]["train"]), "starts": 1, "max_structures": 4,
                             "sampling": [{"name": "perturb", "n_per_start": 2, "rattle_std": 0.03}]}
    raw["labels"] = {"hessian_rows": 2, "fd_step": 0.002}
    config = distill_config_from_dict(raw)
    path = teacher_labels(config, reg)
    frames = read(path, index=":")
    assert len(frames) == 4
    for atoms in frames:
        work = atoms.copy()
        work.calc = EMT()
        np.testing.assert_allclose(atoms.get_forces(), work.get_forces(), atol=1e-6)  # extxyz keeps 8 decimals
        index = np.asarray(atoms.info[HESSIAN_INDEX])
        np.testing.assert_allclose(atoms.arrays[HESSIAN_ROWS].reshape(len(atoms), 2, 3),
                                   fd_hessian_rows(atoms, EMT(), index, step=0.002), atol=1e-6)


@pytest.mark.parametrize("change, message", [
    ({"teacher": {"model": "a.pt", "oracle": "emt"}}, "exactly one of model"),
    ({"teacher": {"oracle": "emt", "hessian": "autograd"}}, "autograd needs an atomforge model"),
    ({"student": {"data": {"train": "x.extxyz"}}}, "set by distill"),
    ({"colour": "blue"}, "unknown key"),
    ({"labels": {"hessian_rows": -1}}, "hessian_rows ≥ 0"),
])
def test_bad_distill_configs_are_clear_errors(teacher_file, tmp_path, change, message) -> None:
    raw = _raw(teacher_file, tmp_path / "run")
    raw.update(change)
    with pytest.raises(ConfigError, match=message):
        distill_config_from_dict(raw)


def test_the_distill_command_runs_and_tracks_the_teacher(teacher_file, tmp_path, monkeypatch) -> None:
    """``atomforge distill`` with MLflow: the student's run carries the teacher's hash and the
    teacher-vs-student comparison."""
    import yaml

    from atomforge.cli import main

    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    raw = _raw(teacher_file, tmp_path / "run", tracking={"name": "mlflow", "tracking_uri": uri})
    raw["labels"] = {"hessian_rows": 0}
    raw["student"]["loss"] = raw["student"]["loss"][:2]
    (tmp_path / "distill.yaml").write_text(yaml.safe_dump(raw))
    assert main(["distill", str(tmp_path / "distill.yaml"), "--quiet"]) == 0
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    run = next(r for r in runs if "distill.teacher.sha256" in r.data.params)
    assert run.data.params["distill.teacher.kind"] == "model"
    assert "distill.test.student.forces_mae" in run.data.metrics and "distill.call_seconds.speedup" in run.data.metrics
    assert run.info.run_name == "run-student"  # named after the distill output, not a bare "student"


def test_a_direct_force_teacher_gets_a_conservative_student_with_both_physics_reported(teacher_file, reg,
                                                                                        tmp_path) -> None:
    """Direct → conservative: a direct-force transformer teacher, a PaiNN student; the report puts
    both models' physics metrics side by side: the teacher's force field has a curl, the
    student's has none (a gradient field), and both ran the same NVE check."""
    _, files = teacher_file
    direct = tiny_config(files, tmp_path / "direct", max_epochs=3)
    direct["model"] = {"backbone": "transformer", "cutoff": 4.0, "hidden_channels": 8, "num_layers": 1,
                       "num_heads": 2, "num_rbf": 6, "forces": "direct"}
    teacher = train(config_from_dict(direct), reg, verbose=False).model_path
    raw = _raw(teacher_file, tmp_path / "run", teacher={"model": str(teacher)})
    raw["labels"] = {"hessian_rows": 1}
    raw["student"]["evaluation"] = {"physics": True, "structures": 2, "rotations": 1, "curl_probes": 2,
                                    "nve_steps": 20}
    outcome = distill(distill_config_from_dict(raw), reg, verbose=False)
    physics = outcome.report["physics"]
    assert physics["teacher"]["physics_curl_relative"] > 1e-3
    assert physics["student"]["physics_curl_relative"] < 1e-5
    assert {"physics_nve_energy_drift", "physics_md_stable_ps"} <= set(physics["teacher"]) & set(physics["student"])


def test_an_oracle_as_calculator_retries_then_fails_with_a_clear_error() -> None:
    """The teacher's MD runs an oracle through ``OracleCalculator``: a failed call is retried
    (``teacher.retries``), and one that keeps failing raises ``OracleFailure`` naming the
    oracle's error (the md explorer then ends that trajectory), never a bare exception."""
    from ase.build import bulk
    from ase.calculators.emt import EMT

    from atomforge import OracleFailure
    from atomforge.exploration.oracle import OracleCalculator

    class Flaky:
        def __init__(self, failures: int) -> None:
            self.failures, self.calls = failures, 0

        def label(self, atoms):
            self.calls += 1
            if self.calls <= self.failures:
                raise RuntimeError("SCF did not converge")
            atoms.calc = EMT()
            atoms.get_forces()
            return atoms

    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    flaky = Flaky(failures=1)
    atoms.calc = OracleCalculator(flaky, retries=1)
    assert atoms.get_forces().shape == (4, 3) and flaky.calls == 2
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.calc = OracleCalculator(Flaky(failures=5), retries=1)
    with pytest.raises(OracleFailure, match="SCF did not converge"):
        atoms.get_forces()
