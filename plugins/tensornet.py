"""TensorNet backbone (Simeon & De Fabritiis, NeurIPS 2023): O(3)-equivariant message passing
with rank-2 Cartesian tensor features.

Every atom carries F channels of a 3×3 tensor ``X = I + A + S``: a scalar part ``I = (tr X / 3)·1``
(l = 0), an antisymmetric part ``A`` (a vector, l = 1) and a symmetric traceless part ``S``
(l = 2). Products of such tensors (``X·M + M·X``) couple the parts as the Clebsch–Gordan products
of l ≤ 2 would, with 3×3 matrix multiplications instead of spherical harmonics — so the model
reaches angular resolution l = 2 and a body order that grows with depth at the cost of dense
[N, F, 3, 3] arithmetic, which is fast on CPUs.

Why it is here (issue: a native backbone that holds up off-distribution). PaiNN carries only
l ≤ 1 features (scalars and vectors), and on the ethanol benchmark its force errors off-distribution
(a hotter trajectory) were 2–2.5× MACE's (max_ell 3, correlation 3), with heavy per-frame tails.
TensorNet's l = 2 features and tensor products are the cheapest native route to MACE-like angular
resolution; the numbers are in docs/benchmarks.md.

Layout (after the paper and TorchMD-Net's reference implementation; written anew here):

* **Embedding**: for each edge i–j with unit vector r̂, radial basis e(r) (Bessel functions times
  a smooth polynomial envelope) and a learnt pair embedding ``Z_ij`` of both elements, the edge
  tensor ``f_I(r) Z_ij 1 + f_A(r) Z_ij [r̂]_× + f_S(r) Z_ij (r̂r̂ᵀ − 1/3)`` summed over j; the
  three parts are channel-mixed and scaled by an MLP of the tensor's Frobenius norm.
* **Interaction** (``num_layers`` times): normalise ``X / (‖X‖² + 1)``, channel-mix I, A and S,
  messages ``M_i = Σ_j φ(r_ij)·(f_I I_j + f_A A_j + f_S S_j)`` (radial MLP, scalar weights per
  part and channel), the equivariant products ``M·Y + Y·M``, decomposition, normalisation, a
  second channel mix, and the update ``X ← X + ΔX + ΔX²``.
* **Readout**: the Frobenius norms of I, A and S (invariants) → layer norm → linear → SiLU →
  the per-atom energy MLP.

Everything is smooth in the positions (forces by autograd through the Potential; checked with
the conformance kit: finite differences, rotations, reflections are not distinguished — O(3)).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from atomforge import Backbone, BackboneSpec, ConfigError, hookimpl
from atomforge import keys as K

__all__ = ["TensorNet"]


def _envelope(r: torch.Tensor, cutoff: float, p: int = 5) -> torch.Tensor:
    """Polynomial envelope (DimeNet): 1 at r = 0, zero with p − 1 vanishing derivatives at the cutoff."""
    x = r / cutoff
    a, b, c = -(p + 1) * (p + 2) / 2, p * (p + 2), -p * (p + 1) / 2
    value = 1 + a * x**p + b * x ** (p + 1) + c * x ** (p + 2)
    return value * (x < 1).to(r.dtype)


class _Radial(nn.Module):
    """Bessel basis ``sqrt(2/rc) sin(nπr/rc)/r`` (n = 1…num_rbf) times the envelope."""

    def __init__(self, num_rbf: int, cutoff: float) -> None:
        super().__init__()
        self.cutoff = cutoff
        self.register_buffer("frequencies", torch.arange(1, num_rbf + 1) * math.pi / cutoff)

    def forward(self, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        env = _envelope(r, self.cutoff)
        basis = math.sqrt(2.0 / self.cutoff) * torch.sin(self.frequencies.to(r.dtype) * r.unsqueeze(-1)) / r.unsqueeze(-1)
        return basis * env.unsqueeze(-1), env


def _basis() -> torch.Tensor:
    """[9, 9]: column c is the c-th orthonormal (Frobenius) basis tensor of 3×3 matrices,
    flattened — 1/√3; the three generators [e_k]_×/√2; five symmetric traceless tensors. Packed
    features are coordinates in this basis, so norms are sums of squares and packing/unpacking
    are one matrix product each (the matrix is orthogonal)."""
    e = torch.eye(3, dtype=torch.float64)
    cols = [e / math.sqrt(3.0)]
    for k in range(3):
        skew = torch.zeros(3, 3, dtype=torch.float64)
        i, j = (k + 1) % 3, (k + 2) % 3
        skew[j, i], skew[i, j] = 1.0, -1.0
        cols.append(skew / math.sqrt(2.0))
    def outer(a: int, b: int) -> torch.Tensor:
        return torch.outer(e[a], e[b])
    cols += [(outer(0, 0) - outer(1, 1)) / math.sqrt(2.0), (outer(0, 0) + outer(1, 1) - 2 * outer(2, 2)) / math.sqrt(6.0),
             (outer(0, 1) + outer(1, 0)) / math.sqrt(2.0), (outer(0, 2) + outer(2, 0)) / math.sqrt(2.0),
             (outer(1, 2) + outer(2, 1)) / math.sqrt(2.0)]
    return torch.stack([c.reshape(9) for c in cols], dim=1)


_BASIS = _basis()


def _norm2(p: torch.Tensor) -> torch.Tensor:
    """Squared Frobenius norm of packed tensors [N, 9, F] → [N, F]."""
    return (p * p).sum(1)


def _matmul(m: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-channel 3×3 products of full tensors [N, 9, F] (row-major 3×3 in the middle axis)."""
    n, f = m.shape[0], m.shape[-1]
    return (m.view(n, 3, 3, 1, f) * y.view(n, 1, 3, 3, f)).sum(2).view(n, 9, f)


