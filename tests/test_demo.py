"""The README's main job, end to end (quick variant): data → train → evaluate → MD → MLflow."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from ase.io import read
from mlflow.tracking import MlflowClient


def test_quick_demo_end_to_end(tmp_path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run([sys.executable, "-m", "atomforge", "demo", "--quick", "--out", str(tmp_path / "demo")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "training" in done.stderr and "MD NVT" in done.stderr  # progress bars
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["test_metrics"]["test_forces_mae"] > 0
    assert len(read(tmp_path / "demo" / "md.extxyz", ":")) >= 4
    store = f"sqlite:///{tmp_path / 'demo' / 'mlflow.db'}"  # the project's store: the folder holding run/
    assert summary["mlflow_ui"] == f"mlflow ui --backend-store-uri {store}"
    client = MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("atomforge-demo").experiment_id
    run = client.search_runs([experiment])[0]
    assert "test_forces_mae" in run.data.metrics and "train_loss_stress" in run.data.metrics
    assert {"model.pt", "plots"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    assert [m.source_run_id for m in client.search_logged_models([experiment])] == [run.info.run_id]
