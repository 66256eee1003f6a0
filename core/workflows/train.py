"""``atomforge train``: wire a :class:`RunConfig` to plugins, train, export, evaluate, track.

Each step is a small function; the engine (a backend of :class:`atomforge.Trainer`), losses,
tracker, UQ head and data sources come from the registry by name. The UQ steps (wrap the model
for training, fit and calibrate the head, report its metrics and plots) are here too.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import yaml
from ase import Atoms

from .. import distributed as dist, keys as K
from .._errors import ConfigError, DataValidationError, PluginError
from .._io import remove_stale_temporaries, write_json_atomic, write_text_atomic
from .._specs import PluginKind
from ..analysis.calibration import calibrate
from ..analysis.curves import learning_curve_plot
from ..analysis.evaluate import evaluate, evaluate_uncertainty
from ..analysis.plots import calibration_plot, error_vs_uncertainty_plot, parity_plot
from ..config import CONFIG_SECTIONS, RunConfig, SourceConfig
from ..data.fingerprint import data_fingerprint
from ..data.graph import GraphDataset, data_statistics
from ..data.streaming import (MixedDataset, StoreDataset, StoreStructures, add_sums, normalization_from_sums,
                              normalization_sums)
from ..data.structures import get_labels
from ..devices import resolve_device
from ..model.finetune import (InitialModel, fit_reference_energies, parameter_lrs, read_initial_model,
                              reference_energy_plan)
from ..model.e0s import e0_tables, normalization_with_e0s, split_isolated_atoms
from ..model.modelfile import build_potential, save_model
from ..model.potential import Potential, fit_normalization
from ..model.uncertainty import UQFitContext, UQHead, build_uq_head
from ..registry import Registry
from ..tracking import Tracker, TrackerCallback, flatten
from ..training.backends import TrainingBackend
from ..training.loop import CHECKPOINT_DIR, Trainer, TrainSettings, has_checkpoint
from ..training.losses import CompositeLoss, WeightedTerm
from ..training.optim import make_optimizer, make_scheduler

__all__ = ["TrainOutcome", "train", "load_source", "build_loss", "make_tracker", "make_backend", "make_trainer",
           "train_settings", "check_config", "has_checkpoint", "wrap_for_training", "fit_uq_head", "uq_report",
           "MODEL_FILE"]

MODEL_FILE = "model.pt"
LEGACY_CHECKPOINT = "checkpoint.pt"  # the single-file checkpoint of atomforge 0.1
TRACKING_FILE = "tracking.json"


@dataclass(frozen=True)
class TrainOutcome:
    """Where the results of a training run are."""

    run_dir: Path
    model_path: Path
    test_metrics: dict[str, float]
    stopped_because: str
    epochs: int


def load_source(registry: Registry, source: SourceConfig, base_dir: Path,
                heads: Sequence[str] | None = None) -> Sequence[Atoms]:
    """Read structures through a data-source plugin (a store's are a lazy
    :class:`~atomforge.data.streaming.StoreStructures`: nothing is read yet). A source with a
    ``head`` sets each structure's fidelity to that head's index in ``heads`` (model.heads)."""
    spec = registry.get(PluginKind.DATA_SOURCE, source.source)
    structures = spec.factory(dict(source.options), base_dir)
    if not isinstance(structures, StoreStructures):
        structures = list(structures)
    if len(structures) == 0:
        raise DataValidationError(f"data source {source.source!r} {source.options} gave no structures")
    if source.head is not None:
        index = list(heads or ["default"]).index(source.head)
        if isinstance(structures, StoreStructures):
            structures = structures.with_info({K.FIDELITY: index})
        else:
            for atoms in structures:
                atoms.info[K.FIDELITY] = index
    return structures


def build_loss(registry: Registry, config: RunConfig) -> CompositeLoss:
    """Instantiate every configured loss term through the registry."""
    terms = []
    for term in config.loss:
        spec = registry.get(PluginKind.LOSS, term.name)
        try:
            head = None if term.head is None else list(config.model.heads or ["default"]).index(term.head)
            terms.append(WeightedTerm(term.name if head is None else f"{term.name}[{term.head}]", term.weight,
                                      spec.factory(**term.options), head))
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


def check_config(registry: Registry, config: RunConfig) -> None:
    """Check a config against the registry before anything is read or written: every name it
    uses is registered, the engine's options block is valid, no stray top-level block, the
    device exists, the engine can run under this launcher."""
    registry.get(PluginKind.BACKBONE, config.model.backbone)
    engines = registry.names(PluginKind.ENGINE)
    unknown = sorted(set(config.engine_blocks) - set(engines))
    if unknown:
        raise ConfigError(f"config: unknown key(s) {unknown}; valid keys: {sorted(CONFIG_SECTIONS)}, plus the options "
                          f"block of an installed engine, named like it (engines: {', '.join(engines)})")
    engine = registry.get(PluginKind.ENGINE, config.training.engine)
    if dist.is_launched() and not getattr(engine, "distributed", False):
        raise ConfigError(
            f"this job runs {dist.world_size()} processes but training.engine {config.training.engine!r} is "
            "single-process; set training.engine: deepspeed (and a deepspeed: block), or run one process"
        )
    if engine.check_options is not None:
        engine.check_options(config.engine_options)
    resolve_device(config.training.device)  # a device this machine lacks fails here, not mid-run
    registry.get(PluginKind.TRACKER, config.tracking.name)
    if config.uq is not None:
        registry.get(PluginKind.UQ_HEAD, config.uq.name)
    for term in config.loss:
        registry.get(PluginKind.LOSS, term.name)
    for source in (config.data.train, config.data.valid, config.data.test):
        if source is not None:
            registry.get(PluginKind.DATA_SOURCE, source.source)


def _split(structures: Sequence[Atoms], fraction: float, seed: int) -> tuple[Sequence[Atoms], Sequence[Atoms]]:
    n_valid = max(1, int(round(fraction * len(structures))))
    if n_valid >= len(structures):
        raise DataValidationError(
            f"cannot hold out {n_valid} of {len(structures)} structures for validation; "
            "give data.valid or more training data"
        )
    order = np.random.default_rng(seed).permutation(len(structures))
    if isinstance(structures, StoreStructures):  # the same split and order as in memory; nothing read
        return structures.take(order[n_valid:]), structures.take(order[:n_valid])
    return [structures[i] for i in order[n_valid:]], [structures[i] for i in order[:n_valid]]


def _as_dataset(config: RunConfig, registry: Registry, structures: Sequence[Atoms], require: Sequence[str],
                source: str) -> Any:
    """Graphs of ``structures``: built now in memory, or streamed from a store."""
    dtype, cutoff, fields = getattr(torch, config.model.dtype), config.model.cutoff, registry.fields
    if isinstance(structures, StoreStructures):
        loader = config.data.loader
        return StoreDataset(structures.store, cutoff, dtype=dtype, require=require, source=source, fields=fields,
                            indices=structures.indices, workers=loader.workers, prefetch=loader.prefetch,
                            cache_gb=loader.cache_gb, info=structures.info)
    return GraphDataset(list(structures), cutoff, dtype=dtype, require=require, source=source, fields=fields)


def _datasets(config: RunConfig, registry: Registry, require: Sequence[str],
              isolated: dict[int, dict[int, float]] | None = None) -> dict[str, Any]:
    """The train, valid (and test) sets. With ``isolated`` (``model.E0s: isolated``), the training
    sources' isolated atoms are taken out of them and their energies put into it (model/e0s.py)."""
    base, data = config.base_dir, config.data
    sources = (data.train, *data.mix)
    names = ["data.train"] if not data.mix else [f"data.train[{k}]" for k in range(len(sources))]
    trains, valids = [], []
    for name, source in zip(names, sources):
        structures = load_source(registry, source, base, config.model.heads)
        if isolated is not None:
            structures = split_isolated_atoms(structures, isolated, name)
        if data.valid is None:
            structures, held_out = _split(structures, data.valid_fraction, config.training.seed)
            valids.append(_as_dataset(config, registry, held_out, require, f"{name} (validation part)"))
        trains.append(_as_dataset(config, registry, structures, require, name))
    if data.valid is not None:
        valids = [_as_dataset(config, registry, load_source(registry, data.valid, base, config.model.heads), require, "data.valid")]
    sets = {
        "train": trains[0] if not data.mix else MixedDataset(trains, [s.ratio or 0.0 for s in sources],
                                                             epoch_size=data.epoch_size),
        "valid": valids[0] if len(valids) == 1 else MixedDataset(valids, [len(v) for v in valids], source="data.valid"),
    }
    if data.test is not None:
        sets["test"] = _as_dataset(config, registry, load_source(registry, data.test, base, config.model.heads), (), "data.test")
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


