"""The oracle interface: something that labels structures (energy, forces, stress).

An oracle's ``label(atoms)`` returns a labelled copy or raises. Active learning never calls it
bare: :func:`label_safely` adds a time limit, retries and a validation of every result
(:func:`check_label_result`: finite energy, forces of shape (N, 3), stress (3, 3) or Voigt (6,),
the structure that was asked about), and turns every failure into a :class:`LabelResult` with a
reason, so that one bad candidate (an SCF that does not converge, a NaN, forces of the wrong
shape, a hung calculation) is recorded and skipped instead of stopping a campaign.
"""

from __future__ import annotations

import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol, Sequence, runtime_checkable

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes

from .._errors import AtomforgeError
from ..data.structures import attach_labels, get_labels

__all__ = [
    "Oracle",
    "CalculatorOracle",
    "OracleFailure",
    "OracleTimeout",
    "LabelResult",
    "label_safely",
    "check_labels_finite",
    "check_label_result",
    "time_limit",
    "OracleCalculator",
]


class OracleFailure(AtomforgeError):
    """Raised by an oracle (or :func:`check_labels_finite`) when a structure cannot be labelled:
    an SCF that did not converge, non-finite labels, a geometry the method cannot handle."""


class OracleTimeout(OracleFailure):
    """Raised inside :func:`time_limit` when a label call runs past its time limit."""


@runtime_checkable
class Oracle(Protocol):
    """Labels structures; ``label`` returns a labelled copy and never mutates its input."""

    name: str

    def label(self, atoms: Atoms) -> Atoms: ...


class CalculatorOracle:
    """An oracle backed by any ASE calculator, made by ``make_calculator``.

    With ``reuse=False`` (default) a fresh calculator is built for every structure, so no state
    leaks between labels. ``reuse=True`` builds it once and resets it before each call: use it for
    calculators that are expensive to build (pretrained models that load weights).
    """

    def __init__(self, name: str, make_calculator: "type[Calculator] | Callable[[], Calculator]", *,
                 stress: bool = True, reuse: bool = False) -> None:
        self.name = name
        self.make_calculator = make_calculator
        self.stress = stress  # also label stress for 3D-periodic structures (if the calculator has it)
        self.reuse = reuse  # build the calculator once and reset it before each call
        self._calculator: Calculator | None = None

    def _calculator_for_call(self) -> Calculator:
        if not self.reuse:
            return self.make_calculator()
        if self._calculator is None:
            self._calculator = self.make_calculator()
        self._calculator.reset()
        return self._calculator

    def label(self, atoms: Atoms) -> Atoms:
        work = atoms.copy()
        work.set_constraint()  # labels are the raw physics; constraints belong to the simulation
        work.calc = calculator = self._calculator_for_call()
        energy = work.get_potential_energy()
        forces = work.get_forces()
        has_stress = "stress" in getattr(calculator, "implemented_properties", ("stress",))
        stress = work.get_stress(voigt=True) if self.stress and has_stress and work.pbc.all() else None
        return attach_labels(atoms, energy=energy, forces=forces, stress=stress)

    def label_many(self, structures: Sequence[Atoms]) -> list[Atoms]:
        """Label each structure in turn."""
        return [self.label(a) for a in structures]


@dataclass(frozen=True)
class LabelResult:
    """The outcome of labelling one candidate: the labelled copy, or why there is none."""

    key: str  # the candidate's structure hash (the label journal's key)
    atoms: Atoms | None  # labelled copy (SinglePointCalculator); None when labelling failed
    error: str | None = None  # why it failed, e.g. "OracleTimeout: no result within 30 s"
    attempts: int = 1  # label calls made (1 + retries used)
    seconds: float = 0.0  # wall-clock time of all attempts

    @property
    def ok(self) -> bool:
        """Whether the candidate was labelled."""
        return self.error is None


def check_labels_finite(atoms: Atoms) -> None:
    """Raise :class:`OracleFailure` if the energy is missing or any label is NaN/inf."""
    labels = get_labels(atoms)
    if labels.energy is None:
        raise OracleFailure("the oracle returned no energy")
    for name in ("energy", "forces", "stress"):
        value = getattr(labels, name)
        if value is not None and not np.all(np.isfinite(value)):
            raise OracleFailure(f"the oracle returned non-finite {name} (NaN or inf)")


