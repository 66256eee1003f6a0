"""The learning curve of one training run: losses and errors against the epoch, as a PNG.

Two panels on log scales: the total and per-term losses (train solid, valid dashed) and the
MAE of each quantity (the running train-set estimate against the validation set), so a reader
sees at a glance whether a term stalls, whether the model over-fits, and how far it got.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .plots import pyplot, save_figure

__all__ = ["learning_curve_plot"]

_ERRORS = (("energy_mae", "energy (meV/atom)"), ("forces_mae", "forces (meV/Å)"), ("stress_mae", "stress (meV/Å³)"))


def _rows(history: Sequence[Any]) -> list[Mapping[str, Any]]:
    """Epoch records (the loop's dataclasses, or their dicts as checkpointed) as dicts."""
    return [dataclasses.asdict(r) if dataclasses.is_dataclass(r) else dict(r) for r in history]


def _series(rows: Sequence[Mapping[str, Any]], group: str | None, key: str) -> np.ndarray:
    values = [(row.get(group) or {}).get(key) if group else row.get(key) for row in rows]
    return np.array([np.nan if v is None else float(v) for v in values])


def _plot(ax: Any, epochs: np.ndarray, values: np.ndarray, **style: Any) -> None:
    positive = np.isfinite(values) & (values > 0)  # a log axis shows positive values only
    if positive.any():
        ax.plot(epochs[positive], values[positive], **style)


def learning_curve_plot(history: Sequence[Any], path: Path | str, *, title: str = "") -> Path:
    """Losses (total and per term) and MAEs (train running estimate, valid) per epoch."""
    rows = _rows(history)
    plt = pyplot()
    fig, (losses, errors) = plt.subplots(1, 2, figsize=(10.0, 4.0))
    epochs = np.array([int(row["epoch"]) for row in rows])
    _plot(losses, epochs, _series(rows, None, "train_loss"), color="k", label="train (total)")
    _plot(losses, epochs, _series(rows, None, "valid_loss"), color="k", ls="--", label="valid (total)")
    terms = sorted({t for row in rows for t in (row.get("train_terms") or {})}
                   | {t for row in rows for t in (row.get("valid_terms") or {})})
    for k, term in enumerate(terms):
        color = f"C{k % 10}"
        _plot(losses, epochs, _series(rows, "train_terms", term), color=color, lw=1, label=f"train {term}")
        _plot(losses, epochs, _series(rows, "valid_terms", term), color=color, lw=1, ls="--", label=f"valid {term}")
    for k, (key, label) in enumerate(_ERRORS):
        color = f"C{k % 10}"
        _plot(errors, epochs, _series(rows, "train_errors", key), color=color, label=f"train {label}")
        _plot(errors, epochs, _series(rows, "valid_metrics", key), color=color, ls="--", label=f"valid {label}")
    from matplotlib.ticker import MaxNLocator

    for ax, ylabel in ((losses, "loss (terms unweighted)"), (errors, "MAE")):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        if ax.lines:
            ax.set_yscale("log")
            ax.legend(fontsize=7)
    losses.set_title(f"{title} losses".strip())
    errors.set_title(f"{title} errors (train: running estimate)".strip())
    return save_figure(fig, path, dpi=100)
