"""The campaign's process pool: one task per worker at a time, so a worker that dies is charged
to exactly the task it was running, and workers that die with the driver.

``concurrent.futures.ProcessPoolExecutor`` breaks as a whole when one worker dies: every pending
future fails with ``BrokenProcessPool``, tried or not, and the pool is unusable. A campaign must
instead charge the death to the structure that caused it and go on, so :class:`WorkerPool` runs
each worker as its own process fed through its own pipe, one task at a time: a death fails that
task's future with :class:`WorkerDied` (with the exit code), the other workers keep running and a
fresh worker replaces the dead one on demand.

Workers never outlive the driver. Each worker (:func:`worker_setup`) asks Linux to SIGKILL it when
its parent dies (``prctl(PR_SET_PDEATHSIG)``; the pool starts workers from its dispatcher thread,
which lives as long as the workers, because the signal follows the parent *thread*), runs a
watchdog thread that exits the worker once its parent process is gone (``os.getppid()`` changes;
portable) and exits when its pipe to the driver closes. Workers ignore SIGINT: Ctrl-C stops the
driver, which then terminates them.
"""

from __future__ import annotations

import atexit
import collections
import multiprocessing
import os
import signal
import sys
import threading
import time
import weakref
from concurrent.futures import Executor, Future
from multiprocessing.connection import wait
from typing import Any, Callable

from atomforge import AtomforgeError

__all__ = ["WorkerPool", "WorkerDied", "worker_setup", "start_parent_watchdog", "exit_description"]

WATCHDOG_INTERVAL = 0.5  # seconds between a worker's checks that its parent is alive


class WorkerDied(AtomforgeError):
    """The worker process running a task died before returning (``exitcode``: its exit status,
    negative for a signal, as ``multiprocessing.Process.exitcode``)."""

    def __init__(self, exitcode: int | None, pid: int | None = None) -> None:
        self.exitcode, self.pid = exitcode, pid
        super().__init__(f"the oracle's worker process died ({exit_description(exitcode)})")

    def __reduce__(self) -> tuple[Any, ...]:
        return (WorkerDied, (self.exitcode, self.pid))


def exit_description(exitcode: int | None) -> str:
    """``exit code 3`` / ``exit code -9, killed by SIGKILL`` / ``exit code unknown``."""
    if exitcode is None:
        return "exit code unknown"
    if exitcode < 0:
        try:
            return f"exit code {exitcode}, killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            pass
    return f"exit code {exitcode}"


