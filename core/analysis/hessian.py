"""Rows of the energy Hessian: by autograd for atomforge models, by finite differences for any
ASE calculator — the labels and the loss of Hessian-matching distillation (docs/distill.md).

A structure of N atoms has a 3N × 3N Hessian ``H = ∂²E/∂r∂r = −∂F/∂r``. Distillation matches a
few rows of it per structure (Amin, Raja & Krishnapriyan, ICLR 2025: subsampled rows carry most
of the benefit at a fraction of the cost). Row ``i`` (a flat coordinate index ``3·atom + axis``)
is stored as an ``[N, 3]`` array: ``row[j, b] = ∂²E / ∂r_i ∂r_{j,b}``.

Storage in ``ase.Atoms`` (extxyz round-trips it): ``atoms.arrays["hessian_rows"]`` ``[N, 3R]``
(row ``r`` in columns ``3r:3r+3``) and ``atoms.info["hessian_index"]`` (the R flat indices).
In a batch: ``hessian_rows`` ``[N, R, 3]`` and ``hessian_index`` ``[B, R]`` (indices local to
each structure), declared as fields by the ``hessian`` loss plugin.

For a direct-force model (forces not a gradient) the same rows are those of ``−∂F/∂r``, the force
Jacobian, which is then not symmetric.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator

from .. import keys as K
from .._errors import ConfigError
from .physics import model_forces

__all__ = ["HESSIAN_ROWS", "HESSIAN_INDEX", "hessian_rows", "fd_hessian_rows", "pick_rows", "attach_hessian_rows",
           "read_hessian_rows"]

HESSIAN_ROWS = "hessian_rows"  # batch: [N, R, 3]; atoms.arrays: [N, 3R]
HESSIAN_INDEX = "hessian_index"  # batch: [B, R] long (local flat indices); atoms.info: R ints


def pick_rows(n_atoms: int, rows: int, rng: np.random.Generator) -> np.ndarray:
    """``rows`` distinct flat coordinate indices of a structure of ``n_atoms`` atoms, drawn
    uniformly (all 3N when ``rows`` ≥ 3N, in random order)."""
    if rows < 1:
        raise ConfigError(f"Hessian rows per structure must be ≥ 1; got {rows}")
    return rng.permutation(3 * n_atoms)[: min(rows, 3 * n_atoms)].astype(np.int64)


def hessian_rows(model: torch.nn.Module, batch: dict[str, torch.Tensor], index: torch.Tensor, *,
                 create_graph: bool = False) -> torch.Tensor:
    """Rows ``index`` [B, R] (local flat indices, one set per structure) of each structure's
    Hessian, as ``[N, R, 3]``: one extra forward pass with position gradients, then R backward
    passes (all structures of the batch at once: they do not interact). ``create_graph`` keeps the
    result differentiable for training (double backward through the model)."""
    with torch.enable_grad():
        forces, positions = model_forces(model, batch)
        n_atoms = batch[K.N_ATOMS]
        offsets = 3 * (torch.cumsum(n_atoms, 0) - n_atoms)
        flat = forces.reshape(-1)
        rows = []
        for r in range(int(index.shape[1])):
            picked = flat[offsets + index[:, r].to(offsets.device)]
            (gradient,) = torch.autograd.grad(picked.sum(), positions, create_graph=create_graph, retain_graph=True)
            rows.append(-gradient)
    return torch.stack(rows, dim=1)


def fd_hessian_rows(atoms: Atoms, calculator: Calculator, index: Sequence[int], *, step: float = 0.005) -> np.ndarray:
    """Rows ``index`` of the Hessian of ``atoms`` under any ASE calculator, ``[N, R, 3]``, by
    central differences of the forces: row i = −(F(r + h eᵢ) − F(r − h eᵢ)) / 2h (the column,
    equal to the row by symmetry of a conservative field). Costs 2 calls per row; error O(h²)."""
    if step <= 0:
        raise ConfigError(f"finite-difference step must be > 0 Å; got {step}")
    work = atoms.copy()
    work.calc = calculator
    base = atoms.positions.copy()
    out = np.empty((len(atoms), len(index), 3))
    for r, flat in enumerate(index):
        atom, axis = divmod(int(flat), 3)
        displaced = []
        for sign in (1.0, -1.0):
            positions = base.copy()
            positions[atom, axis] += sign * step
            work.positions = positions
            displaced.append(np.array(work.get_forces()))
        out[:, r, :] = -(displaced[0] - displaced[1]) / (2 * step)
    return out


def attach_hessian_rows(atoms: Atoms, index: Sequence[int], rows: np.ndarray) -> Atoms:
    """Store rows ``[N, R, 3]`` and their flat indices in ``atoms`` (extxyz-safe layout)."""
    rows = np.asarray(rows, dtype=float)
    if rows.shape != (len(atoms), len(index), 3):
        raise ValueError(f"Hessian rows of shape {rows.shape}; expected {(len(atoms), len(index), 3)}")
    atoms.arrays[HESSIAN_ROWS] = rows.reshape(len(atoms), -1)
    atoms.info[HESSIAN_INDEX] = np.asarray(index, dtype=np.int64)
    return atoms


def read_hessian_rows(atoms: Atoms) -> tuple[np.ndarray, np.ndarray] | None:
    """``(index [R], rows [N, R, 3])`` stored in ``atoms``, or ``None``."""
    if HESSIAN_ROWS not in atoms.arrays or HESSIAN_INDEX not in atoms.info:
        return None
    index = np.atleast_1d(np.asarray(atoms.info[HESSIAN_INDEX], dtype=np.int64))
    rows = np.asarray(atoms.arrays[HESSIAN_ROWS], dtype=float).reshape(len(atoms), len(index), 3)
    return index, rows