def _scatter_parts(centre: torch.Tensor, num_atoms: int, parts: list[torch.Tensor]) -> torch.Tensor:
    """Sum the per-edge parts ([E, 1, F], [E, 3, F], [E, 5, F]) onto their centres → packed [N, 9, F].
    The parts are scattered one by one: the edge-level tensors are never expanded or concatenated."""
    return torch.cat([part.new_zeros((num_atoms, part.shape[1], part.shape[2])).index_add(0, centre, part)
                      for part in parts], dim=1)


def _scale_parts(p: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Packed [N, 9, F] times one scale per part and channel ([N, 3, F])."""
    return torch.cat([p[:, 0:1] * scale[:, 0:1], p[:, 1:4] * scale[:, 1:2], p[:, 4:9] * scale[:, 2:3]], dim=1)


class _PartLinear(nn.Module):
    """One bias-free channel-mixing layer per part (equivariant: it never mixes components)."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.parts = nn.ModuleList(nn.Linear(features, features, bias=False) for _ in range(3))

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.parts[0](p[:, 0:1]), self.parts[1](p[:, 1:4]), self.parts[2](p[:, 4:9])], dim=1)


class _Embedding(nn.Module):
    def __init__(self, num_elements: int, features: int, num_rbf: int, act: type[nn.Module]) -> None:
        super().__init__()
        self.features = features
        self.element = nn.Embedding(num_elements, features)
        self.pair = nn.Linear(2 * features, features)
        self.radial = nn.Linear(num_rbf, 3 * features)
        self.mix = _PartLinear(features)
        self.norm = nn.LayerNorm(features)
        self.scalar = nn.Sequential(nn.Linear(features, 2 * features), act(), nn.Linear(2 * features, 3 * features), act())

    def forward(self, element: torch.Tensor, centre: torch.Tensor, neighbour: torch.Tensor, rbf: torch.Tensor,
                envelope: torch.Tensor, unit: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
        f = self.features
        z = self.element(element)
        pair = self.pair(torch.cat([z[centre], z[neighbour]], dim=-1)) * envelope.unsqueeze(-1)  # [E, F], 0 at rc
        weights = (self.radial(rbf).view(-1, 3, f) * pair.unsqueeze(1))  # [E, 3, F]: f_I, f_A, f_S
        # the edge's tensors 1, [u]_× and u uᵀ − 1/3 in the packed basis: √3, √2·u and the
        # projection of u uᵀ on the five symmetric traceless basis tensors
        outer = (unit.unsqueeze(-1) * unit.unsqueeze(-2)).reshape(-1, 9)
        geometry = (math.sqrt(3.0), math.sqrt(2.0) * unit, outer @ basis[:, 4:9])  # per part: [], [E, 3], [E, 5]
        p = _scatter_parts(centre, element.shape[0], [weights[:, 0:1] * geometry[0],
                                                      weights[:, 1:2] * geometry[1].unsqueeze(-1),
                                                      weights[:, 2:3] * geometry[2].unsqueeze(-1)])
        scale = self.scalar(self.norm(_norm2(p))).view(-1, 3, f)
        return _scale_parts(self.mix(p), scale)


class _Interaction(nn.Module):
    def __init__(self, features: int) -> None:
        super().__init__()
        self.first = _PartLinear(features)
        self.second = _PartLinear(features)

    def forward(self, x: torch.Tensor, centre: torch.Tensor, neighbour: torch.Tensor, weights: torch.Tensor,
                basis: torch.Tensor) -> torch.Tensor:
        x = x / (_norm2(x) + 1.0).unsqueeze(1)
        y = self.first(x)
        # messages Σ_j φ_I(r) I_j + φ_A(r) A_j + φ_S(r) S_j from neighbours j onto centres i
        # gathered part by part from node-level slices: slicing an edge-level tensor would make its
        # backward pass fill whole [E, 9, F] zero tensors, one per slice (measured: ~20 % of a call)
        message = _scatter_parts(centre, y.shape[0], [
            weights[:, 0:1] * y[:, 0:1].index_select(0, neighbour),
            weights[:, 1:2] * y[:, 1:4].index_select(0, neighbour),
            weights[:, 2:3] * y[:, 4:9].index_select(0, neighbour)])
        m, full_y = basis @ message, basis @ y  # full 3×3 tensors, [N, 9, F]
        product = basis.T @ (_matmul(m, full_y) + _matmul(full_y, m))
        product = product / (_norm2(product) + 1.0).unsqueeze(1)
        delta = self.second(product)
        full_delta = basis @ delta
        return x + delta + basis.T @ _matmul(full_delta, full_delta)


class TensorNet(Backbone):
    """TensorNet: rank-2 Cartesian tensor message passing (O(3)-equivariant, energies only).

    Args:
        num_elements, cutoff: set by atomforge.
        hidden_channels: channels F of the tensor features (default 48: docs/benchmarks.md, issue 16).
        num_layers: interaction blocks (default 2).
        num_rbf: Bessel radial functions (default 16).
        radial_hidden: width of a hidden layer between the radial basis and the per-layer radial
            weights (0, default: one linear map, as PaiNN's filters).
        activation: ``silu`` (default) or ``tanh``.
        readout_heads: readout heads (set by atomforge from ``model.heads``; the last readout layer
            gives one per-atom energy per head).
    """

    supports_heads = True
    head_parameters = ("readout.2.weight", "readout.2.bias")
    element_parameters = ("embedding.element.weight",)

    def __init__(self, *, num_elements: int, cutoff: float, hidden_channels: int = 48, num_layers: int = 2,
                 num_rbf: int = 16, radial_hidden: int = 0, activation: str = "silu", readout_heads: int = 1) -> None:
        super().__init__(num_elements=num_elements, cutoff=cutoff)
        activations = {"silu": nn.SiLU, "tanh": nn.Tanh}
        if activation not in activations:
            raise ConfigError(f"tensornet activation {activation!r} is not one of {sorted(activations)}")
        for name, value, least in (("hidden_channels", hidden_channels, 1), ("num_layers", num_layers, 0),
                                   ("num_rbf", num_rbf, 1), ("radial_hidden", radial_hidden, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ConfigError(f"tensornet {name} must be an integer ≥ {least}, got {value!r}")
        act = activations[activation]
        self.features = hidden_channels
        self.radial = _Radial(num_rbf, cutoff)
        self.embedding = _Embedding(num_elements, hidden_channels, num_rbf, act)
        self.num_layers = num_layers
        # radial weights (φ_I, φ_A, φ_S per channel) of every layer from one edge-level linear map
        if radial_hidden:
            self.filters = nn.Sequential(nn.Linear(num_rbf, radial_hidden), act(),
                                         nn.Linear(radial_hidden, max(num_layers, 1) * 3 * hidden_channels))
        else:
            self.filters = nn.Linear(num_rbf, max(num_layers, 1) * 3 * hidden_channels)
        self.layers = nn.ModuleList(_Interaction(hidden_channels) for _ in range(num_layers))
        self.out_norm = nn.LayerNorm(3 * hidden_channels)
        self.out = nn.Sequential(nn.Linear(3 * hidden_channels, hidden_channels), act())
        self.readout = nn.Sequential(nn.Linear(hidden_channels, hidden_channels // 2 or 1), act(),
                                     nn.Linear(hidden_channels // 2 or 1, int(readout_heads)))
        self.num_heads = int(readout_heads)
        self.basis_table = _BASIS  # [9, 9] float64 (see forward)
        self.message_passing_steps = num_layers + 1  # the embedding sums over neighbours too

    def parameter_groups(self) -> dict[str, list[str]]:
        """``embedding``, ``radial`` (filters shared by the interactions), ``interaction.<k>``, ``readout``."""
        return {"embedding": ["embedding"], "radial": ["filters"],
                **{f"interaction.{k}": [f"layers.{k}"] for k in range(len(self.layers))},
                "readout": ["out_norm", "out", "readout"]}

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        lengths = batch[K.EDGE_LENGTHS]
        centre, neighbour = batch[K.EDGE_INDEX][0], batch[K.EDGE_INDEX][1]
        unit = batch[K.EDGE_VECTORS] / lengths.unsqueeze(-1)
        basis, envelope = self.radial(lengths)
        element = batch[K.ELEMENT_INDEX]
        # exact in float64: a plain attribute, not a buffer, so that model.to(float32) leaves it alone
        basis_tensors = self.basis_table.to(device=lengths.device, dtype=lengths.dtype)
        x = self.embedding(element, centre, neighbour, basis, envelope, unit, basis_tensors)
        f = self.features
        filters = (self.filters(basis) * envelope.unsqueeze(-1)).split(3 * f, dim=-1)
        for index, layer in enumerate(self.layers):  # (enumerate, not zip: TorchScript)
            x = layer(x, centre, neighbour, filters[index].view(-1, 3, f), basis_tensors)
        invariants = torch.cat([x[:, 0] ** 2, (x[:, 1:4] ** 2).sum(1), (x[:, 4:9] ** 2).sum(1)], dim=-1)
        features = self.out(self.out_norm(invariants))
        energy = self.readout(features)
        return {K.NODE_ENERGY: energy.squeeze(-1) if self.num_heads == 1 else energy, K.NODE_FEATURES: features}


@hookimpl
def register_backbones(register) -> None:  # noqa: ANN001 - pluggy passes the registrar
    register(
        BackboneSpec(
            name="tensornet",
            factory=TensorNet,
            description="TensorNet (Simeon & De Fabritiis 2023), rank-2 Cartesian tensor message passing, l ≤ 2",
            equivariant=True,
        )
    )