def model_spec(config: RunConfig, registry: Registry, train: GraphDataset,
               e0s: dict[int, dict[int, float]] | None = None) -> dict[str, Any]:
    """The model-file config: backbone, options and the normalisation fitted on ``train``; with
    ``e0s`` (each head's ``{Z: eV}``, from ``model.E0s``) the reference energies are those and
    ``shift`` is 0."""
    elements = [int(z) for z in train.numbers()]
    fitted = True
    if isinstance(train, GraphDataset):
        # fitted on the structures that carry energies (unlabelled ones, e.g. for denoising, are skipped)
        labelled = [(a.numbers, lab) for a, lab in ((a, get_labels(a)) for a in train.structures)
                    if lab.energy is not None]
        if not labelled:
            atomic, scale, shift = np.zeros(len(elements)), 1.0, 0.0
            fitted = False
        else:
            forces = [lab.forces for _, lab in labelled]
            args = ([zs for zs, _ in labelled], np.array([lab.energy for _, lab in labelled]),
                    forces if all(f is not None for f in forces) else None, elements)
            atomic, scale, shift = fit_normalization(*args) if e0s is None else normalization_with_e0s(*args, e0s[0])
    else:  # streamed: one pass, each process over its shard, sums added (no process reads everything)
        mine = np.arange(dist.rank(), len(train), dist.world_size())
        sums = add_sums(dist.all_gather_objects(normalization_sums(train, elements, mine)))
        atomic, scale, shift = normalization_from_sums(sums)
        fitted = sums["n"] - sums["energy_missing"] > 0
    if e0s is not None:  # model.E0s: the given reference energies; the learnt part is measured from them
        atomic, shift, fitted = np.array([e0s[0][z] for z in elements]), 0.0, True
    provided = registry.provided(PluginKind.BACKBONE, config.model.backbone)
    options = dict(config.model.options)
    if provided.spec.fit_options is not None:  # e.g. MACE's avg_num_neighbors: auto → a number
        try:
            options = dict(provided.spec.fit_options(options, data_statistics(train)))
        except (ConfigError, DataValidationError):
            raise
        except Exception as error:  # noqa: BLE001 - a plugin's failure, named
            raise PluginError(f"backbone {config.model.backbone!r} (from {provided.distribution}) failed to fit its "
                              f"options to the training data: {type(error).__name__}: {error}") from error
    spec = {
        "backbone": config.model.backbone,
        "provider": provided.distribution,
        "cutoff": config.model.cutoff,
        "dtype": config.model.dtype,
        "options": options,
        "elements": elements,
        "atomic_energies": [float(e) for e in atomic],
        "scale": scale,
        "shift": shift,
    }
    if not fitted:  # no energies seen (denoising pre-training): fine-tuning refits the table (docs/finetune.md)
        spec["energies_fitted"] = False
    heads = list(config.model.heads or [])
    if heads and heads != ["default"]:  # each head's reference energies are fitted once the model is built
        h = len(heads)
        rows = ([[e0s[k][z] for z in elements] for k in range(h)] if e0s is not None
                else [list(spec["atomic_energies"])] * h)
        spec.update(heads=heads, atomic_energies=rows if h > 1 else rows[0],
                    scale=[scale] * h if h > 1 else scale, shift=[shift] * h if h > 1 else shift)
    return spec


