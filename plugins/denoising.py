"""Denoising pre-training: the ``denoising`` loss term (docs/physics.md).

Following Zaidi et al. 2023 ("Pre-training via denoising") and, for labelled non-equilibrium
structures, the DeNS idea of Liao et al. 2024: the term's ``augment`` hook moves the atoms of
chosen training structures by Gaussian noise, and the term asks the model's own conservative
forces ``F = −∂E/∂x`` at the noisy geometry to point back: the target is the Hookean restoring
force ``−k (x̃ − x)``. For a Boltzmann density ``p ∝ exp(−E/kT)`` the score is ``F/kT``, so this
is score matching with the energy model itself — no extra head, and the result fine-tunes through
``model.init_from`` like any model file.

Chosen structures: every structure without energy and force labels (CIF/POSCAR collections,
unlabelled MD frames) and each labelled one with probability ``labelled_fraction``; a perturbed
labelled structure's labels no longer hold, so its label masks are cleared and the label terms
skip it.
"""

from __future__ import annotations

import math
from numbers import Real

import torch

from atomforge import ConfigError, FieldSpec, LossSpec, hookimpl, label_mask, mask_key
from atomforge import keys as K

__all__ = ["Denoising", "DISPLACEMENT", "MASK"]

DISPLACEMENT = "denoise_displacement"  # [N, 3] float, Å: x̃ − x of each atom (0 where not perturbed)
MASK = "denoise_mask"  # [B] bool: which structures ``augment`` perturbed
HELD_OUT_SEED = 0  # seed of the fixed noise on batches the loop does not augment (validation)


def _number(option: str, value: object, *, low: float, high: float | None = None, unit: str = "") -> float:
    """``value`` as a float, ``> low`` (no ``high``) or in ``[low, high]``; a non-number, NaN,
    infinity or out-of-range value is a :class:`ConfigError` saying what was expected."""
    expected = f"a number > {low:g}" if high is None else f"a number in [{low:g}, {high:g}]"
    ok = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(float(value))
    if ok:
        number = float(value)
        ok = number > low if high is None else low <= number <= high
    if not ok:
        raise ConfigError(f"denoising {option} must be {expected}{f' ({unit})' if unit else ''}; got {value!r}")
    return float(value)


def _carries(batch: dict[str, torch.Tensor], label: str) -> torch.Tensor:
    """[B] bool on the CPU: which structures carry ``label`` (a batch without the key: none)."""
    mask = label_mask(batch, label)
    if mask is not None:
        return mask.cpu()
    return torch.full((int(batch[K.N_ATOMS].shape[0]),), label in batch, dtype=torch.bool)


def _labels(batch: dict[str, torch.Tensor]) -> list[str]:
    """The labels a perturbation invalidates: the built-ins and any other masked label."""
    masked = [key for key in batch if mask_key(key) in batch]
    return list(dict.fromkeys([*K.LABEL_KEYS, *masked]))


def _centred(noise: torch.Tensor, owner: torch.Tensor, n_atoms: torch.Tensor) -> torch.Tensor:
    """``noise`` [N, 3] minus its mean over each structure: a rigid translation changes no
    geometry, and no conservative force field can predict it (its forces sum to zero)."""
    sums = noise.new_zeros((int(n_atoms.shape[0]), 3)).index_add_(0, owner, noise)
    return noise - (sums / n_atoms.to(noise.dtype).unsqueeze(-1))[owner]


