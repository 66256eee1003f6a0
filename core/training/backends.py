"""Training backends: the engine-specific parts of training, behind one small public interface.

The training loop (:class:`atomforge.Trainer`) is written once: epochs, shuffling and seeds,
stopping, EMA, best weights, validation, history, callbacks and the checkpoint schema. An
*engine* plugin (``register_engines``) supplies a :class:`TrainingBackend` — how a step runs
(device, mixed precision, sharding, gradient all-reduce), which tensors are this process's own
copy of the weights, how the model's state is saved and how the trained model is exported. The
built-ins are :class:`TorchBackend` (one process, any device) and ``deepspeed`` (ZeRO 0–3).

A third-party engine subclasses :class:`TorchBackend` and overrides public methods (say
:meth:`TrainingBackend.plan` for gradient accumulation), or implements the protocol afresh;
:func:`atomforge.testing.check_engine` checks it.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Mapping, Protocol, Sequence, runtime_checkable

import torch
from torch import nn

from .._errors import ConfigError
from .._io import atomic_save
from ..data.graph import GraphDataset
from ..data.streaming import epoch_batches
from ..devices import PRECISIONS, autocast_context, cast_outputs, resolve_device

__all__ = ["Step", "TrainingBackend", "TorchBackend", "swapped_weights"]

Batch = dict[str, torch.Tensor]
BACKEND_FILE = "backend.pt"


@dataclass(frozen=True)
class Step:
    """One optimiser step of this process: its micro-batches (dataset indices, in order) and
    what the backend measured about the step (averaged over the epoch into the epoch record's
    ``train_metrics``, e.g. ``load_imbalance``)."""

    batches: Sequence[Sequence[int]]
    metrics: Mapping[str, float] = field(default_factory=dict)


@runtime_checkable
class TrainingBackend(Protocol):
    """What the training loop asks of an engine. One instance trains one model.

    Lifecycle: the engine's factory builds it (joining a process group if it is distributed),
    :meth:`setup` attaches the model and optimiser, then every epoch the loop calls
    :meth:`plan`, and for each step :meth:`to_device` and :meth:`step`; it validates with
    :meth:`predict` inside :meth:`evaluation`, averages :meth:`local_tensors` (EMA), checkpoints
    with :meth:`save_state` / :meth:`load_state` and finally calls :meth:`export`.
    Collective methods must be called by every process of the job.
    """

    rank: int  # this process's rank (0 in one process)
    world_size: int  # processes in the job (1 in one process)
    device: torch.device  # where batches go

    @property
    def model(self) -> nn.Module:
        """The module being trained, unwrapped (what validation and losses call)."""
        ...

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Take the model and its optimiser (move to the device, wrap, shard)."""
        ...

    def plan(self, order: Sequence[int], dataset: GraphDataset) -> Iterator[Step]:
        """This process's steps of one epoch; ``order`` is the epoch's shuffled order of
        ``dataset``, the same on every process."""
        ...

    def to_device(self, batch: Batch) -> Batch:
        """The batch on this backend's device (called once per micro-batch)."""
        ...

    def step(self, batches: Sequence[Batch], loss_of: Callable[[Batch], torch.Tensor]) -> tuple[float, int]:
        """One optimiser step over ``batches`` (micro-batches already on the device and
        augmented): ``loss_of(batch)`` runs :meth:`forward` and the loss; the backend does
        backward, clipping (``settings.grad_clip``) and the update. Returns the sum of the
        micro-batch losses and their number."""
        ...

    def forward(self, batch: Batch, *, compute_forces: bool, compute_stress: bool) -> Batch:
        """Training forward pass (mixed precision, wrappers) with outputs in the model's dtype."""
        ...

    def predict(self, batch: Batch, *, compute_forces: bool, compute_stress: bool) -> Batch:
        """Inference forward pass of :attr:`model` (validation), outputs in the model's dtype."""
        ...

    def train_mode(self, training: bool) -> None:
        """Switch the model (and its wrapper) between training and evaluation mode."""
        ...

    def evaluation(self) -> ContextManager[Any]:
        """Context in which :meth:`predict` may run (e.g. ZeRO-3 parameters held whole)."""
        ...

    def local_tensors(self) -> list[torch.Tensor]:
        """This process's copy of each averaged tensor (its ZeRO-3 partition, else the whole
        parameter); the loop keeps EMA and best weights over these and writes them in place
        (``copy_``) to validate with them."""
        ...

    def export(self, tensors: Sequence[torch.Tensor] | None) -> nn.Module:
        """A plain CPU module holding ``tensors`` (in :meth:`local_tensors` order; ``None``: the
        current weights), in eval mode. Collective."""
        ...

    def save_state(self, folder: Path) -> None:
        """Write the model's and optimiser's state into ``folder`` (collective)."""
        ...

    def load_state(self, folder: Path) -> None:
        """Restore what :meth:`save_state` wrote in ``folder``."""
        ...

    # -- collectives (identity in one process) -------------------------------------------------
    def all_reduce_mean(self, value: float) -> float: ...

    def any(self, flag: bool) -> bool: ...

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every process."""
        ...

    def gather(self, obj: Any) -> list[Any]:
        """``[obj of rank 0, obj of rank 1, …]`` on every process."""
        ...

    def barrier(self) -> None: ...


class TorchBackend:
    """One process on any device: plain PyTorch steps, optional bf16 autocast (fp32 master
    weights), gradient-norm clipping. A step with several micro-batches accumulates their
    gradients (each micro-batch's loss divided by their number) before one update.

    ``device``: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` (``training.device``);
    ``precision``: ``fp32`` | ``bf16`` (``training.precision``); ``batch_size``,
    ``batch_atoms``, ``batch_edges`` and ``grad_clip`` as in :class:`atomforge.TrainSettings`.
    """

    rank = 0
    world_size = 1

    def __init__(self, *, batch_size: int, grad_clip: float | None = 10.0, device: str | torch.device = "auto",
                 precision: str = "fp32", batch_atoms: int | None = None,
                 batch_edges: int | None = None) -> None:
        if precision not in PRECISIONS:
            raise ConfigError(f"training.precision: expected one of {PRECISIONS}; got {precision!r}")
        self.batch_size = int(batch_size)
        self.batch_atoms = None if batch_atoms is None else int(batch_atoms)
        self.batch_edges = None if batch_edges is None else int(batch_edges)
        self.grad_clip = grad_clip
        self.device = resolve_device(device)
        self.precision = precision
        self._model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None

    @classmethod
    def from_settings(cls, settings: Any, **extra: Any) -> "TorchBackend":
        """A backend configured by a :class:`atomforge.TrainSettings` (plus ``extra`` keywords)."""
        return cls(batch_size=settings.batch_size, grad_clip=settings.grad_clip, device=settings.device,
                   precision=settings.precision, batch_atoms=getattr(settings, "batch_atoms", None),
                   batch_edges=getattr(settings, "batch_edges", None), **extra)

    @property
    def model(self) -> nn.Module:
        if self._model is None:
            raise RuntimeError("TrainingBackend.setup(model, optimizer) has not been called")
        return self._model

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self._model = model.to(self.device)
        self.optimizer = optimizer

    @property
    def dtype(self) -> torch.dtype:
        """The model's floating dtype (outputs are returned in it)."""
        return next((p.dtype for p in self.model.parameters() if p.is_floating_point()), torch.float32)

    def plan(self, order: Sequence[int], dataset: GraphDataset) -> Iterator[Step]:
        """One micro-batch per step: ``batch_size`` structures, or as many as fit ``batch_atoms``
        and ``batch_edges``."""
        for chosen in epoch_batches(dataset, order, batch_size=self.batch_size, batch_atoms=self.batch_atoms,
                                    batch_edges=self.batch_edges):
            yield Step([chosen])

    def to_device(self, batch: Batch) -> Batch:
        if self.device.type == "cpu":
            return batch
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def forward(self, batch: Batch, *, compute_forces: bool, compute_stress: bool) -> Batch:
        with autocast_context(self.device, self.precision):
            outputs = self.model(batch, compute_forces=compute_forces, compute_stress=compute_stress)
        return cast_outputs(outputs, self.dtype) if self.precision != "fp32" else outputs

    predict = forward

    def step(self, batches: Sequence[Batch], loss_of: Callable[[Batch], torch.Tensor]) -> tuple[float, int]:
        assert self.optimizer is not None, "setup() first"
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for batch in batches:
            loss = loss_of(batch)
            (loss if len(batches) == 1 else loss / len(batches)).backward()
            total += float(loss.detach())
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        return total, len(batches)

    def train_mode(self, training: bool) -> None:
        self.model.train(training)

    def evaluation(self) -> ContextManager[Any]:
        return contextlib.nullcontext()

    def local_tensors(self) -> list[torch.Tensor]:
        return _averaged_tensors(self.model)

    def export(self, tensors: Sequence[torch.Tensor] | None) -> nn.Module:
        model = copy.deepcopy(self.model)
        if tensors is not None:
            targets = _averaged_tensors(model)
            if len(targets) != len(tensors) or any(t.shape != s.shape for t, s in zip(targets, tensors)):
                raise RuntimeError(
                    f"export: the deep copy of the model has {len(targets)} weight tensors where training has "
                    f"{len(tensors)} (or other shapes): the backbone does not deep-copy faithfully (e3nn ≥ 0.5 "
                    "code-generated modules need a __deepcopy__; see plugins/sevennet.py)")
            with torch.no_grad():
                for dst, src in zip(targets, tensors):
                    dst.copy_(src)
        for parameter in model.parameters():
            parameter.grad = None
        return model.to("cpu").eval()

    def save_state(self, folder: Path) -> None:
        assert self.optimizer is not None, "setup() first"
        atomic_save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}, folder / BACKEND_FILE)

    def load_state(self, folder: Path) -> None:
        assert self.optimizer is not None, "setup() first"
        state = torch.load(folder / BACKEND_FILE, map_location=self.device, weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    # -- collectives of a world of one -----------------------------------------------------------
    def all_reduce_mean(self, value: float) -> float:
        return float(value)

    def any(self, flag: bool) -> bool:
        return bool(flag)

    def broadcast(self, obj: Any) -> Any:
        return obj

    def gather(self, obj: Any) -> list[Any]:
        return [obj]

    def barrier(self) -> None:
        return None


@contextlib.contextmanager
def swapped_weights(local: Sequence[torch.Tensor], tensors: Sequence[torch.Tensor] | None) -> Iterator[None]:
    """Inside the block ``local`` (a backend's :meth:`~TrainingBackend.local_tensors`) hold
    ``tensors`` (EMA or best weights, same order), written in place; the previous values are
    restored after. ``None``: nothing changes."""
    if tensors is None:
        yield
        return
    saved = [t.clone() for t in local]
    with torch.no_grad():
        torch._foreach_copy_(list(local), list(tensors))
    try:
        yield
    finally:
        with torch.no_grad():
            torch._foreach_copy_(list(local), saved)


def _averaged_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Parameters, then floating buffers: what EMA and best weights cover in one process."""
    return [p.data for p in model.parameters()] + [b for b in model.buffers() if b.is_floating_point()]
