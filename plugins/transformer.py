"""``transformer``: a non-equivariant graph attention backbone with direct or conservative forces.

The "bitter lesson" experiment in one config change (docs/physics.md): instead of building
rotational equivariance and energy conservation into the architecture, this model sees raw
relative vectors, is equivariant only to the extent it learns from data (``rotation_augmentation``),
and can predict forces directly (``forces: direct``), kept near-conservative by a soft
``curl_penalty``.

Architecture. Atoms start from an element embedding ``h`` [N, F]. Every edge i→j within the
cutoff gets an edge embedding from its radial basis *and its raw relative vector* ``r_ij / rc``
(this is what breaks rotational symmetry on purpose). Each layer is pre-norm multi-head attention of
atom i over its neighbours j: query from ``h_i``, key from ``h_j`` + edge, value from ``h_j``
gated by the edge, then a feed-forward block; both residual. The attention weights are

    α_ij = fc(r_ij) exp(a_ij) / (1 + Σ_k fc(r_ik) exp(a_ik)),   a_ij = c tanh(q_i·k_ij / (c √d))

with the cosine cutoff ``fc`` (value and slope zero at ``rc``): a neighbour crossing the cutoff
changes the energy (and direct forces) continuously, the ``1 +`` (a "null" key) keeps an isolated
atom well defined, and the soft cap ``c`` keeps ``exp`` finite without a (non-smooth) max shift.

Outputs. ``NODE_ENERGY = MLP(h)``. With ``forces: direct`` the same trunk also gives per-atom force
vectors as an envelope-weighted sum over edges, ``F_i = Σ_j fc(r_ij) [s_ij r̂_ij + u_ij]`` with
``s_ij`` [1] and ``u_ij`` [3] from an MLP of ``(h_i, h_j, edge)`` — so forces vanish for isolated
atoms and stay continuous at the cutoff; nothing makes them rotate with the structure or
integrate to the energy. With ``forces: conservative`` the wrapper takes ``-∂E/∂r`` as for any
backbone.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from atomforge import Backbone, BackboneSpec, ConfigError, hookimpl
from atomforge import keys as K

__all__ = ["GraphTransformer"]

FORCE_MODES = ("conservative", "direct")
_LOGIT_CAP = 8.0  # soft cap of attention logits: exp stays within e^±8 without a max shift


def cosine_envelope(lengths: torch.Tensor, cutoff: float) -> torch.Tensor:
    """``½(cos(πr/rc) + 1)`` inside the cutoff, 0 outside; value and slope vanish at ``rc``."""
    inside = (lengths < cutoff).to(lengths.dtype)
    return 0.5 * (torch.cos(lengths * (math.pi / cutoff)) + 1.0) * inside


class EdgeEncoder(nn.Module):
    """Edge embedding [E, F] from a Gaussian radial basis and the raw vector ``r_ij / rc``."""

    def __init__(self, features: int, num_rbf: int, cutoff: float) -> None:
        super().__init__()
        self.cutoff = cutoff
        self.register_buffer("centres", torch.linspace(0.0, cutoff, num_rbf))
        self.width = cutoff / max(num_rbf - 1, 1)
        self.mlp = nn.Sequential(nn.Linear(num_rbf + 3, features), nn.SiLU(), nn.Linear(features, features))

    def forward(self, vectors: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        basis = torch.exp(-(((lengths.unsqueeze(-1) - self.centres.to(lengths.dtype)) / self.width) ** 2))
        return self.mlp(torch.cat([basis, vectors / self.cutoff], dim=-1))


class NeighbourAttention(nn.Module):
    """One pre-norm block: multi-head attention over neighbours, then a feed-forward network."""

    def __init__(self, features: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, features // heads
        self.logit_cap = _LOGIT_CAP  # an attribute, not the global: TorchScript reads attributes
        self.norm_attention = nn.LayerNorm(features)
        self.query = nn.Linear(features, features)
        self.key_value = nn.Linear(features, 2 * features)
        self.edge_key_gate = nn.Linear(features, 2 * features)
        self.out = nn.Linear(features, features)
        self.norm_ffn = nn.LayerNorm(features)
        self.ffn = nn.Sequential(nn.Linear(features, 2 * features), nn.SiLU(), nn.Linear(2 * features, features))

    def forward(self, h: torch.Tensor, edges: torch.Tensor, envelope: torch.Tensor,
                centre: torch.Tensor, neighbour: torch.Tensor) -> torch.Tensor:
        x = self.norm_attention(h)
        shape = (-1, self.heads, self.head_dim)
        q = self.query(x)[centre].view(shape)
        k, v = self.key_value(x)[neighbour].chunk(2, dim=-1)
        edge_key, gate = self.edge_key_gate(edges).chunk(2, dim=-1)
        k, v = (k + edge_key).view(shape), (v * gate).view(shape)
        logits = (q * k).sum(-1) / math.sqrt(self.head_dim)  # [E, heads]
        logits = self.logit_cap * torch.tanh(logits / self.logit_cap)
        weights = envelope.unsqueeze(-1) * torch.exp(logits)
        norm = 1.0 + h.new_zeros((h.shape[0], self.heads)).index_add(0, centre, weights)
        alpha = weights / norm[centre]
        messages = h.new_zeros((h.shape[0], self.heads, self.head_dim)).index_add(0, centre, alpha.unsqueeze(-1) * v)
        h = h + self.out(messages.reshape(h.shape[0], -1))
        return h + self.ffn(self.norm_ffn(h))


class ForceHead(nn.Module):
    """Direct forces ``F_i = Σ_j fc(r_ij) [s_ij r̂_ij + u_ij]`` [N, 3] (normalised units), with
    ``(s_ij, u_ij) = MLP(h_i, h_j, edge_ij)``. The MLP's first layer is applied to atoms before the
    gather (same function, fewer edge-level flops); its last layer starts at zero, so training
    starts from zero forces instead of a large random field."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.atom_in = nn.Linear(features, 2 * features)
        self.edge_in = nn.Linear(features, features, bias=False)
        self.out = nn.Linear(features, 4)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, h: torch.Tensor, edges: torch.Tensor, vectors: torch.Tensor, lengths: torch.Tensor,
                envelope: torch.Tensor, centre: torch.Tensor, neighbour: torch.Tensor) -> torch.Tensor:
        a_centre, a_neighbour = self.atom_in(h).chunk(2, dim=-1)
        su = self.out(nn.functional.silu(a_centre[centre] + a_neighbour[neighbour] + self.edge_in(edges)))
        unit = vectors / lengths.clamp_min(1e-9).unsqueeze(-1)
        per_edge = (su[:, :1] * unit + su[:, 1:]) * envelope.unsqueeze(-1)
        return h.new_zeros((h.shape[0], 3)).index_add(0, centre, per_edge)


