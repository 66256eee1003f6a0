"""Physics as soft losses: ``rotation_augmentation`` and ``curl_penalty`` (docs/physics.md).

``rotation_augmentation`` contributes nothing to the loss value; it uses the loss terms'
optional ``augment(batch, generator)`` hook (:class:`atomforge.Augmentation`), which the engine
applies to every training batch before the forward pass. ``curl_penalty`` penalises the
antisymmetric part of the predicted force Jacobian, estimated with random probes
(:func:`atomforge.physics.curl_estimate`).
"""

from __future__ import annotations

import torch

from atomforge import ConfigError, LossSpec, hookimpl, model_curl, random_rotations, rotate_batch
from atomforge import keys as K


class RotationAugmentation:
    """Rotate every training structure by its own random rotation before the forward pass.

    Positions and cell rotate together (periodic and open systems alike), forces and stress
    consistently; the energy is invariant. ``reflections: true`` draws from O(3) instead of SO(3)
    (right only for data without chirality-dependent labels, which holds for energies and forces).
    ``probability`` is the chance that a structure is rotated at all. The term's value is 0.
    """

    requires: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()

    def __init__(self, *, reflections: bool = False, probability: float = 1.0) -> None:
        if not isinstance(reflections, bool):
            raise ConfigError(f"rotation_augmentation reflections must be true or false; got {reflections!r}")
        if not 0.0 <= float(probability) <= 1.0:
            raise ConfigError(f"rotation_augmentation probability must be in [0, 1]; got {probability!r}")
        self.reflections = reflections
        self.probability = float(probability)

    def augment(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        """The batch with each structure rotated (drawn from ``generator``)."""
        n = int(batch[K.N_ATOMS].shape[0])
        rotations = random_rotations(n, generator, reflections=self.reflections)
        keep = torch.rand(n, generator=generator, dtype=torch.float64) >= self.probability
        rotations[keep] = torch.eye(3, dtype=torch.float64)
        return rotate_batch(batch, rotations)

    def __call__(self, batch, outputs, model) -> torch.Tensor:  # noqa: ANN001
        return outputs[K.ENERGY].new_zeros(())


class CurlPenalty:
    """Mean square of the antisymmetric part ``A = (J − Jᵀ)/2`` of the force Jacobian
    ``J = ∂F/∂r``, per force component: ``‖A‖_F² / 3N`` in (eV/Å²)², estimated with ``probes``
    Rademacher (or Gaussian) vectors as ``mean_v ‖(J v − Jᵀ v)/2‖² / 3N``.

    Zero for any gradient field, so it only acts on direct-force models (for conservative ones it
    is ≈ 0 and only costs time). Cost per step: one extra forward pass with position gradients,
    then per probe two extra backward passes (one vector-Jacobian product, one Jacobian-vector
    product by double backward) and their share of the training backward pass — roughly 3–6× a
    plain direct-force step with one probe. Probes come from torch's global RNG, which the engine
    checkpoints, so resumed runs stay exact.
    """

    requires: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()

    def __init__(self, *, probes: int = 1, distribution: str = "rademacher") -> None:
        if int(probes) < 1:
            raise ConfigError(f"curl_penalty probes must be ≥ 1; got {probes!r}")
        if distribution not in ("rademacher", "gaussian"):
            raise ConfigError(f"curl_penalty distribution must be 'rademacher' or 'gaussian'; got {distribution!r}")
        self.probes = int(probes)
        self.distribution = distribution

    def __call__(self, batch, outputs, model) -> torch.Tensor:  # noqa: ANN001
        estimate = model_curl(model, batch, probes=self.probes, kind=self.distribution,
                              create_graph=torch.is_grad_enabled() and model.training)
        return estimate.antisymmetric / estimate.components


@hookimpl
def register_losses(register) -> None:  # noqa: ANN001
    register(LossSpec("rotation_augmentation", RotationAugmentation,
                      "random rotation of every training structure (data augmentation; value 0); "
                      "reflections, probability"))
    register(LossSpec("curl_penalty", CurlPenalty,
                      "antisymmetric part of the force Jacobian (non-conservative forces); probes, distribution"))
