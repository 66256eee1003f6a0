"""``example_accumulate``: the torch backend with gradient accumulation — a third-party engine.

Each optimiser step of ``training.batch_size`` structures is split into ``steps`` micro-batches
whose gradients add up before one update: the same step as one big batch (for equal-sized
micro-batches) in the memory of a small one. It changes one public method of
:class:`atomforge.TorchBackend`, :meth:`plan`; the loop (epochs, EMA, validation, checkpoints,
resume) is atomforge's, and :meth:`TorchBackend.step` already accumulates over the
micro-batches it is given. Its options block is the config section named like the engine::

    training: {engine: example_accumulate, batch_size: 16}
    example_accumulate: {steps: 4}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

from atomforge import ConfigError, GraphDataset, Step, TorchBackend, TrainSettings

__all__ = ["AccumulateOptions", "AccumulatingBackend", "parse_options", "make_backend"]


@dataclass(frozen=True)
class AccumulateOptions:
    """The ``example_accumulate:`` block."""

    steps: int = 2  # micro-batches per optimiser step; training.batch_size must be a multiple


def parse_options(options: Mapping[str, Any] | None) -> AccumulateOptions:
    """Validated options; unknown keys and bad values are :class:`atomforge.ConfigError`."""
    data = dict(options or {})
    unknown = sorted(set(data) - {"steps"})
    if unknown:
        raise ConfigError(f"example_accumulate: unknown key(s) {unknown}; valid keys: ['steps']")
    steps = data.get("steps", 2)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"example_accumulate.steps: expected an integer ≥ 1, got {steps!r}")
    return AccumulateOptions(steps=steps)


class AccumulatingBackend(TorchBackend):
    """:class:`atomforge.TorchBackend` whose steps come in ``steps`` micro-batches."""

    def __init__(self, *, steps: int, **torch_options: Any) -> None:
        super().__init__(**torch_options)
        self.steps = steps

    def plan(self, order: Sequence[int], dataset: GraphDataset) -> Iterator[Step]:
        for step in super().plan(order, dataset):
            (batch,) = step.batches
            size = -(-len(batch) // self.steps)  # ceil: a short last batch gets fewer micro-batches
            yield Step([batch[k : k + size] for k in range(0, len(batch), size)], step.metrics)


def make_backend(*, options: Mapping[str, Any] | None, settings: TrainSettings) -> AccumulatingBackend:
    """The engine factory atomforge calls (``EngineSpec.factory``)."""
    parsed = parse_options(options)
    if settings.batch_size % parsed.steps:
        raise ConfigError(f"example_accumulate.steps={parsed.steps} must divide training.batch_size="
                          f"{settings.batch_size}")
    return AccumulatingBackend.from_settings(settings, steps=parsed.steps)
