"""Evaluation of a model on labelled structures, and parity plots."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from ase import Atoms

from .graph import GraphDataset, iterate_batches
from .metrics import ErrorAccumulator
from .potential import Potential

__all__ = ["evaluate", "parity_plot"]


def evaluate(
    model: Potential, structures: Sequence[Atoms] | GraphDataset, *, batch_size: int = 32
) -> ErrorAccumulator:
    """Predict every structure and accumulate errors against the labels it carries."""
    dataset = structures if isinstance(structures, GraphDataset) else GraphDataset(
        structures, model.cutoff, dtype=_dtype(model)
    )
    model.eval()
    acc = ErrorAccumulator()
    want_stress = all(bool(np.all(a.pbc)) for a in dataset.structures)
    for batch in iterate_batches(dataset, batch_size):
        outputs = model(batch, compute_forces=True, compute_stress=want_stress)
        acc.add(batch, {k: v.detach() for k, v in outputs.items()})
    return acc


def _dtype(model: torch.nn.Module) -> torch.dtype:
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def parity_plot(acc: ErrorAccumulator, path: Path | str, *, title: str = "") -> Path:
    """Predicted vs reference energy per atom and force components, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
