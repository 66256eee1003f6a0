"""What the training loop measures besides the total loss: each loss term's mean on the training
and validation data, and a running estimate of the training-set errors.

Train-set errors are a *running* estimate: each training batch's predictions (the forward pass the
optimiser step needs anyway, so they cost nothing extra) are compared with its labels as the
batch is trained on, with the weights of that moment and on augmented batches. They lag behind
the end-of-epoch weights and are not the EMA weights' errors, so compare them with the
validation errors for trends (over-fitting: train errors falling while valid errors rise), not
digit by digit. Units as everywhere: meV/atom, meV/Å, meV/Å³.

Only sums travel between processes (one ``gather`` per epoch), never per-atom arrays.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping

import torch

from ..analysis.metrics import ErrorAccumulator

__all__ = ["EpochMeter", "metric_name"]

#: ErrorAccumulator quantity → the metric prefix (energy per atom is reported as ``energy``)
_QUANTITIES = {"energy_per_atom": "energy", "forces": "forces", "stress": "stress"}
_NOT_ALLOWED = re.compile(r"[^0-9A-Za-z_\-. /]")  # MLflow accepts these characters in metric names


def metric_name(term: str) -> str:
    """A loss term's name as a metric name (``forces[dft]`` → ``forces.dft``): trackers such as
    MLflow accept only letters, digits and ``_-. /``."""
    return _NOT_ALLOWED.sub(".", term).strip(".") or "term"


class EpochMeter:
    """Accumulates one epoch's per-term losses (train and valid) and running train errors.

    The loop calls :meth:`reset` at the start of an epoch (or :meth:`load_state` when it
    continues one from a mid-epoch checkpoint), :meth:`add_train` for every training
    micro-batch, :meth:`add_valid` for every validation batch, and :meth:`summary` once at
    the end (collective)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.train_terms: dict[str, list[float]] = {}  # term → [sum over micro-batches, count]
        self.valid_terms: dict[str, list[float]] = {}  # term → [sum of value × structures, structures]
        self.errors: dict[str, list[float]] = {}  # quantity → [Σ|error|, Σerror², values]

    def add_train(self, batch: Mapping[str, torch.Tensor], outputs: Mapping[str, torch.Tensor],
                  terms: Mapping[str, float]) -> None:
        """One training micro-batch: its loss terms and its prediction errors."""
        for name, value in terms.items():
            entry = self.train_terms.setdefault(name, [0.0, 0.0])
            entry[0], entry[1] = entry[0] + float(value), entry[1] + 1
        acc = ErrorAccumulator()
        acc.add(dict(batch), {k: v.detach() for k, v in outputs.items()})
        for quantity in _QUANTITIES:
            if quantity not in acc.pairs:
                continue
            pred, ref = acc.arrays(quantity)
            error = (pred - ref) * 1000.0
            entry = self.errors.setdefault(quantity, [0.0, 0.0, 0.0])
            entry[0] += float(abs(error).sum())
            entry[1] += float((error**2).sum())
            entry[2] += float(error.size)

    def add_valid(self, terms: Mapping[str, float], structures: int) -> None:
        """One validation batch of ``structures`` structures (weighted like ``valid_loss``)."""
        for name, value in terms.items():
            entry = self.valid_terms.setdefault(name, [0.0, 0.0])
            entry[0], entry[1] = entry[0] + float(value) * structures, entry[1] + structures

    # -- checkpointing (a mid-epoch checkpoint keeps the epoch's running sums) --------------------
    def state(self) -> dict[str, Any]:
        return {"train_terms": self.train_terms, "errors": self.errors}

    def load_state(self, state: Mapping[str, Any] | None) -> None:
        self.reset()
        if state:
            self.train_terms = {k: list(v) for k, v in state.get("train_terms", {}).items()}
            self.errors = {k: list(v) for k, v in state.get("errors", {}).items()}

    def summary(self, backend: Any) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
        """``(train terms, valid terms, train errors)`` over every process (collective): the
        mean of each term (train: per micro-batch, like ``train_loss``; valid: per structure,
        like ``valid_loss``), and ``<quantity>_mae`` / ``<quantity>_rmse`` of the errors."""
        train_terms: dict[str, list[float]] = {}
        valid_terms: dict[str, list[float]] = {}
        errors: dict[str, list[float]] = {}
        for mine in backend.gather((self.train_terms, self.valid_terms, self.errors)):
            for merged, part in zip((train_terms, valid_terms, errors), mine):
                for name, sums in part.items():
                    merged[name] = [a + b for a, b in zip(merged.get(name, [0.0] * len(sums)), sums)]
        mean = lambda table: {metric_name(k): s / n for k, (s, n) in table.items() if n > 0}  # noqa: E731
        out_errors: dict[str, float] = {}
        for quantity, (abs_sum, sq_sum, n) in errors.items():
            if n > 0:
                out_errors[f"{_QUANTITIES[quantity]}_mae"] = abs_sum / n
                out_errors[f"{_QUANTITIES[quantity]}_rmse"] = math.sqrt(sq_sum / n)
        return mean(train_terms), mean(valid_terms), out_errors
