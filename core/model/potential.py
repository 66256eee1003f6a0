"""The one place where energies become forces and stress.

:class:`Potential` = per-element reference energies + scale/shift + a backbone. Forces are
``-∂E/∂r`` and stress is ``(1/V) ∂E/∂ε`` (ASE sign convention) by autograd through a symmetric
strain applied to positions and cell, with ``create_graph`` only while training. A backbone that
declares ``direct_forces`` supplies per-atom force vectors instead of the gradient.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from .. import keys as K
from .._errors import ModelOutputError, UnseenElementError

__all__ = [
    "Backbone", "Potential", "differentiable_inputs", "energy_derivatives", "fit_normalization",
    "scatter_sum", "check_finite_outputs",
]

_MAX_Z = 119


def scatter_sum(values: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """Sum ``values`` ([M, ...]) into ``size`` bins given by ``index`` ([M])."""
    out = values.new_zeros((size,) + tuple(values.shape[1:]))
    return out.index_add_(0, index, values)


class Backbone(nn.Module):
    """Base class of model architectures.

    ``forward(batch)`` receives a batch with :data:`keys.EDGE_VECTORS`, :data:`keys.EDGE_LENGTHS`
    and :data:`keys.ELEMENT_INDEX` added and returns a dict with :data:`keys.NODE_ENERGY` ([N],
    normalised units), optionally :data:`keys.NODE_FEATURES` ([N, F]), :data:`keys.NODE_VECTORS`
    ([N, 3, F], equivariant) and, when
    ``direct_forces`` is true, :data:`keys.DIRECT_FORCES` ([N, 3], normalised units).
    """

    direct_forces: bool = False
    #: whether ``forward`` runs under ``torch.func.vmap`` (no in-place writes into tensors created
    #: inside it from batched inputs); the deep ensemble's vectorised evaluation needs it
    vmap_safe: bool = True

    def __init__(self, *, num_elements: int, cutoff: float) -> None:
        super().__init__()
        self.num_elements = int(num_elements)
        self.cutoff = float(cutoff)


class Potential(nn.Module):
    """Composition baseline + scale/shift + backbone; forces and stress from one wrapper."""

    def __init__(
        self,
        backbone: Backbone,
        *,
        elements: Sequence[int],
        atomic_energies: Sequence[float],
        scale: float = 1.0,
        shift: float = 0.0,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.elements = [int(z) for z in elements]
        z_to_index = torch.full((_MAX_Z,), -1, dtype=torch.long)
        z_to_index[torch.tensor(self.elements)] = torch.arange(len(self.elements))
        self.register_buffer("z_to_index", z_to_index)
        self.register_buffer("atomic_energies", torch.tensor(list(atomic_energies), dtype=torch.float64))
        self.register_buffer("scale", torch.tensor(float(scale), dtype=torch.float64))
        self.register_buffer("shift", torch.tensor(float(shift), dtype=torch.float64))

    @property
    def cutoff(self) -> float:
        return self.backbone.cutoff

    def element_index(self, numbers: torch.Tensor) -> torch.Tensor:
        """Map atomic numbers to model element indices; unseen elements raise a clear error."""
        index = self.z_to_index[numbers.clamp(0, _MAX_Z - 1)]
        if bool((index < 0).any()) or bool((numbers >= _MAX_Z).any()):
            unseen = sorted(set(numbers[index < 0].tolist()))
            raise UnseenElementError(
                f"the structure contains element(s) Z={unseen} that the model was never trained on; "
                f"it knows Z={self.elements}. Retrain or fine-tune with data containing them."
            )
        return index

    def forward(
        self,
        batch: dict[str, torch.Tensor],
        *,
        compute_forces: bool = True,
        compute_stress: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Energy [B] (eV), forces [N, 3] (eV/Å), stress [B, 3, 3] (eV/Å³) when requested."""
        gradient_forces = compute_forces and not self.backbone.direct_forces
        positions, strain = differentiable_inputs(batch, gradient_forces, compute_stress)
        results = self.energy_outputs(batch, positions, strain)
        direct = results.pop(K.DIRECT_FORCES, None)
        results.update(energy_derivatives(results[K.ENERGY], batch, positions if gradient_forces else None,
                                          strain, create_graph=self.training))
        if compute_forces and direct is not None:
            results[K.FORCES] = direct
        return results

    def energy_outputs(
        self, batch: dict[str, torch.Tensor], positions: torch.Tensor, strain: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """Energy [B], per-atom energy [N] (eV) and latent features at ``positions`` (strained by
        ``strain`` [B, 3, 3] if given), without derivatives.

        UQ heads call this to evaluate several energies (ensemble members, readout heads) and take
        their derivatives with :func:`energy_derivatives`, so forces still come from here only.
        A direct-force backbone's forces (eV/Å) come back under :data:`keys.DIRECT_FORCES`.
        """
        cell = batch[K.CELL]
        if strain is not None:
            symmetric = 0.5 * (strain + strain.transpose(-1, -2))
            positions = positions + torch.einsum("ni,nij->nj", positions, symmetric[batch[K.BATCH]])
            cell = cell + torch.bmm(cell, symmetric)
        inputs = self._with_edges(batch, positions, cell)
        out = self.backbone(inputs)
        node_energy = self._node_energy(out[K.NODE_ENERGY], inputs[K.ELEMENT_INDEX])
        energy = scatter_sum(node_energy, batch[K.BATCH], int(batch[K.N_ATOMS].shape[0]))
        results = {K.ENERGY: energy, K.NODE_ENERGY: node_energy}
        for key in (K.NODE_FEATURES, K.NODE_VECTORS):  # latent features, for UQ heads
            if key in out:
                results[key] = out[key]
        if self.backbone.direct_forces and K.DIRECT_FORCES in out:
            results[K.DIRECT_FORCES] = out[K.DIRECT_FORCES] * self.scale.to(out[K.DIRECT_FORCES].dtype)
        return results

    def _with_edges(
        self, batch: dict[str, torch.Tensor], positions: torch.Tensor, cell: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        centre, neighbour = batch[K.EDGE_INDEX][0], batch[K.EDGE_INDEX][1]
        offsets = torch.einsum("ek,ekl->el", batch[K.SHIFTS], cell[batch[K.BATCH][centre]])
        vectors = positions[neighbour] - positions[centre] + offsets
        inputs = dict(batch)
        inputs[K.POSITIONS] = positions
        inputs[K.CELL] = cell
        inputs[K.EDGE_VECTORS] = vectors
        inputs[K.EDGE_LENGTHS] = torch.linalg.vector_norm(vectors, dim=-1)
        inputs[K.ELEMENT_INDEX] = self.element_index(batch[K.NUMBERS])
        return inputs

    def _node_energy(self, raw: torch.Tensor, element_index: torch.Tensor) -> torch.Tensor:
        dtype = raw.dtype
        baseline = self.atomic_energies.to(dtype)[element_index]
        return raw * self.scale.to(dtype) + self.shift.to(dtype) + baseline


def _zeros_if_none(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if grad is None else grad


def differentiable_inputs(
    batch: dict[str, torch.Tensor], forces: bool, stress: bool, *, copies: int | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Leaf tensors to differentiate the energy by: positions (with ``requires_grad`` only if
    ``forces``) and a zero strain [B, 3, 3] (only if ``stress``).

    ``copies=K`` gives K independent leaves ([K, N, 3], [K, B, 3, 3]) for K energy functions
    evaluated side by side (a vectorised ensemble); each then gets its own gradient from one
    backward pass.
    """
    positions, cell = batch[K.POSITIONS].detach(), batch[K.CELL]
    strain = torch.zeros_like(cell) if stress else None
    if copies is not None:
        positions = positions.expand(copies, *positions.shape).clone()
        strain = None if strain is None else strain.expand(copies, *strain.shape).clone()
    if forces:
        positions.requires_grad_(True)
    if strain is not None:
        strain.requires_grad_(True)
    return positions, strain


def energy_derivatives(
    energy: torch.Tensor,
    batch: dict[str, torch.Tensor],
    positions: torch.Tensor | None,
    strain: torch.Tensor | None,
    *,
    create_graph: bool,
    members: int | None = None,
) -> dict[str, torch.Tensor]:
    """Forces ``-∂E/∂r``, virial ``-∂E/∂ε`` and stress ``-virial/V`` — the only place they are made.

    ``energy`` is [B], or [K, B] for K energy functions. With leaves made by
    :func:`differentiable_inputs` ``(copies=K)`` each member's gradient comes from one backward
    pass of the summed energy. With shared leaves and ``members=K`` the K vector-Jacobian
    products run as one batched backward pass (``is_grads_batched``). Outputs then carry a
    leading K axis.
    """
    wrt = [t for t in (positions, strain) if t is not None]
    if not wrt:
        return {}
    if members is None:
        grads = torch.autograd.grad(energy.sum(), wrt, create_graph=create_graph, allow_unused=True)
    else:
        selector = torch.eye(members, dtype=energy.dtype, device=energy.device)
        selector = selector.unsqueeze(-1).expand(members, members, energy.shape[-1])
        grads = torch.autograd.grad(energy, wrt, grad_outputs=selector, create_graph=create_graph,
                                    allow_unused=True, is_grads_batched=True)
    lead = () if members is None else (members,)
    results: dict[str, torch.Tensor] = {}
    if positions is not None:
        results[K.FORCES] = _zeros_if_none(grads[0], positions.expand(*lead, *positions.shape)).neg()
    if strain is not None:
        volume = torch.linalg.det(batch[K.CELL]).abs().reshape(-1, 1, 1)
        results[K.VIRIAL] = _zeros_if_none(grads[-1], strain.expand(*lead, *strain.shape)).neg()
        results[K.STRESS] = -results[K.VIRIAL] / volume
    return results


def check_finite_outputs(outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], *,
                         where: str = "", first_index: int = 0) -> None:
    """Raise :class:`ModelOutputError` naming the structures of ``batch`` (numbered from
    ``first_index``) whose energy, forces or stress (or a UQ std) came out NaN/inf; nothing when
    every output is finite."""
    bad: dict[str, list[int]] = {}
    for key in (K.ENERGY, K.FORCES, K.STRESS, K.ENERGY_STD, K.FORCES_STD):
        if key not in outputs:
            continue
        value = outputs[key].detach()
        finite = torch.isfinite(value.reshape(value.shape[0], -1)).all(-1)
        if bool(finite.all()):
            continue
        owner = batch[K.BATCH] if key in (K.FORCES, K.FORCES_STD) else torch.arange(value.shape[0], device=value.device)
        bad[key] = sorted({first_index + int(b) for b in owner[~finite].tolist()})
    if bad:
        detail = "; ".join(f"{key} of structure(s) {rows[:8]}" for key, rows in bad.items())
        raise ModelOutputError(
            f"{where + ': ' if where else ''}the model returned NaN/inf ({detail}). The numbers are not used. "
            "Check the model file (a corrupted or diverged model) and the structure (atoms far closer than in "
            "the training data, a cell of the wrong units).")


def fit_normalization(
    numbers: Sequence[np.ndarray],
    energies: np.ndarray,
    forces: Sequence[np.ndarray] | None,
    elements: Sequence[int],
) -> tuple[np.ndarray, float, float]:
    """Per-element reference energies by least squares, plus scale and shift of the residual.

    ``scale`` is the RMS force component (the natural unit of the learnt part, as in NequIP and
    MACE) or, without force labels, the standard deviation of the per-atom residual energy.
    ``shift`` is the mean per-atom residual energy (≈ 0 after the fit).
    """
    index = {z: k for k, z in enumerate(elements)}
    counts = np.zeros((len(numbers), len(elements)))
    for row, zs in enumerate(numbers):
        for z in zs:
            counts[row, index[int(z)]] += 1
    atomic_energies, *_ = np.linalg.lstsq(counts, energies, rcond=None)
    n_atoms = counts.sum(1)
    residual = (energies - counts @ atomic_energies) / n_atoms
    shift = float(residual.mean())
    if forces is not None and len(forces):
        scale = float(np.sqrt(np.mean(np.concatenate([f.reshape(-1) for f in forces]) ** 2)))
    else:
        scale = float(residual.std())
    return atomic_energies, (scale if scale > 1e-8 else 1.0), shift
