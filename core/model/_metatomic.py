"""The ``metatomic`` export format: an exported atomforge model as a ``metatomic.torch``
``AtomisticModel`` (imported only when exporting to it; needs ``metatomic-torch``).

The model declares one output, ``energy`` (eV, per structure or per atom), and asks the host for
one full neighbour list at the model's cutoff. The host (LAMMPS ``pair_style metatomic``, the
``metatomic_ase`` calculator, torch-sim, i-PI) differentiates the energy for forces and stress, so
the edge vectors are taken from the neighbour list's values, which the host connects to the
positions and cell in the autograd graph. ``selected_atoms`` (LAMMPS: the atoms of this domain,
not its ghosts) restricts which atoms' energies are summed; every atom still acts as a neighbour.
"""

# (no `from __future__ import annotations`: metatomic checks forward's annotations as real types)

import math
from pathlib import Path
from typing import Dict, List, Optional

import torch
from metatensor.torch import Labels, TensorBlock, TensorMap
from metatomic.torch import AtomisticModel, ModelCapabilities, ModelMetadata, ModelOutput, NeighborListOptions, System
from torch import nn

from .export import ExportedPotential

__all__ = ["MetatomicPotential", "save_metatomic"]


class MetatomicPotential(nn.Module):
    """``ModelInterface`` of metatomic around an :class:`~atomforge.model.export.ExportedPotential`."""

    def __init__(self, core: ExportedPotential) -> None:
        super().__init__()
        self.core = core
        self.neighbors = NeighborListOptions(cutoff=core.cutoff, full_list=True, strict=True, requestor="atomforge")

    def requested_neighbor_lists(self) -> List[NeighborListOptions]:
        return [self.neighbors]

    def forward(self, systems: List[System], outputs: Dict[str, ModelOutput],
                selected_atoms: Optional[Labels] = None) -> Dict[str, TensorMap]:
        if "energy" not in outputs:
            return {}
        per_atom = outputs["energy"].sample_kind == "atom"
        values: List[torch.Tensor] = []
        samples: List[torch.Tensor] = []
        for index, system in enumerate(systems):
            node = self._atom_energies(system)
            atoms = torch.arange(node.shape[0], device=node.device)
            if selected_atoms is not None:
                mine = selected_atoms.column("system") == index
                atoms = selected_atoms.column("atom")[mine].to(torch.long)
                node = node.index_select(0, atoms)
            if per_atom:
                values.append(node.reshape(-1, 1))
                samples.append(torch.stack([torch.full_like(atoms, index), atoms], dim=1))
            else:
                values.append(node.sum().reshape(1, 1))
        device = systems[0].positions.device if len(systems) > 0 else torch.device("cpu")
        if per_atom:
            names = ["system", "atom"]
            sample_values = torch.cat(samples).to(torch.int32) if len(samples) > 0 else torch.zeros(
                (0, 2), dtype=torch.int32, device=device)
        else:
            names = ["system"]
            sample_values = torch.arange(len(systems), dtype=torch.int32, device=device).reshape(-1, 1)
        block = TensorBlock(
            values=torch.cat(values) if len(values) > 0 else torch.zeros(
                (0, 1), dtype=self.core.atomic_energies.dtype, device=device),
            samples=Labels(names, sample_values),
            components=[],
            properties=Labels(["energy"], torch.zeros((1, 1), dtype=torch.int32, device=device)),
        )
        keys = Labels(["_"], torch.zeros((1, 1), dtype=torch.int32, device=device))
        return {"energy": TensorMap(keys, [block])}

    def _atom_energies(self, system: System) -> torch.Tensor:
        numbers = system.types.to(torch.long)
        self.core.check_elements(numbers)
        neighbors = system.get_neighbor_list(self.neighbors)
        pairs = neighbors.samples.values  # [E, 5]: first_atom, second_atom, cell_shift_a/b/c
        edge_index = pairs[:, 0:2].transpose(0, 1).to(torch.long)
        shifts = pairs[:, 2:5].to(system.positions.dtype)
        vectors = neighbors.values.reshape(-1, 3)  # r_j − r_i + shift·cell, differentiable by the host
        node, _ = self.core.atom_energies(system.positions, numbers, system.cell, system.pbc, edge_index, shifts,
                                          vectors)
        return node


def save_metatomic(core: ExportedPotential, path: Path, *, steps: int, dtype: str, info: Dict[str, str]) -> None:
    """Wrap ``core`` in an ``AtomisticModel`` and save it: interaction range ``steps`` × cutoff
    (what LAMMPS needs to send enough ghost atoms for a message-passing model), energy in eV,
    lengths in Å, atomic types = atomic numbers, the export record in ``metadata.extra``."""
    capabilities = ModelCapabilities(
        outputs={"energy": ModelOutput(unit="eV", sample_kind="atom", description="atomforge potential energy")},
        atomic_types=list(core.elements),
        interaction_range=core.cutoff * steps if steps > 0 else math.inf,
        length_unit="angstrom",
        supported_devices=["cpu", "cuda"],
        dtype=dtype,
    )
    metadata = ModelMetadata(name=f"atomforge {info.get('backbone', '')}".strip(),
                             description=info.get("description", "an atomforge model"), extra=info)
    AtomisticModel(MetatomicPotential(core).eval(), metadata, capabilities).save(str(path))
