"""Built-in trackers: ``mlflow`` (default) and ``none``.

Where ``mlflow`` writes (the first that is set): the ``tracking_uri`` option, the
``MLFLOW_TRACKING_URI`` environment variable, or else the **project store**
``sqlite:///<project>/mlflow.db`` with artifacts in ``<project>/mlartifacts``, where
``<project>`` is found from the run's output folder by :func:`project_dir`. Every run of one
project, trainings and campaigns alike, lands in one store, so one ``mlflow ui`` compares them.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Mapping

from atomforge import TrackerSpec, hookimpl

_PARAM_LIMIT = 6000  # characters MLflow keeps of a param value
_BATCH = 100  # entries per log_batch call
STORE_FILE = "mlflow.db"  # the project store's file (MLflow's own default name in the working directory)
ARTIFACTS_DIR = "mlartifacts"  # beside it: artifacts of the experiments the store creates
PROJECT_MARKERS = (STORE_FILE, ".git")  # a folder holding one of these is a project's root

log = logging.getLogger("atomforge.tracking")


def project_dir(run_dir: Path) -> Path:
    """The project a run folder belongs to: the nearest folder, from ``run_dir`` itself upwards,
    that holds an MLflow store (``mlflow.db``) or is a repository root (``.git``); else the
    folder holding ``run_dir``. Derived from the output path alone, so a run lands in the same
    store whatever the working directory, and ``runs/a`` and ``runs/b`` share one store."""
    run_dir = Path(run_dir).resolve()
    for folder in (run_dir, *run_dir.parents):
        if any((folder / marker).exists() for marker in PROJECT_MARKERS):
            return folder
    return run_dir.parent


def default_tracking_uri(run_dir: Path) -> str:
    """``sqlite:///<project>/mlflow.db`` of :func:`project_dir`."""
    return f"sqlite:///{project_dir(run_dir) / STORE_FILE}"


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

    def set_tags(self, tags: Mapping[str, Any]) -> None: ...

    def log_model(self, path: Path) -> None:
        return None

    def nested_options(self) -> dict[str, Any]:
        return {}

    def child(self, run_name: str, *, run_id: str | None = None) -> "NoTracker":
        return NoTracker(run_dir=self.run_dir)

    def end(self, status: str = "FINISHED") -> None: ...

    def describe(self) -> str:
        return "not tracked (tracking: none)"

    def ui_command(self) -> None:
        return None


class MlflowTracker:
    """Logs through an ``MlflowClient`` (no global active run), so runs can nest and resume.

    Options (the ``tracking`` block's other keys): ``tracking_uri``, ``artifact_location`` (for a
    new experiment), ``register_model`` (register every logged model under this name in the
    model registry), ``parent_run_id`` (open the run nested under another one; what a campaign
    hands its training jobs)."""

    def __init__(self, *, run_dir: Path, experiment: str = "atomforge", tracking_uri: str | None = None,
                 artifact_location: str | None = None, parent_run_id: str | None = None,
                 register_model: str | None = None, _client: Any = None) -> None:
        from mlflow.tracking import MlflowClient

        run_dir = Path(run_dir).resolve()
        self.uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(run_dir)
        # a sqlite store keeps artifacts beside it (<project>/mlartifacts), not in ./mlruns of the cwd;
        # a file store keeps them inside itself, a server where it was told to
        self.local_store = self.uri.startswith("sqlite:")
        self.artifact_location = artifact_location or (
            (_store_folder(self.uri) / ARTIFACTS_DIR).as_uri() if self.local_store else None
        )
        self.experiment = experiment
        self.parent_run_id = parent_run_id
        self.register_model = register_model
        self.run_dir = run_dir
        if _client is None and self.local_store:
            _store_folder(self.uri).mkdir(parents=True, exist_ok=True)
        self.client = _client or MlflowClient(tracking_uri=self.uri)
        self.run_id: str | None = None

    def _experiment_id(self) -> str:
        found = self.client.get_experiment_by_name(self.experiment)
        if found is not None:
            return found.experiment_id
        return self.client.create_experiment(self.experiment, artifact_location=self.artifact_location)

    def start(self, *, run_name: str, resume_run_id: str | None = None,
              tags: Mapping[str, str] | None = None) -> str:
        """Open a new run, or reopen ``resume_run_id``; a run id this store does not hold (the
        store moved, or ``tracking_uri`` changed on ``--resume``) starts a new run, with a warning."""
        if resume_run_id is not None and self._holds(resume_run_id):
            self.client.update_run(resume_run_id, status="RUNNING")
            self.run_id = resume_run_id
            return resume_run_id
        if resume_run_id is not None:
            log.warning("MLflow run %s is not in %s; starting a new run", resume_run_id, self.uri)
        all_tags = dict(tags or {})
        if self.parent_run_id:
            all_tags["mlflow.parentRunId"] = self.parent_run_id
        run = self.client.create_run(self._experiment_id(), run_name=run_name, tags=all_tags)
        self.run_id = run.info.run_id
        return self.run_id

    def _holds(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_run(run_id)
        except MlflowException:
            return False
        return True

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

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def log_model(self, path: Path) -> str:
        """Log the model file ``path`` as an MLflow model of this run (``pyfunc`` flavour:
        ``mlflow.pyfunc.load_model(uri).predict(frame)`` gives energies, forces and stress; see
        ``plugins/_mlflow_model.py``), registered as ``register_model`` if set; returns its URI."""
        from ._mlflow_model import log_pyfunc_model

        info = log_pyfunc_model(self.client, self.uri, self.run_id, Path(path), registered_model_name=self.register_model)
        return info.model_uri

    def nested_options(self) -> dict[str, Any]:
        """The factory options that open a run nested under this one from another process (a
        campaign's training job): same store, experiment and registry name."""
        return {"experiment": self.experiment, "tracking_uri": self.uri, "artifact_location": self.artifact_location,
                "parent_run_id": self.run_id, "register_model": self.register_model}

    def child(self, run_name: str, *, run_id: str | None = None) -> "MlflowTracker":
        """A nested run under this one, named ``run_name``; ``run_id``: reopen that run instead
        (one a training job created with :meth:`nested_options`)."""
        child = MlflowTracker(run_dir=self.run_dir, experiment=self.experiment, tracking_uri=self.uri,
                              artifact_location=self.artifact_location, parent_run_id=self.run_id,
                              register_model=self.register_model, _client=self.client)
        child.start(run_name=run_name, resume_run_id=run_id)
        return child

    def end(self, status: str = "FINISHED") -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status=status)

    def describe(self) -> str:
        return f"MLflow run {self.run_id} in {self.uri} (view: {self.ui_command()})"

    def ui_command(self) -> str:
        """The command that opens this store in MLflow's UI."""
        return f"mlflow ui --backend-store-uri {self.uri}"

    def last_step(self, key: str) -> int | None:
        """The largest step logged for ``key`` in this run (``None`` if none)."""
        history = self.client.get_metric_history(self.run_id, key) if self.run_id else []
        return max((m.step for m in history), default=None)


def _store_folder(uri: str) -> Path:
    """The folder holding a sqlite store's file (``sqlite:////a/b/mlflow.db`` → ``/a/b``)."""
    return Path(uri.split(":///", 1)[1]).resolve().parent


@hookimpl
def register_trackers(register) -> None:  # noqa: ANN001
    register(TrackerSpec("mlflow", MlflowTracker, "MLflow; by default one sqlite store per project (mlflow.db)"))
    register(TrackerSpec("none", NoTracker, "no tracking"))
