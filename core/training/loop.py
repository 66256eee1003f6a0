"""The training loop, written once; engines are backends it calls.

:class:`Trainer` runs epochs: it shuffles with a per-epoch seed, asks the backend
(:class:`atomforge.TrainingBackend`) for this process's steps, augments each training batch
through the loss, lets the backend step, keeps an EMA of the weights, validates with the EMA
weights, steps the LR schedule, keeps the best weights, stops (``max_epochs``, ``max_time``,
early stopping), calls callbacks and checkpoints atomically after every epoch so that a killed
run resumes exactly. None of that is repeated in any engine: the ``torch`` backend and the
``deepspeed`` backend differ only in the step, the collectives, the state they save and the
export.

Checkpoint layout (``checkpoint_dir``, ``<run>/checkpoint`` for ``atomforge train``)::

    checkpoint/
      latest             # name of the newest complete epoch folder; written last (the commit)
      epoch<N>/
        trainer.pt       # the loop's state: epoch, elapsed time, history, best loss, scheduler, …
        rank<r>.pt       # per process: EMA and best weights (its own copy), torch RNG state
        …                # the backend's files (torch: backend.pt with model + optimiser)

The two newest epoch folders are kept.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

import numpy as np
import torch
from torch import nn

from .. import keys as K
from .._errors import ConfigError, TrainingDivergedError
from .._io import atomic_save, write_text_atomic
from ..analysis.metrics import ErrorAccumulator, config_types_of
from ..data.fields import collate
from ..data.graph import GraphDataset
from .backends import TrainingBackend, swapped_weights
from .losses import CompositeLoss
from .meter import EpochMeter

__all__ = [
    "TrainSettings", "EpochRecord", "TrainResult", "Callback", "Trainer", "ExponentialMovingAverage",
    "epoch_seed", "augment_seed", "read_training_state", "has_checkpoint", "CHECKPOINT_DIR",
]

CHECKPOINT_DIR = "checkpoint"
LATEST = "latest"
TRAINER_FILE = "trainer.pt"
SCHEMA = 2  # version of the checkpoint layout above
_KEEP = 2  # epoch folders kept
_SEED_STRIDE = 100_003  # epoch e of seed s shuffles with s * _SEED_STRIDE + e
_AUGMENT_OFFSET = 7_919_000_003  # the augmentation generator's seed is offset from the shuffling one
_RANK_STRIDE = 7_919  # … and from rank to rank


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of epoch ``epoch``'s shuffling order (the same on every process)."""
    return seed * _SEED_STRIDE + epoch


def augment_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """The seed of the data-augmentation generator of one epoch on one process."""
    return epoch_seed(seed, epoch) + _AUGMENT_OFFSET + _RANK_STRIDE * rank


@dataclass(frozen=True)
class TrainSettings:
    """What the loop (and the backend) needs to know besides the injected objects."""

    max_epochs: int = 100  # hard limit on epochs
    max_time: float | None = None  # wall-clock limit in seconds (accumulated across resumes)
    batch_size: int = 8  # structures per optimiser step (all processes together)
    valid_batch_size: int = 32  # structures per validation batch
    seed: int = 0  # seeds initialisation and the shuffling of each epoch
    grad_clip: float | None = 10.0  # max gradient norm; None disables clipping
    ema_decay: float | None = 0.99  # EMA of weights used for validation and export; None = off
    patience: int | None = None  # early stopping after this many epochs without improvement
    compute_stress: bool = False  # whether the loss needs stress
    device: str = "auto"  # auto | cpu | cuda | cuda:N (backends that place the model themselves)
    precision: str = "fp32"  # fp32 | bf16 (autocast of the forward; fp32 master weights)
    batch_atoms: int | None = None  # atoms per optimiser step (all processes); batch_size then caps structures
    batch_edges: int | None = None  # directed edges (neighbour pairs) per optimiser step (all processes)
    checkpoint_steps: int | None = None  # also checkpoint every this many steps inside an epoch (resumes mid-epoch)


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
    train_metrics: dict[str, float] = field(default_factory=dict)  # backend measurements, e.g. load_imbalance
    train_terms: dict[str, float] = field(default_factory=dict)  # each loss term's mean (unweighted) in training
    valid_terms: dict[str, float] = field(default_factory=dict)  # … and on the validation set
    train_errors: dict[str, float] = field(default_factory=dict)  # running train-set MAE/RMSE (training/meter.py)


