"""``example_bootstrap_readout``: a bootstrap ensemble of linear readouts on the trained model's
latent features — a UQ head that costs one least-squares fit after training and leaves the
model's predictions unchanged.

After training, each structure of the training set gives the summed latent features of its
atoms ``x_s = Σ_i h_i`` (and its atom count) and the model's energy residual
``y_s = E_ref,s − E_model,s``. Member k is a ridge regression of ``y`` on ``x`` over a bootstrap
resample of the structures; the members are centred (their mean subtracted), so the mean
prediction is the model's own and the members' spread is the uncertainty. Forces of each member
come from the Potential's ``energy_derivatives`` (one batched backward pass), so they are exact
gradients.
"""

from __future__ import annotations

import torch
from ase import Atoms

from atomforge import (
    ConfigError,
    Potential,
    UQFitContext,
    UQHead,
    atoms_to_graph,
    collate,
    differentiable_inputs,
    energy_derivatives,
    iterate_batches,
    member_statistics,
    scatter_sum,
)
from atomforge import keys as K

__all__ = ["BootstrapReadout"]


def _feature_width(potential: Potential) -> int:
    z = potential.elements[0]
    dimer = Atoms(numbers=[z, z], positions=[[0, 0, 0], [0, 0, 0.5 * potential.cutoff]])
    dtype = next(p.dtype for p in potential.parameters() if p.is_floating_point())
    batch = collate([atoms_to_graph(dimer, potential.cutoff, dtype=dtype)])
    with torch.no_grad():
        out = potential.energy_outputs(batch, batch[K.POSITIONS], None)
    if K.NODE_FEATURES not in out:
        raise ConfigError("example_bootstrap_readout needs a backbone that returns keys.NODE_FEATURES")
    return int(out[K.NODE_FEATURES].shape[-1])


class BootstrapReadout(UQHead):
    """``members`` bootstrap readouts (≥ 2), ridge ``ridge`` (relative to the feature scale),
    resampling seeded by ``seed``."""

    def __init__(self, potential: Potential, *, members: int = 8, ridge: float = 1e-3, seed: int = 0) -> None:
        super().__init__(potential)
        if isinstance(members, bool) or not isinstance(members, int) or members < 2:
            raise ConfigError(f"example_bootstrap_readout.members: expected an integer ≥ 2, got {members!r}")
        if not isinstance(ridge, (int, float)) or ridge <= 0:
            raise ConfigError(f"example_bootstrap_readout.ridge: expected a number > 0, got {ridge!r}")
        self.members, self.ridge, self.seed = members, float(ridge), int(seed)
        dtype = next(p.dtype for p in potential.parameters() if p.is_floating_point())
        self.register_buffer("weights", torch.zeros(members, _feature_width(potential) + 1, dtype=dtype))

    @torch.no_grad()
    def fit(self, context: UQFitContext) -> None:
        """Regress the training residuals on summed features, once per bootstrap resample."""
        xs, ys = [], []
        self.potential.eval()
        for batch in iterate_batches(context.train, context.batch_size):
            out = self.potential.energy_outputs(batch, batch[K.POSITIONS], None)
            size = int(batch[K.N_ATOMS].shape[0])
            summed = scatter_sum(out[K.NODE_FEATURES], batch[K.BATCH], size)
            xs.append(torch.cat([summed, batch[K.N_ATOMS].to(summed.dtype).unsqueeze(-1)], -1).double())
            ys.append((batch[K.ENERGY] - out[K.ENERGY]).double())
        x, y = torch.cat(xs), torch.cat(ys)
        generator = torch.Generator().manual_seed(self.seed)
        penalty = self.ridge * x.pow(2).mean(0).clamp_min(1e-12)
        fitted = []
        for _ in range(self.members):
            pick = torch.randint(0, len(y), (len(y),), generator=generator)
            a, b = x[pick], y[pick]
            fitted.append(torch.linalg.solve(a.T @ a + torch.diag(penalty * len(y)), a.T @ b))
        weights = torch.stack(fitted)
        self.weights.copy_((weights - weights.mean(0)).to(self.weights.dtype))

    def predict(self, batch, *, compute_forces, compute_stress):  # noqa: ANN001, ANN201
        gradient = compute_forces and not self.potential.backbone.direct_forces
        positions, strain = differentiable_inputs(batch, gradient, compute_stress)
        out = self.potential.energy_outputs(batch, positions, strain)
        features = out[K.NODE_FEATURES]
        per_atom = features @ self.weights[:, :-1].T.to(features.dtype) + self.weights[:, -1].to(features.dtype)
        node = out[K.NODE_ENERGY].unsqueeze(-1) + per_atom  # [N, K]
        energies = scatter_sum(node, batch[K.BATCH], int(batch[K.N_ATOMS].shape[0])).T  # [K, B]
        derived = energy_derivatives(energies, batch, positions if gradient else None, strain,
                                     create_graph=False, members=self.members)
        results = member_statistics({K.ENERGY: energies, K.NODE_ENERGY: node.T, **derived})
        if compute_forces and K.DIRECT_FORCES in out:
            results[K.FORCES] = out[K.DIRECT_FORCES]
        return results
