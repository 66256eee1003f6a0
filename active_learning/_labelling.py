"""Labelling through any ``concurrent.futures.Executor``.

Oracles are not sent to workers: a picklable :class:`OracleCall` (the registry factory resolved
on the driver, its options, time limit and retries) is, and each worker builds the oracle once
and keeps it (pretrained models load their weights once per worker). Each result is handed to
``on_result`` as soon as it arrives, so the campaign journals it before waiting for the next.

Executors: ``process`` (local ``ProcessPoolExecutor``, the default; time limits are enforced in
the worker with ``SIGALRM``), ``thread``, ``serial`` (in the calling thread; time limits work) and
``dask`` (``distributed.Client(address).get_executor()``; time limits are not enforced inside
dask's worker threads). Any other object with ``submit`` can be passed from Python.
"""

from __future__ import annotations

import os
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from ase import Atoms

from atomforge import ConfigError, LabelResult, label_safely

__all__ = ["OracleCall", "label_one", "label_all", "make_executor", "InlineExecutor", "EXECUTORS"]

EXECUTORS = ("process", "thread", "serial", "dask")

_WORKER_ORACLES: dict[str, Any] = {}  # per-process cache: OracleCall.cache_key -> built oracle


@dataclass(frozen=True)
class OracleCall:
    """Everything a worker needs to label one structure (picklable)."""

    factory: Callable[..., Any]  # the OracleSpec's factory, resolved through the registry by name
    options: Mapping[str, Any] = field(default_factory=dict)  # the oracle's keyword options
    timeout: float | None = None  # seconds per attempt; None = no limit
    retries: int = 0  # extra attempts after a failure (timeouts are not retried)

    @property
    def cache_key(self) -> str:
        return f"{self.factory.__module__}.{self.factory.__qualname__}:{sorted(self.options.items())!r}"


def label_one(call: OracleCall, key: str, atoms: Atoms) -> LabelResult:
    """Worker entry point: build (once per process) the oracle and label ``atoms`` safely."""
    try:
        oracle = _WORKER_ORACLES.get(call.cache_key)
        if oracle is None:
            oracle = _WORKER_ORACLES[call.cache_key] = call.factory(**call.options)
    except Exception as error:  # noqa: BLE001 - a worker that cannot build the oracle fails this label
        return LabelResult(key, None, f"oracle could not be built: {type(error).__name__}: {error}")
    return label_safely(oracle, atoms, key=key, timeout=call.timeout, retries=call.retries)


class InlineExecutor(Executor):
    """Runs each task at ``submit`` in the calling thread (serial labelling, time limits work)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as error:  # noqa: BLE001 - delivered through the future like a pool would
            future.set_exception(error)
        return future


def _single_threaded_worker() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover - torch is a dependency, but a worker needs no torch
        pass


def make_executor(kind: str = "process", *, max_workers: int | None = None, start_method: str = "spawn",
                  address: str | None = None) -> Executor:
    """An executor by name (see the module docstring); ``max_workers`` defaults to the CPU count."""
    if kind == "process":
        import multiprocessing

        return ProcessPoolExecutor(max_workers=max_workers, initializer=_single_threaded_worker,
                                   mp_context=multiprocessing.get_context(start_method))
    if kind == "thread":
        return ThreadPoolExecutor(max_workers=max_workers)
    if kind == "serial":
        return InlineExecutor()
    if kind == "dask":
        try:
            from distributed import Client
        except ImportError as error:
            raise ConfigError("executor 'dask' needs dask.distributed: pip install 'atomforge[dask]'") from error
        client = Client(address) if address else Client(processes=False, n_workers=1,
                                                         threads_per_worker=max_workers or 1)
        return client.get_executor()
    raise ConfigError(f"unknown executor {kind!r}; valid: {', '.join(EXECUTORS)}")


def label_all(executor: Executor, call: OracleCall, items: Iterable[tuple[str, Atoms]],
              on_result: Callable[[LabelResult], None]) -> list[LabelResult]:
    """Submit every ``(key, atoms)``; call ``on_result`` for each result as it completes.

    A task that dies in the executor (a crashed worker process) becomes a failed result naming
    the error; ``KeyboardInterrupt`` stops labelling (completed results are already recorded).
    """
    results: list[LabelResult] = []
    pending: dict[Future, str] = {}
    for key, atoms in items:
        future = executor.submit(label_one, call, key, atoms)
        if future.done():  # an inline executor: record it before the next label starts
            results.append(_deliver(future, key, on_result))
        else:
            pending[future] = key
    for future in as_completed(pending):
        results.append(_deliver(future, pending[future], on_result))
    return results


def _deliver(future: Future, key: str, on_result: Callable[[LabelResult], None]) -> LabelResult:
    try:
        result = future.result()
    except Exception as error:  # noqa: BLE001 - the executor failed, not the oracle
        result = LabelResult(key, None, f"executor error: {type(error).__name__}: {error}")
    on_result(result)
    return result
