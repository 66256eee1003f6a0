"""PaiNN backbone (Schütt, Unke & Gastegger, ICML 2021): equivariant message passing with
scalar and vector features.

Scalar features ``s`` [N, F] and vector features ``v`` [N, 3, F] are updated by a message block
(continuous filters on a radial basis times cutoff, plus the edge direction) and an update block
(gated mixing of ``v`` with itself). The per-atom energy is an MLP of the final scalars.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from atomforge import Backbone, BackboneSpec, ConfigError, hookimpl
from atomforge import keys as K

__all__ = ["PaiNN"]


class RadialBasis(nn.Module):
    """``sin(nπr/rc)/r`` for n = 1..num_rbf, times a cosine cutoff (smooth at ``rc``)."""

    def __init__(self, num_rbf: int, cutoff: float) -> None:
        super().__init__()
        self.cutoff = cutoff
        self.register_buffer("frequencies", torch.arange(1, num_rbf + 1) * math.pi / cutoff)

    def forward(self, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r = lengths.unsqueeze(-1)
        basis = torch.sin(self.frequencies.to(r.dtype) * r) / r
        envelope = 0.5 * (torch.cos(lengths * (math.pi / self.cutoff)) + 1.0)
        envelope = envelope * (lengths < self.cutoff).to(lengths.dtype)
        return basis, envelope


class PaiNNInteraction(nn.Module):
    """One message + update block."""

    def __init__(self, features: int, activation: type[nn.Module]) -> None:
        super().__init__()
        self.features = features
        self.context = nn.Sequential(
            nn.Linear(features, features), activation(), nn.Linear(features, 3 * features)
        )
        self.mix_vectors = nn.Linear(features, 2 * features, bias=False)
        self.update = nn.Sequential(
            nn.Linear(2 * features, features), activation(), nn.Linear(features, 3 * features)
        )

    def forward(
        self,
        s: torch.Tensor,
        v: torch.Tensor | None,
        filters: torch.Tensor,
        directions: torch.Tensor,
        centre: torch.Tensor,
        neighbour: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features
        x = self.context(s)[neighbour] * filters
        ds, dvv, dvs = torch.split(x, f, dim=-1)
        dv = dvs.unsqueeze(1) * directions.unsqueeze(-1)
        if v is None:  # first block: vector features start at zero, so skip the zero term
            v = s.new_zeros((s.shape[0], 3, f))
        else:
            dv = torch.addcmul(dv, dvv.unsqueeze(1), v[neighbour])
        s = s.index_add(0, centre, ds)
        v = v.index_add(0, centre, dv)
        uv, vv = torch.split(self.mix_vectors(v), f, dim=-1)
        vv_norm = torch.sqrt((vv * vv).sum(1) + 1e-8)
        a_vv, a_sv, a_ss = torch.split(self.update(torch.cat([s, vv_norm], -1)), f, dim=-1)
        s = s + a_sv * (uv * vv).sum(1) + a_ss
        v = v + a_vv.unsqueeze(1) * uv
        return s, v


class PaiNN(Backbone):
    """Polarizable atom interaction neural network (equivariant, energy-conserving via the wrapper).

    Args:
        num_elements: size of the element embedding (set by atomforge from the training data).
        cutoff: neighbour cutoff in Å.
        hidden_channels: feature width F.
        num_layers: number of interaction blocks.
        num_rbf: radial basis size.
        activation: ``silu`` or ``tanh``.
    """

    def __init__(
        self,
        *,
        num_elements: int,
        cutoff: float,
        hidden_channels: int = 128,
        num_layers: int = 3,
        num_rbf: int = 20,
        activation: str = "silu",
    ) -> None:
        super().__init__(num_elements=num_elements, cutoff=cutoff)
        activations = {"silu": nn.SiLU, "tanh": nn.Tanh}
        if activation not in activations:
            raise ConfigError(f"painn activation {activation!r} is not one of {sorted(activations)}")
        act = activations[activation]
        self.features = hidden_channels
        self.embedding = nn.Embedding(num_elements, hidden_channels)
        self.radial = RadialBasis(num_rbf, cutoff)
        self.filters = nn.Linear(num_rbf, num_layers * 3 * hidden_channels)
        self.layers = nn.ModuleList(PaiNNInteraction(hidden_channels, act) for _ in range(num_layers))
        self.readout = nn.Sequential(
            nn.Linear(hidden_channels, hidden_channels // 2), act(), nn.Linear(hidden_channels // 2, 1)
        )

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        centre, neighbour = batch[K.EDGE_INDEX][0], batch[K.EDGE_INDEX][1]
        lengths = batch[K.EDGE_LENGTHS]
        directions = batch[K.EDGE_VECTORS] / lengths.unsqueeze(-1)
        basis, envelope = self.radial(lengths)
        all_filters = (self.filters(basis) * envelope.unsqueeze(-1)).split(3 * self.features, -1)
        s = self.embedding(batch[K.ELEMENT_INDEX])
        v: torch.Tensor | None = None
        for layer, filters in zip(self.layers, all_filters):
            s, v = layer(s, v, filters, directions, centre, neighbour)
        out = {K.NODE_ENERGY: self.readout(s).squeeze(-1), K.NODE_FEATURES: s}
        if v is not None:
            out[K.NODE_VECTORS] = v
        return out


@hookimpl
def register_backbones(register) -> None:  # noqa: ANN001 - pluggy passes the registrar
    register(
        BackboneSpec(
            name="painn",
            factory=PaiNN,
            description="PaiNN (Schütt et al. 2021), equivariant message passing; forces by autograd",
            equivariant=True,
        )
    )
