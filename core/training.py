"""The single-process training engine and its callbacks.

The engine is deliberately small: the model, the loss, the optimiser, the LR scheduler and the
callbacks are injected; it only runs epochs, keeps EMA weights, clips gradients, validates,
stops (``max_epochs``, ``max_time``, early stopping) and checkpoints atomically each epoch so
that a resumed run continues exactly where the killed one left off. Engines are plugins
(:func:`atomforge.hookspecs.register_engines`); a sharded engine (DeepSpeed) implements the same
:class:`Engine` protocol.
"""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch
from torch.optim.swa_utils import AveragedModel

from . import keys as K
from .graph import GraphDataset, iterate_batches
from .losses import CompositeLoss
from .metrics import ErrorAccumulator

__all__ = [
    "TrainSettings",
    "EpochRecord",
    "TrainResult",
    "Callback",
    "Engine",
    "TorchEngine",
    "atomic_save",
    "make_optimizer",
    "make_scheduler",
]


@dataclass(frozen=True)
class TrainSettings:
    """What the engine needs to know besides the injected objects."""

    max_epochs: int = 100  # hard limit on epochs
    max_time: float | None = None  # wall-clock limit in seconds (accumulated across resumes)
    batch_size: int = 8  # structures per training step
    valid_batch_size: int = 32  # structures per validation step
    seed: int = 0  # seeds initialisation and the shuffling of each epoch
    grad_clip: float | None = 10.0  # max gradient norm; None disables clipping
    ema_decay: float | None = 0.99  # EMA of weights used for validation and export; None = off
    patience: int | None = None  # early stopping after this many epochs without improvement
    compute_stress: bool = False  # whether the loss needs stress


@dataclass(frozen=True)
class EpochRecord:
    """Metrics of one finished epoch."""

    epoch: int
    lr: float
    train_loss: float
    valid_loss: float
    valid_metrics: dict[str, float]
    elapsed: float
    steps: int
    train_metrics: dict[str, float] = field(default_factory=dict)  # engine extras, e.g. load_imbalance


@dataclass
class TrainResult:
    """Outcome of :meth:`Engine.fit`."""

    epochs: int
    best_epoch: int
    best_valid_loss: float
    stopped_because: str
    elapsed: float
    history: list[EpochRecord] = field(default_factory=list)


class Callback(Protocol):
    """Hooks called by an engine; every method is optional (``on_epoch_end``, ``on_train_end``)."""

    def on_epoch_end(self, engine: "TorchEngine", record: EpochRecord) -> None: ...

    def on_train_end(self, engine: "TorchEngine", result: TrainResult) -> None: ...


class Engine(Protocol):
    """What every training engine provides."""

    model: torch.nn.Module

    def fit(self, train: GraphDataset, valid: GraphDataset, *, resume: bool = False) -> TrainResult:
        """Train; with ``resume`` continue from the engine's last checkpoint if there is one."""
        ...

    def export_model(self) -> torch.nn.Module:
        """The model to deploy (best EMA weights), on CPU."""
        ...


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def warmup_ema(decay: float) -> Callable[[list[torch.Tensor], list[torch.Tensor], Any], None]:
    """EMA update with the usual warm-up: the decay is ``min(decay, (1 + n) / (10 + n))`` after
    ``n`` updates, so the average does not lag far behind a young model."""

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: Any) -> None:
        n = float(num_averaged)
        d = min(decay, (1.0 + n) / (10.0 + n))
        floats = [(a, c) for a, c in zip(averaged, current) if a.is_floating_point()]
        if floats:
            torch._foreach_lerp_([a for a, _ in floats], [c for _, c in floats], 1.0 - d)
        for a, c in zip(averaged, current):
            if not a.is_floating_point():
                a.copy_(c)

    return update


