"""Faulty ASE calculators for the campaign fault-injection tests (``test_campaign_faults.py``),
used through the ``ase_calculator`` oracle so that worker processes can import them:

    oracle: {name: ase_calculator, calculator: "al_fault_oracles:FaultyEMT", mode: nan,
             state: /tmp/x, victims: 1, sleep: 0.2}

``FaultyEMT`` is ASE's EMT that logs every calculation to ``<state>/calls.log`` (one line:
``<structure key> <probe|label> <pid>``, fsynced) and misbehaves, by ``mode``, on its *victims*:
the first ``victims`` distinct campaign candidates it is asked about (decided at their first
request under a file lock, so exactly that many, whatever the scheduling; ``victims: -1`` = every
candidate). The oracle probe at campaign start labels a plain initial structure (no ``al_key`` in
its info) and is never a victim. Modes:

* ``ok`` — never misbehaves (a counting EMT); ``sleep`` seconds per call, plus
  ``$AL_FAULT_LABEL_SLEEP`` seconds per label call (read in the worker: set it in a driver's
  environment to make that driver's labels slow without changing the oracle's settings)
* ``raise`` — raises ``RuntimeError``
* ``nan`` — NaN forces
* ``shape`` — forces of shape (N − 1, 3)
* ``hang`` — sleeps ``hang`` seconds (default 60): the oracle's timeout must stop it
* ``die`` — ``os._exit(3)``: the worker process dies
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

import numpy as np
from ase.calculators.emt import EMT

from atomforge.active_learning import structure_hash

MODES = ("ok", "raise", "nan", "shape", "hang", "die")


def _append(path: Path, line: str) -> None:
    with open(path, "a") as handle:
        handle.write(line + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _is_victim(state: Path, key: str, victims: int) -> bool:
    """Whether ``key`` is (or now becomes) one of the first ``victims`` distinct candidates."""
    if victims < 0:
        return True
    with open(state / "victims.lock", "a") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        path = state / "victims.txt"
        chosen = path.read_text().split() if path.exists() else []
        if key in chosen:
            return True
        if len(chosen) < victims:
            _append(path, key)
            return True
        return False


def calls(state: Path | str) -> list[tuple[str, str]]:
    """(key, kind) of every calculation so far; kind is ``probe`` or ``label``."""
    path = Path(state) / "calls.log"
    lines = path.read_text().splitlines() if path.exists() else []
    return [tuple(line.split()[:2]) for line in lines if line.strip()]  # type: ignore[misc]


def victims(state: Path | str) -> list[str]:
    path = Path(state) / "victims.txt"
    return path.read_text().split() if path.exists() else []


class FaultyEMT(EMT):
    """EMT that counts its calls and misbehaves on chosen structures (module docstring)."""

    def __init__(self, mode: str = "ok", state: str = ".", victims: int = 1, sleep: float = 0.0,
                 hang: float = 60.0, **kwargs) -> None:  # noqa: ANN003
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
        super().__init__(**kwargs)
        self.mode, self.state, self.victims = mode, Path(state), int(victims)
        self.sleep, self.hang = float(sleep), float(hang)

    def calculate(self, atoms=None, properties=("energy",), system_changes=()):  # noqa: ANN001
        if atoms is not None:
            label = "al_key" in atoms.info  # a campaign candidate; the start-up probe has no key
            key = structure_hash(atoms)
            _append(self.state / "calls.log", f"{key} {'label' if label else 'probe'} {os.getpid()}")
            time.sleep(self.sleep + (float(os.environ.get("AL_FAULT_LABEL_SLEEP", "0")) if label else 0.0))
            victim = label and self.mode != "ok" and _is_victim(self.state, key, self.victims)
            if victim and self.mode == "die":
                os._exit(3)
            if victim and self.mode == "raise":
                raise RuntimeError("the SCF exploded (injected fault)")
            if victim and self.mode == "hang":
                time.sleep(self.hang)
        else:
            victim = False
        super().calculate(atoms, properties, system_changes)
        if victim and self.mode == "nan":
            self.results["forces"] = self.results["forces"] * np.nan
        if victim and self.mode == "shape":
            self.results["forces"] = self.results["forces"][:-1]
