"""Flag configurations a UQ model is unsure about, in everyday use (MD, relaxations, any ASE driver).

An :class:`UncertaintyFlagger` looks at the results of every calculation of a UQ calculator. When
the max force std σ (``forces_std_max``, read by :func:`atomforge.uncertainty_of`)
reaches the trust level, it appends the configuration to an extxyz *candidates file*, one frame
per flagged calculation, in one write that is flushed and fsynced: a crash loses nothing already
flagged. The first flag of a flagger issues one :class:`UncertainConfigurationWarning` naming the
file. The ``candidates_file`` explorer (``docs/active_learning.md``) reads such files back with
:func:`read_candidates`, so a campaign labels what production runs flagged.

A flagged frame holds positions, numbers, cell, pbc and the metadata ``charge``, ``spin`` and
``fidelity`` (no labels: the model's numbers are not ground truth); ``info``: ``step``,
``forces_std_max`` (eV/Å), ``energy_std`` (eV), ``model_energy`` (eV), ``trust_level`` (eV/Å)
and ``source`` (the model file, where known); ``arrays['forces_std']``: the per-atom std (eV/Å).
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from ase import Atoms
from ase.io import read, write

from .._errors import ConfigError
from .._io import append_durably
from ..data.structures import complete_extxyz_length
from .records import uncertainty_of

__all__ = ["UncertaintyFlagger", "UncertainConfigurationWarning", "read_candidates"]

#: metadata kept on a flagged frame (the oracle may need charge and spin)
_METADATA = ("charge", "spin", "fidelity")


class UncertainConfigurationWarning(UserWarning):
    """Issued once per :class:`UncertaintyFlagger`, at its first flagged configuration."""


class UncertaintyFlagger:
    """Append every configuration whose max force std σ ≥ ``trust_level`` (eV/Å) to ``path``.

    ``step`` is the step written with a frame: a driver that knows its step number sets it
    (:func:`atomforge.analysis.md.run_md` does); while it is ``None`` the count of calculations so far
    (0-based) is written instead. An existing file is appended to, never truncated.
    """

    def __init__(self, path: str | Path, trust_level: float, *, source: str = "") -> None:
        if not np.isfinite(trust_level) or trust_level < 0:
            raise ConfigError(f"the trust level for flagging is a max force std in eV/Å, ≥ 0; got {trust_level!r}")
        self.path = Path(path)  # the extxyz candidates file (created at the first flag)
        self.trust_level = float(trust_level)  # eV/Å
        self.source = source  # written to info['source']: where the model came from
        self.step: int | None = None  # the driver's step of the next calculation, if it knows it
        self.calls = 0  # calculations observed
        self.flagged = 0  # configurations written
        self._warned = False

    def observe(self, atoms: Atoms, results: Mapping[str, Any]) -> bool:
        """Look at one calculation's results; append ``atoms`` if it is uncertain. True if flagged."""
        step = self.calls if self.step is None else self.step
        self.calls += 1
        sigma, energy_std = uncertainty_of(results)
        if sigma is None or sigma < self.trust_level:
            return False
        self._append(_frame(atoms, results, step=step, sigma=sigma, energy_std=energy_std,
                            trust_level=self.trust_level, source=self.source))
        self.flagged += 1
        if not self._warned:
            self._warned = True
            warnings.warn(f"max force std {sigma:.3g} eV/Å ≥ trust level {self.trust_level:g} eV/Å at step "
                          f"{step}: the model is unsure here. This and every further uncertain configuration "
                          f"is appended to {self.path} (label them with an active-learning campaign, "
                          "explorer `candidates_file`)", UncertainConfigurationWarning, stacklevel=2)
        return True

    def _append(self, frame: Atoms) -> None:
        """One write of the whole frame, flushed and fsynced."""
        buffer = io.StringIO()
        write(buffer, frame, format="extxyz")
        append_durably(self.path, buffer.getvalue())


def _frame(atoms: Atoms, results: Mapping[str, Any], *, step: int, sigma: float, energy_std: float | None,
           trust_level: float, source: str) -> Atoms:
    """A label-free copy of ``atoms`` with the flag's record in ``info`` and ``arrays``."""
    frame = Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
    frame.info.update({k: v for k, v in atoms.info.items() if k in _METADATA})
    frame.info.update(step=int(step), forces_std_max=float(sigma), trust_level=trust_level)
    if energy_std is not None:
        frame.info["energy_std"] = float(energy_std)
    if results.get("energy") is not None:  # not "energy": extxyz readers would take it for a label
        frame.info["model_energy"] = float(results["energy"])
    if source:
        frame.info["source"] = source
    forces_std = results.get("forces_std")
    if forces_std is not None and np.shape(forces_std) == (len(atoms),):
        frame.arrays["forces_std"] = np.asarray(forces_std, dtype=float)
    return frame


def read_candidates(path: str | Path) -> list[Atoms]:
    """The flagged configurations in a candidates file, in order.

    A half-written last frame (the file is being appended to, or its writer was killed mid-write)
    is skipped. Raises :class:`ConfigError` naming the file when it is missing or holds no frame.
    """
    path = Path(path)
    how = ("candidates files are written by `atomforge md ... --flag-uncertain LEVEL --candidates FILE` "
           "or load_calculator(model, flag_uncertain=LEVEL, candidates=FILE)")
    if not path.is_file():
        raise ConfigError(f"candidates file {path} does not exist; {how}, and only once a configuration is "
                          "flagged. Check the path, or lower the trust level if nothing was flagged.")
    data = path.read_bytes()
    text = data[: complete_extxyz_length(data)].decode()
    if not text.strip():
        raise ConfigError(f"candidates file {path} holds no complete extxyz frame; {how}. Remove it from "
                          "the campaign's explorers or point to a file with flagged configurations.")
    return list(read(io.StringIO(text), index=":", format="extxyz"))
