"""``atomforge train``: wire a :class:`RunConfig` to plugins, train, export, evaluate, track.

Each step is a small function; the engine, losses, tracker and data sources come from the
registry by name.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import yaml
from ase import Atoms

from . import distributed as dist
from . import keys as K
from ._errors import ConfigError, DataValidationError
from ._specs import PluginKind
from .config import RunConfig, SourceConfig
from .data import get_labels
from .evaluate import evaluate, parity_plot
from .finetune import InitialModel, read_initial_model
from .graph import GraphDataset
from .losses import CompositeLoss, WeightedTerm
from .modelfile import build_potential, save_model
from .potential import Potential, fit_normalization
from .registry import Registry
from .tracking import Tracker, TrackerCallback, flatten
from .training import TrainSettings, make_optimizer, make_scheduler
from .uncertainty import UQFitContext, fit_uq_head, uq_report, wrap_for_training

__all__ = ["TrainOutcome", "train", "load_source", "build_loss", "make_tracker", "MODEL_FILE"]

MODEL_FILE = "model.pt"
CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINTS = (CHECKPOINT_FILE, "deepspeed_checkpoint")  # single-process file, DeepSpeed folder
TRACKING_FILE = "tracking.json"


@dataclass(frozen=True)
class TrainOutcome:
    """Where the results of a training run are."""

    run_dir: Path
    model_path: Path
    test_metrics: dict[str, float]
    stopped_because: str
    epochs: int


def load_source(registry: Registry, source: SourceConfig, base_dir: Path) -> list[Atoms]:
    """Read structures through a data-source plugin."""
    spec = registry.get(PluginKind.DATA_SOURCE, source.source)
    structures = list(spec.factory(dict(source.options), base_dir))
    if not structures:
        raise DataValidationError(f"data source {source.source!r} {source.options} gave no structures")
    return structures


def build_loss(registry: Registry, config: RunConfig) -> CompositeLoss:
    """Instantiate every configured loss term through the registry."""
    terms = []
    for term in config.loss:
        spec = registry.get(PluginKind.LOSS, term.name)
        try:
            terms.append(WeightedTerm(term.name, term.weight, spec.factory(**term.options)))
        except TypeError as error:
            raise ConfigError(f"loss {term.name!r} rejected its options {term.options}: {error}") from error
    return CompositeLoss(terms)


def make_tracker(registry: Registry, config: RunConfig) -> Tracker:
    """Instantiate the configured tracker plugin."""
    spec = registry.get(PluginKind.TRACKER, config.tracking.name)
    try:
        return spec.factory(run_dir=config.output, experiment=config.tracking.experiment,
                            **config.tracking.options)
    except TypeError as error:
        raise ConfigError(f"tracker {config.tracking.name!r} rejected its options "
                          f"{sorted(config.tracking.options)}: {error}") from error


def engine_options(config: RunConfig) -> dict[str, Any] | None:
    """The config block of the configured engine (top-level section named like it), if any."""
    block = getattr(config, config.training.engine, None)
    return dict(block) if isinstance(block, dict) else None


def check_names(registry: Registry, config: RunConfig) -> None:
    """Fail early (before anything is written) on any registry name the config uses."""
    registry.get(PluginKind.BACKBONE, config.model.backbone)
    engine = registry.get(PluginKind.ENGINE, config.training.engine)
    if dist.is_launched() and not getattr(engine, "distributed", False):
        raise ConfigError(
            f"this job runs {dist.world_size()} processes but training.engine {config.training.engine!r} is "
            "single-process; set training.engine: deepspeed (and a deepspeed: block), or run one process"
        )
    if getattr(engine, "check_options", None) is not None:
        engine.check_options(engine_options(config) or {})
    registry.get(PluginKind.TRACKER, config.tracking.name)
    if config.uq is not None:
        registry.get(PluginKind.UQ_HEAD, config.uq.name)
    for term in config.loss:
        registry.get(PluginKind.LOSS, term.name)
    for source in (config.data.train, config.data.valid, config.data.test):
        if source is not None:
            registry.get(PluginKind.DATA_SOURCE, source.source)


def _split(structures: list[Atoms], fraction: float, seed: int) -> tuple[list[Atoms], list[Atoms]]:
    n_valid = max(1, int(round(fraction * len(structures))))
    if n_valid >= len(structures):
        raise DataValidationError(
            f"cannot hold out {n_valid} of {len(structures)} structures for validation; "
            "give data.valid or more training data"
        )
    order = np.random.default_rng(seed).permutation(len(structures))
    return [structures[i] for i in order[n_valid:]], [structures[i] for i in order[:n_valid]]


def _datasets(config: RunConfig, registry: Registry, require: Sequence[str]) -> dict[str, GraphDataset]:
    base = config.base_dir
    train = load_source(registry, config.data.train, base)
    if config.data.valid is not None:
        valid = load_source(registry, config.data.valid, base)
    else:
        train, valid = _split(train, config.data.valid_fraction, config.training.seed)
    dtype = getattr(torch, config.model.dtype)
    cutoff = config.model.cutoff
    sets = {
        "train": GraphDataset(train, cutoff, dtype=dtype, require=require, source="data.train"),
        "valid": GraphDataset(valid, cutoff, dtype=dtype, require=require, source="data.valid"),
    }
    if config.data.test is not None:
        test = load_source(registry, config.data.test, base)
        sets["test"] = GraphDataset(test, cutoff, dtype=dtype, source="data.test")
    _check_elements(sets)
    return sets


def _check_elements(sets: dict[str, GraphDataset]) -> None:
    known = set(sets["train"].numbers().tolist())
    for name, dataset in sets.items():
        unseen = sorted(set(dataset.numbers().tolist()) - known)
        if unseen:
            raise DataValidationError(
                f"data.{name} contains element(s) Z={unseen} absent from the training set "
                f"(Z={sorted(known)}); the model cannot learn them. Add them to data.train."
            )


def model_spec(config: RunConfig, registry: Registry, train: GraphDataset) -> dict[str, Any]:
    """The model-file config: backbone, options and the normalisation fitted on ``train``."""
    elements = train.numbers().tolist()
    labels = [get_labels(a) for a in train.structures]
    if any(lab.energy is None for lab in labels):
        energies, forces = np.zeros(len(labels)), None
    else:
        energies = np.array([lab.energy for lab in labels])
        forces = [lab.forces for lab in labels] if all(lab.forces is not None for lab in labels) else None
    atomic, scale, shift = fit_normalization([a.numbers for a in train.structures], energies, forces, elements)
    return {
        "backbone": config.model.backbone,
        "provider": registry.provided(PluginKind.BACKBONE, config.model.backbone).distribution,
        "cutoff": config.model.cutoff,
        "dtype": config.model.dtype,
        "options": dict(config.model.options),
        "elements": elements,
        "atomic_energies": [float(e) for e in atomic],
        "scale": scale,
        "shift": shift,
    }


class ProgressBar:
    """Engine callback: a tqdm bar over epochs showing the latest validation errors."""

    def __init__(self, max_epochs: int) -> None:
        self.max_epochs = max_epochs
        self.bar: Any = None

    def on_epoch_end(self, engine: Any, record: Any) -> None:
        if self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.max_epochs, initial=record.epoch - 1, desc="training",
                            unit="epoch", file=sys.stderr, dynamic_ncols=True)
        m = record.valid_metrics
        self.bar.set_postfix_str(
            f"valid F-MAE {m.get('forces_mae', float('nan')):.1f} meV/Å, "
            f"E-MAE {m.get('energy_mae', float('nan')):.2f} meV/atom, lr {record.lr:.2g}"
        )
        self.bar.update(1)

    def on_train_end(self, engine: Any, result: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            print(f"training stopped ({result.stopped_because}) after {result.epochs} epochs, "
                  f"{result.elapsed:.0f} s; best epoch {result.best_epoch}", file=sys.stderr)


def _run_dir(config: RunConfig, resume: bool) -> Path:
    run_dir = config.output
    if any((run_dir / name).exists() for name in CHECKPOINTS) and not resume:
        raise ConfigError(
            f"{run_dir} already holds a training checkpoint; pass --resume to continue it, or "
            "choose another output directory (nothing was overwritten)"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _start_tracker(tracker: Tracker, config: RunConfig, run_dir: Path, resume: bool) -> None:
    state_file = run_dir / TRACKING_FILE
    previous = json.loads(state_file.read_text()).get("run_id") if resume and state_file.exists() else None
    run_id = tracker.start(run_name=config.tracking.run_name or run_dir.name, resume_run_id=previous)
    state_file.write_text(json.dumps({"run_id": run_id}))
    if previous is None:
        tracker.log_params(flatten(config.to_dict()))
        tracker.log_dict(config.to_dict(), "config.yaml")


def _on_main(action: Any) -> Any:
    """Run ``action()`` on rank 0 only; its result, or its error, reaches every rank (so that a
    bad config fails all processes instead of leaving the others waiting)."""
    result, error = None, None
    if dist.is_main():
        try:
            result = action()
        except ConfigError as caught:
            error = caught
    result, message = dist.broadcast_object((result, str(error) if error else None))
    if error is not None:
        raise error
    if message is not None:
        raise ConfigError(message)
    return result


def _prepare_run_dir(config: RunConfig, resume: bool) -> Path:
    run_dir = _run_dir(config, resume)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    return run_dir


def train(config: RunConfig, registry: Registry, *, resume: bool = False, verbose: bool = True) -> TrainOutcome:
    """Train a model as configured; returns where the model and metrics are.

    Under a distributed launcher every rank calls this; only rank 0 writes the run folder,
    tracks and evaluates, and only its outcome carries metrics."""
    if config.training.num_threads:
        torch.set_num_threads(config.training.num_threads)
    check_names(registry, config)
    dist.init_from_env()
    main = dist.is_main()
    verbose = verbose and main
    run_dir = _on_main(lambda: _prepare_run_dir(config, resume)) or config.output
    loss = build_loss(registry, config)
    sets = _datasets(config, registry, loss.requires)
    torch.manual_seed(config.training.seed)
    initial = _initial_model(config, registry, sets["train"])
    spec = model_spec(config, registry, sets["train"]) if initial is None else dict(initial.spec)
    model = wrap_for_training(build_potential(spec, registry), config.uq, registry, loss.outputs)
    if initial is not None and not resume:  # a resumed run's checkpoint holds newer weights
        fresh = initial.load_into(model)
        if verbose:
            print(f"starting from {initial.path}" + (f" (new: {', '.join(fresh)})" if fresh else ""),
                  file=sys.stderr)
    tracker = make_tracker(registry, config) if main else registry.get(PluginKind.TRACKER, "none").factory(
        run_dir=config.output, experiment=config.tracking.experiment)
    if main:
        _start_tracker(tracker, config, run_dir, resume)
    try:
        engine = _make_engine(config, registry, model, loss, tracker, verbose)
        result = engine.fit(sets["train"], sets["valid"], resume=resume)
        final = engine.export_model()  # collective for sharded engines
        if config.uq is not None:  # extra members, latent density, calibration (docs/uq.md)
            trainer = _member_trainer(config, registry, spec, loss, sets, tracker, verbose, resume, initial)
            final, spec["uq"] = fit_uq_head(final, config.uq, registry, UQFitContext(
                sets["train"], sets["valid"], trainer, config.training.valid_batch_size))
        if not main:
            return TrainOutcome(run_dir, run_dir / MODEL_FILE, {}, result.stopped_because, result.epochs)
        model_path = save_model(final, run_dir / MODEL_FILE, config=spec, metadata={
            "epochs": result.epochs, "best_epoch": result.best_epoch,
            "best_valid_loss": result.best_valid_loss, "stopped_because": result.stopped_because,
            "engine": config.training.engine, "processes": dist.world_size()})
        metrics = _final_evaluation(final, sets, tracker, run_dir)
        if config.uq is not None:
            metrics.update(uq_report(final, sets, tracker, run_dir))
            (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        if config.evaluation.physics:  # rotation error, curl, NVE drift, stability (docs/physics.md)
            metrics.update(_physics_report(final, config, sets, tracker, run_dir, verbose))
        tracker.log_metrics({"epochs": result.epochs, "best_epoch": result.best_epoch})
        tracker.log_artifact(model_path)
    except BaseException:
        tracker.end("KILLED" if sys.exc_info()[0] is KeyboardInterrupt else "FAILED")
        raise
    tracker.end("FINISHED")
    if verbose:
        print(f"model: {model_path}\ntracking: {tracker.describe()}", file=sys.stderr)
    return TrainOutcome(run_dir, model_path, metrics, result.stopped_because, result.epochs)


def _make_engine(config: RunConfig, registry: Registry, model: Potential, loss: CompositeLoss,
                 tracker: Tracker, verbose: bool) -> Any:
    t = config.training
    settings = TrainSettings(
        max_epochs=t.max_epochs, max_time=t.max_time, batch_size=t.batch_size,
        valid_batch_size=t.valid_batch_size, seed=t.seed, grad_clip=t.grad_clip,
        ema_decay=t.ema_decay, patience=t.patience, compute_stress=K.STRESS in loss.outputs,
    )
    optimizer = make_optimizer(model, lr=t.lr, weight_decay=t.weight_decay)
    s = t.scheduler
    scheduler = make_scheduler(optimizer, s.name, max_epochs=t.max_epochs, factor=s.factor,
                               patience=s.patience, min_lr=s.min_lr, gamma=s.gamma, max_time=t.max_time)
    callbacks: list[Any] = [TrackerCallback(tracker)] if dist.is_main() else []
    if verbose:
        callbacks.append(ProgressBar(t.max_epochs))
    spec = registry.get(PluginKind.ENGINE, t.engine)
    options = engine_options(config)
    extra = {} if options is None else {"options": options}
    return spec.factory(model=model, loss=loss, optimizer=optimizer, scheduler=scheduler,
                        settings=settings, callbacks=callbacks,
                        checkpoint_path=config.output / CHECKPOINT_FILE, **extra)


def _initial_model(config: RunConfig, registry: Registry, train_set: GraphDataset) -> InitialModel | None:
    """The model file of ``model.init_from``, checked against the training data's elements."""
    if config.model.init_from is None:
        return None
    initial = read_initial_model(config.model.init_from, registry)
    initial.check_elements(train_set.numbers().tolist())
    return initial


