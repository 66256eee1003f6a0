"""Hessian matching (distillation): the teacher's Hessian rows as batch fields, and the ``hessian``
loss that fits the student's rows to them (docs/distill.md).

Fields: ``hessian_rows`` (per atom, ``[N, R, 3]``) and ``hessian_index`` (per structure, ``[B, R]``
flat coordinate indices local to each structure), read from what
:func:`atomforge.attach_hessian_rows` stored. Both are labels: a structure
without rows is batched with zeros and masked out of the loss, so teacher-labelled structures
with and without Hessians train together.
"""

from __future__ import annotations

import numpy as np
import torch

from atomforge import (HESSIAN_INDEX, HESSIAN_ROWS, ConfigError, FieldSpec, LossSpec, hessian_rows, hookimpl,
                       label_weights, read_hessian_rows)
from atomforge import keys as K


def _read_rows(atoms) -> np.ndarray | None:  # noqa: ANN001
    stored = read_hessian_rows(atoms)
    return None if stored is None else stored[1]


def _read_index(atoms) -> np.ndarray | None:  # noqa: ANN001
    stored = read_hessian_rows(atoms)
    return None if stored is None else stored[0]


class HessianLoss:
    """Mean square error of the student's Hessian rows against the teacher's, per entry, in
    (eV/Å²)², weighted by the structure weight; structures without rows count zero.

    ``rows``: how many of the stored rows to fit per step (a random subset of the R stored, the
    same columns for the whole batch; default all). Cost per step: one extra forward pass with
    position gradients and one double-backward pass per row — with 4 rows roughly 3–5× a plain
    force-matching step.
    """

    requires: tuple[str, ...] = ()  # structures without rows are masked out, not refused
    outputs: tuple[str, ...] = ()

    def __init__(self, *, rows: int | None = None) -> None:
        if rows is not None and int(rows) < 1:
            raise ConfigError(f"hessian loss rows must be ≥ 1 (or null for every stored row); got {rows!r}")
        self.rows = None if rows is None else int(rows)

    def __call__(self, batch, outputs, model) -> torch.Tensor:  # noqa: ANN001
        zero = outputs["energy"].sum() * 0.0
        if HESSIAN_ROWS not in batch or HESSIAN_INDEX not in batch:
            return zero
        target, index = batch[HESSIAN_ROWS], batch[HESSIAN_INDEX]
        if self.rows is not None and self.rows < int(index.shape[1]):
            keep = torch.randperm(int(index.shape[1]))[: self.rows]
            target, index = target[:, keep], index[:, keep]
        weights = label_weights(batch, HESSIAN_ROWS)
        if not bool((weights > 0).any()):
            return zero
        predicted = hessian_rows(model, batch, index, create_graph=model.training and torch.is_grad_enabled())
        w = weights[batch[K.BATCH]].reshape(-1, 1, 1)
        entries = 3 * int(index.shape[1])
        return (w * (predicted - target) ** 2).sum() / (entries * w.sum().clamp_min(torch.finfo(w.dtype).tiny))


@hookimpl
def register_fields(register) -> None:  # noqa: ANN001
    register(FieldSpec(HESSIAN_ROWS, "atom", shape=(-1, 3), label=True, read=_read_rows,
                       description="teacher Hessian rows ∂²E/∂r_i∂r_j, eV/Å² (distillation)"))
    register(FieldSpec(HESSIAN_INDEX, "structure", dtype="long", shape=(-1,), label=True, read=_read_index,
                       description="flat coordinate index (3·atom + axis) of each Hessian row"))


@hookimpl
def register_losses(register) -> None:  # noqa: ANN001
    register(LossSpec("hessian", HessianLoss, "match the teacher's Hessian rows (distillation); rows"))