def training_eta(epoch: int, max_epochs: int, elapsed: float, max_time: float | None) -> tuple[float, str]:
    """Seconds left and the limit that ends the run first (``max_epochs`` or ``max_time``) after
    ``epoch`` epochs in ``elapsed`` seconds (both counted across resumes, as the loop counts them).

    tqdm's own ETA extrapolates to ``max_epochs`` only; with a ``max_time`` that stops the run
    sooner that ETA is a lie (hours shown for a run that ends in minutes). Early stopping
    (``patience``) cannot be foreseen and may end a run sooner than either estimate."""
    by_epochs = max(max_epochs - epoch, 0) * (elapsed / epoch if epoch > 0 else 0.0)
    if max_time is not None and max(max_time - elapsed, 0.0) < by_epochs:
        return max(max_time - elapsed, 0.0), "max_time"
    return by_epochs, "max_epochs"


class ProgressBar:
    """Engine callback: a tqdm bar over epochs showing the latest validation errors and an ETA
    that honours ``max_time`` (:func:`training_eta`)."""

    BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"  # ETA in the postfix

    def __init__(self, max_epochs: int, max_time: float | None = None) -> None:
        self.max_epochs = max_epochs
        self.max_time = max_time
        self.bar: Any = None

    def on_epoch_end(self, engine: Any, record: Any) -> None:
        if self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.max_epochs, initial=record.epoch - 1, desc="training",
                            unit="epoch", file=sys.stderr, dynamic_ncols=True, bar_format=self.BAR_FORMAT)
        m = record.valid_metrics
        eta, limit = training_eta(record.epoch, self.max_epochs, record.elapsed, self.max_time)
        self.bar.set_postfix_str(
            f"ETA {self.bar.format_interval(eta)}{' (max_time)' if limit == 'max_time' else ''}, valid F-MAE {m.get('forces_mae', float('nan')):.1f} meV/Å, "
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
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"output {str(run_dir)!r} exists and is not a directory; choose another output")
    if (run_dir / LEGACY_CHECKPOINT).exists():
        raise ConfigError(
            f"{run_dir} holds a checkpoint of atomforge 0.1 ({LEGACY_CHECKPOINT}); this version keeps checkpoints in "
            f"{CHECKPOINT_DIR}/ and cannot continue it. Finish that run with atomforge 0.1, or choose another "
            "output directory (nothing was overwritten)")
    if has_checkpoint(run_dir) and not resume:
        raise ConfigError(
            f"{run_dir} already holds a training checkpoint; pass --resume to continue it, or "
            "choose another output directory (nothing was overwritten)"
        )
    if resume:
        _check_resume(config, run_dir)  # before anything is created or written
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _start_tracker(tracker: Tracker, config: RunConfig, run_dir: Path, resume: bool,
                   sets: Mapping[str, Any]) -> int | None:
    """Open (or reopen, on resume) the run; returns the last epoch it already logged (a resumed
    run re-runs the epoch a kill interrupted and must not log it twice). A new run gets the
    config as params and ``config.yaml``, and the data sets' sizes and hashes (:func:`data_params`)."""
    state_file = run_dir / TRACKING_FILE
    previous = json.loads(state_file.read_text()).get("run_id") if resume and state_file.exists() else None
    run_id = tracker.start(run_name=config.tracking.run_name or run_dir.name, resume_run_id=previous)
    write_json_atomic(state_file, {"run_id": run_id, "tracking_uri": getattr(tracker, "uri", None)})
    if previous is None or run_id != previous:  # a new run (also when the old one is not in this store)
        data = data_params(sets)
        tracker.log_params({**flatten(config.to_dict()), **data})
        tracker.log_dict(config.to_dict(), "config.yaml")
        if hasattr(tracker, "set_tags"):  # searchable: tags.data_sha256 = '…'
            tracker.set_tags({"data_sha256": data["dataset.train.sha256"]})
        return None
    last_step = getattr(tracker, "last_step", None)
    return last_step("valid_loss") if callable(last_step) else None


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