@dataclass
class TrainResult:
    """Outcome of :meth:`Trainer.fit`."""

    epochs: int
    best_epoch: int
    best_valid_loss: float
    stopped_because: str
    elapsed: float
    history: list[EpochRecord] = field(default_factory=list)


class Callback(Protocol):
    """Called by the loop; every method is optional (``on_epoch_end``, ``on_train_end``).
    Resumable callback state goes into ``trainer.extra_state`` (checkpointed)."""

    def on_epoch_end(self, trainer: "Trainer", record: EpochRecord) -> None: ...

    def on_train_end(self, trainer: "Trainer", result: TrainResult) -> None: ...


class ExponentialMovingAverage:
    """EMA of a list of tensors with the usual warm-up: after ``n`` updates the decay is
    ``min(decay, (1 + n) / (10 + n))``; the first update copies."""

    def __init__(self, decay: float) -> None:
        self.decay = float(decay)
        self.tensors: list[torch.Tensor] | None = None
        self.updates = 0

    @torch.no_grad()
    def update(self, current: Sequence[torch.Tensor]) -> None:
        if self.tensors is None:
            self.tensors = [t.detach().clone() for t in current]
        else:
            n = float(self.updates)
            d = min(self.decay, (1.0 + n) / (10.0 + n))
            torch._foreach_lerp_(self.tensors, [t.detach() for t in current], 1.0 - d)
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"tensors": self.tensors, "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tensors, self.updates = state["tensors"], int(state["updates"])


