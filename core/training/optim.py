"""Optimiser and learning-rate schedules used by the training loop."""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch

__all__ = ["make_optimizer", "make_scheduler", "TimeCosineLR", "SCHEDULERS"]

SCHEDULERS = ("plateau", "cosine", "cosine_time", "exponential", "none")


def make_optimizer(
    model: torch.nn.Module, *, lr: float, weight_decay: float = 0.0, amsgrad: bool = True,
    lrs: Mapping[str, float | None] | None = None,
) -> torch.optim.Optimizer:
    """AdamW without weight decay on biases, norms and embeddings. ``lrs`` (parameter name →
    learning rate, ``None`` for ``lr``; see :func:`atomforge.model.finetune.parameter_lrs`)
    gives parameter groups their own rates; parameters missing from it are not trained."""
    groups: dict[tuple[float, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad or (lrs is not None and name not in lrs):
            continue
        rate = lr if lrs is None or lrs[name] is None else float(lrs[name])  # type: ignore[arg-type]
        groups.setdefault((rate, param.ndim <= 1 or "embedding" in name), []).append(param)
    ordered = sorted(groups.items(), key=lambda item: (item[0][0] != lr, item[0][0], item[0][1]))
    return torch.optim.AdamW([{"params": params, "lr": rate, "weight_decay": 0.0 if no_decay else weight_decay}
                              for (rate, no_decay), params in ordered], lr=lr, amsgrad=amsgrad)


class TimeCosineLR:
    """Cosine decay of the LR over the wall-clock budget ``max_time`` (for fixed-time training).

    ``update_time(elapsed)`` sets ``lr = min_lr + (base - min_lr) * (1 + cos(pi * elapsed / max_time)) / 2``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, max_time: float, min_lr: float) -> None:
        self.optimizer = optimizer
        self.max_time = float(max_time)
        self.min_lr = float(min_lr)
        self.base_lrs = [float(g["lr"]) for g in optimizer.param_groups]

    def update_time(self, elapsed: float) -> None:
        progress = min(1.0, max(0.0, elapsed / self.max_time))
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = self.min_lr + (base - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def state_dict(self) -> dict[str, Any]:
        return {"base_lrs": self.base_lrs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.base_lrs = list(state["base_lrs"])


def make_scheduler(
    optimizer: torch.optim.Optimizer, name: str, *, max_epochs: int, factor: float = 0.5,
    patience: int = 10, min_lr: float = 1e-6, gamma: float = 0.99, max_time: float | None = None,
) -> Any:
    """``plateau`` (on the validation loss), ``cosine`` (over ``max_epochs``), ``cosine_time``
    (over the ``max_time`` budget, updated every step), ``exponential`` (``gamma`` per epoch) or
    ``none``."""
    if name == "cosine_time":
        if not max_time:
            raise ValueError("scheduler cosine_time needs training.max_time")
        return TimeCosineLR(optimizer, max_time=max_time, min_lr=min_lr)
    if name == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, factor=factor, patience=patience, min_lr=min_lr
        )
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max_epochs, eta_min=min_lr)
    if name == "exponential":
        return torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=gamma)
    if name == "none":
        return None
    raise ValueError(f"unknown scheduler {name!r}; valid: plateau, cosine, exponential, none")