POSITION_TOLERANCE = 1e-6  # Å: how far a returned structure's positions (and cell) may be from the request's


def _raw_label(atoms: Atoms, name: str) -> Any:
    """A label as the oracle stored it (calculator results first, then info/arrays), unconverted."""
    results = (getattr(atoms.calc, "results", None) or {}) if atoms.calc is not None else {}
    if name in results:
        return results[name]
    return atoms.arrays.get(name) if name == "forces" else atoms.info.get(name)


def _array(name: str, value: Any) -> np.ndarray:
    try:
        return np.asarray(value, dtype=float)
    except (TypeError, ValueError) as error:
        raise OracleFailure(f"the oracle returned {name} that are not numbers ({type(value).__name__}: {error})") \
            from None


def check_label_result(request: Atoms, labelled: Any) -> Atoms:
    """Validate an oracle's result for ``request`` before anything stores it; return it.

    Raises :class:`OracleFailure` naming the first problem: not an ``ase.Atoms``; a structure
    other than the one asked about (number of atoms, atomic numbers, positions or cell off by
    more than 1e-6 Å, pbc); no energy, or an energy that is not one finite number; no forces, or
    forces not of shape (N, 3) or not finite; a stress (optional) not of shape (3, 3) or Voigt
    (6,) or not finite. :func:`label_safely` runs it on every attempt, so a bad result is a failed
    attempt with this reason (retried like an exception).
    """
    if not isinstance(labelled, Atoms):
        raise OracleFailure(f"the oracle returned a {type(labelled).__name__}, not a labelled ase.Atoms copy")
    n = len(request)
    if len(labelled) != n:
        raise OracleFailure(f"the oracle returned a structure of {len(labelled)} atoms for one of {n}")
    if not np.array_equal(labelled.numbers, request.numbers):
        raise OracleFailure("the oracle returned a structure with other atomic numbers than the request's")
    shift = float(np.abs(labelled.positions - request.positions).max()) if n else 0.0
    if not shift <= POSITION_TOLERANCE:
        raise OracleFailure(f"the oracle returned a structure whose positions differ from the request's by up to "
                            f"{shift:.3g} Å (did it wrap, relax or reorder it? label the structure as given)")
    if not np.allclose(labelled.cell.array, request.cell.array, rtol=0, atol=POSITION_TOLERANCE) or \
            not np.array_equal(labelled.pbc, request.pbc):
        raise OracleFailure("the oracle returned a structure with another cell or pbc than the request's")
    energy = _raw_label(labelled, "energy")
    if energy is None:
        raise OracleFailure("the oracle returned no energy")
    energy = _array("energy", energy)
    if energy.size != 1:
        raise OracleFailure(f"the oracle returned an energy of shape {energy.shape}; expected one number")
    if not np.isfinite(energy).all():
        raise OracleFailure("the oracle returned non-finite energy (NaN or inf)")
    forces = _raw_label(labelled, "forces")
    if forces is None:
        raise OracleFailure("the oracle returned no forces")
    forces = _array("forces", forces)
    if forces.shape != (n, 3):
        raise OracleFailure(f"the oracle returned forces of shape {forces.shape}; expected ({n}, 3)")
    if not np.isfinite(forces).all():
        raise OracleFailure("the oracle returned non-finite forces (NaN or inf)")
    stress = _raw_label(labelled, "stress")
    if stress is not None:
        stress = _array("stress", stress)
        if stress.shape not in ((6,), (3, 3)):
            raise OracleFailure(f"the oracle returned a stress of shape {stress.shape}; expected (3, 3) or Voigt (6,)")
        if not np.isfinite(stress).all():
            raise OracleFailure("the oracle returned non-finite stress (NaN or inf)")
    return labelled


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Raise :class:`OracleTimeout` in the block after ``seconds`` of wall-clock time.

    Uses ``SIGALRM``, so it works in the main thread of a process (the local process pool's
    workers and serial labelling); native code that never returns to the interpreter is
    interrupted only when it does. In other threads (thread pools, dask workers) it is a no-op;
    :func:`label_safely` then enforces the limit by :func:`_abandon_after` instead.
    """
    if not seconds or not _in_main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def on_alarm(signum: int, frame: Any) -> None:
        raise OracleTimeout(f"no result within {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _abandon_after(seconds: float, call: Callable[[], Atoms]) -> Atoms:
    """Run ``call`` in a daemon thread and wait at most ``seconds``: the way to time out a label
    off the main thread (thread pools, dask workers), where no signal can interrupt it. A call
    that overruns raises :class:`OracleTimeout`; it is abandoned — it keeps its thread until it
    returns, its result is discarded — so the worker is free for the next label."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = call()
        except BaseException as error:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = error

    worker = threading.Thread(target=target, name="atomforge-oracle-call", daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise OracleTimeout(f"no result within {seconds:g} s (the calculation was abandoned in a background "
                            "thread; use executor kind 'process' to have hung calculations killed)")
    if "error" in box:
        raise box["error"]
    return box["result"]


def _one_attempt(oracle: Oracle, atoms: Atoms, timeout: float | None) -> Atoms:
    if timeout and not _in_main_thread():
        labelled = _abandon_after(timeout, lambda: oracle.label(atoms))
    else:
        with time_limit(timeout):
            labelled = oracle.label(atoms)
    return check_label_result(atoms, labelled)


def label_safely(oracle: Oracle, atoms: Atoms, *, key: str = "", timeout: float | None = None,
                 retries: int = 0) -> LabelResult:
    """Label ``atoms`` with up to ``1 + retries`` attempts, each limited to ``timeout`` seconds.

    Every result is validated by :func:`check_label_result` (finite energy, forces (N, 3), stress
    (3, 3) or (6,) when present, the structure asked about). Any exception and any invalid result
    becomes a failed :class:`LabelResult` naming the error; a timeout is final (the same
    calculation would hit it again) and is not retried.
    ``KeyboardInterrupt``/``SystemExit`` still propagate, so a campaign can be stopped.
    """
    if retries < 0:
        raise OracleFailure(f"retries must be ≥ 0; got {retries}")
    started, error = time.perf_counter(), ""
    for attempt in range(1, retries + 2):
        try:
            labelled = _one_attempt(oracle, atoms, timeout)
            return LabelResult(key, labelled, None, attempt, time.perf_counter() - started)
        except OracleTimeout as failure:
            return LabelResult(key, None, f"OracleTimeout: {failure}", attempt, time.perf_counter() - started)
        except Exception as failure:  # noqa: BLE001 - any oracle failure is recorded, never fatal
            error = f"{type(failure).__name__}: {failure}"
    return LabelResult(key, None, error, retries + 1, time.perf_counter() - started)


class OracleCalculator(Calculator):
    """An oracle as an ASE calculator (one label per call), so dynamics can run with an oracle
    that has no calculator of its own (e.g. ``pyscf``): the distillation teacher's MD and the
    stability suite's reference MD. Stress is passed on when the oracle gives one.

    Every call goes through :func:`label_safely` (``timeout`` seconds per attempt, ``retries``
    more attempts, the result validated); a call that still fails raises :class:`OracleFailure`
    naming the oracle's error, which ends that trajectory in the explorers."""

    implemented_properties = ["energy", "forces", "stress"]

    def __init__(self, oracle: Any, *, timeout: float | None = None, retries: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.oracle = oracle
        self.timeout = timeout
        self.retries = retries

    def calculate(self, atoms: Atoms | None = None, properties: Sequence[str] = ("energy",),
                  system_changes: Sequence[str] = all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        result = label_safely(self.oracle, self.atoms.copy(), timeout=self.timeout, retries=self.retries)
        if not result.ok:
            raise OracleFailure(f"the oracle failed during dynamics: {result.error}")
        labelled = result.atoms
        self.results = {"energy": float(labelled.get_potential_energy()), "forces": np.array(labelled.get_forces())}
        try:
            self.results["stress"] = np.array(labelled.get_stress())
        except Exception:  # noqa: BLE001  (molecules: no stress)
            pass