def _member_trainer(config: RunConfig, registry: Registry, spec: dict[str, Any], loss: CompositeLoss,
                    sets: dict[str, GraphDataset], tracker: Tracker, verbose: bool, resume: bool,
                    initial: InitialModel | None = None) -> Any:
    """``train_member(k)``: one more independently seeded training run (deep-ensemble member k),
    in ``<output>/member<k>/`` with its own checkpoint (resumable) and a nested tracker run.
    With ``model.init_from``, member k starts from the file's member k (or its first model)."""

    def train_member(index: int) -> Potential:
        seed = config.training.seed + 1000 * index
        member = dataclasses.replace(config, output=config.output / f"member{index}",
                                     training=dataclasses.replace(config.training, seed=seed))
        if dist.is_main():
            member.output.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(seed)
        child = tracker.child(f"member{index}")
        potential = build_potential(spec, registry)
        if initial is not None:
            initial.load_into(potential, index)
        engine = _make_engine(member, registry, potential, loss, child, verbose)
        engine.fit(sets["train"], sets["valid"], resume=resume)
        child.end("FINISHED")
        return engine.export_model()

    return train_member


def _physics_report(model: torch.nn.Module, config: RunConfig, sets: dict[str, GraphDataset],
                    tracker: Tracker, run_dir: Path, verbose: bool) -> dict[str, float]:
    """``physics_*`` metrics on the test set (else the validation set), logged and saved."""
    from .physics import physics_metrics

    structures = sets["test" if "test" in sets else "valid"].structures
    say = (lambda message: print(message, file=sys.stderr)) if verbose else None
    metrics = physics_metrics(model, structures, config.evaluation, progress=say)
    tracker.log_metrics(metrics)
    path = run_dir / "metrics.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **metrics}, indent=2))
    return metrics


def _final_evaluation(model: Potential, sets: dict[str, GraphDataset], tracker: Tracker,
                      run_dir: Path) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for name, prefix in (("valid", "best_valid"), ("test", "test")):
        if name not in sets:
            continue
        acc = evaluate(model, sets[name])
        metrics.update({f"{prefix}_{k}": v for k, v in acc.metrics().items()})
        plot = parity_plot(acc, run_dir / f"parity_{name}.png", title=f"{name} set")
        tracker.log_artifact(plot, "plots")
    tracker.log_metrics(metrics)
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
