"""Evaluation of a model on labelled structures: errors, and predicted uncertainty against error."""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np
import torch
from ase import Atoms

from ..data.fields import FieldTable
from ..data.graph import GraphDataset, iterate_batches
from ..model.potential import Potential, check_finite_outputs, with_head
from .metrics import ErrorAccumulator, UQAccumulator, config_types_of

__all__ = ["evaluate", "evaluate_uncertainty", "uncertainty_metrics", "as_dataset", "predicted_batches", "model_dtype",
           "model_device"]


def as_dataset(model: torch.nn.Module, structures: Sequence[Atoms] | GraphDataset,
               fields: FieldTable | None = None) -> GraphDataset:
    """``structures`` as graphs with the model's cutoff and dtype (a dataset — in memory or
    streamed from a store — is passed through)."""
    if isinstance(structures, GraphDataset) or hasattr(structures, "graphs"):
        return structures  # type: ignore[return-value]
    return GraphDataset(list(structures), model.cutoff, dtype=model_dtype(model), fields=fields)


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    """The floating dtype of a model's parameters."""
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def model_device(model: torch.nn.Module) -> torch.device:
    """Where a model's parameters are (batches are moved there, once each)."""
    return next(p.device for p in model.parameters())


def predicted_batches(model: torch.nn.Module, dataset: GraphDataset, batch_size: int, *,
                      compute_stress: bool = False,
                      head: str | int | None = None) -> Iterator[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
    """``(batch, outputs)`` for every batch of ``dataset`` (eval mode, on the model's device;
    outputs detached); ``head``: a multi-head model's readout for every structure."""
    model.eval()
    device = model_device(model)
    for start, batch in zip(range(0, len(dataset), batch_size), iterate_batches(dataset, batch_size)):
        if device.type != "cpu":
            batch = {k: v.to(device) for k, v in batch.items()}
        batch = with_head(model, batch, head)
        outputs = model(batch, compute_forces=True, compute_stress=compute_stress)
        check_finite_outputs(outputs, batch, first_index=start)  # structures named by their index in the data
        yield batch, {k: v.detach() for k, v in outputs.items()}


def evaluate(
    model: Potential, structures: Sequence[Atoms] | GraphDataset, *, batch_size: int = 32,
    fields: FieldTable | None = None, head: str | int | None = None,
) -> ErrorAccumulator:
    """Predict every structure (on the model's device) and accumulate errors against the labels
    it carries, also per ``config_type`` when structures have one
    (:meth:`ErrorAccumulator.config_type_table`); ``head`` scores every structure on that head
    of a multi-head model (default: each structure's own fidelity)."""
    dataset = as_dataset(model, structures, fields)
    acc = ErrorAccumulator()
    want_stress = all(bool(np.all(a.pbc)) for a in dataset.structures)
    types = config_types_of(dataset)
    batches = predicted_batches(model, dataset, batch_size, compute_stress=want_stress, head=head)
    for start, (batch, outputs) in zip(range(0, len(dataset), batch_size), batches):
        acc.add(batch, outputs, None if types is None else types[start : start + batch_size])
    return acc


def evaluate_uncertainty(model: torch.nn.Module, structures: Sequence[Atoms] | GraphDataset, *,
                         batch_size: int = 32, fields: FieldTable | None = None) -> UQAccumulator:
    """Predict with a UQ head and accumulate errors against predicted stds."""
    acc = UQAccumulator()
    for batch, outputs in predicted_batches(model, as_dataset(model, structures, fields), batch_size):
        acc.add(batch, outputs)
    return acc


def uncertainty_metrics(model: torch.nn.Module, structures: Any, *, batch_size: int = 32) -> dict[str, float]:
    """``uq_``-prefixed :meth:`UQAccumulator.metrics` of a UQ head on labelled ``ase.Atoms``."""
    metrics = evaluate_uncertainty(model, list(structures), batch_size=batch_size).metrics()
    return {f"uq_{k}": v for k, v in metrics.items()}
