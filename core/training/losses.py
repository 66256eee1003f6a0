"""The loss interface: loss plugins build :class:`LossTerm` objects; a :class:`CompositeLoss`
sums them with their weights.

A term may also transform the training data: a term with an ``augment(batch, generator) ->
batch`` method (the :class:`Augmentation` protocol, e.g. ``rotation_augmentation``) is applied by
:meth:`CompositeLoss.augment`, which the engine calls on every *training* batch before the forward
pass (never on validation or test batches), with a generator the engine seeds per epoch so that
resumed runs see the same augmented data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

import torch

from .. import keys as K
from ..data.fields import label_mask

__all__ = ["LossTerm", "Augmentation", "WeightedTerm", "CompositeLoss", "label_weights"]


def label_weights(batch: dict[str, torch.Tensor], label: str) -> torch.Tensor:
    """[B] per-structure loss weights for a term on ``label``: the sample weight
    (:data:`keys.WEIGHT`), zero for structures that lack the label (its mask; see
    :func:`atomforge.collate`). Divide by ``weights.sum().clamp_min(...)`` — a batch may have
    none."""
    weight = batch[K.WEIGHT]
    mask = label_mask(batch, label)
    return weight if mask is None else weight * mask.to(weight.dtype)


@runtime_checkable
class LossTerm(Protocol):
    """One term of the training loss.

    ``requires`` names the labels it needs ('energy', 'forces', 'stress'; checked on the data
    before training), ``outputs`` the model outputs it needs ('forces', 'stress').
    ``term(batch, outputs, model)`` returns a scalar tensor.

    Optional: a truthy class attribute ``accepts_unlabelled`` declares that the term learns from
    structures without labels (``denoising``); with such a term in the loss, training data need
    not carry every label of :attr:`CompositeLoss.requires` (see
    :attr:`CompositeLoss.required_of_every_structure`), and the label terms score only the
    structures that carry their label (the label masks, :func:`label_weights`).
    """

    requires: tuple[str, ...]
    outputs: tuple[str, ...]

    def __call__(
        self, batch: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor], model: torch.nn.Module
    ) -> torch.Tensor: ...


@runtime_checkable
class Augmentation(Protocol):
    """Optional extra of a loss term: transform a training batch before the forward pass.

    ``augment`` returns a new batch (do not modify the input's tensors in place) whose labels
    are transformed consistently with the inputs. Draw all randomness from ``generator``.
    """

    def augment(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]: ...


@dataclass(frozen=True)
class WeightedTerm:
    """A loss term with its config name and weight."""

    name: str
    weight: float
    term: LossTerm
    head: int | None = None  # only structures on this head (fidelity) count: their sample weights, others' 0


class CompositeLoss:
    """Weighted sum of loss terms; also reports each term for logging."""

    def __init__(self, terms: Sequence[WeightedTerm]) -> None:
        self.terms = list(terms)

    @property
    def requires(self) -> tuple[str, ...]:
        """All labels any term needs."""
        return tuple(sorted({label for t in self.terms for label in t.term.requires}))

    @property
    def required_of_every_structure(self) -> tuple[str, ...]:
        """The labels every training structure must carry: :attr:`requires`, or none when a term
        accepts unlabelled structures (``accepts_unlabelled``; the other terms then skip the
        structures that lack their label)."""
        if any(getattr(t.term, "accepts_unlabelled", False) for t in self.terms):
            return ()
        return self.requires

    @property
    def outputs(self) -> tuple[str, ...]:
        """All model outputs any term needs."""
        return tuple(sorted({out for t in self.terms for out in t.term.outputs}))

    def augment(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Apply every term's ``augment`` (if it has one) in config order; training batches only."""
        for t in self.terms:
            if isinstance(t.term, Augmentation):
                batch = t.term.augment(batch, generator)
        return batch

    def __call__(
        self, batch: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor], model: torch.nn.Module
    ) -> tuple[torch.Tensor, dict[str, float]]:
        total = torch.zeros((), dtype=outputs["energy"].dtype)
        logs: dict[str, float] = {}
        for t in self.terms:
            if t.head is None:
                value = t.term(batch, outputs, model)
            else:  # a loss per head: the other heads' structures weigh 0 in this term
                on_head = batch.get(K.FIDELITY, torch.zeros_like(batch[K.WEIGHT], dtype=torch.long)) == t.head
                value = t.term({**batch, K.WEIGHT: batch[K.WEIGHT] * on_head.to(batch[K.WEIGHT].dtype)}, outputs, model)
            logs[t.name] = float(value.detach())
            total = total + t.weight * value
        return total, logs
