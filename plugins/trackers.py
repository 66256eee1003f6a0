"""Built-in trackers: ``mlflow`` (default; local sqlite store in the run directory unless
``MLFLOW_TRACKING_URI`` or ``tracking_uri`` is set) and ``none``."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Mapping

from atomforge import TrackerSpec, hookimpl

_PARAM_LIMIT = 6000  # characters MLflow keeps of a param value
_BATCH = 100  # entries per log_batch call


class NoTracker:
    """Tracks nothing (``tracking: none``)."""

    run_id: str | None = None

    def __init__(self, *, run_dir: Path | None = None, **_: Any) -> None:
        self.run_dir = run_dir

    def start(self, *, run_name: str, resume_run_id: str | None = None,
              tags: Mapping[str, str] | None = None) -> None:
        return None

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None: ...

    def child(self, run_name: str) -> "NoTracker":
        return NoTracker(run_dir=self.run_dir)

    def end(self, status: str = "FINISHED") -> None: ...

    def describe(self) -> str:
        return "not tracked (tracking: none)"


class MlflowTracker:
    """Logs through an ``MlflowClient`` (no global active run), so runs can nest and resume."""

    def __init__(self, *, run_dir: Path, experiment: str = "atomforge", tracking_uri: str | None = None,
                 artifact_location: str | None = None, parent_run_id: str | None = None,
                 _client: Any = None) -> None:
        from mlflow.tracking import MlflowClient

        run_dir = Path(run_dir).resolve()
        self.uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{run_dir / 'mlflow.db'}"
        # local stores (sqlite/file) keep artifacts in the run dir instead of ./mlruns of the cwd
        self.local_store = self.uri.startswith(("sqlite:", "file:", "/"))
        self.artifact_location = artifact_location or (
            (run_dir / "mlartifacts").as_uri() if self.local_store else None
        )
        self.experiment = experiment
        self.parent_run_id = parent_run_id
        self.run_dir = run_dir
        if _client is None:
            run_dir.mkdir(parents=True, exist_ok=True)
        self.client = _client or MlflowClient(tracking_uri=self.uri)
        self.run_id: str | None = None

    def _experiment_id(self) -> str:
        found = self.client.get_experiment_by_name(self.experiment)
        if found is not None:
            return found.experiment_id
        return self.client.create_experiment(self.experiment, artifact_location=self.artifact_location)

    def start(self, *, run_name: str, resume_run_id: str | None = None,
              tags: Mapping[str, str] | None = None) -> str:
        if resume_run_id is not None:
            self.client.update_run(resume_run_id, status="RUNNING")
            self.run_id = resume_run_id
            return resume_run_id
        all_tags = dict(tags or {})
        if self.parent_run_id:
            all_tags["mlflow.parentRunId"] = self.parent_run_id
        run = self.client.create_run(self._experiment_id(), run_name=run_name, tags=all_tags)
        self.run_id = run.info.run_id
        return self.run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:_PARAM_LIMIT]) for k, v in params.items()]
        for start in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, params=items[start : start + _BATCH])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        for start in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, metrics=items[start : start + _BATCH])

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        self.client.log_dict(self.run_id, dict(data), artifact_file)

    def child(self, run_name: str) -> "MlflowTracker":
        child = MlflowTracker(run_dir=self.run_dir, experiment=self.experiment, tracking_uri=self.uri,
                              artifact_location=self.artifact_location, parent_run_id=self.run_id,
                              _client=self.client)
        child.start(run_name=run_name)
        return child

    def end(self, status: str = "FINISHED") -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status=status)

    def describe(self) -> str:
        return f"MLflow run {self.run_id} in {self.uri} (view: mlflow ui --backend-store-uri {self.uri})"

    def last_step(self, key: str) -> int | None:
        """The largest step logged for ``key`` in this run (``None`` if none)."""
        history = self.client.get_metric_history(self.run_id, key) if self.run_id else []
        return max((m.step for m in history), default=None)


@hookimpl
def register_trackers(register) -> None:  # noqa: ANN001
    register(TrackerSpec("mlflow", MlflowTracker, "MLflow; local sqlite store in the run dir by default"))
    register(TrackerSpec("none", NoTracker, "no tracking"))
