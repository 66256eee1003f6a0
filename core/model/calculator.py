"""ASE calculator: a thin adapter from ``ase.Atoms`` to a :class:`Potential`."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes
from ase.stress import full_3x3_to_voigt_6_stress

from .. import keys as K
from .._errors import ConfigError
from ..data.fields import FieldTable
from ..data.graph import StructureBatcher
from ..data.structures import check_geometry
from ..devices import resolve_device
from ..exploration.flagging import UncertaintyFlagger
from .potential import Potential, check_finite_outputs, with_head

__all__ = ["AtomforgeCalculator", "UNCERTAINTY_PROPERTIES", "load_calculator"]

#: extra results of a model with a UQ head (calibrated): eV, [N] eV/Å, eV/Å
UNCERTAINTY_PROPERTIES = (K.ENERGY_STD, K.FORCES_STD, K.FORCES_STD_MAX)


class AtomforgeCalculator(Calculator):
    """Energy, free energy, forces and (for 3D-periodic cells) stress from an atomforge model.

    The calculator works on its own copy of the model with parameter gradients switched off, so
    that autograd only tracks positions and strain. Call after call on one moving system (MD,
    relaxation) it rebuilds positions and the neighbour list and reuses the tensors of what did
    not change (numbers, cell, pbc, metadata: :class:`~atomforge.data.graph.StructureBatcher`).

    With a UQ head (``uq`` in the model file, see ``docs/uq.md``) it also reports, calibrated:
    ``energy_std`` (eV, float), ``forces_std`` (eV/Å, [N]: the std of each force component of
    an atom) and ``forces_std_max`` (eV/Å, float: the largest ``forces_std``). Energy, forces and
    stress are then the head's means.

    **Flagging** (UQ models only): with ``flag_uncertain`` (a trust level, max force std in eV/Å)
    and ``candidates`` (an extxyz path), every calculation whose ``forces_std_max`` is ≥ the
    trust level appends the configuration to the candidates file, fsynced, and the first one
    warns once (:mod:`atomforge.flagging`). ``self.flagger`` is then the
    :class:`~atomforge.UncertaintyFlagger` (counts in ``flagged``); otherwise ``None``.
    """

    implemented_properties = ["energy", "free_energy", "energies", "forces", "stress"]

    def __init__(
        self,
        model: Potential,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        flag_uncertain: float | None = None,
        candidates: str | Path | None = None,
        fields: FieldTable | None = None,
        head: str | int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if head is not None:
            getattr(model, "potential", model).head_number(head)  # an unknown head fails here
        self.head = head  # a multi-head model's readout for every structure (None: atoms.info['fidelity'])
        model = copy.deepcopy(model).eval()
        if dtype is not None:
            model = model.to(dtype)
        self.device = resolve_device(device)
        self.fields = fields  # batch fields (the registry's, so plugin fields are read from atoms)
        self.model = model.to(self.device)
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.dtype = _float_dtype(self.model)
        if getattr(self.model, "calibration", None) is not None:  # a UQ head: std keys too
            self.implemented_properties = [*type(self).implemented_properties, *UNCERTAINTY_PROPERTIES]
        self.flagger = _flagger(flag_uncertain, candidates, uq=K.FORCES_STD_MAX in self.implemented_properties)
        # the batch of each call's structure; what the atoms' motion leaves unchanged is reused
        self._batches = StructureBatcher(self.model.cutoff, dtype=self.dtype, fields=fields, device=self.device)

    def calculate(
        self,
        atoms: Atoms | None = None,
        properties: list[str] | None = None,
        system_changes: list[str] = all_changes,
    ) -> None:
        super().calculate(atoms, properties or ["energy"], system_changes)
        check_geometry(self.atoms)
        batch = with_head(self.model, self._batches(self.atoms), self.head)
        want_stress = bool(np.all(self.atoms.pbc))
        out = self.model(batch, compute_forces=True, compute_stress=want_stress)
        energy = float(out[K.ENERGY].detach().cpu()[0])
        results = {
            "energy": energy,
            "free_energy": energy,
            "energies": out[K.NODE_ENERGY].detach().cpu().double().numpy(),
            "forces": out[K.FORCES].detach().cpu().double().numpy(),
        }
        stress = out[K.STRESS].detach().cpu().double().numpy()[0] if want_stress else np.zeros(0)
        for key in UNCERTAINTY_PROPERTIES:
            if key in out:
                value = out[key].detach().cpu().double().numpy()
                results[key] = float(value[0]) if key != K.FORCES_STD else value
        if not _all_finite(stress, *results.values()):  # name the NaN/inf outputs (raises; the formula only now)
            check_finite_outputs(out, batch, where=f"{len(self.atoms)}-atom {self.atoms.get_chemical_formula()}")
        if want_stress:
            results["stress"] = full_3x3_to_voigt_6_stress(stress)
        self.results = results
        if self.flagger is not None:
            self.flagger.observe(self.atoms, self.results)

    def check_state(self, atoms: Atoms, tol: float = 1e-15) -> list[str]:
        """What changed since the last calculation: ASE's answer
        (:func:`ase.calculators.calculator.compare_atoms`), computed with cheaper comparisons of
        finite float arrays (ASE's ``np.allclose`` costs ~15 µs an array, a quarter of a small
        molecule's host-side time)."""
        return _system_changes(self.atoms, atoms, tol, set(self.ignored_changes))


def _all_finite(*values: float | np.ndarray) -> bool:
    """``True`` only if every entry of ``values`` (floats, arrays) is finite, from one sum (a NaN
    or inf anywhere makes it NaN or inf); ``False`` also when finite entries overflow the sum,
    which only sends the caller on to the exact check (:func:`check_finite_outputs`)."""
    with np.errstate(over="ignore", invalid="ignore"):  # overflow, inf - inf: caught below
        return math.isfinite(sum(value if isinstance(value, float) else float(value.sum()) for value in values))


def _system_changes(before: Atoms | None, atoms: Atoms, tol: float, excluded: set[str]) -> list[str]:
    """``ase.calculators.calculator.compare_atoms(before, atoms, tol, excluded)``, with :func:`_equal`."""
    if before is None:
        return all_changes[:]
    check = set(all_changes) - excluded
    changes = [prop for prop in ("cell", "pbc") if prop in check and not _equal(getattr(before, prop),
                                                                                   getattr(atoms, prop), tol)]
    check -= {"cell", "pbc"}
    first, second = set(before.arrays), set(atoms.arrays)
    changes += check & (first ^ second)
    changes += [prop for prop in check & first & second if not _equal(before.arrays[prop], atoms.arrays[prop], tol)]
    return changes


def _equal(a: Any, b: Any, tol: float) -> bool:
    """ASE's ``equal(a, b, atol=tol)`` (``np.allclose(a, b, rtol=0, atol=tol)``) for arrays: for
    finite floats that is ``|a - b| <= tol`` everywhere, and equal arrays of any kind are close;
    everything else (NaN, inf, unequal integers) is left to ``np.allclose``."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        return False
    if a.dtype.kind == "f" and b.dtype.kind == "f":
        with np.errstate(invalid="ignore"):  # inf - inf: NaN, not close here, left to np.allclose
            if bool((np.abs(a - b) <= tol).all()):
                return True
        if bool(np.isfinite(a).all()) and bool(np.isfinite(b).all()):
            return False
    elif np.array_equal(a, b):
        return True
    return bool(np.allclose(a, b, rtol=0, atol=tol))


def _flagger(trust_level: float | None, candidates: str | Path | None, *, uq: bool) -> UncertaintyFlagger | None:
    """The flagger asked for (both or neither of ``flag_uncertain`` and ``candidates``)."""
    if trust_level is None and candidates is None:
        return None
    if trust_level is None or candidates is None:
        raise ConfigError("flagging uncertain configurations needs both flag_uncertain (a trust level, max "
                          f"force std in eV/Å) and candidates (a file); got flag_uncertain={trust_level!r}, "
                          f"candidates={candidates!r}")
    if not uq:
        raise ConfigError("flagging uncertain configurations needs a UQ model (one whose model file has a "
                          "`uq` head, which reports forces_std_max); this model has none. Train it with a "
                          "`uq:` section, e.g. uq: {name: deep_ensemble, num_members: 4} (docs/uq.md).")
    return UncertaintyFlagger(candidates, trust_level)


def _float_dtype(model: torch.nn.Module) -> torch.dtype:
    for parameter in model.parameters():
        if parameter.is_floating_point():
            return parameter.dtype
    return torch.get_default_dtype()


def load_calculator(
    path: str | Path, *, device: str = "cpu", dtype: torch.dtype | None = None, registry: Any = None,
    flag_uncertain: float | None = None, candidates: str | Path | None = None, head: str | int | None = None,
) -> AtomforgeCalculator:
    """An ASE calculator for the model file at ``path``, on ``device`` (``cpu``, ``cuda``,
    ``cuda:N`` or ``auto``); ``head``: a multi-head model's readout for every structure.

    ``flag_uncertain`` (eV/Å) and ``candidates`` (extxyz path) switch on flagging (see
    :class:`AtomforgeCalculator`); flagged frames record the model file as ``info['source']``.
    """
    from ..registry import make_registry
    from .modelfile import load_model

    registry = registry or make_registry()
    calculator = AtomforgeCalculator(load_model(path, registry=registry), device=device, dtype=dtype,
                                     flag_uncertain=flag_uncertain, candidates=candidates, fields=registry.fields,
                                     head=head)
    if calculator.flagger is not None:
        calculator.flagger.source = str(Path(path).resolve())
    return calculator
