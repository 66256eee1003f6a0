"""MLflow as a lab notebook: one store per project, each run's model as an MLflow model that
serves the calculator's energies and forces, per-term losses and train errors per epoch, the
learning curve and the data hash."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pytest
from ase.io import read
from mlflow.tracking import MlflowClient

from atomforge import config_from_dict, load_calculator, make_registry
from atomforge.analysis.evaluate import evaluate
from atomforge.plugins.trackers import MlflowTracker, project_dir
from atomforge.training.loop import read_training_state
from atomforge.workflows.train import train

from conftest import cu_structures, tiny_config


def test_the_project_is_found_from_the_output_folder(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "repo" / ".git").mkdir(parents=True)
    assert project_dir(tmp_path / "repo" / "runs" / "cu" / "a") == tmp_path / "repo"  # repository root
    (tmp_path / "repo" / "runs").mkdir()
    (tmp_path / "repo" / "runs" / "mlflow.db").touch()
    assert project_dir(tmp_path / "repo" / "runs" / "cu" / "a") == tmp_path / "repo" / "runs"  # nearest store
    assert project_dir(tmp_path / "loose" / "a") == tmp_path / "loose"  # neither: the folder holding the run
    tracker = MlflowTracker(run_dir=tmp_path / "loose" / "a", _client=object())
    assert tracker.uri == f"sqlite:///{tmp_path / 'loose' / 'mlflow.db'}"
    assert tracker.artifact_location == (tmp_path / "loose" / "mlartifacts").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere/env.db")  # the environment wins …
    assert MlflowTracker(run_dir=tmp_path / "a", _client=object()).uri == "sqlite:////elsewhere/env.db"
    explicit = MlflowTracker(run_dir=tmp_path / "a", tracking_uri="http://127.0.0.1:5000", _client=object())
    assert explicit.uri == "http://127.0.0.1:5000" and explicit.artifact_location is None  # … the option more


@pytest.fixture(scope="module")
def project(cu_files, tmp_path_factory):
    """Two tracked runs in one project folder (the second registers its model), 2 epochs each."""
    root = tmp_path_factory.mktemp("project")
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        for name, extra in (("a", {}), ("b", {"register_model": "cu-painn"})):
            raw = tiny_config(cu_files, root / "runs" / name, max_epochs=2)
            raw["tracking"] = {"name": "mlflow", "experiment": "notebook", **extra}
            train(config_from_dict(raw), make_registry(), verbose=False)
    return root / "runs"


def _runs(project: Path) -> dict[str, object]:
    frame = mlflow.search_runs(experiment_names=["notebook"], output_format="list")
    return {run.info.run_name: run for run in frame}


def test_two_runs_of_a_project_land_in_one_store(project, monkeypatch) -> None:
    assert (project / "mlflow.db").exists() and not (project / "a" / "mlflow.db").exists()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
    runs = _runs(project)
    assert set(runs) == {"a", "b"} and all(r.info.status == "FINISHED" for r in runs.values())
    # the same data: the same hash, as a param and as a searchable tag
    hashes = {r.data.params["dataset.train.sha256"] for r in runs.values()}
    assert len(hashes) == 1 and len(hashes.pop()) == 16
    assert runs["a"].data.params["dataset.train.structures"] == "18"  # 24 minus the 25 % validation part
    found = mlflow.search_runs(experiment_names=["notebook"], filter_string=f"tags.data_sha256 = "
                               f"'{runs['a'].data.tags['data_sha256']}'", output_format="list")
    assert len(found) == 2


def test_per_term_losses_train_errors_and_learning_curve_per_epoch(project) -> None:
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    run = _runs_by_client(client)["a"]
    history = {key: [(m.step, m.value) for m in client.get_metric_history(run, key)]
               for key in ("train_loss", "valid_loss", "train_loss_energy", "train_loss_forces",
                           "valid_loss_energy", "valid_loss_forces", "train_forces_mae", "train_energy_mae")}
    for key, values in history.items():
        assert [step for step, _ in values] == [1, 2], key
    for epoch in range(2):  # the total is the weighted sum of the terms (weights 1 and 10)
        for part in ("train", "valid"):
            total = history[f"{part}_loss"][epoch][1]
            terms = history[f"{part}_loss_energy"][epoch][1] + 10 * history[f"{part}_loss_forces"][epoch][1]
            assert terms == pytest.approx(total, rel=1e-5)
    assert all(value > 0 for _, value in history["train_forces_mae"])
    plots = {a.path for a in client.list_artifacts(run, "plots")}
    assert {"plots/learning_curve.png", "plots/parity_valid.png", "plots/parity_test.png"} <= plots
    assert (project / "a" / "learning_curve.png").stat().st_size > 10_000


def _runs_by_client(client: MlflowClient) -> dict[str, str]:
    experiment = client.get_experiment_by_name("notebook").experiment_id
    return {r.info.run_name: r.info.run_id for r in client.search_runs([experiment])}


def test_the_logged_model_serves_the_calculators_energies_and_forces(project, monkeypatch) -> None:
    from atomforge.plugins._mlflow_model import structures_frame

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
    client = MlflowClient()
    runs = _runs_by_client(client)
    experiment = client.get_experiment_by_name("notebook").experiment_id
    models = {m.source_run_id: m for m in client.search_logged_models([experiment])}
    assert set(models) == set(runs.values())
    model = models[runs["a"]]
    assert model.params["model.backbone"] == "painn" and model.model_type == "atomforge-potential"
    assert "test_forces_mae" in {m.key for m in model.metrics or []}  # the run's final metrics, linked
    served = mlflow.pyfunc.load_model(f"models:/{model.model_id}")
    structures = cu_structures(3, seed=11)
    structures[2].pbc = False  # a molecule-like structure: no stress
    out = served.predict(structures_frame(structures))
    calculator = load_calculator(project / "a" / "model.pt")
    for k, atoms in enumerate(structures):
        atoms = atoms.copy()
        atoms.calc = calculator
        assert out["energy"][k] == pytest.approx(atoms.get_potential_energy(), abs=1e-5)
        np.testing.assert_allclose(np.array(out["forces"][k]), atoms.get_forces(), atol=1e-5)
        if k < 2:
            np.testing.assert_allclose(out["stress"][k], atoms.get_stress(voigt=True), atol=1e-6)
    assert list(out["stress"][2]) == []
    # only run b asked for registration: version 1 of cu-painn is its model
    versions = client.search_model_versions("name='cu-painn'")
    assert [(v.version, v.run_id) for v in versions] == [("1", runs["b"])] or \
        [(int(v.version), v.run_id) for v in versions] == [(1, runs["b"])]
    registered = mlflow.pyfunc.load_model("models:/cu-painn/1").predict(structures_frame(structures[:1]))
    calculator_b = load_calculator(project / "b" / "model.pt")
    atoms = structures[0].copy()
    atoms.calc = calculator_b
    assert registered["energy"][0] == pytest.approx(atoms.get_potential_energy(), abs=1e-5)
    assert client.get_run(runs["a"]).data.metrics["mlflow_model_log_s"] < 15  # logging stays cheap


def test_running_train_errors_equal_the_train_set_errors_when_nothing_is_learnt(cu_files, tmp_path) -> None:
    """With lr = 1e-12 the weights do not move, so the running estimate over the epoch's batches is
    exactly the train set's error under those weights."""
    raw = tiny_config(cu_files, tmp_path / "frozen", max_epochs=1, lr=1e-12)
    raw["data"] = {"train": str(cu_files["train"]), "valid": str(cu_files["test"])}
    outcome = train(config_from_dict(raw), make_registry(), verbose=False)
    epoch = read_training_state(outcome.run_dir)["history"][0]
    from atomforge import load_model

    expected = evaluate(load_model(outcome.model_path), read(cu_files["train"], ":")).metrics()
    for key in ("forces_mae", "forces_rmse", "energy_mae", "energy_rmse"):
        assert epoch["train_errors"][key] == pytest.approx(expected[key], rel=1e-4), key
    assert set(epoch["train_terms"]) == {"energy", "forces"} and set(epoch["valid_terms"]) == {"energy", "forces"}