#: what may change when a run is resumed: stopping limits, threads, where it runs, what is
#: evaluated at the end and how it is tracked. Anything else would not continue the same run.
RESUMABLE_CHANGES = ("training.max_epochs", "training.max_time", "training.patience", "training.num_threads",
                     "training.valid_batch_size", "training.device", "data.test", "evaluation", "tracking")


def resume_conflicts(stored: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``key: stored → new`` for every difference between a run's stored config and the config
    it is resumed with, except :data:`RESUMABLE_CHANGES`."""
    old_flat, new_flat = flatten(stored), flatten(new)
    allowed = lambda key: any(key == k or key.startswith(k + ".") for k in RESUMABLE_CHANGES)  # noqa: E731
    keys = sorted(k for k in set(old_flat) | set(new_flat) if not allowed(k))
    missing = object()
    return [f"{k}: {old_flat.get(k, '(absent)')!r} → {new_flat.get(k, '(absent)')!r}" for k in keys
            if old_flat.get(k, missing) != new_flat.get(k, missing)]


def _check_resume(config: RunConfig, run_dir: Path) -> None:
    """Refuse to resume a run with a config that would not continue it (before writing anything)."""
    stored_file = run_dir / "config.yaml"
    if not has_checkpoint(run_dir) or not stored_file.exists():
        return
    stored = yaml.safe_load(stored_file.read_text()) or {}
    conflicts = resume_conflicts(stored, config.to_dict())
    if conflicts:
        raise ConfigError(
            f"--resume: the config differs from the one {run_dir} was trained with, in ways that would not continue "
            "the same run:\n  " + "\n  ".join(conflicts) + "\nOnly stopping limits (max_epochs, max_time, patience), "
            "threads, device, the test set, evaluation and tracking may change. Restore the old values, or start a new "
            "run in another output directory (nothing was written).")


def _prepare_run_dir(config: RunConfig, resume: bool) -> Path:
    run_dir = _run_dir(config, resume)
    if resume:
        remove_stale_temporaries(run_dir)
    write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
    return run_dir


def train(config: RunConfig, registry: Registry, *, resume: bool = False, verbose: bool = True) -> TrainOutcome:
    """Train a model as configured; returns where the model and metrics are.

    Under a distributed launcher every rank calls this; only rank 0 writes the run folder,
    tracks and evaluates, and only its outcome carries metrics."""
    if config.training.num_threads:
        torch.set_num_threads(config.training.num_threads)
    check_config(registry, config)
    loss = build_loss(registry, config)
    backend = make_backend(config, registry, train_settings(config, loss))  # a distributed one joins its group
    dist.init_from_env()
    main = dist.is_main()
    verbose = verbose and main
    run_dir = _on_main(lambda: _prepare_run_dir(config, resume)) or config.output
    isolated: dict[int, dict[int, float]] | None = {} if config.model.E0s == "isolated" else None
    sets = _datasets(config, registry, getattr(loss, "required_of_every_structure", loss.requires), isolated)
    torch.manual_seed(config.training.seed)
    initial = _initial_model(config, registry, sets["train"])
    e0s = e0_tables(config.model.E0s, sets["train"].numbers().tolist(), config.model.heads or ["default"], isolated)
    spec = (model_spec(config, registry, sets["train"], e0s) if initial is None
            else initial.run_spec(config.model.heads, sets["train"].numbers().tolist()))
    model = wrap_for_training(build_potential(spec, registry), config.uq, registry, loss.outputs)
    if not resume:  # a resumed run's checkpoint holds newer weights and reference energies
        fresh = initial.load_into(model) if initial is not None else []
        fitted = _reference_energies(config, model, initial, sets["train"], spec)
        if verbose and initial is not None:
            print(f"starting from {initial.path}" + (f" (new: {', '.join(fresh)})" if fresh else ""),
                  file=sys.stderr)
        if verbose and fitted:
            for head, row in fitted.items():
                print(f"reference energies of head {head!r}: {row['mode']} on {row['structures']} structures, "
                      f"mean residual {1000 * row['residual_per_atom_before']:.1f} → "
                      f"{1000 * row['residual_per_atom_after']:.1f} meV/atom", file=sys.stderr)
    tracker = make_tracker(registry, config) if main else registry.get(PluginKind.TRACKER, "none").factory(
        run_dir=config.output, experiment=config.tracking.experiment)
    logged_through = _start_tracker(tracker, config, run_dir, resume, sets) if main else None
    try:
        trainer = make_trainer(config, registry, model, loss, tracker, verbose, backend=backend,
                               logged_through=logged_through)
        result = trainer.fit(sets["train"], sets["valid"], resume=resume)
        final = trainer.export_model()  # collective for sharded engines
        if config.uq is not None:  # extra members, latent density, calibration (docs/uq.md)
            members = _member_trainer(config, registry, spec, loss, sets, tracker, verbose, resume, initial)
            final, spec["uq"] = fit_uq_head(final, config.uq, registry, UQFitContext(
                sets["train"], sets["valid"], members, config.training.valid_batch_size))
        if not main:
            return TrainOutcome(run_dir, run_dir / MODEL_FILE, {}, result.stopped_because, result.epochs)
        model_path = save_model(final, run_dir / MODEL_FILE, config=spec, metadata={
            "epochs": result.epochs, "best_epoch": result.best_epoch,
            "best_valid_loss": result.best_valid_loss, "stopped_because": result.stopped_because,
            "engine": config.training.engine, "processes": dist.world_size()})
        metrics = _final_evaluation(final, sets, tracker, run_dir)
        if config.uq is not None:
            metrics.update(uq_report(final, sets, tracker, run_dir))
            write_json_atomic(run_dir / "metrics.json", metrics)
        if config.evaluation.physics:  # rotation error, curl, NVE drift, stability (docs/physics.md)
            metrics.update(_physics_report(final, config, sets, tracker, run_dir, verbose))
        tracker.log_metrics({"epochs": result.epochs, "best_epoch": result.best_epoch})
        tracker.log_artifact(model_path)
        _log_lab_notebook(tracker, result, model_path, run_dir)
    except BaseException:
        tracker.end("KILLED" if sys.exc_info()[0] is KeyboardInterrupt else "FAILED")
        raise
    tracker.end("FINISHED")
    if verbose:
        print(f"model: {model_path}\ntracking: {tracker.describe()}", file=sys.stderr)
    return TrainOutcome(run_dir, model_path, metrics, result.stopped_because, result.epochs)


def data_params(sets: Mapping[str, Any]) -> dict[str, Any]:
    """``dataset.<set>.sha256`` (:func:`~atomforge.data.fingerprint.data_fingerprint`) and
    ``dataset.<set>.structures`` of the train, valid (and test) sets: what the run saw."""
    params: dict[str, Any] = {}
    for name, dataset in sets.items():
        params[f"dataset.{name}.sha256"] = data_fingerprint(dataset)
        params[f"dataset.{name}.structures"] = len(dataset)
    return params


def _log_lab_notebook(tracker: Tracker, result: Any, model_path: Path, run_dir: Path) -> None:
    """The learning curve (``plots/learning_curve.png``, also in the run folder) and the model as
    an MLflow-style model (trackers that have ``log_model``)."""
    plot = learning_curve_plot(result.history, run_dir / "learning_curve.png", title=run_dir.name)
    tracker.log_artifact(plot, "plots")
    if hasattr(tracker, "log_model"):
        try:
            tracker.log_model(model_path)
        except Exception as error:  # noqa: BLE001 - the model file is saved and logged; the run still counts
            warnings.warn(f"the model was trained and saved ({model_path}, also logged as an artifact), but logging it "
                          f"as the tracker's model failed: {type(error).__name__}: {error}", RuntimeWarning, stacklevel=2)


def train_settings(config: RunConfig, loss: CompositeLoss) -> TrainSettings:
    """The loop's settings from the ``training`` block (stress only if a loss term needs it)."""
    t = config.training
    return TrainSettings(
        max_epochs=t.max_epochs, max_time=t.max_time, batch_size=t.batch_size,
        valid_batch_size=t.valid_batch_size, seed=t.seed, grad_clip=t.grad_clip,
        ema_decay=t.ema_decay, patience=t.patience, compute_stress=K.STRESS in loss.outputs,
        device=t.device, precision=t.precision, batch_atoms=t.batch_atoms, batch_edges=t.batch_edges,
        checkpoint_steps=t.checkpoint_steps,
    )


def make_backend(config: RunConfig, registry: Registry, settings: TrainSettings) -> TrainingBackend:
    """The configured engine's backend, built by its plugin with the engine's options block."""
    spec = registry.get(PluginKind.ENGINE, config.training.engine)
    return spec.factory(options=config.engine_options, settings=settings)


def make_trainer(config: RunConfig, registry: Registry, model: torch.nn.Module, loss: CompositeLoss,
                 tracker: Tracker, verbose: bool, *, backend: TrainingBackend | None = None,
                 logged_through: int | None = None) -> Trainer:
    """The training loop for ``model``: optimiser, schedule, callbacks and the engine's backend
    (a fresh one unless given), checkpointing into ``<output>/checkpoint``. Epochs up to
    ``logged_through`` are already in the tracker (a resumed run) and are not logged again."""
    t = config.training
    settings = train_settings(config, loss)
    f = config.finetune
    lrs = parameter_lrs(model, f.freeze, f.lr) if (f.freeze or f.lr) else None
    optimizer = make_optimizer(model, lr=t.lr, weight_decay=t.weight_decay, lrs=lrs)
    s = t.scheduler
    scheduler = make_scheduler(optimizer, s.name, max_epochs=t.max_epochs, factor=s.factor,
                               patience=s.patience, min_lr=s.min_lr, gamma=s.gamma, max_time=t.max_time)
    callbacks: list[Any] = [TrackerCallback(tracker, logged_through=logged_through)] if dist.is_main() else []
    if verbose:
        callbacks.append(ProgressBar(t.max_epochs, t.max_time))
    return Trainer(model=model, loss=loss, optimizer=optimizer, scheduler=scheduler, settings=settings,
                   backend=backend or make_backend(config, registry, settings), callbacks=callbacks,
                   checkpoint_dir=config.output / CHECKPOINT_DIR)


def _reference_energies(config: RunConfig, model: torch.nn.Module, initial: InitialModel | None, train_set: Any,
                        spec: dict[str, Any]) -> dict[str, Any]:
    """Fit what ``finetune.reference_energies`` asks (a fine-tune's new heads and elements by
    default; every head of a multi-head model trained from scratch); ``spec`` and ``initial``
    then carry the table, so deep-ensemble members start from the same one."""
    potential = getattr(model, "potential", model)
    if initial is None and (potential.num_heads == 1 or config.model.E0s != "fit"):  # E0s given: in spec already
        return {}
    if initial is None:  # from scratch, several heads: one joint fit, then each head's own offsets
        plan = {h: "refit" for h in range(potential.num_heads)}
        if config.finetune.reference_energies not in ("auto", "refit"):
            plan = reference_energy_plan(config.finetune.reference_energies, None, potential.heads, potential.elements)
    else:
        plan = reference_energy_plan(config.finetune.reference_energies, initial, potential.heads, potential.elements)
    report = fit_reference_energies(potential, train_set, plan,
                                    initial.new_elements(potential.elements) if initial is not None else (),
                                    batch_size=config.training.valid_batch_size)
    table = potential.atomic_energies.detach().cpu()
    if report:  # fitted to energies now: a later fine-tune keeps this table by default
        spec.pop("energies_fitted", None)
    spec["atomic_energies"] = table.tolist() if potential.num_heads > 1 else table[0].tolist()
    if initial is not None:
        initial.fitted_energies = table.clone()
    return report


def _initial_model(config: RunConfig, registry: Registry, train_set: GraphDataset) -> InitialModel | None:
    """The model file of ``model.init_from``, checked against the training data's elements."""
    if config.model.init_from is None:
        return None
    initial = read_initial_model(config.model.init_from, registry, config.model.backbone)
    initial.check_elements(train_set.numbers().tolist(), registry)
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
        potential = build_potential(spec, registry)  # spec holds the fitted reference energies
        if initial is not None:
            initial.load_into(potential, index)
        trainer = make_trainer(member, registry, potential, loss, child, verbose)
        trainer.fit(sets["train"], sets["valid"], resume=resume)
        child.end("FINISHED")
        return trainer.export_model()

    return train_member


def _physics_report(model: torch.nn.Module, config: RunConfig, sets: dict[str, GraphDataset],
                    tracker: Tracker, run_dir: Path, verbose: bool) -> dict[str, float]:
    """``physics_*`` metrics on the test set (else the validation set), logged and saved."""
    from ..analysis.physics import physics_metrics

    structures = sets["test" if "test" in sets else "valid"].structures
    say = (lambda message: print(message, file=sys.stderr)) if verbose else None
    metrics = physics_metrics(model, structures, config.evaluation, progress=say)
    tracker.log_metrics(metrics)
    path = run_dir / "metrics.json"
    write_json_atomic(path, {**json.loads(path.read_text()), **metrics})
    return metrics


def _final_evaluation(model: Potential, sets: dict[str, GraphDataset], tracker: Tracker,
                      run_dir: Path) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for name, prefix in (("valid", "best_valid"), ("test", "test")):
        if name not in sets:
            continue
        acc = evaluate(model, sets[name])
        metrics.update({f"{prefix}_{k}": v for k, v in {**acc.metrics(), **acc.config_type_metrics()}.items()})
        metrics.update({f"{prefix}_{quantity}_count": n for quantity, n in acc.counts.items()})  # structures scored
        if acc.metrics():  # an unlabelled set (denoising pre-training) has nothing to plot
            plot = parity_plot(acc, run_dir / f"parity_{name}.png", title=f"{name} set")
            tracker.log_artifact(plot, "plots")
    tracker.log_metrics(metrics)
    write_json_atomic(run_dir / "metrics.json", metrics)
    return metrics


# -- the UQ steps of ``atomforge train`` ------------------------------------------------------------
def wrap_for_training(potential: Potential, uq: Any, registry: Any, loss_outputs: tuple[str, ...]) -> torch.nn.Module:
    """The module the engine trains: the head itself when it ``trains_with_model`` (shallow
    ensemble, MC dropout), else the bare Potential. Also validates the head's options early."""
    if uq is None:
        return potential
    head = build_uq_head(potential, {"name": uq.name, "options": uq.options}, registry)
    if not head.trains_with_model:
        return potential
    missing = [key for key in head.needs_loss_outputs if key not in loss_outputs]
    if missing:
        hints = {K.ENERGY_STD: "- {name: energy_nll, weight: 0.01, detach_mean: true}",
                 K.FORCES_STD: "- {name: forces_nll, weight: 0.01}"}
        raise ConfigError(
            f"uq head {uq.name!r} learns its spread only from a loss term on {missing}; add "
            + " and ".join(f"`{hints.get(k, k)}`" for k in missing) + " to `loss` (see docs/uq.md)"
        )
    return head


def fit_uq_head(model: torch.nn.Module, uq: Any, registry: Any, context: UQFitContext) -> tuple[UQHead, dict[str, Any]]:
    """Wrap the trained ``model`` (unless it is already the head), run the head's post-training
    fit (extra ensemble members, latent density), calibrate on ``context.valid``. Returns the
    head and its model-file record ``{name, provider, options, calibration}``."""
    head = model if isinstance(model, UQHead) else build_uq_head(
        model, {"name": uq.name, "options": uq.options}, registry)
    head.fit(context)
    record = calibrate(head, context.valid, method=uq.calibration, batch_size=context.batch_size)
    provider = registry.provided(PluginKind.UQ_HEAD, uq.name).distribution
    options = {**uq.options, **head.uq_config()}
    return head.eval(), {"name": uq.name, "provider": provider, "options": options, "calibration": record}


def uq_report(head: torch.nn.Module, sets: Mapping[str, GraphDataset], tracker: Any, run_dir: Path,
              *, batch_size: int = 32) -> dict[str, float]:
    """UQ metrics (``{valid,test}_uq_*``) and the calibration and error-vs-uncertainty plots of
    the valid and test sets, logged to the tracker. (The valid set is the calibration set.)"""
    metrics: dict[str, float] = {}
    for name in ("valid", "test"):
        if name not in sets:
            continue
        acc = evaluate_uncertainty(head, sets[name], batch_size=batch_size)
        metrics.update({f"{name}_uq_{k}": v for k, v in acc.metrics().items()})
        for plot in (calibration_plot(acc, run_dir / f"calibration_{name}.png", title=f"{name} set"),
                     error_vs_uncertainty_plot(acc, run_dir / f"uncertainty_{name}.png", title=f"{name} set")):
            tracker.log_artifact(plot, "plots")
    tracker.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)})
    return metrics