class GraphTransformer(Backbone):
    """Non-equivariant graph transformer; forces ``conservative`` (−∂E/∂r) or ``direct``.

    Args:
        num_elements: size of the element embedding (set by atomforge from the training data).
        cutoff: neighbour cutoff in Å.
        hidden_channels: feature width F (divisible by ``num_heads``).
        num_layers: attention blocks.
        num_heads: attention heads per block.
        num_rbf: Gaussian radial basis functions of the edge encoder.
        forces: ``conservative`` (the wrapper differentiates the energy) or ``direct`` (a force
            head on the same trunk; ``direct_forces`` is then true on this instance).
    """

    def __init__(
        self,
        *,
        num_elements: int,
        cutoff: float,
        hidden_channels: int = 64,
        num_layers: int = 3,
        num_heads: int = 4,
        num_rbf: int = 16,
        forces: str = "conservative",
    ) -> None:
        super().__init__(num_elements=num_elements, cutoff=cutoff)
        _check_options(hidden_channels, num_layers, num_heads, num_rbf, forces)
        self.direct_forces = forces == "direct"
        f = hidden_channels
        self.embedding = nn.Embedding(num_elements, f)
        self.edge_encoder = EdgeEncoder(f, num_rbf, cutoff)
        self.layers = nn.ModuleList(NeighbourAttention(f, num_heads) for _ in range(num_layers))
        self.norm_out = nn.LayerNorm(f)
        self.energy_head = nn.Sequential(nn.Linear(f, f // 2), nn.SiLU(), nn.Linear(f // 2, 1))
        self.force_head = ForceHead(f) if self.direct_forces else None
        self.message_passing_steps = num_layers + (1 if self.direct_forces else 0)  # the force head: one more hop

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        centre, neighbour = batch[K.EDGE_INDEX][0], batch[K.EDGE_INDEX][1]
        vectors, lengths = batch[K.EDGE_VECTORS], batch[K.EDGE_LENGTHS]
        envelope = cosine_envelope(lengths, self.cutoff)
        edges = self.edge_encoder(vectors, lengths)
        h = self.embedding(batch[K.ELEMENT_INDEX])
        for layer in self.layers:
            h = layer(h, edges, envelope, centre, neighbour)
        h = self.norm_out(h)
        out = {K.NODE_ENERGY: self.energy_head(h).squeeze(-1), K.NODE_FEATURES: h}
        if self.force_head is not None:
            out[K.DIRECT_FORCES] = self.force_head(h, edges, vectors, lengths, envelope, centre, neighbour)
        return out


def _check_options(hidden_channels: int, num_layers: int, num_heads: int, num_rbf: int, forces: str) -> None:
    """Reject invalid options with a message naming the option and what is allowed."""
    if forces not in FORCE_MODES:
        raise ConfigError(f"transformer forces {forces!r} is not one of {FORCE_MODES}")
    if min(hidden_channels, num_layers, num_heads, num_rbf) < 1:
        raise ConfigError("transformer hidden_channels, num_layers, num_heads and num_rbf must be ≥ 1; got "
                          f"{hidden_channels}, {num_layers}, {num_heads}, {num_rbf}")
    if hidden_channels % num_heads:
        raise ConfigError(f"transformer hidden_channels ({hidden_channels}) must be divisible by "
                          f"num_heads ({num_heads})")


@hookimpl
def register_backbones(register) -> None:  # noqa: ANN001 - pluggy passes the registrar
    register(
        BackboneSpec(
            name="transformer",
            factory=GraphTransformer,
            description="graph attention, NOT equivariant (learn it: rotation_augmentation); "
                        "forces: conservative | direct",
            equivariant=False,
        )
    )
