"""Small models and data the conformance kits train and test plugins with (core may not use the
built-in plugins, so the kits carry their own)."""

from __future__ import annotations

import math

import numpy as np
import torch
from ase import Atoms
from ase.calculators.lj import LennardJones
from torch import nn

from .. import keys as K
from ..data.structures import attach_labels
from ..model.potential import Backbone, scatter_sum

__all__ = ["RadialTestBackbone", "lj_clusters"]


class RadialTestBackbone(Backbone):
    """A tiny smooth pairwise-radial backbone for conformance checks of UQ heads.

    Invariant features ``h_i = tanh(W(e_i + Σ_j f(r_ij) ⊙ e_j + Σ_c v_i,c²))`` (``e`` an element
    embedding, ``f`` a learned radial filter under a cosine cutoff envelope) and equivariant
    vector features ``v_i = Σ_j env(r_ij) r̂_ij ⊗ g(r_ij)`` [N, 3, F]; per-atom energy is a linear
    readout of ``h``. Smooth, conservative, rotation-equivariant by construction.
    """

    def __init__(self, *, num_elements: int, cutoff: float, features: int = 8, num_rbf: int = 6) -> None:
        super().__init__(num_elements=num_elements, cutoff=cutoff)
        self.embed = nn.Embedding(num_elements, features)
        self.register_buffer("centres", torch.linspace(0.0, cutoff, num_rbf))
        self.width = cutoff / num_rbf
        self.radial = nn.Linear(num_rbf, features)
        self.vector_radial = nn.Linear(num_rbf, features)
        self.mix = nn.Linear(features, features)
        self.readout = nn.Linear(features, 1)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        lengths, vectors = batch[K.EDGE_LENGTHS], batch[K.EDGE_VECTORS]
        centre, neighbour = batch[K.EDGE_INDEX][0], batch[K.EDGE_INDEX][1]
        n = int(batch[K.POSITIONS].shape[0])
        envelope = 0.5 * (torch.cos(math.pi * lengths / self.cutoff) + 1.0) * (lengths < self.cutoff)
        centres = self.centres.to(lengths.dtype)
        rbf = torch.exp(-(((lengths.unsqueeze(-1) - centres) / self.width) ** 2))  # [E, R]
        embedded = self.embed(batch[K.ELEMENT_INDEX])  # [N, F]
        messages = self.radial(rbf) * envelope.unsqueeze(-1) * embedded[neighbour]
        unit = vectors / lengths.unsqueeze(-1)
        edge_vectors = (envelope.unsqueeze(-1) * unit).unsqueeze(-1) * self.vector_radial(rbf).unsqueeze(1)
        node_vectors = scatter_sum(edge_vectors, centre, n)  # [N, 3, F]
        hidden = embedded + scatter_sum(messages, centre, n) + node_vectors.pow(2).sum(1)
        features = torch.tanh(self.mix(hidden))
        return {K.NODE_ENERGY: self.readout(features).squeeze(-1), K.NODE_FEATURES: features,
                K.NODE_VECTORS: node_vectors}


def lj_clusters(count: int, seed: int) -> list[Atoms]:
    """``count`` rattled 6-atom argon clusters labelled with ASE's Lennard-Jones calculator."""
    rng = np.random.default_rng(seed)
    grid = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1]], float) * 3.7
    out = []
    for _ in range(count):
        atoms = Atoms("Ar6", positions=grid + rng.normal(0, 0.15, grid.shape))
        atoms.calc = LennardJones(sigma=3.4, epsilon=0.0104, rc=8.0, smooth=True)
        out.append(attach_labels(atoms, energy=atoms.get_potential_energy(), forces=atoms.get_forces()))
    return out