class Trainer:
    """The one training loop; see the module docstring.

    ``backend`` comes from an engine plugin (``training.engine``); the trainer calls its
    :meth:`~atomforge.TrainingBackend.setup` with the model and optimiser.
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        loss: CompositeLoss,
        optimizer: torch.optim.Optimizer,
        settings: TrainSettings,
        backend: TrainingBackend,
        scheduler: Any = None,
        callbacks: Sequence[Any] = (),
        checkpoint_dir: Path | None = None,
    ) -> None:
        self.loss = loss
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.settings = settings
        self.backend = backend
        self.callbacks = list(callbacks)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        backend.setup(model, optimizer)
        self.ema = ExponentialMovingAverage(settings.ema_decay) if settings.ema_decay else None
        self.epoch = 0
        self.elapsed = 0.0
        self.best_valid_loss = math.inf
        self.best_epoch = 0
        self.best: list[torch.Tensor] | None = None  # this process's copy of the best (EMA) weights
        self.bad_epochs = 0
        self.history: list[EpochRecord] = []
        self.extra_state: dict[str, Any] = {}  # callbacks may keep resumable state here
        self._partial: dict[str, Any] | None = None  # progress inside the epoch a checkpoint was taken in
        self.meter = EpochMeter()  # per-term losses and running train errors of the current epoch

    @property
    def model(self) -> nn.Module:
        """The module being trained (on the backend's device)."""
        return self.backend.model

    # -- one epoch -------------------------------------------------------------------------------
    def _loss_of(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        outputs = self.backend.forward(batch, compute_forces=K.FORCES in self.loss.outputs,
                                       compute_stress=self.settings.compute_stress)
        loss, terms = self.loss(batch, outputs, self.backend.model)
        self.meter.add_train(batch, outputs, terms)
        return loss

    def _prepared(self, batches: Iterator[dict[str, torch.Tensor]], count: int,
                  generator: torch.Generator) -> list[dict[str, torch.Tensor]]:
        """The next ``count`` micro-batches of ``batches``, moved and augmented (training only)."""
        return [self.loss.augment(self.backend.to_device(next(batches)), generator) for _ in range(count)]

    def _out_of_time(self, started: float) -> bool:
        limit = self.settings.max_time
        return limit is not None and self.elapsed + (time.perf_counter() - started) >= limit

    def epoch_order(self, train: Any) -> Sequence[int]:
        """Epoch :attr:`epoch`'s order of ``train`` (the same on every process): a shuffled
        permutation, or the dataset's own draw (``epoch_order``: mixing ratios)."""
        seed = epoch_seed(self.settings.seed, self.epoch)
        if hasattr(train, "epoch_order"):
            return train.epoch_order(np.random.default_rng(seed))
        if getattr(train, "streaming", False):  # no Python list per structure
            return torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).numpy()
        return torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()

    def train_epoch(self, train: GraphDataset, started: float | None = None) -> tuple[float, int, bool, dict[str, float]]:
        """One pass over ``train`` (epoch :attr:`epoch`'s order): the mean training loss, the
        steps taken, whether ``max_time`` cut it short (counting from ``started``, default now)
        and the backend's step metrics averaged. A run resumed from a mid-epoch checkpoint
        continues after its last step, with the same order and augmentation. :meth:`fit` calls
        it; benchmarks may too."""
        started = time.perf_counter() if started is None else started
        self.backend.train_mode(True)
        steps_plan = list(self.backend.plan(self.epoch_order(train), train))
        augment = torch.Generator().manual_seed(augment_seed(self.settings.seed, self.epoch, self.backend.rank))
        partial = self._partial or {}
        self._partial = None
        if partial.get("augment") is not None:
            augment.set_state(partial["augment"])
        total, count, steps = float(partial.get("total", 0.0)), int(partial.get("count", 0)), int(partial.get("steps", 0))
        measured: dict[str, list[float]] = {k: list(v) for k, v in partial.get("measured", {}).items()}
        self.meter.load_state(partial.get("meter"))  # empty unless continuing a mid-epoch checkpoint
        remaining = steps_plan[steps:]
        batches = _batches_of(train, [chosen for step in remaining for chosen in step.batches])
        timed_out = False
        for step in remaining:
            for name, value in step.metrics.items():
                measured.setdefault(name, []).append(float(value))
            loss_sum, micro = self.backend.step(self._prepared(batches, len(step.batches), augment), self._loss_of)
            if not math.isfinite(loss_sum):
                raise TrainingDivergedError(
                    f"the training loss became {loss_sum} at epoch {self.epoch + 1}, step {steps + 1}; the weights "
                    "are no longer usable. The last checkpoint is kept: lower training.lr (or set "
                    "training.grad_clip), check the data for outliers, and resume or restart.")
            total, count, steps = total + loss_sum, count + micro, steps + 1
            if hasattr(self.scheduler, "update_time"):
                self.scheduler.update_time(self.elapsed + time.perf_counter() - started)
            if self.ema is not None:
                self.ema.update(self.backend.local_tensors())
            if self.settings.max_time is not None and self.backend.any(self._out_of_time(started)):
                timed_out = True
                break
            every = self.settings.checkpoint_steps
            if every and steps % every == 0 and steps < len(steps_plan):
                self._save_partial(started, {"steps": steps, "total": total, "count": count, "measured": measured,
                                             "augment": augment.get_state(), "meter": self.meter.state()})
        metrics = {name: sum(values) / len(values) for name, values in measured.items()}
        return self.backend.all_reduce_mean(total / max(count, 1)), steps, timed_out, metrics

    def _save_partial(self, started: float, partial: dict[str, Any]) -> None:
        """A mid-epoch checkpoint: the loop's state with this epoch's progress (collective)."""
        elapsed = self.elapsed
        self.elapsed = elapsed + time.perf_counter() - started
        try:
            self.save_checkpoint(partial=partial)
        finally:
            self.elapsed = elapsed

    # -- validation ------------------------------------------------------------------------------
    def validate(self, valid: GraphDataset) -> tuple[float, dict[str, float]]:
        """Loss and error metrics of the EMA (or plain) weights on ``valid``; each process
        predicts its share, the results are gathered."""
        acc = ErrorAccumulator()
        total, count = 0.0, 0
        mine = list(range(self.backend.rank, len(valid), self.backend.world_size))
        size = self.settings.valid_batch_size
        plan = [mine[start : start + size] for start in range(0, len(mine), size)]
        types = config_types_of(valid)  # per-config_type metrics (metrics.py), None without config types
        self.backend.train_mode(False)
        ema = self.ema.tensors if self.ema else None
        with swapped_weights(self.backend.local_tensors(), ema), self.backend.evaluation():
            for chosen, batch in zip(plan, _batches_of(valid, plan)):
                batch = self.backend.to_device(batch)
                outputs = self.backend.predict(batch, compute_forces=True, compute_stress=self.settings.compute_stress)
                loss, terms = self.loss(batch, outputs, self.backend.model)
                n = int(batch[K.N_ATOMS].shape[0])
                total += float(loss.detach()) * n
                count += n
                self.meter.add_valid(terms, n)
                acc.add(batch, {k: v.detach() for k, v in outputs.items()},
                        None if types is None else [types[int(i)] for i in chosen])
        merged, loss_sum, n_sum = ErrorAccumulator(), 0.0, 0
        for rank_total, rank_count, state in self.backend.gather((total, count, acc.state())):
            loss_sum, n_sum = loss_sum + rank_total, n_sum + rank_count
            merged.absorb(state)
        return loss_sum / max(n_sum, 1), {**merged.metrics(), **merged.config_type_metrics()}

    # -- bookkeeping -----------------------------------------------------------------------------
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
            current = self.ema.tensors if self.ema and self.ema.tensors is not None else self.backend.local_tensors()
            self.best = [t.detach().clone() for t in current]
            self.bad_epochs = 0
        else:
            self.bad_epochs += 1

    def _stop_reason(self, timed_out: bool) -> str | None:
        s = self.settings
        reason = None
        if timed_out or (s.max_time is not None and self.elapsed >= s.max_time):
            reason = "max_time"
        elif self.epoch >= s.max_epochs:
            reason = "max_epochs"
        elif s.patience is not None and self.bad_epochs >= s.patience:
            reason = "early_stopping"
        return self.backend.broadcast(reason)  # elapsed time differs slightly per process: rank 0 decides

    def fit(self, train: GraphDataset, valid: GraphDataset, *, resume: bool = False) -> TrainResult:
        """Train until a stop criterion; checkpoint after every epoch; with ``resume`` continue
        from the last checkpoint if there is one."""
        if not (resume and self.try_resume()):
            torch.manual_seed(self.settings.seed)
        reason = self._stop_reason(False)
        while reason is None:
            started = time.perf_counter()
            train_loss, steps, timed_out, train_metrics = self.train_epoch(train, started)
            valid_loss, metrics = self.validate(valid)
            self.epoch += 1
            self.elapsed += time.perf_counter() - started
            lr = float(self.optimizer.param_groups[0]["lr"])
            self._step_scheduler(valid_loss)
            self._update_best(valid_loss)
            train_terms, valid_terms, train_errors = self.meter.summary(self.backend)
            record = EpochRecord(self.epoch, lr, train_loss, valid_loss, metrics, self.elapsed, steps, train_metrics,
                                 train_terms, valid_terms, train_errors)
            self.history.append(record)
            for callback in self.callbacks:
                if hasattr(callback, "on_epoch_end"):
                    callback.on_epoch_end(self, record)
            self.save_checkpoint()
            reason = self._stop_reason(timed_out)
        result = TrainResult(self.epoch, self.best_epoch, self.best_valid_loss, reason, self.elapsed, list(self.history))
        for callback in self.callbacks:
            if hasattr(callback, "on_train_end"):
                callback.on_train_end(self, result)
        return result

    def export_model(self) -> nn.Module:
        """The best (EMA) weights in a plain CPU module, eval mode (collective)."""
        return self.backend.export(self.best or (self.ema.tensors if self.ema else None))

    # -- checkpoints -----------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """The loop's own state (shared by every process; weights-only serialisable)."""
        return {
            "schema": SCHEMA, "epoch": self.epoch, "elapsed": self.elapsed,
            "best_valid_loss": self.best_valid_loss, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs,
            "history": [asdict(r) for r in self.history],
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "extra": self.extra_state, "world_size": self.backend.world_size, "partial": None,
        }

    def rank_state(self) -> dict[str, Any]:
        """This process's own state: EMA and best weights over its tensors, the torch RNG."""
        return {"ema": self.ema.state_dict() if self.ema else None, "best": self.best,
                "rng": torch.get_rng_state(), "world_size": self.backend.world_size}

    def save_checkpoint(self, partial: dict[str, Any] | None = None) -> None:
        """Write this epoch's folder (every process its part), then ``latest`` (collective).
        ``partial``: progress inside the running epoch (a mid-epoch checkpoint, folder
        ``epoch<N>-step<S>``; each process's own progress goes into its rank file)."""
        if self.checkpoint_dir is None:
            return
        main = self.backend.rank == 0
        name = f"epoch{self.epoch}" + (f"-step{partial['steps']}" if partial else "")
        folder = self.checkpoint_dir / name
        if main and folder.exists():  # left half-written by a killed run
            shutil.rmtree(folder)
        self.backend.barrier()
        atomic_save({**self.rank_state(), "partial": partial}, folder / f"rank{self.backend.rank}.pt")
        if main:
            atomic_save({**self.state(), "partial": {"steps": partial["steps"]} if partial else None},
                        folder / TRAINER_FILE)
        self.backend.save_state(folder)
        self.backend.barrier()
        if main:
            write_text_atomic(self.checkpoint_dir / LATEST, folder.name)
            for old in _epoch_folders(self.checkpoint_dir)[:-_KEEP]:
                shutil.rmtree(old, ignore_errors=True)
        self.backend.barrier()

    def try_resume(self) -> bool:
        """Load the last complete checkpoint if there is one; return whether it did."""
        folder = latest_checkpoint(self.checkpoint_dir) if self.checkpoint_dir else None
        if folder is None:
            return False
        mine = folder / f"rank{self.backend.rank}.pt"
        state = torch.load(folder / TRAINER_FILE, weights_only=True)
        if int(state.get("world_size", 1)) != self.backend.world_size or not mine.exists():
            raise ConfigError(f"{folder} was written by {state.get('world_size', 1)} process(es); this job has "
                              f"{self.backend.world_size}. Resume with the same number of processes.")
        self.backend.load_state(folder)
        self._load_state(state, torch.load(mine, weights_only=True))
        return True

    def _load_state(self, state: dict[str, Any], rank_state: dict[str, Any]) -> None:
        self.epoch, self.elapsed = int(state["epoch"]), float(state["elapsed"])
        self.best_valid_loss, self.best_epoch = float(state["best_valid_loss"]), int(state["best_epoch"])
        self.bad_epochs = int(state["bad_epochs"])
        self.history = [EpochRecord(**r) for r in state["history"]]
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.extra_state = dict(state.get("extra") or {})
        if self.ema is not None and rank_state["ema"] is not None:
            self.ema.load_state_dict(rank_state["ema"])
        self.best = rank_state["best"]
        torch.set_rng_state(rank_state["rng"])
        self._partial = rank_state.get("partial")


def _folder_position(name: str) -> tuple[int, int] | None:
    """(completed epochs, steps into the next one) of a checkpoint folder name, or None."""
    epoch, _, step = name[5:].partition("-step")
    if not name.startswith("epoch") or not epoch.isdigit() or (step and not step.isdigit()):
        return None
    return int(epoch), int(step or 0)


def _epoch_folders(directory: Path) -> list[Path]:
    folders = [p for p in directory.glob("epoch*") if p.is_dir() and _folder_position(p.name) is not None]
    return sorted(folders, key=lambda p: _folder_position(p.name))


def _batches_of(dataset: Any, plan: Sequence[Sequence[int]]) -> Iterator[dict[str, torch.Tensor]]:
    """The collated batches of ``plan`` (the dataset's own reader if it has one: streaming)."""
    if hasattr(dataset, "batches"):
        return iter(dataset.batches(plan))
    return iter(collate([dataset.graphs[int(i)] for i in chosen], dataset.fields) for chosen in plan)


def latest_checkpoint(directory: Path | None) -> Path | None:
    """The newest complete epoch folder of a checkpoint directory, or ``None``."""
    if directory is None or not (Path(directory) / LATEST).exists():
        return None
    folder = Path(directory) / (Path(directory) / LATEST).read_text().strip()
    return folder if (folder / TRAINER_FILE).exists() else None


def has_checkpoint(run_dir: Path | str) -> bool:
    """Whether the run folder holds a training checkpoint (what ``--resume`` continues)."""
    return latest_checkpoint(Path(run_dir) / CHECKPOINT_DIR) is not None


def read_training_state(run_dir: Path | str) -> dict[str, Any]:
    """The loop's state in a run folder's newest checkpoint (``epoch``, ``elapsed``,
    ``history`` as dicts, ``best_valid_loss``, …); a clear error if there is none."""
    folder = latest_checkpoint(Path(run_dir) / CHECKPOINT_DIR)
    if folder is None:
        raise ConfigError(f"{run_dir} holds no training checkpoint ({CHECKPOINT_DIR}/{LATEST} is missing)")
    return torch.load(folder / TRAINER_FILE, weights_only=True)
