"""``check_engine``: a training backend that trains, is reproducible, resumes exactly and
exports a plain model — run through the one training loop, as ``atomforge train`` would."""

from __future__ import annotations

import copy
import math
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from .. import keys as K
from .._specs import EngineSpec
from ..analysis.evaluate import evaluate
from ..data.graph import GraphDataset
from ..model.potential import Potential
from ..training.backends import TrainingBackend
from ..training.loop import Trainer, TrainSettings
from ..training.losses import CompositeLoss
from ..training.optim import make_optimizer
from ._common import CheckResult, check, finish
from ._models import RadialTestBackbone, lj_clusters

__all__ = ["check_engine"]


def _potential(seed: int, dtype: torch.dtype) -> Potential:
    torch.manual_seed(seed)
    return Potential(RadialTestBackbone(num_elements=1, cutoff=6.0, features=16), elements=[18],
                     atomic_energies=[0.0], scale=0.05, shift=0.0).to(dtype)


def _loss() -> CompositeLoss:
    from ..training.losses import WeightedTerm

    class _Forces:
        requires = (K.FORCES,)
        outputs = (K.FORCES,)

        def __call__(self, batch: Any, outputs: Any, model: Any) -> torch.Tensor:
            return ((outputs[K.FORCES] - batch[K.FORCES]) ** 2).mean()

    class _Energy:
        requires = (K.ENERGY,)
        outputs: tuple[str, ...] = ()

        def __call__(self, batch: Any, outputs: Any, model: Any) -> torch.Tensor:
            n = batch[K.N_ATOMS].to(outputs[K.ENERGY].dtype)
            return (((outputs[K.ENERGY] - batch[K.ENERGY]) / n) ** 2).mean()

    return CompositeLoss([WeightedTerm("energy", 1.0, _Energy()), WeightedTerm("forces", 100.0, _Forces())])


def _factory(factory_or_spec: Callable[..., Any] | EngineSpec) -> Callable[..., Any]:
    return factory_or_spec.factory if isinstance(factory_or_spec, EngineSpec) else factory_or_spec


def _run(make: Callable[..., Any], options: Mapping[str, Any] | None, settings: TrainSettings,
         data: tuple[GraphDataset, GraphDataset], checkpoint: Path | None, resume: bool = False) -> tuple[Trainer, Any]:
    backend = make(options=options, settings=settings)
    model = _potential(settings.seed, data[0].graphs[0][K.POSITIONS].dtype)
    trainer = Trainer(model=model, loss=_loss(), optimizer=make_optimizer(model, lr=0.01), settings=settings,
                      backend=backend, checkpoint_dir=checkpoint)
    result = trainer.fit(*data, resume=resume)
    return trainer, result


def _max_relative(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    worst = 0.0
    for key in a:
        scale = max(float(a[key].abs().max()) if a[key].numel() else 0.0, 1e-12)
        worst = max(worst, float((a[key].double() - b[key].double()).abs().max()) / scale if a[key].numel() else 0.0)
    return worst


def check_engine(
    factory_or_spec: Callable[..., Any] | EngineSpec,
    *,
    options: Mapping[str, Any] | None = None,
    epochs: int = 6,
    tolerance: float = 1e-6,
    dtype: torch.dtype = torch.float32,
) -> list[CheckResult]:
    """Train a small pair potential on Lennard-Jones clusters through :class:`atomforge.Trainer`
    with the engine's backend (one process, CPU, ``dtype``) and check that it:

    * is an :class:`atomforge.TrainingBackend` with ``rank`` 0 of ``world_size`` 1;
    * trains: the validation loss falls below half its first value;
    * is reproducible: a second run with the same seed exports the same weights;
    * resumes: ``epochs // 2`` epochs, then a new backend resuming from the checkpoint to
      ``epochs``, exports the weights of the uninterrupted run and the same history;
    * exports a plain module on the CPU, in eval mode, without gradients, that predicts what
      the loop measured at its best epoch;
    * reports only finite numbers as ``train_metrics``.

    Weights are compared with relative tolerance ``tolerance``.
    """
    make = _factory(factory_or_spec)
    settings = TrainSettings(max_epochs=epochs, batch_size=4, valid_batch_size=8, seed=0, grad_clip=10.0,
                             ema_decay=0.9, device="cpu")
    data = (GraphDataset(lj_clusters(16, 1), 6.0, dtype=dtype), GraphDataset(lj_clusters(8, 2), 6.0, dtype=dtype))
    results: list[CheckResult] = []
    with tempfile.TemporaryDirectory() as tmp:
        trainer, result = _run(make, options, settings, data, Path(tmp) / "straight")
        backend = trainer.backend
        results.append(check("the factory returns a TrainingBackend", isinstance(backend, TrainingBackend)))
        results.append(check("a single process is rank 0 of 1", (backend.rank, backend.world_size) == (0, 1)))
        first, best = result.history[0].valid_loss, result.best_valid_loss
        results.append(CheckResult(f"trains: best valid loss / first ({best:.3g} / {first:.3g})", best / first, 0.5))
        exported = trainer.export_model()
        state = {k: v.detach().clone() for k, v in exported.state_dict().items()}
        results.append(check("exports a module on the CPU", all(p.device.type == "cpu" for p in exported.parameters())))
        results.append(check("exports in eval mode", not exported.training))
        results.append(check("exports without gradients", all(p.grad is None for p in exported.parameters())))
        measured = result.history[result.best_epoch - 1].valid_metrics["forces_mae"]
        predicted = evaluate(copy.deepcopy(exported), data[1]).metrics()["forces_mae"]
        results.append(CheckResult("the export predicts what the loop measured (forces MAE, relative)",
                                   abs(predicted - measured) / max(measured, 1e-12), 1e-6))
        numbers = [v for r in result.history for v in r.train_metrics.values()]
        results.append(check("train_metrics are finite numbers", all(isinstance(v, float) and math.isfinite(v)
                                                                     for v in numbers)))
        again, _ = _run(make, options, settings, data, None)
        results.append(CheckResult("reproducible for a seed (weights, relative)",
                                   _max_relative(state, again.export_model().state_dict()), tolerance))
        half = TrainSettings(**{**settings.__dict__, "max_epochs": epochs // 2})
        _run(make, options, half, data, Path(tmp) / "split")
        resumed, resumed_result = _run(make, options, settings, data, Path(tmp) / "split", resume=True)
        results.append(CheckResult("resumes to the uninterrupted weights (relative)",
                                   _max_relative(state, resumed.export_model().state_dict()), tolerance))
        same = [r.epoch for r in resumed_result.history] == [r.epoch for r in result.history]
        losses = max(abs(a.valid_loss - b.valid_loss) / abs(a.valid_loss)
                     for a, b in zip(result.history, resumed_result.history))
        results.append(check("the resumed history has every epoch once", same))
        results.append(CheckResult("the resumed history matches (valid loss, relative)", losses, tolerance))
    return finish(results)
