"""Uncertainty: the base class of UQ heads, their helpers and calibration.

A UQ head (:func:`atomforge.hookspecs.register_uq_heads`) wraps a trained or to-be-trained
:class:`~atomforge.Potential` and returns the usual outputs (mean energy, forces, stress) plus
:data:`keys.ENERGY_STD` [B], :data:`keys.FORCES_STD` [N] (std of each force component of an
atom) and :data:`keys.FORCES_STD_MAX` [B]. Forces always come from the Potential's
:func:`~atomforge.energy_derivatives`, so conservation lives in one place.

The raw spread of a head is rarely calibrated, so every head carries a :class:`Calibration`
fitted on the validation set (:func:`atomforge.calibrate`, in :mod:`atomforge.analysis.calibration`): a variance scale by Gaussian NLL minimisation
(closed form) or an isotonic map (scikit-learn). It is stored as JSON in the model file.
UQ metrics live in :mod:`atomforge.analysis.metrics`, their plots in :mod:`atomforge.analysis.plots` and the UQ
steps of ``atomforge train`` in :mod:`atomforge.workflows.train`. See ``docs/uq.md``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

from .. import keys as K
from .._errors import ConfigError
from .._specs import PluginKind
from ..data.fields import DEFAULT_FIELDS, FieldTable, replicate_batch
from ..data.graph import GraphDataset
from .potential import Potential

__all__ = [
    "CALIBRATION_METHODS", "Calibration", "UQHead", "UQFitContext", "build_uq_head", "raw_spread",
    "member_statistics", "replicate_batch",
]

CALIBRATION_METHODS = ("scale", "isotonic", "none")
_TINY = 1e-12


# -- calibration -----------------------------------------------------------------------------------
class Calibration(nn.Module):
    """Maps a head's raw std to a calibrated std: ``σ = scale·σ_raw`` or, after an isotonic fit,
    a monotone piecewise-linear map ``σ = f(σ_raw)``. Energy and forces are calibrated apart.

    Its state is plain JSON (:meth:`to_dict`), kept in the model file's config; nothing of it is
    in the ``state_dict`` (the isotonic map has a data-dependent size).
    """

    def __init__(self) -> None:
        super().__init__()
        self.active = True  # False while the raw spread is being measured
        self.state: dict[str, Any] = {"method": "none", "energy": {"scale": 1.0}, "forces": {"scale": 1.0}}

    def to_dict(self) -> dict[str, Any]:
        return dict(self.state)

    def load(self, state: Mapping[str, Any] | None) -> None:
        """Restore a :meth:`to_dict` record (``None`` = identity)."""
        if state:
            self.state = dict(state)

    def map(self, quantity: str, std: torch.Tensor) -> torch.Tensor:
        """Calibrated std of ``quantity`` (``energy`` or ``forces``)."""
        record = self.state.get(quantity, {})
        if not self.active or not record:
            return std
        if "x" in record:
            xp = torch.tensor(record["x"], dtype=std.dtype, device=std.device)
            fp = torch.tensor(record["y"], dtype=std.dtype, device=std.device)
            return _interp(std, xp, fp)
        return std * float(record.get("scale", 1.0))

    def forward(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Calibrate the std keys of ``outputs`` in place and add :data:`keys.FORCES_STD_MAX`."""
        if K.ENERGY_STD in outputs:
            outputs[K.ENERGY_STD] = self.map("energy", outputs[K.ENERGY_STD])
        if K.FORCES_STD in outputs:
            std = self.map("forces", outputs[K.FORCES_STD])
            outputs[K.FORCES_STD] = std
            size = int(batch[K.N_ATOMS].shape[0])
            outputs[K.FORCES_STD_MAX] = std.new_zeros(size).scatter_reduce(
                0, batch[K.BATCH], std, reduce="amax", include_self=False)
        return outputs


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """``numpy.interp`` in torch: piecewise linear, constant beyond the ends."""
    if xp.numel() == 1:
        return fp.expand_as(x).clone()
    x = x.clamp(xp[0], xp[-1])
    index = torch.searchsorted(xp, x.contiguous()).clamp(1, xp.numel() - 1)
    x0, x1, y0, y1 = xp[index - 1], xp[index], fp[index - 1], fp[index]
    t = (x - x0) / (x1 - x0).clamp_min(_TINY)
    return y0 + t * (y1 - y0)


