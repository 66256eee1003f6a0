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
from .._errors import ConfigError, ModelOutputError, UnseenElementError

__all__ = [
    "Backbone", "Potential", "with_head", "differentiable_inputs", "energy_derivatives", "fit_normalization",
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
    #: whether the backbone takes ``readout_heads`` and then returns NODE_ENERGY [N, heads] (one
    #: readout per head; the Potential picks each atom's column from the structure's fidelity)
    supports_heads: bool = False
    #: parameters (names relative to the backbone) whose first axis is the head axis; fine-tuning
    #: maps their rows from the file's heads to the run's heads (a new head copies an old one)
    head_parameters: tuple[str, ...] = ()
    #: parameters whose first axis is the element axis (per-element embeddings); fine-tuning with
    #: new elements maps their rows by atomic number and starts a new element at the mean row
    element_parameters: tuple[str, ...] = ()
    #: whether ``forward`` runs under ``torch.func.vmap`` (no in-place writes into tensors created
    #: inside it from batched inputs); the deep ensemble's vectorised evaluation needs it
    vmap_safe: bool = True
    #: message-passing steps (each reaches one cutoff further), or ``None`` if unknown: an exported
    #: metatomic model's interaction range is steps × cutoff (how far LAMMPS sends ghost atoms)
    message_passing_steps: int | None = None
    #: the flags above are Python-side metadata: TorchScript (``atomforge export``) must not try to
    #: type them from their (postponed, string) annotations, which it cannot read
    __jit_ignored_attributes__ = ["direct_forces", "supports_heads", "head_parameters", "element_parameters",
                                  "vmap_safe", "message_passing_steps"]

    def __init__(self, *, num_elements: int, cutoff: float) -> None:
        super().__init__()
        self.num_elements = int(num_elements)
        self.cutoff = float(cutoff)

    def parameter_groups(self) -> dict[str, list[str]]:
        """Named groups of parameters for fine-tuning (``finetune.freeze``, ``finetune.lr``):
        group name → prefixes of parameter names (as in ``named_parameters()`` of this module),
        in forward order. Conventional names: ``embedding`` (per-element embeddings),
        ``interaction.<k>`` (the k-th message-passing block, from 0), ``readout`` (what turns
        features into energies). Default: one group per child module, under its attribute name."""
        return {name: [name] for name, child in self.named_children() if any(True for _ in child.parameters())}


class Potential(nn.Module):
    """Composition baseline + scale/shift + backbone; forces and stress from one wrapper.

    With several ``heads`` (one readout per level of theory or data source) each head has its
    own reference energies (``atomic_energies`` [H, elements]), scale and shift ([H]); a
    structure's head is its ``fidelity`` index (``batch[K.FIDELITY]``, 0 when absent), and the
    backbone (``supports_heads``) returns one per-atom energy column per head.
    """

    def __init__(
        self,
        backbone: Backbone,
        *,
        elements: Sequence[int],
        atomic_energies: Sequence[float] | Sequence[Sequence[float]],
        scale: float | Sequence[float] = 1.0,
        shift: float | Sequence[float] = 0.0,
        heads: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.elements = [int(z) for z in elements]
        self.heads = [str(h) for h in heads] if heads else ["default"]
        z_to_index = torch.full((_MAX_Z,), -1, dtype=torch.long)
        z_to_index[torch.tensor(self.elements)] = torch.arange(len(self.elements))
        self.register_buffer("z_to_index", z_to_index)
        h = len(self.heads)
        energies = torch.as_tensor(np.asarray(atomic_energies, dtype=np.float64)).reshape(-1, len(self.elements))
        self.register_buffer("atomic_energies", energies.expand(h, -1).clone() if len(energies) == 1 else energies)
        self.register_buffer("scale", torch.as_tensor(np.asarray(scale, dtype=np.float64)).reshape(-1).expand(h).clone())
        self.register_buffer("shift", torch.as_tensor(np.asarray(shift, dtype=np.float64)).reshape(-1).expand(h).clone())
        if self.atomic_energies.shape[0] != h:
            raise ValueError(f"atomic_energies has {self.atomic_energies.shape[0]} rows for {h} heads")

    @property
    def num_heads(self) -> int:
        return len(self.heads)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        # model files written before heads existed hold [elements] and scalar buffers: head 0
        for name, dims in (("atomic_energies", 2), ("scale", 1), ("shift", 1)):
            value = state_dict.get(prefix + name)
            if value is not None and value.dim() == dims - 1:
                state_dict[prefix + name] = value.reshape(1, *value.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def head_number(self, head: str | int) -> int:
        """The index of ``head`` (a name of :attr:`heads` or an index), with a clear error."""
        if isinstance(head, str) and head in self.heads:
            return self.heads.index(head)
        if isinstance(head, int) and not isinstance(head, bool) and 0 <= head < self.num_heads:
            return head
        raise ConfigError(f"head {head!r}: this model's heads are {self.heads} (give a name or an index)")

    def head_index(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Each structure's head [B] (its fidelity), checked against the heads; ``None`` with one head."""
        if self.num_heads == 1:
            return None
        n = int(batch[K.N_ATOMS].shape[0])
        head = batch.get(K.FIDELITY)
        if head is None:
            return torch.zeros(n, dtype=torch.long, device=batch[K.N_ATOMS].device)
        if bool(((head < 0) | (head >= self.num_heads)).any()):
            bad = sorted(set(head[(head < 0) | (head >= self.num_heads)].tolist()))
            raise ModelOutputError(
                f"structure(s) with fidelity {bad}: this model's heads are {dict(enumerate(self.heads))}; "
                "set atoms.info['fidelity'] (or the data source's head:) to one of them")
        return head

    def atom_scale(self, batch: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """The scale of each atom's head ([N], or a scalar with one head)."""
        head = self.head_index(batch)
        return self.scale[0].to(dtype) if head is None else self.scale.to(dtype)[head[batch[K.BATCH]]]

    @property
    def cutoff(self) -> float:
        return self.backbone.cutoff

    def element_index(self, numbers: torch.Tensor) -> torch.Tensor:
        """Map atomic numbers to model element indices; unseen elements raise a clear error."""
        index = self.z_to_index[numbers.clamp(0, _MAX_Z - 1)]
        if bool(((index < 0) | (numbers >= _MAX_Z)).any()):  # (one host sync)
            unseen = sorted(set(numbers[index < 0].tolist()))
            raise UnseenElementError(
                f"the structure contains element(s) Z={unseen} that the model was never trained on; "
                f"it knows Z={self.elements}. Fine-tune it (model.init_from) on data containing them: new "
                "elements are added (docs/finetune.md)."
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
        head = self.head_index(batch)
        node_energy = self._node_energy(out[K.NODE_ENERGY], inputs[K.ELEMENT_INDEX],
                                        None if head is None else head[batch[K.BATCH]])
        energy = scatter_sum(node_energy, batch[K.BATCH], int(batch[K.N_ATOMS].shape[0]))
        results = {K.ENERGY: energy, K.NODE_ENERGY: node_energy}
        for key in (K.NODE_FEATURES, K.NODE_VECTORS):  # latent features, for UQ heads
            if key in out:
                results[key] = out[key]
        if self.backbone.direct_forces and K.DIRECT_FORCES in out:
            forces = out[K.DIRECT_FORCES]
            scale = self.scale.to(forces.dtype)[0] if head is None else self.scale.to(forces.dtype)[head[batch[K.BATCH]]].unsqueeze(-1)
            results[K.DIRECT_FORCES] = forces * scale
        return results

    def _with_edges(
        self, batch: dict[str, torch.Tensor], positions: torch.Tensor, cell: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        centre, neighbour = batch[K.EDGE_INDEX][0], batch[K.EDGE_INDEX][1]
        if cell.shape[0] == 1:  # one structure (a calculator call): one matrix product, no per-edge cells
            offsets = batch[K.SHIFTS] @ cell[0]
        else:
            offsets = torch.einsum("ek,ekl->el", batch[K.SHIFTS], cell[batch[K.BATCH][centre]])
        # index_select, not indexing: the same values, and a cheaper backward pass (index_add)
        vectors = positions.index_select(0, neighbour) - positions.index_select(0, centre) + offsets
        inputs = dict(batch)
        inputs[K.POSITIONS] = positions
        inputs[K.CELL] = cell
        inputs[K.EDGE_VECTORS] = vectors
        inputs[K.EDGE_LENGTHS] = torch.linalg.vector_norm(vectors, dim=-1)
        inputs[K.ELEMENT_INDEX] = self.element_index(batch[K.NUMBERS])
        return inputs

    def _node_energy(self, raw: torch.Tensor, element_index: torch.Tensor,
                     atom_head: torch.Tensor | None = None) -> torch.Tensor:
        dtype = raw.dtype
        if atom_head is None:  # one head (a multi-head backbone's first column)
            raw = raw[:, 0] if raw.dim() == 2 else raw
            return raw * self.scale.to(dtype)[0] + self.shift.to(dtype)[0] + self.atomic_energies.to(dtype)[0][element_index]
        if raw.dim() == 2:
            raw = raw.gather(1, atom_head.unsqueeze(1)).squeeze(1)
        baseline = self.atomic_energies.to(dtype)[atom_head, element_index]
        return raw * self.scale.to(dtype)[atom_head] + self.shift.to(dtype)[atom_head] + baseline


def with_head(model: nn.Module, batch: dict[str, torch.Tensor], head: str | int | None) -> dict[str, torch.Tensor]:
    """``batch`` with every structure on ``head`` of ``model`` (a Potential or a UQ head around
    one); ``None`` leaves each structure's own fidelity."""
    if head is None:
        return batch
    number = getattr(model, "potential", model).head_number(head)
    n = batch[K.N_ATOMS].shape[0]
    return {**batch, K.FIDELITY: torch.full((n,), number, dtype=torch.long, device=batch[K.N_ATOMS].device)}


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
