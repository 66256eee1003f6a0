"""The tracker interface (implemented by tracker plugins such as ``mlflow`` and ``none``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Protocol, runtime_checkable

__all__ = ["Tracker", "TrackerCallback", "flatten"]


@runtime_checkable
class Tracker(Protocol):
    """Records one run: params, metrics, artifacts; ``child`` opens a nested run."""

    run_id: str | None

    def start(self, *, run_name: str, resume_run_id: str | None = None,
              tags: Mapping[str, str] | None = None) -> str | None:
        """Open (or reopen) the run; return its id (``None`` if the tracker has none)."""
        ...

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None: ...

    def child(self, run_name: str) -> "Tracker":
        """A tracker for a nested run under this one."""
        ...

    def end(self, status: str = "FINISHED") -> None: ...

    def describe(self) -> str:
        """One line telling the user where to find the run."""
        ...

    # optional, used when present (docs/tracking.md):
    # ``last_step(key) -> int | None``, the largest step logged for ``key`` in the run (a resumed
    #   training run uses it to avoid logging an epoch twice);
    # ``set_tags(tags)``; ``log_model(path)``, the model file in the tracker's own model format;
    # ``nested_options() -> dict``, factory options that open a run nested under this one from
    #   another process (a campaign's training job), and ``child(run_name, run_id=...)``, which
    #   reopens such a run.


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}``; lists become their string form."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


class TrackerCallback:
    """Training-loop callback that logs each epoch's metrics (step = epoch): ``train_loss``,
    ``valid_loss``, ``lr``, ``elapsed_s``, ``valid_<error>``, each loss term as
    ``train_loss_<term>`` and ``valid_loss_<term>`` (unweighted), the running train-set errors
    ``train_<error>`` and the backend's ``train_<measurement>``. Epochs up to ``logged_through``
    (already in a resumed run's tracker) are skipped, so no epoch is logged twice."""

    def __init__(self, tracker: Tracker, *, logged_through: int | None = None) -> None:
        self.tracker = tracker
        self.logged_through = logged_through

    def on_epoch_end(self, trainer: Any, record: Any) -> None:
        if self.logged_through is not None and record.epoch <= self.logged_through:
            return
        metrics = {
            "train_loss": record.train_loss,
            "valid_loss": record.valid_loss,
            "lr": record.lr,
            "elapsed_s": record.elapsed,
            **{f"valid_{k}": v for k, v in record.valid_metrics.items()},
            **{f"train_{k}": v for k, v in getattr(record, "train_metrics", {}).items()},
            **{f"train_loss_{k}": v for k, v in getattr(record, "train_terms", {}).items()},
            **{f"valid_loss_{k}": v for k, v in getattr(record, "valid_terms", {}).items()},
            **{f"train_{k}": v for k, v in getattr(record, "train_errors", {}).items()},
        }
        self.tracker.log_metrics(metrics, step=record.epoch)
