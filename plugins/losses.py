"""Built-in loss terms: per-atom energy, forces and stress, each as MSE, MAE or Huber, weighted
per structure (sample weight; zero where a structure lacks the label)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from atomforge import ConfigError, LossSpec, hookimpl, label_weights
from atomforge import keys as K

_KINDS = ("mse", "mae", "huber")


def _elementwise(kind: str, delta: float, pred: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    if kind == "mse":
        return (pred - ref) ** 2
    if kind == "mae":
        return (pred - ref).abs()
    return F.huber_loss(pred, ref, reduction="none", delta=delta)


def _total(weights: torch.Tensor) -> torch.Tensor:
    """Sum of the weights; a batch where no structure carries the label gives 0 / tiny = 0."""
    return weights.sum().clamp_min(torch.finfo(weights.dtype).tiny)


class _LabelLoss:
    """Weighted mean of an elementwise error between a model output and its label."""

    key: str = ""
    requires: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()

    def __init__(self, *, kind: str = "mse", delta: float = 0.01) -> None:
        if kind not in _KINDS:
            raise ConfigError(f"loss kind {kind!r} is not one of {_KINDS}")
        self.kind = kind
        self.delta = float(delta)

    def error(self, batch: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return _elementwise(self.kind, self.delta, outputs[self.key], batch[self.key])


class EnergyLoss(_LabelLoss):
    """Error of the energy per atom (eV/atom), weighted by the structure weight."""

    key = K.ENERGY
    requires = (K.ENERGY,)

    def error(self, batch: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        n = batch[K.N_ATOMS].to(outputs[K.ENERGY].dtype)
        return _elementwise(self.kind, self.delta, outputs[K.ENERGY] / n, batch[K.ENERGY] / n)

    def __call__(self, batch, outputs, model) -> torch.Tensor:  # noqa: ANN001
        w = label_weights(batch, K.ENERGY)
        return (w * self.error(batch, outputs)).sum() / _total(w)


class ForceLoss(_LabelLoss):
    """Error per force component (eV/Å), weighted by the weight of each atom's structure."""

    key = K.FORCES
    requires = (K.FORCES,)
    outputs = (K.FORCES,)

    def __call__(self, batch, outputs, model) -> torch.Tensor:  # noqa: ANN001
        w = label_weights(batch, K.FORCES)[batch[K.BATCH]].unsqueeze(-1)
        return (w * self.error(batch, outputs)).sum() / (3 * _total(w))


class StressLoss(_LabelLoss):
    """Error per stress component (eV/Å³), weighted by the structure weight."""

    key = K.STRESS
    requires = (K.STRESS,)
    outputs = (K.STRESS,)

    def __call__(self, batch, outputs, model) -> torch.Tensor:  # noqa: ANN001
        w = label_weights(batch, K.STRESS).reshape(-1, 1, 1)
        return (w * self.error(batch, outputs)).sum() / (9 * _total(w))


@hookimpl
def register_losses(register) -> None:  # noqa: ANN001
    register(LossSpec("energy", EnergyLoss, "energy per atom; kind: mse|mae|huber, delta"))
    register(LossSpec("forces", ForceLoss, "force components; kind: mse|mae|huber, delta"))
    register(LossSpec("stress", StressLoss, "stress components; kind: mse|mae|huber, delta"))
