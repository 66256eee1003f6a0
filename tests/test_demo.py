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
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'demo' / 'run' / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("atomforge-demo").experiment_id])[0]
    assert "test_forces_mae" in run.data.metrics
    assert {"model.pt", "plots"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    assert summary["mlflow_ui"].startswith("mlflow ui --backend-store-uri sqlite:///")