def make_optimizer(
    model: torch.nn.Module, *, lr: float, weight_decay: float = 0.0, amsgrad: bool = True
) -> torch.optim.Optimizer:
    """AdamW without weight decay on biases, norms and embeddings."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or "embedding" in name else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, amsgrad=amsgrad)


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


_AUGMENT_SEED = 7_919_000_003  # offsets the augmentation generator's seed from the shuffling one


class TorchEngine:
    """Single-process engine: one optimiser step per batch, EMA, validation, checkpoints."""

    def __init__(
        self,
        *,
        model: torch.nn.Module,
        loss: CompositeLoss,
        optimizer: torch.optim.Optimizer,
        settings: TrainSettings,
        scheduler: Any = None,
        callbacks: Sequence[Any] = (),
        checkpoint_path: Path | None = None,
    ) -> None:
        self.model = model
        self.loss = loss
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.settings = settings
        self.callbacks = list(callbacks)
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path else None
        self.ema = (
            AveragedModel(model, multi_avg_fn=warmup_ema(settings.ema_decay), use_buffers=True)
            if settings.ema_decay
            else None
        )
        self.epoch = 0
        self.elapsed = 0.0
        self.best_valid_loss = math.inf
        self.best_epoch = 0
        self.best_state: dict[str, torch.Tensor] | None = None
        self.bad_epochs = 0
        self.history: list[EpochRecord] = []
        self.extra_state: dict[str, Any] = {}  # callbacks may keep resumable state here
        self.epoch_train_metrics: dict[str, float] = {}  # engine extras of the last epoch

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue training exactly (weights-only serialisable)."""
        return {
            "epoch": self.epoch,
            "elapsed": self.elapsed,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "best_valid_loss": self.best_valid_loss,
            "best_epoch": self.best_epoch,
            "best_state": self.best_state,
            "bad_epochs": self.bad_epochs,
            "history": [asdict(r) for r in self.history],
            "rng": torch.get_rng_state(),
            "extra": self.extra_state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`."""
        self.model.load_state_dict(state["model"])
        if self.ema and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.epoch = int(state["epoch"])
        self.elapsed = float(state["elapsed"])
        self.best_valid_loss = float(state["best_valid_loss"])
        self.best_epoch = int(state["best_epoch"])
        self.best_state = state["best_state"]
        self.bad_epochs = int(state["bad_epochs"])
        self.history = [EpochRecord(**r) for r in state["history"]]
        torch.set_rng_state(state["rng"])
        self.extra_state = dict(state.get("extra") or {})

    def _save_checkpoint(self) -> None:
        if self.checkpoint_path is not None:
            atomic_save(self.state_dict(), self.checkpoint_path)

    def try_resume(self) -> bool:
        """Load the last checkpoint if one exists; return whether it did."""
        if self.checkpoint_path is None or not self.checkpoint_path.exists():
            return False
        self.load_state_dict(torch.load(self.checkpoint_path, weights_only=True))
        return True

    # -- training -------------------------------------------------------------------------------
    @property
    def eval_model(self) -> torch.nn.Module:
        """The weights used for validation and export: EMA if enabled."""
        return self.ema.module if self.ema else self.model

    def _out_of_time(self, started: float) -> bool:
        limit = self.settings.max_time
        return limit is not None and self.elapsed + (time.perf_counter() - started) >= limit

    def _train_epoch(self, train: GraphDataset, started: float) -> tuple[float, int, bool]:
        self.model.train()
        generator = torch.Generator().manual_seed(self.settings.seed * 100_003 + self.epoch)
        augment_generator = torch.Generator().manual_seed(self.settings.seed * 100_003 + self.epoch + _AUGMENT_SEED)
        total, steps, timed_out = 0.0, 0, False
        want_stress = self.settings.compute_stress
        for batch in iterate_batches(train, self.settings.batch_size, shuffle=True, generator=generator):
            batch = self.loss.augment(batch, augment_generator)  # data augmentation, training only
            outputs = self.model(batch, compute_forces=K.FORCES in self.loss.outputs,
                                 compute_stress=want_stress)
            loss, _ = self.loss(batch, outputs, self.model)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.settings.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.grad_clip)
            self.optimizer.step()
            if hasattr(self.scheduler, "update_time"):
                self.scheduler.update_time(self.elapsed + time.perf_counter() - started)
            if self.ema:
                self.ema.update_parameters(self.model)
            total += float(loss.detach())
            steps += 1
            if self._out_of_time(started):
                timed_out = True
                break
        return total / max(steps, 1), steps, timed_out

    def validate(self, valid: GraphDataset) -> tuple[float, dict[str, float]]:
        """Loss and error metrics of the EMA (or plain) model on ``valid``."""
        model = self.eval_model
        model.eval()
        acc = ErrorAccumulator()
        total, count = 0.0, 0
        for batch in iterate_batches(valid, self.settings.valid_batch_size):
            outputs = model(batch, compute_forces=True, compute_stress=self.settings.compute_stress)
            loss, _ = self.loss(batch, outputs, model)
            n = int(batch[K.N_ATOMS].shape[0])
            total += float(loss.detach()) * n
            count += n
            acc.add(batch, {k: v.detach() for k, v in outputs.items()})
        return total / count, acc.metrics()

    def _step_scheduler(self, valid_loss: float) -> None:
        if self.scheduler is None or hasattr(self.scheduler, "update_time"):
            return
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(valid_loss)
        else:
            self.scheduler.step()

    def _update_best(self, valid_loss: float) -> None:
        if valid_loss < self.best_valid_loss:
            self.best_valid_loss = valid_loss
            self.best_epoch = self.epoch
            self.best_state = {k: v.detach().clone() for k, v in self.eval_model.state_dict().items()}
            self.bad_epochs = 0
        else:
            self.bad_epochs += 1

    def _stop_reason(self, timed_out: bool) -> str | None:
        s = self.settings
        if timed_out or (s.max_time is not None and self.elapsed >= s.max_time):
            return "max_time"
        if self.epoch >= s.max_epochs:
            return "max_epochs"
        if s.patience is not None and self.bad_epochs >= s.patience:
            return "early_stopping"
        return None

    def fit(self, train: GraphDataset, valid: GraphDataset, *, resume: bool = False) -> TrainResult:
        """Train until a stop criterion; checkpoint after every epoch."""
        if not (resume and self.try_resume()):
            torch.manual_seed(self.settings.seed)
        reason = self._stop_reason(False)
        while reason is None:
            started = time.perf_counter()
            train_loss, steps, timed_out = self._train_epoch(train, started)
            valid_loss, metrics = self.validate(valid)
            self.epoch += 1
            self.elapsed += time.perf_counter() - started
            lr = float(self.optimizer.param_groups[0]["lr"])
            self._step_scheduler(valid_loss)
            self._update_best(valid_loss)
            record = EpochRecord(self.epoch, lr, train_loss, valid_loss, metrics, self.elapsed, steps,
                                 dict(self.epoch_train_metrics))
            self.history.append(record)
            for callback in self.callbacks:
                if hasattr(callback, "on_epoch_end"):
                    callback.on_epoch_end(self, record)
            self._save_checkpoint()
            reason = self._stop_reason(timed_out)
        result = TrainResult(
            self.epoch, self.best_epoch, self.best_valid_loss, reason, self.elapsed, list(self.history)
        )
        for callback in self.callbacks:
            if hasattr(callback, "on_train_end"):
                callback.on_train_end(self, result)
        return result

    def export_model(self) -> torch.nn.Module:
        """A copy of the model holding the best (EMA) weights, in eval mode."""
        model = copy.deepcopy(self.eval_model)
        if self.best_state is not None:
            model.load_state_dict(self.best_state)
        return model.eval()