class Denoising:
    """Score matching on noisy geometries: mean square, per force component, of
    ``F(x̃) − (−k (x̃ − x))`` over the perturbed atoms, in (eV/Å)², weighted by the structure
    weight.

    ``augment`` draws ``x̃ = x + σ ε`` (``ε ~ N(0, 1)`` per component, its mean over each
    structure removed) for the structures it chooses: all unlabelled ones and labelled ones with
    probability ``labelled_fraction`` (their label masks are cleared). The noise is kept under
    :data:`DISPLACEMENT` and the choice under :data:`MASK`. On a batch the loop did not augment
    (validation) the term perturbs it itself with fixed noise (seed :data:`HELD_OUT_SEED`) and
    runs one extra forward pass, so the validation loss measures denoising too.

    Run it after ``rotation_augmentation`` in the ``loss`` list: a rotation applied later would
    turn the positions but not the stored noise.
    """

    requires: tuple[str, ...] = ()
    outputs: tuple[str, ...] = (K.FORCES,)
    accepts_unlabelled = True  # CompositeLoss.required_of_every_structure: labels are optional

    def __init__(self, *, sigma: float = 0.05, stiffness: float = 20.0, labelled_fraction: float = 0.0) -> None:
        self.sigma = _number("sigma", sigma, low=0.0, unit="noise std in Å")
        self.stiffness = _number("stiffness", stiffness, low=0.0, unit="eV/Å²")
        self.labelled_fraction = _number("labelled_fraction", labelled_fraction, low=0.0, high=1.0)

    # -- data ----------------------------------------------------------------------------------
    def choose(self, batch: dict[str, torch.Tensor], coins: torch.Tensor) -> torch.Tensor:
        """[B] bool on the CPU: the structures to perturb, given uniform ``coins`` [B] in [0, 1)."""
        labelled = _carries(batch, K.ENERGY) | _carries(batch, K.FORCES)
        return ~labelled | (coins < self.labelled_fraction)

    def augment(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        """A new batch with the chosen structures' positions perturbed, the noise and choice
        recorded, and the labels of perturbed labelled structures masked out."""
        positions = batch[K.POSITIONS]
        coins = torch.rand(int(batch[K.N_ATOMS].shape[0]), generator=generator, dtype=torch.float64)
        noise = torch.randn(tuple(positions.shape), generator=generator, dtype=torch.float64)
        chosen = self.choose(batch, coins)
        owner, n_atoms = batch[K.BATCH].cpu(), batch[K.N_ATOMS].cpu()
        displacement = self.sigma * _centred(noise, owner, n_atoms) * chosen[owner].unsqueeze(-1)
        displacement = displacement.to(device=positions.device, dtype=positions.dtype)
        out = dict(batch)
        out[K.POSITIONS] = positions + displacement
        out[DISPLACEMENT] = displacement
        out[MASK] = chosen.to(positions.device)
        for label in _labels(batch):
            carried = _carries(batch, label)
            if bool((carried & chosen).any()):
                out[mask_key(label)] = (carried & ~chosen).to(positions.device)
        return out

    # -- loss ----------------------------------------------------------------------------------
    def __call__(self, batch, outputs, model) -> torch.Tensor:  # noqa: ANN001
        if MASK not in batch:  # not augmented by the loop: validation, evaluation
            return self._held_out(batch, outputs, model)
        return self.value(batch, outputs[K.FORCES])

    def value(self, batch: dict[str, torch.Tensor], forces: torch.Tensor) -> torch.Tensor:
        """The term on an augmented ``batch`` for predicted ``forces`` [N, 3] (eV/Å); an empty
        sum (0, with the forces' graph) when no structure was perturbed."""
        owner = batch[K.BATCH]
        atoms = batch[MASK][owner]
        target = -self.stiffness * batch[DISPLACEMENT][atoms].to(forces.dtype)
        error = ((forces[atoms] - target) ** 2).sum(-1)
        weights = batch[K.WEIGHT].to(forces.dtype)[owner][atoms]
        return (weights * error).sum() / (3 * weights.sum().clamp_min(torch.finfo(forces.dtype).tiny))

    def _held_out(self, batch: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor],
                  model: torch.nn.Module | None) -> torch.Tensor:
        """The term on ``batch`` perturbed with fixed noise (one extra forward pass of ``model``)."""
        zero = outputs[K.ENERGY].new_zeros(())
        if model is None:
            return zero
        perturbed = self.augment(batch, torch.Generator().manual_seed(HELD_OUT_SEED))
        if not bool(perturbed[MASK].any()):
            return zero
        with torch.enable_grad():
            forces = model(perturbed, compute_forces=True, compute_stress=False)[K.FORCES]
        return self.value(perturbed, forces)


@hookimpl
def register_fields(register) -> None:  # noqa: ANN001
    register(FieldSpec(DISPLACEMENT, "atom", shape=(3,),
                       description="denoising noise x̃ − x of each atom, Å (training batches only)"))
    register(FieldSpec(MASK, "structure", dtype="bool",
                       description="which structures the denoising term perturbed (training batches only)"))


@hookimpl
def register_losses(register) -> None:  # noqa: ANN001
    register(LossSpec("denoising", Denoising,
                      "denoising pre-training: forces of noisy structures match −k·noise, unlabelled data allowed; "
                      "sigma, stiffness, labelled_fraction"))