# -- inside a worker ------------------------------------------------------------------------------------
def _die_with_parent(parent: int) -> None:
    """SIGKILL this process when its parent dies (Linux), and a watchdog thread (everywhere)."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            PR_SET_PDEATHSIG = 1
            libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):  # pragma: no cover - no prctl: the watchdog still works
            pass
    if os.getppid() != parent:  # the parent died before the death signal was armed
        os._exit(1)
    start_parent_watchdog(parent)


def start_parent_watchdog(parent: int, interval: float = WATCHDOG_INTERVAL) -> threading.Thread:
    """A daemon thread that ends this process (``os._exit(1)``) once ``os.getppid()`` is no
    longer ``parent``, i.e. the parent died and this process was re-parented. Portable; it needs
    the GIL, so native code that never releases it delays it (``PR_SET_PDEATHSIG`` does not)."""

    def watch() -> None:
        while True:
            time.sleep(interval)
            if os.getppid() != parent:  # re-parented: the driver is gone, and so must we be
                os._exit(1)

    thread = threading.Thread(target=watch, name="atomforge-parent-watchdog", daemon=True)
    thread.start()
    return thread


def worker_setup(parent: int | None = None) -> None:
    """Everything a labelling worker process does first: die with its parent (``parent``: the pid
    the worker was started by — given, so that a driver that died while the worker was still
    starting is noticed; default: the current parent), ignore Ctrl-C (the driver handles it), one
    OpenMP/torch thread."""
    _die_with_parent(os.getppid() if parent is None else parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover - torch is a dependency, but a worker needs no torch
        pass


def _worker_main(conn: Any, parent: int | None) -> None:
    """A worker: set up, then run ``(fn, args, kwargs)`` tasks from ``conn`` until told to stop."""
    worker_setup(parent)
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):  # the driver is gone
            return
        if task is None:
            return
        fn, args, kwargs = task
        try:
            reply: tuple[bool, Any] = (True, fn(*args, **kwargs))
        except BaseException as error:  # noqa: BLE001 - sent back to the driver's future
            reply = (False, error)
        try:
            conn.send(reply)
        except OSError:  # the driver is gone
            return
        except Exception as error:  # noqa: BLE001 - e.g. an unpicklable result or exception
            try:
                conn.send((False, RuntimeError(f"the worker could not send its result back: "
                                               f"{type(error).__name__}: {error}")))
            except OSError:
                return


# -- in the driver ------------------------------------------------------------------------------------------
_POOLS: "weakref.WeakSet[WorkerPool]" = weakref.WeakSet()


@atexit.register
def _stop_pools() -> None:  # workers are not daemonic (oracles may start processes): stop them at exit
    for pool in list(_POOLS):
        pool.terminate()


class _Task:
    __slots__ = ("future", "fn", "args", "kwargs", "started")

    def __init__(self, future: Future, fn: Callable[..., Any], args: tuple, kwargs: dict) -> None:
        self.future, self.fn, self.args, self.kwargs, self.started = future, fn, args, kwargs, False


class _Worker:
    def __init__(self, context: Any) -> None:
        self.conn, child = context.Pipe(duplex=True)
        # spawn and fork make this process the worker's parent; a forkserver is the parent otherwise
        parent = os.getpid() if context.get_start_method() in ("spawn", "fork") else None
        self.process = context.Process(target=_worker_main, args=(child, parent), name="atomforge-label-worker")
        self.process.start()
        child.close()
        self.task: _Task | None = None

    def finish(self, grace: float = 5.0) -> None:
        """Ask the worker to exit; kill it if it does not within ``grace`` seconds."""
        try:
            self.conn.send(None)
        except (OSError, ValueError):
            pass
        self.process.join(grace)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self.conn.close()


class WorkerPool(Executor):
    """A process pool with per-task worker-death attribution (see the module docstring).

    ``submit`` returns a future that gets the task's result or exception, or :class:`WorkerDied`
    when the worker running it died. ``deaths`` counts workers that died while running a task.
    """

    def __init__(self, max_workers: int | None = None, *, start_method: str = "spawn") -> None:
        self.max_workers = max(1, max_workers or os.cpu_count() or 1)
        self._context = multiprocessing.get_context(start_method)
        self._queue: collections.deque[_Task] = collections.deque()
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = multiprocessing.Pipe(duplex=False)
        self._shutdown = False
        self._kill = False
        self._thread: threading.Thread | None = None
        self.deaths = 0
        _POOLS.add(self)

    # -- Executor API -----------------------------------------------------------------------------------
    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot submit to a WorkerPool after shutdown")
            if self._thread is not None and not self._thread.is_alive():
                raise RuntimeError("the worker pool has stopped (its dispatcher failed); make a new one")
            self._queue.append(_Task(future, fn, args, kwargs))
            if self._thread is None:  # workers are started by this thread, which outlives them
                self._thread = threading.Thread(target=self._dispatch, name="atomforge-worker-pool", daemon=True)
                self._thread.start()
        self._wake()
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
            if cancel_futures:
                while self._queue:
                    task = self._queue.popleft()
                    task.future.cancel() or task.future.set_exception(RuntimeError("the worker pool was shut down"))
            thread = self._thread
        self._wake()
        if thread is None:
            self._close_pipe()
        elif wait and thread is not threading.current_thread():
            thread.join()

    def terminate(self) -> None:
        """Stop now: cancel queued tasks and kill every worker (a running task's future gets an error)."""
        with self._lock:
            self._kill = True
        self.shutdown(wait=True, cancel_futures=True)

    @property
    def processes(self) -> list[int]:
        """PIDs of the live workers."""
        return [w.process.pid for w in list(self._workers) if w.process.pid is not None]

    # -- the dispatcher thread ------------------------------------------------------------------------
    def _wake(self) -> None:
        try:
            self._wake_w.send_bytes(b"x")
        except (OSError, ValueError):  # closed: the dispatcher has ended
            pass

    def _close_pipe(self) -> None:
        self._wake_r.close()
        self._wake_w.close()

    def _dispatch(self) -> None:
        try:
            self._loop()
        except BaseException as error:  # noqa: BLE001 - never leave futures waiting forever
            with self._lock:
                tasks = [w.task for w in self._workers if w.task] + list(self._queue)
                self._queue.clear()
            for task in tasks:
                if not task.future.done():
                    task.future.set_exception(RuntimeError(f"the worker pool failed: {type(error).__name__}: {error}"))
        finally:
            for worker in list(self._workers):  # started by this thread: stop them before it ends
                if self._kill:
                    worker.process.kill()
                worker.finish()
                if worker.task is not None and not worker.task.future.done():
                    worker.task.future.set_exception(RuntimeError("the worker pool was terminated"))
            self._workers.clear()
            self._close_pipe()

    def _assign(self) -> None:
        """Give queued tasks to idle workers, starting workers up to ``max_workers``."""
        while True:
            with self._lock:
                if not self._queue or self._kill:
                    return
                idle = next((w for w in self._workers if w.task is None and w.process.is_alive()), None)
                if idle is None and len(self._workers) >= self.max_workers:
                    return
                task = self._queue.popleft()
            if not task.started and not task.future.set_running_or_notify_cancel():
                continue  # cancelled while queued
            task.started = True
            if idle is None:
                try:
                    idle = _Worker(self._context)
                except Exception as error:  # noqa: BLE001 - e.g. out of processes
                    task.future.set_exception(error)
                    continue
                self._workers.append(idle)
            try:
                idle.conn.send((task.fn, task.args, task.kwargs))
            except Exception as error:  # noqa: BLE001 - an unpicklable task, or the worker just died
                if isinstance(error, OSError) or not idle.process.is_alive():
                    with self._lock:  # the task never reached a worker: not its fault, queue it again
                        self._queue.appendleft(task)
                    idle.process.join(0.1)
                    if not idle.process.is_alive():
                        self._collect(idle)
                    continue
                task.future.set_exception(error)
                continue
            idle.task = task

    def _loop(self) -> None:
        while True:
            self._assign()
            with self._lock:
                if self._kill or (self._shutdown and not self._queue and all(w.task is None for w in self._workers)):
                    return
            waitables: list[Any] = [self._wake_r]
            for worker in self._workers:
                waitables.append(worker.process.sentinel)
                if worker.task is not None:
                    waitables.append(worker.conn)
            wait(waitables, timeout=1.0)
            while self._wake_r.poll():
                self._wake_r.recv_bytes()
            for worker in list(self._workers):
                self._collect(worker)

    def _collect(self, worker: _Worker) -> None:
        """Deliver a finished task's reply; remove a worker that died, failing its task."""
        if worker.task is not None:
            try:
                ready = worker.conn.poll()
            except (OSError, EOFError):
                ready = False
            if ready:
                try:
                    ok, value = worker.conn.recv()
                except (EOFError, OSError):
                    ok, value = None, None  # died while sending: handled below as a death
                except Exception as error:  # noqa: BLE001 - a reply that cannot be unpickled
                    ok, value = False, RuntimeError(f"the worker's reply could not be read: {error}")
                if ok is not None:
                    task, worker.task = worker.task, None
                    task.future.set_result(value) if ok else task.future.set_exception(value)
        if worker.process.is_alive():
            return
        worker.process.join()
        if worker in self._workers:
            self._workers.remove(worker)
        worker.conn.close()
        if worker.task is not None:
            self.deaths += 1
            task, worker.task = worker.task, None
            task.future.set_exception(WorkerDied(worker.process.exitcode, worker.process.pid))
