"""A compact SchNet (Schütt et al., NeurIPS 2017; J. Chem. Phys. 148, 241722, 2018).

Every atom starts from an element embedding ``x_i`` [F]. Each interaction block applies a
continuous-filter convolution and a residual update::

    v_i = Σ_j  (W_in x_j) ⊙ W(r_ij) · fcut(r_ij)        # sum over the neighbours j of i
    x_i ← x_i + MLP(v_i)

The filter ``W(r)`` is an MLP of Gaussian radial basis functions of the distance. The per-atom
energy is an MLP of the final ``x_i``. Only distances enter, so the energy is invariant under
rotation, translation and permutation, and the forces atomforge derives from it (−∂E/∂r, in its
one wrapper) are equivariant. The cosine cutoff ``fcut(r) = ½(cos(πr/rc) + 1)`` falls to zero with
zero slope at ``rc``: energy *and* forces stay continuous when a neighbour crosses the cutoff.

The backbone works in normalised units: atomforge's ``Potential`` multiplies ``NODE_ENERGY`` by
the fitted scale and adds the shift and the per-element reference energy.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from atomforge import Backbone, ConfigError
from atomforge import keys as K

__all__ = ["ExampleSchNet", "GaussianBasis", "Interaction", "ShiftedSoftplus", "cosine_cutoff"]

_LOG2 = math.log(2.0)


class ShiftedSoftplus(nn.Module):
    """``softplus(x) − log 2``: smooth (forces are trained through second derivatives), ssp(0) = 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.softplus(x) - _LOG2


class GaussianBasis(nn.Module):
    """``exp(−γ (r − μ_k)²)`` with ``num_rbf`` centres μ_k evenly spaced on [0, rc]."""

    def __init__(self, num_rbf: int, cutoff: float) -> None:
        super().__init__()
        self.register_buffer("centres", torch.linspace(0.0, cutoff, num_rbf))
        spacing = cutoff / (num_rbf - 1)
        self.gamma = 0.5 / spacing**2  # neighbouring Gaussians cross at one standard deviation

    def forward(self, lengths: torch.Tensor) -> torch.Tensor:
        """[E] distances → [E, num_rbf] features."""
        diff = lengths.unsqueeze(-1) - self.centres.to(lengths.dtype)
        return torch.exp(-self.gamma * diff * diff)


def cosine_cutoff(lengths: torch.Tensor, cutoff: float) -> torch.Tensor:
    """``½(cos(πr/rc) + 1)`` inside the cutoff, 0 outside; value and slope vanish at ``rc``."""
    inside = (lengths < cutoff).to(lengths.dtype)
    return 0.5 * (torch.cos(lengths * (math.pi / cutoff)) + 1.0) * inside


class Interaction(nn.Module):
    """One continuous-filter convolution plus a residual atom-wise update."""

    def __init__(self, features: int, num_rbf: int) -> None:
        super().__init__()
        self.filter_net = nn.Sequential(
            nn.Linear(num_rbf, features), ShiftedSoftplus(), nn.Linear(features, features)
        )
        self.project_in = nn.Linear(features, features, bias=False)
        self.update = nn.Sequential(
            nn.Linear(features, features), ShiftedSoftplus(), nn.Linear(features, features)
        )

    def forward(
        self,
        x: torch.Tensor,
        basis: torch.Tensor,
        envelope: torch.Tensor,
        centre: torch.Tensor,
        neighbour: torch.Tensor,
    ) -> torch.Tensor:
        """``x`` [N, F], ``basis`` [E, R], ``envelope`` [E]; edges point centre → neighbour."""
        filters = self.filter_net(basis) * envelope.unsqueeze(-1)  # [E, F]
        messages = self.project_in(x)[neighbour] * filters  # [E, F]
        pooled = x.new_zeros(x.shape).index_add(0, centre, messages)  # [N, F]
        return x + self.update(pooled)


class ExampleSchNet(Backbone):
    """SchNet-style invariant backbone: per-atom energies from continuous-filter convolutions.

    Args:
        num_elements: size of the element embedding (set by atomforge from the training data).
        cutoff: neighbour cutoff in Å (set by atomforge from ``model.cutoff``).
        hidden_channels: feature width F of atoms and filters.
        num_interactions: number of interaction blocks.
        num_rbf: number of Gaussian radial basis functions (at least 2).
    """

    def __init__(
        self,
        *,
        num_elements: int,
        cutoff: float,
        hidden_channels: int = 64,
        num_interactions: int = 3,
        num_rbf: int = 32,
    ) -> None:
        super().__init__(num_elements=num_elements, cutoff=cutoff)
        _check_options(hidden_channels=hidden_channels, num_interactions=num_interactions,
                       num_rbf=num_rbf)
        self.embedding = nn.Embedding(num_elements, hidden_channels)
        self.basis = GaussianBasis(num_rbf, self.cutoff)
        self.interactions = nn.ModuleList(
            Interaction(hidden_channels, num_rbf) for _ in range(num_interactions)
        )
        self.readout = nn.Sequential(
            nn.Linear(hidden_channels, hidden_channels // 2),
            ShiftedSoftplus(),
            nn.Linear(hidden_channels // 2, 1),
        )

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Batch with edge lengths → ``NODE_ENERGY`` [N] (normalised) and ``NODE_FEATURES`` [N, F]."""
        centre, neighbour = batch[K.EDGE_INDEX][0], batch[K.EDGE_INDEX][1]
        lengths = batch[K.EDGE_LENGTHS]
        basis = self.basis(lengths)
        envelope = cosine_cutoff(lengths, self.cutoff)
        x = self.embedding(batch[K.ELEMENT_INDEX])
        for block in self.interactions:
            x = block(x, basis, envelope, centre, neighbour)
        return {K.NODE_ENERGY: self.readout(x).squeeze(-1), K.NODE_FEATURES: x}


def _check_options(*, hidden_channels: int, num_interactions: int, num_rbf: int) -> None:
    """Reject sizes the model cannot be built with, saying what is allowed."""
    problems = [
        f"{name}={value!r} (expected an integer >= {low})"
        for name, value, low in (("hidden_channels", hidden_channels, 2),
                                 ("num_interactions", num_interactions, 1),
                                 ("num_rbf", num_rbf, 2))
        if not isinstance(value, int) or isinstance(value, bool) or value < low
    ]
    if problems:
        raise ConfigError(f"example_schnet: invalid option(s) {', '.join(problems)}; "
                          "fix them in the config's model block")
