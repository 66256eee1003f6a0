"""The ``torchscript`` export format's top module (imported only when exporting to it: it needs
vesin-torch, whose TorchScript neighbour list it calls; a host loading the file loads vesin-torch's
op library first — ``import vesin_torch`` in Python, ``libvesin_torch.so`` in C++)."""

from __future__ import annotations

from typing import Dict

import torch
from torch import nn
from vesin_torch import NeighborList

from .export import ExportedPotential

__all__ = ["TorchScriptPotential"]


class TorchScriptPotential(nn.Module):
    """The ``torchscript`` format's top module: ``forward(positions, numbers, cell, pbc)`` with
    its own neighbour list (vesin-torch); ``with_neighbors`` for hosts that have one. Outputs
    ``energy`` [1], ``energies`` [N], ``forces`` [N, 3] and, for a cell periodic along all three
    axes, ``virial`` and ``stress`` [3, 3] (eV/Å³, ASE sign)."""

    def __init__(self, core: ExportedPotential) -> None:
        super().__init__()
        self.core = core
        self.cutoff = core.cutoff

    def forward(self, positions: torch.Tensor, numbers: torch.Tensor, cell: torch.Tensor,
                pbc: torch.Tensor) -> Dict[str, torch.Tensor]:
        dtype = self.core.atomic_energies.dtype
        positions, cell = positions.to(dtype), cell.to(dtype)
        box = cell if bool(pbc.any()) else torch.zeros_like(cell)
        found = NeighborList(cutoff=self.cutoff, full_list=True).compute(
            points=positions.detach(), box=box.detach(), periodic=pbc, quantities="ijS", copy=True)
        edge_index = torch.stack([found[0], found[1]]).to(torch.long)
        return self.with_neighbors(positions, numbers, cell, pbc, edge_index, found[2].to(dtype))

    @torch.jit.export
    def with_neighbors(self, positions: torch.Tensor, numbers: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor,
                       edge_index: torch.Tensor, shifts: torch.Tensor) -> Dict[str, torch.Tensor]:
        """As ``forward``, with the host's full neighbour list (``edge_index`` [2, E], ``shifts`` [E, 3])."""
        self.core.check_elements(numbers)
        dtype = self.core.atomic_energies.dtype
        periodic = bool(pbc.all())
        out = self.core(positions.to(dtype), numbers, cell.to(dtype), pbc, edge_index, shifts.to(dtype), periodic)
        if periodic:
            out["stress"] = -out["virial"] / torch.linalg.det(cell.to(dtype)).abs()
        return out