# -- the base class of heads -------------------------------------------------------------------------
@dataclass(frozen=True)
class UQFitContext:
    """What a head's post-training :meth:`UQHead.fit` may use."""

    train: GraphDataset  # the training structures (graphs built with the model's cutoff)
    valid: GraphDataset  # the validation structures
    train_member: Callable[[int], Potential]  # trains a fresh, independently seeded Potential
    batch_size: int = 32  # structures per batch when predicting


class UQHead(nn.Module):
    """Base class of UQ heads: ``forward(batch, compute_forces=, compute_stress=)`` returns the
    mean outputs of :class:`~atomforge.Potential` plus the std keys, calibrated.

    Subclasses implement :meth:`predict` (raw spread) and may override :meth:`fit` (steps after
    the engine has trained the model: more ensemble members, a latent density) and these flags:
    """

    #: the engine trains the head itself (shallow ensemble, MC dropout), not the bare Potential
    trains_with_model: bool = False
    #: model outputs some loss term must consume for the head to learn a spread (e.g. energy_std)
    needs_loss_outputs: tuple[str, ...] = ()

    def __init__(self, potential: Potential) -> None:
        super().__init__()
        self.potential = potential
        self.calibration = Calibration()
        self.fields: FieldTable = DEFAULT_FIELDS  # how batch keys replicate; the registry's once built through it

    @property
    def cutoff(self) -> float:
        return self.potential.cutoff

    @property
    def elements(self) -> list[int]:
        return self.potential.elements

    def forward(
        self, batch: dict[str, torch.Tensor], *, compute_forces: bool = True, compute_stress: bool = False
    ) -> dict[str, torch.Tensor]:
        outputs = self.predict(batch, compute_forces=compute_forces, compute_stress=compute_stress)
        return self.calibration(outputs, batch)

    def predict(
        self, batch: dict[str, torch.Tensor], *, compute_forces: bool, compute_stress: bool
    ) -> dict[str, torch.Tensor]:
        """Mean outputs and the raw (uncalibrated) :data:`keys.ENERGY_STD` / :data:`keys.FORCES_STD`."""
        raise NotImplementedError

    def fit(self, context: UQFitContext) -> None:
        """Post-training steps; the default has none."""

    def uq_config(self) -> dict[str, Any]:
        """Extra JSON the head needs to be rebuilt (merged into its options); default none."""
        return {}


def build_uq_head(potential: Potential, uq: Mapping[str, Any], registry: Any) -> UQHead:
    """Wrap ``potential`` with the head named ``uq["name"]`` (options ``uq["options"]``) through
    the registry, and restore ``uq["calibration"]`` if present."""
    spec = registry.get(PluginKind.UQ_HEAD, uq["name"])
    options = dict(uq.get("options", {}))
    try:
        head = spec.factory(potential, **options)
    except TypeError as error:
        raise ConfigError(f"uq head {uq['name']!r} rejected its options {sorted(options)}: {error}") from error
    if not isinstance(head, UQHead):
        raise ConfigError(f"uq head {uq['name']!r} returned {type(head).__name__}, not an atomforge UQHead")
    head.calibration.load(uq.get("calibration"))
    head.fields = getattr(registry, "fields", DEFAULT_FIELDS)
    return head


@contextlib.contextmanager
def raw_spread(head: UQHead) -> Iterator[UQHead]:
    """Switch calibration off inside the block (to measure the raw spread)."""
    before = head.calibration.active
    head.calibration.active = False
    try:
        yield head
    finally:
        head.calibration.active = before


# -- helpers for heads -----------------------------------------------------------------------------------
def member_statistics(members: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Mean over the leading (member) axis of every output, plus the spread: ENERGY_STD from
    ``energy`` [K, B] and FORCES_STD [N] (RMS over the 3 components of the per-component std) from
    ``forces`` [K, N, 3]. K = 1 gives zero spread."""
    out = {key: value.mean(0) for key, value in members.items()}
    if K.ENERGY in members:
        out[K.ENERGY_STD] = _std(members[K.ENERGY])
    if K.FORCES in members:
        out[K.FORCES_STD] = _std(members[K.FORCES]).pow(2).mean(-1).sqrt()
    return out


def _std(values: torch.Tensor) -> torch.Tensor:
    """Population std over axis 0 (an ensemble of identical members has exactly zero)."""
    centred = values - values.mean(0, keepdim=True)
    return centred.pow(2).mean(0).clamp_min(0).sqrt()
