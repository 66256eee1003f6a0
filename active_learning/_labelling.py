"""Labelling through any ``concurrent.futures.Executor``.

Oracles are not sent to workers: a picklable :class:`OracleCall` (the registry factory resolved
on the driver, its options, time limit and retries) is, and each worker builds the oracle once
and keeps it (pretrained models load their weights once per worker). Each result is handed to
``on_result`` as soon as it arrives, so the campaign journals it before waiting for the next.

Executors: ``process`` (the default: a local :class:`~._workers.WorkerPool`, one task per worker
process at a time, so a worker that dies is charged to the structure it was running, and workers
that die with the driver; time limits are enforced in the worker with ``SIGALRM``), ``thread``,
``serial`` (in the calling thread; time limits work) and ``dask``
(``distributed.Client(address).get_executor()``; a timed-out call is abandoned in dask's worker
thread). Any other object with ``submit`` can be passed from Python.

**A worker process that dies** (a segfault in native code, ``os._exit``, the OOM killer) fails
only the structure it was running: :func:`label_all` requests that structure again up to the
oracle's ``retries`` times, then records it as failed ("the oracle's worker process died (exit
code …)"); the other structures are not affected. A foreign ``ProcessPoolExecutor`` passed from
Python breaks as a whole instead (``BrokenProcessPool``): its unfinished structures, which cannot
be told apart, are re-run in a fresh :class:`~._workers.WorkerPool`, where a culprit is found
exactly and no innocent structure is charged.
"""

from __future__ import annotations

import dataclasses
import logging
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from ase import Atoms

from atomforge import ConfigError, LabelResult, label_safely

from ._workers import WorkerDied, WorkerPool, worker_setup

__all__ = ["OracleCall", "label_one", "build_oracle", "label_all", "make_executor", "InlineExecutor", "EXECUTORS"]

_LOG = logging.getLogger("atomforge.active_learning")

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


def _oracle_for(call: OracleCall) -> Any:
    oracle = _WORKER_ORACLES.get(call.cache_key)
    if oracle is None:
        oracle = _WORKER_ORACLES[call.cache_key] = call.factory(**call.options)
    return oracle


def label_one(call: OracleCall, key: str, atoms: Atoms) -> LabelResult:
    """Worker entry point: build (once per process) the oracle and label ``atoms`` safely."""
    try:
        oracle = _oracle_for(call)
    except Exception as error:  # noqa: BLE001 - a worker that cannot build the oracle fails this label
        return LabelResult(key, None, f"oracle could not be built: {type(error).__name__}: {error}")
    return label_safely(oracle, atoms, key=key, timeout=call.timeout, retries=call.retries)


def build_oracle(call: OracleCall) -> str | None:
    """Worker entry point: build (and keep) the oracle; the error, or None if it was built."""
    try:
        _oracle_for(call)
    except Exception as error:  # noqa: BLE001 - reported by the caller
        return f"oracle could not be built: {type(error).__name__}: {error}"
    return None


class InlineExecutor(Executor):
    """Runs each task at ``submit`` in the calling thread (serial labelling, time limits work)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as error:  # noqa: BLE001 - delivered through the future like a pool would
            future.set_exception(error)
        return future


def make_executor(kind: str = "process", *, max_workers: int | None = None, start_method: str = "spawn",
                  address: str | None = None) -> Executor:
    """An executor by name (see the module docstring); ``max_workers`` defaults to the CPU count."""
    if kind == "process":
        return WorkerPool(max_workers=max_workers, start_method=start_method)
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


_single_threaded_worker = worker_setup  # the former process-pool initializer (kept for callers)


def label_all(executor: Executor, call: OracleCall, items: Iterable[tuple[str, Atoms]],
              on_result: Callable[[LabelResult], None], *,
              log: Callable[[str], None] | None = None) -> list[LabelResult]:
    """Submit every ``(key, atoms)``; call ``on_result`` for each result as it completes.

    A worker process that dies (:class:`~._workers.WorkerDied`) is charged to the structure it
    was running: that structure is requested again up to ``call.retries`` times, then delivered
    as failed ("the oracle's worker process died (exit code …)"). A foreign process pool that
    breaks (``BrokenProcessPool``) has its unfinished structures re-run in a fresh
    :class:`~._workers.WorkerPool`, uncharged. Any other executor error becomes a failed result
    naming it. ``KeyboardInterrupt`` stops labelling (completed results are already recorded).
    ``log`` receives a line for each worker death.
    """
    say = log or _LOG.warning
    results: list[LabelResult] = []
    pending: dict[Future, tuple[str, Atoms]] = {}
    deaths: dict[str, int] = {}
    fallback: WorkerPool | None = None

    def submit(key: str, atoms: Atoms) -> None:
        nonlocal fallback
        try:
            future = (fallback or executor).submit(label_one, call, key, atoms)
        except BrokenProcessPool:
            fallback = _fallback_pool(executor, say)
            future = fallback.submit(label_one, call, key, atoms)
        if future.done() and not _broken(future):  # an inline executor: record it before the next label
            results.append(_deliver(future, key, on_result, deaths.get(key, 0)))
        else:
            pending[future] = (key, atoms)

    completed = False
    try:
        for key, atoms in items:
            submit(key, atoms)
        while pending:
            done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
            for future in done:
                key, atoms = pending.pop(future)
                error = None if future.cancelled() else future.exception()
                if isinstance(error, BrokenProcessPool):  # a foreign pool broke: no structure is charged
                    submit(key, atoms)
                elif isinstance(error, WorkerDied):
                    deaths[key] = deaths.get(key, 0) + 1
                    if deaths[key] <= call.retries:
                        say(f"label {key}: {error}; requesting it again ({deaths[key]} of {call.retries} retries)")
                        submit(key, atoms)
                    else:
                        say(f"label {key}: {error}; giving up after {deaths[key]} attempt(s)")
                        result = LabelResult(key, None, str(error), deaths[key])
                        on_result(result)
                        results.append(result)
                else:
                    results.append(_deliver(future, key, on_result, deaths.get(key, 0)))
        completed = True
    finally:
        if fallback is not None:
            fallback.shutdown(wait=True, cancel_futures=True) if completed else fallback.terminate()
    return results


def _broken(future: Future) -> bool:
    return not future.cancelled() and isinstance(future.exception(), (BrokenProcessPool, WorkerDied))


def _fallback_pool(executor: Executor, say: Callable[[str], None]) -> WorkerPool:
    workers = getattr(executor, "_max_workers", None)
    say(f"the process pool broke (a worker process died); re-running its unfinished labels in a fresh pool "
        f"of {workers or 'CPU-count'} worker(s) that charges a death to the structure that caused it")
    return WorkerPool(max_workers=workers)


def _deliver(future: Future, key: str, on_result: Callable[[LabelResult], None], deaths: int = 0) -> LabelResult:
    try:
        result = future.result()
    except Exception as error:  # noqa: BLE001 - the executor failed, not the oracle
        result = LabelResult(key, None, f"executor error: {type(error).__name__}: {error}")
    if deaths and isinstance(result, LabelResult):  # earlier attempts killed their worker
        result = dataclasses.replace(result, attempts=result.attempts + deaths)
    on_result(result)
    return result
