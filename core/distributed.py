"""Where this process sits in a distributed job, and the few collectives the workflow needs.

A launcher (``torchrun``, the ``deepspeed`` launcher, ``atomforge train --nproc N``) sets
``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; a plain ``atomforge train`` has none and is rank 0 of 1.
Only rank 0 writes the run folder, talks to the tracker and saves the model file; every rank
trains. The helpers are no-ops when ``torch.distributed`` is not initialised, so single-process
code calls them unconditionally.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["rank", "world_size", "local_rank", "is_main", "is_launched", "init_from_env", "barrier",
           "all_gather_objects", "all_reduce_mean", "all_reduce_max", "broadcast_object"]


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def rank() -> int:
    """Global rank (0 in a single process)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else _env_int("RANK", 0)


def world_size() -> int:
    """Number of processes in the job (1 in a single process)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else _env_int("WORLD_SIZE", 1)


def local_rank() -> int:
    """Rank on this node (selects the GPU)."""
    return _env_int("LOCAL_RANK", 0)


def is_main() -> bool:
    """Whether this process writes files and logs (rank 0)."""
    return rank() == 0


def is_launched() -> bool:
    """Whether a distributed launcher started this process (``WORLD_SIZE`` > 1)."""
    return _env_int("WORLD_SIZE", 1) > 1


def init_from_env(backend: str | None = None) -> None:
    """Join the launcher's process group (``gloo`` on CPU, ``nccl`` with CUDA) if this process was
    launched with ``WORLD_SIZE`` > 1 and has not joined yet; otherwise nothing. (A distributed
    engine's backend usually joins first, with the communication backend it needs.)"""
    if not is_launched() or dist.is_initialized():
        return
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend)


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if _active():
        dist.barrier()


def all_gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, …]`` on every rank (``[obj]`` in a single process)."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _reduce(value: float, op: Any) -> float:
    if not _active():
        return float(value)
    tensor = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(tensor, op=op)
    return float(tensor.item())


def all_reduce_mean(value: float) -> float:
    """Mean of ``value`` over the ranks."""
    return _reduce(value, dist.ReduceOp.SUM) / world_size() if _active() else float(value)


def all_reduce_max(value: float) -> float:
    """Maximum of ``value`` over the ranks (used to agree on stopping)."""
    return _reduce(value, dist.ReduceOp.MAX) if _active() else float(value)