def test_a_run_missing_from_the_store_is_started_anew(tmp_path, caplog) -> None:
    """``--resume`` after the store moved (or ``tracking_uri`` changed) opens a new run instead of failing."""
    tracker = MlflowTracker(run_dir=tmp_path / "a", tracking_uri=f"sqlite:///{tmp_path / 'other.db'}")
    with caplog.at_level("WARNING", logger="atomforge.tracking"):
        run_id = tracker.start(run_name="a", resume_run_id="0" * 32)
    assert run_id != "0" * 32 and tracker.client.get_run(run_id).info.run_name == "a"
    assert "is not in" in caplog.text
    assert tracker.start(run_name="a", resume_run_id=run_id) == run_id  # a run it holds is reopened


def test_a_failure_to_log_the_model_warns_and_keeps_the_run(cu_files, tmp_path, monkeypatch) -> None:
    from atomforge.plugins.trackers import NoTracker

    def broken(self, path):  # noqa: ANN001
        raise OSError("artifact store unreachable")

    monkeypatch.setattr(NoTracker, "log_model", broken)
    with pytest.warns(RuntimeWarning, match="logging it as the tracker's model failed: OSError: artifact store"):
        outcome = train(config_from_dict(tiny_config(cu_files, tmp_path / "run", max_epochs=1)), make_registry(),
                        verbose=False)
    assert outcome.model_path.exists() and (tmp_path / "run" / "learning_curve.png").exists()


def test_an_untracked_iteration_gets_its_curves_plots_and_model_afterwards(cu_files, tmp_path) -> None:
    """A campaign iteration trained without tracking (an older campaign, or a tracker that cannot
    nest runs across processes) still gets what a tracked training logs."""
    from atomforge.active_learning._loop import _log_training

    train(config_from_dict(tiny_config(cu_files, tmp_path / "train", max_epochs=2)), make_registry(), verbose=False)
    child = MlflowTracker(run_dir=tmp_path, experiment="late", tracking_uri=f"sqlite:///{tmp_path / 'late.db'}")
    child.start(run_name="iteration-000")
    _log_training(child, tmp_path / "train")
    client = child.client
    assert [m.step for m in client.get_metric_history(child.run_id, "train_loss_forces")] == [1, 2]
    assert [m.step for m in client.get_metric_history(child.run_id, "train_forces_mae")] == [1, 2]
    plots = {a.path for a in client.list_artifacts(child.run_id, "plots")}
    assert {"plots/learning_curve.png", "plots/parity_valid.png", "plots/parity_test.png"} <= plots
    assert "model.pt" in {a.path for a in client.list_artifacts(child.run_id)}
    experiment = client.get_experiment_by_name("late").experiment_id
    assert [m.source_run_id for m in client.search_logged_models([experiment])] == [child.run_id]
