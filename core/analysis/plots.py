"""Plots (PNG, matplotlib's Agg backend, set up in one place): parity plots of predictions
against labels, calibration curves and error against predicted uncertainty."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .metrics import TINY, ErrorAccumulator, UQAccumulator, calibration_curve, spearman

__all__ = ["pyplot", "save_figure", "parity_plot", "calibration_plot", "error_vs_uncertainty_plot"]


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend (files only, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path | str, *, dpi: int = 110) -> Path:
    """Lay out, save and close ``fig``; returns the path."""
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


def parity_plot(acc: ErrorAccumulator, path: Path | str, *, title: str = "") -> Path:
    """Predicted vs reference energy per atom, force and stress components, as a PNG."""
    plt = pyplot()
    panels = [(n, u) for n, u in (("energy_per_atom", "eV/atom"), ("forces", "eV/Å"),
                                   ("stress", "eV/Å³")) if n in acc.pairs]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.0), squeeze=False)
    for ax, (name, unit) in zip(axes[0], panels):
        pred, ref = acc.arrays(name)
        lo, hi = float(min(pred.min(), ref.min())), float(max(pred.max(), ref.max()))
        ax.plot([lo, hi], [lo, hi], color="grey", lw=1)
        ax.scatter(ref, pred, s=3, alpha=0.5)
        mae = np.abs(pred - ref).mean() * 1000
        ax.set_title(f"{name}  MAE {mae:.2f} m{unit}")
        ax.set_xlabel(f"reference ({unit})")
        ax.set_ylabel(f"predicted ({unit})")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def _quantities(acc: UQAccumulator) -> list[tuple[str, str]]:
    return [(q, u) for q, u in (("energy", "eV"), ("forces", "eV/Å")) if f"{q}_error" in acc.parts]


def calibration_plot(acc: UQAccumulator, path: Path | str, *, title: str = "") -> Path:
    """Observed vs expected fraction of errors inside the Gaussian interval (diagonal = calibrated)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.4, 4.2))
    ax.plot([0, 1], [0, 1], color="grey", lw=1)
    for quantity, _ in _quantities(acc):
        expected, observed = calibration_curve(*acc.pairs(quantity))
        area = float(np.trapezoid(np.abs(observed - expected), expected))
        ax.plot(expected, observed, label=f"{quantity} (area {area:.3f})")
    ax.set_xlabel("expected fraction inside interval")
    ax.set_ylabel("observed fraction")
    ax.legend()
    ax.set_title(title or "calibration")
    return save_figure(fig, path)


def error_vs_uncertainty_plot(acc: UQAccumulator, path: Path | str, *, title: str = "") -> Path:
    """Actual error against predicted std (log-log): per structure for energy, per atom for forces."""
    plt = pyplot()
    panels = _quantities(acc)
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(4.4 * max(len(panels), 1), 4.2), squeeze=False)
    for ax, (quantity, unit) in zip(axes[0], panels):
        if quantity == "energy":
            errors, stds = acc.pairs("energy")
        else:
            stds = acc.array("forces_std")
            errors = np.sqrt((acc.array("forces_error") ** 2).mean(-1))
        errors, stds = np.abs(errors) + TINY, stds + TINY
        ax.scatter(stds, errors, s=3, alpha=0.4)
        lo, hi = float(min(stds.min(), errors.min())), float(max(stds.max(), errors.max()))
        ax.plot([lo, hi], [lo, hi], color="grey", lw=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"predicted std ({unit})")
        ax.set_ylabel(f"|error| ({unit})")
        ax.set_title(f"{quantity}  ρ={spearman(stds, errors):.2f}")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)
