"""MLflow tracking: an embedded sqlite store per project by default, and a real ``mlflow server``."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from atomforge import config_from_dict
from atomforge.workflows.train import train

from conftest import tiny_config


def _check_run(client: MlflowClient, experiment: str, epochs: int) -> None:
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["model.backbone"] == "painn"
    assert run.data.params["training.max_epochs"] == str(epochs)
    history = client.get_metric_history(run.info.run_id, "valid_forces_mae")
    assert [m.step for m in history] == list(range(1, epochs + 1))
    assert "test_forces_mae" in run.data.metrics and "test_energy_mae" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model.pt", "config.yaml", "plots"} <= artifacts
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert "plots/parity_test.png" in plots


def test_embedded_default_is_the_projects_sqlite_store(cu_files, tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    raw = tiny_config(cu_files, tmp_path / "run", max_epochs=2)
    raw["tracking"] = {"name": "mlflow", "experiment": "embedded"}
    from atomforge import make_registry

    train(config_from_dict(raw), make_registry(), verbose=False)
    db = tmp_path / "mlflow.db"  # no store or repository above: the folder holding the run
    assert db.exists() and not (tmp_path / "run" / "mlflow.db").exists()
    assert (tmp_path / "mlartifacts").is_dir()
    _check_run(MlflowClient(tracking_uri=f"sqlite:///{db}"), "embedded", 2)


def test_resume_continues_the_same_mlflow_run(cu_files, tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from atomforge import make_registry

    raw = tiny_config(cu_files, tmp_path / "run", max_epochs=1)
    raw["tracking"] = {"name": "mlflow", "experiment": "resumed"}
    train(config_from_dict(raw), make_registry(), verbose=False)
    raw["training"]["max_epochs"] = 3
    train(config_from_dict(raw), make_registry(), resume=True, verbose=False)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("resumed")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "valid_loss")]
    assert steps == [1, 2, 3]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def mlflow_server(tmp_path):
    port = _free_port()
    mlflow = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen(
        [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            assert proc.poll() is None, "mlflow server exited"
            time.sleep(0.3)
    else:
        proc.kill()
        pytest.fail("mlflow server did not start in 90 s")
    yield uri
    proc.terminate()
    proc.wait(timeout=30)


def test_logging_to_a_real_mlflow_server(cu_files, tmp_path, mlflow_server, monkeypatch) -> None:
    from atomforge import make_registry

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    raw = tiny_config(cu_files, tmp_path / "run", max_epochs=2)
    raw["tracking"] = {"name": "mlflow", "experiment": "served"}
    train(config_from_dict(raw), make_registry(), verbose=False)
    assert not (tmp_path / "run" / "mlflow.db").exists() and not (tmp_path / "mlflow.db").exists()
    _check_run(MlflowClient(tracking_uri=mlflow_server), "served", 2)
