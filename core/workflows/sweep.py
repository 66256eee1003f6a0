"""Scaling sweeps (docs/sweep.md): ``atomforge sweep CONFIG`` / :func:`run_sweep`.

A sweep trains one model per point of the grid

    data size × model (width/depth) × training budget × initialisation (scratch | a model file) × seed

from one base training config, each an ordinary :func:`~atomforge.train` run, and measures each
model on named test sets. Then it fits scaling laws (:mod:`atomforge.analysis.scaling`) to the
points. What holds it together:

- **Tracking.** The sweep is one parent run of the tracker plugin; each point's training opens
  its run nested under it (the tracker's ``nested_options``, as a campaign's iterations do), and
  the point's measurements (parameters, compute, test errors per test set, MD stability) are
  added to that run at the end, with its axes as tags (``sweep.size``, ``sweep.model``, …).
- **Subsets.** The training structures of a point are the first ``size`` of a seeded
  permutation of the data pool (``data.train``), so for one seed every smaller subset is inside
  every larger one (nested). A fixed validation set (``data.valid``, or ``data.valid_size``
  structures drawn once from the pool, disjoint from every subset) selects the weights of every
  point. The permutations and the validation indices are written to ``subsets/plan.json`` (and
  logged to the parent run); each point's exact indices to ``points/<key>/subset.json`` (and
  its run). A store is subset by indices; any other source by extxyz files in ``subsets/``.
- **Resume.** A point is done when ``points/<key>/result.json`` exists; a sweep started again
  skips done points and continues a killed one from its training checkpoint (``train(...,
  resume=True)``), in the same tracked run.
- **Executors.** Points run in this process (``serial``), in a local process pool
  (``process``) or on a dask cluster (``dask``); each worker builds its own registry. With
  ``device: auto`` points use the GPUs round-robin when there are any.

The report (fits, plots, tables of exponents) is made from the tracker's store alone, so
``atomforge sweep CONFIG --report-only`` regenerates it without the sweep's files
(``_sweep_report.py``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import sys
import time
import traceback
from concurrent.futures import Executor, Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from .._errors import AtomforgeError, ConfigError
from .._io import read_json, write_json_atomic, write_text_atomic
from .._specs import PluginKind
from ..analysis.evaluate import evaluate
from ..config import _source, config_from_dict
from ..data.fingerprint import data_fingerprint
from ..data.streaming import StoreStructures
from ..registry import Registry
from ..training.loop import has_checkpoint, read_training_state
from ..tracking import Tracker, flatten
from ._sweep_config import (AxisValue, ExecutorConfig, FitsConfig, SweepConfig, SweepData, load_sweep_config, merge,
                            stability_module, sweep_config_from_dict)
from .train import check_config, load_source, train

__all__ = ["SweepConfig", "SweepData", "AxisValue", "ExecutorConfig", "FitsConfig", "SweepPoint", "SweepOutcome",
           "sweep_config_from_dict", "load_sweep_config", "plan_points", "draw_subsets", "point_config", "point_signature", "run_sweep",
           "run_point", "sweep_report_only"]

RESULT_FILE = "result.json"  # a point's done marker, with its measurements
STATE_FILE = "sweep.json"  # the sweep's parent run id and store
PLAN_FILE = "plan.json"  # subsets/plan.json: the permutations and the validation indices


@dataclass(frozen=True)
class SweepPoint:
    """One point of the grid."""

    size: int
    model: str
    budget: str
    init: str
    seed: int

    @property
    def key(self) -> str:
        """Deterministic and unique: ``n<size>-<model>-<budget>-<init>-s<seed>``."""
        return f"n{self.size}-{self.model}-{self.budget}-{self.init}-s{self.seed}"

    def axes(self) -> dict[str, Any]:
        return {"size": self.size, "model": self.model, "budget": self.budget, "init": self.init, "seed": self.seed}


@dataclass
class SweepOutcome:
    """What :func:`run_sweep` did."""

    output: Path
    results: dict[str, dict[str, Any]]  # key → the point's record (result.json), done points only
    failed: dict[str, str]  # key → the error of a point that failed in this run
    report: dict[str, Any]  # fits, tables, plot files (report/report.json)


# -- the grid and the subsets ---------------------------------------------------------------------
def plan_points(config: SweepConfig) -> list[SweepPoint]:
    """Every point of the grid, smallest data first (so early points give a first picture)."""
    return [SweepPoint(size, m.name, b.name, i.name, seed) for size in config.data.sizes for m in config.models
            for b in config.budgets for i in config.inits for seed in config.seeds]


def draw_subsets(pool_size: int, seeds: Sequence[int], *, valid_size: int, data_seed: int,
                 resample: str = "per_seed") -> dict[str, Any]:
    """The validation positions and, per seed, an order of the rest of the pool: the training
    subset of size N for a seed is the first N of its order, so subsets of one seed are nested.
    Deterministic in its arguments (``numpy.random.default_rng``)."""
    positions = np.random.default_rng([data_seed, 0]).permutation(pool_size)
    valid, rest = positions[:valid_size], np.sort(positions[valid_size:])
    orders = {}
    for seed in seeds:
        key = [data_seed, 1, seed] if resample == "per_seed" else [data_seed, 1]
        orders[str(seed)] = rest[np.random.default_rng(key).permutation(len(rest))].tolist()
    return {"data_seed": data_seed, "resample": resample, "pool_size": pool_size, "valid_size": valid_size,
            "valid": np.sort(valid).tolist(), "orders": orders}


class _Subsets:
    """The pool, the plan (``subsets/plan.json``) and the data source of every subset."""

    def __init__(self, config: SweepConfig, registry: Registry) -> None:
        self.config, self.folder = config, config.output / "subsets"
        self.pool = load_source(registry, config.data.train, config.base_dir)
        self.store = isinstance(self.pool, StoreStructures)
        largest = max(config.data.sizes)
        if largest + config.data.valid_size > len(self.pool):
            raise ConfigError(f"data.sizes: the largest subset ({largest}) plus the validation structures "
                              f"({config.data.valid_size}) exceed the {len(self.pool)} structures of data.train; "
                              "lower the sizes or valid_size, or give a larger pool")
        sha = data_fingerprint(self.pool if self.store else SimpleNamespace(structures=self.pool))
        self.plan = {"pool": {"source": config.data.train.source, **config.data.train.options}, "pool_sha256": sha,
                     **draw_subsets(len(self.pool), config.seeds, valid_size=config.data.valid_size,
                                    data_seed=config.data.seed, resample=config.data.resample)}
        self._check_previous()
        self.folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.folder / PLAN_FILE, self.plan)

    def _check_previous(self) -> None:
        previous = read_json(self.folder / PLAN_FILE)
        if not previous:
            return
        for key in ("pool_sha256", "pool_size", "valid_size", "data_seed", "resample", "valid"):
            if previous.get(key) != self.plan.get(key):
                raise ConfigError(
                    f"{self.config.output} holds a sweep drawn from other data ({key}: {previous.get(key)!r} then, "
                    f"{self.plan.get(key)!r} now): its points would not be comparable. Restore data.train, valid_size, "
                    "seed and resample, or choose another output folder (nothing was changed)")
        self.plan["orders"] = {**previous.get("orders", {}), **self.plan["orders"]}  # earlier seeds stay recorded

    def positions(self, seed: int, size: int) -> list[int]:
        return self.plan["orders"][str(seed)][:size]

    def record(self, seed: int, size: int) -> dict[str, Any]:
        """What ``points/<key>/subset.json`` holds: the subset's positions in the pool (and store indices)."""
        positions = self.positions(seed, size)
        out: dict[str, Any] = {"seed": seed, "size": size, "positions": positions, "pool_sha256": self.plan["pool_sha256"]}
        if self.store:
            out["store_indices"] = self.pool.indices[positions].tolist()  # type: ignore[union-attr]
        return out

    def source(self, positions: Sequence[int], name: str) -> dict[str, Any]:
        """A data-source mapping for these pool positions: store indices, or an extxyz file."""
        if self.store:
            options = {k: v for k, v in self.config.data.train.options.items()
                       if k not in ("split", "indices", "fidelity", "config_type")}
            return {"source": self.config.data.train.source, **options,
                    "indices": self.pool.indices[list(positions)].tolist()}  # type: ignore[union-attr]
        path = self.folder / f"{name}.extxyz"
        if not path.exists():
            _write_extxyz(path, [self.pool[i] for i in positions])
        return {"source": "ase", "path": str(path)}

    def train_source(self, seed: int, size: int) -> dict[str, Any]:
        return self.source(self.positions(seed, size), f"seed{seed}/n{size}")

    def valid_source(self) -> dict[str, Any]:
        valid = self.config.data.valid
        if valid is not None:
            return {"source": valid.source, **valid.options}
        return self.source(self.plan["valid"], "valid")


def _write_extxyz(path: Path, frames: Sequence[Any]) -> None:
    import io

    from ase.io import write

    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    write(buffer, list(frames), format="extxyz")
    write_text_atomic(path, buffer.getvalue())


# -- one point ------------------------------------------------------------------------------------
@dataclass
class PointTask:
    """Everything a worker needs to run one point (plain data: it crosses process boundaries)."""

    key: str
    axes: dict[str, Any]
    raw: dict[str, Any]  # the point's training config
    base_dir: str
    point_dir: str
    subset: dict[str, Any]
    tests: dict[str, dict[str, Any]]  # name → data-source mapping
    head: str | None  # the head test sets are scored on (a multi-head fine-tune)
    epoch_structures: int  # structures per epoch (the subset; with replay, its share of each epoch)
    stability: dict[str, Any] | None  # the stability section (or None)
    stability_dir: str  # where its relative paths resolve
    stability_reference: str  # shared cache of generated reference MD
    tracking: dict[str, Any] | None  # the tracker factory's options to reopen the point's run
    signature: str = ""  # point_signature of raw (recorded: a later change of the config is detected)
    family: str | None = None  # the model's family (default: its backbone)
    verbose: bool = False


def point_config(config: SweepConfig, point: SweepPoint, subsets: _Subsets, device: str,
                 tracking: dict[str, Any] | str) -> tuple[dict[str, Any], int]:
    """The training config of ``point`` (plain data) and the structures in each of its epochs."""
    model = next(m for m in config.models if m.name == point.model)
    budget = next(b for b in config.budgets if b.name == point.budget)
    init = next(i for i in config.inits if i.name == point.init)
    raw = merge(config.base, model.overrides, budget.overrides, init.overrides)
    head = {"head": init.head} if init.head else {}
    train_source = {**subsets.train_source(point.seed, point.size), **head}
    data = dict(raw.get("data") or {})
    data["valid"] = {**subsets.valid_source(), **head}
    epoch = point.size
    if init.replay:  # mixing in earlier data (fine-tuning without forgetting), as campaigns do
        own = 1.0 - sum(r["ratio"] for r in init.replay)
        data["train"] = [{**train_source, "ratio": own}, *copy.deepcopy(init.replay)]
        epoch = data["epoch_size"] = max(1, math.ceil(point.size / own))
    else:
        data["train"] = train_source
    raw["data"] = data
    if init.init_from is not None:
        source = init.init_from[point.model] if isinstance(init.init_from, dict) else init.init_from
        raw["model"] = {**dict(raw.get("model") or {}), "init_from": source}
    training = {**dict(raw.get("training") or {}), "seed": point.seed, "device": device}
    if config.executor.threads is not None:
        training.setdefault("num_threads", config.executor.threads)
    raw.update(training=training, output=str(config.output / "points" / point.key / "train"), tracking=tracking)
    return raw, epoch


def run_point(task: PointTask, registry: Registry | None = None) -> dict[str, Any]:
    """Train, measure and record one point; returns its record (also ``result.json``, written
    last: the point's done marker). A killed point continues from its training checkpoint."""
    from ..registry import make_registry

    registry = registry or make_registry()
    folder = Path(task.point_dir)
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / "subset.json", task.subset)
    run_dir = folder / "train"
    resumed = has_checkpoint(run_dir)
    started = time.perf_counter()
    run_config = config_from_dict(task.raw, task.base_dir)
    outcome = train(run_config, registry, resume=resumed, verbose=task.verbose)
    metrics = {k: float(v) for k, v in outcome.test_metrics.items() if k.startswith("best_valid_")}
    device = str(task.raw["training"]["device"])
    model = _load_for_evaluation(outcome.model_path, registry, device)
    for name, source in task.tests.items():
        structures = load_source(registry, _source(source, Path(task.base_dir), f"data.test.{name}"), Path(task.base_dir))
        acc = evaluate(model, structures, fields=registry.fields, head=task.head)
        metrics.update({f"test_{name}_{k}": float(v) for k, v in acc.metrics().items()})
    if task.stability is not None:
        metrics.update(_stability_metrics(outcome.model_path, task, registry, device))
    record = _record(task, outcome, model, metrics, resumed, time.perf_counter() - started)
    record["family"] = task.family or run_config.model.backbone  # parameter and compute laws are fitted per family
    _log_point(task, record, registry, folder)
    write_json_atomic(folder / RESULT_FILE, record)
    return record


def _load_for_evaluation(path: Path, registry: Registry, device: str) -> torch.nn.Module:
    from ..devices import resolve_device
    from ..model.modelfile import load_model

    return load_model(path, registry=registry).to(resolve_device(device))


def _stability_metrics(model_path: Path, task: PointTask, registry: Registry, device: str) -> dict[str, float]:
    """``stability_*``: the MD stability suite (:mod:`atomforge.analysis.stability`) on the
    model, in ``points/<key>/stability``; generated reference MD is shared by all points."""
    stability = stability_module()
    config = stability.stability_config_from_dict(dict(task.stability or {}), task.stability_dir)
    results = stability.run_stability_suite(Path(model_path), config, out_dir=Path(task.point_dir) / "stability",
                                            registry=registry, head=task.head, device=device,
                                            reference_dir=Path(task.stability_reference))
    return {f"stability_{k}": float(v) for k, v in results.items() if isinstance(v, (int, float))}


def _record(task: PointTask, outcome: Any, model: torch.nn.Module, metrics: dict[str, float], resumed: bool,
            attempt_s: float) -> dict[str, Any]:
    """The point's measurements: size, parameters, compute, errors (result.json, the run's metrics)."""
    state = read_training_state(outcome.run_dir)
    history = state.get("history") or []
    full = max((int(r.get("steps") or 0) for r in history), default=0)
    epochs_done = sum(min(1.0, int(r.get("steps") or 0) / full) for r in history) if full else float(outcome.epochs)
    params = int(sum(p.numel() for p in model.parameters()))
    samples = epochs_done * task.epoch_structures
    return {"key": task.key, **task.axes, "n_train": task.axes["size"], "params": params,
            "epochs": outcome.epochs, "stopped_because": outcome.stopped_because,
            "train_s": float(state.get("elapsed", 0.0)), "samples_seen": samples, "params_x_samples": params * samples,
            "attempt_s": attempt_s, "resumed": resumed, "model_file": str(outcome.model_path),
            "config_sha256": task.signature,
            "run_id": (read_json(Path(outcome.run_dir) / "tracking.json") or {}).get("run_id"), "metrics": metrics}


def _log_point(task: PointTask, record: Mapping[str, Any], registry: Registry, folder: Path) -> None:
    """Add the point's measurements and axes to the run its training logged into."""
    if task.tracking is None or record.get("run_id") is None:
        return
    options = {k: v for k, v in task.tracking.items() if k not in ("name", "run_name")}
    tracker = registry.get(PluginKind.TRACKER, task.tracking["name"]).factory(run_dir=folder / "train", **options)
    tracker.start(run_name=task.key, resume_run_id=record["run_id"])
    tracker.log_metrics({**record["metrics"], **{f"sweep_{k}": float(record[k]) for k in _NUMBERS}})
    if hasattr(tracker, "set_tags"):
        tracker.set_tags({"sweep.key": task.key, **{f"sweep.{k}": v for k, v in task.axes.items()},
                          "sweep.family": record["family"],
                          "sweep.stopped_because": record["stopped_because"], "sweep.done": "true"})
    tracker.log_artifact(folder / "subset.json", "sweep")
    tracker.end("FINISHED")


_NUMBERS = ("n_train", "params", "epochs", "train_s", "samples_seen", "params_x_samples")  # logged as sweep_<name>


# -- the sweep ------------------------------------------------------------------------------------
def run_sweep(config: SweepConfig, registry: Registry, *, verbose: bool = True) -> SweepOutcome:
    """Run every point not done yet (skipping done ones, resuming killed ones), then fit and
    report (:func:`~atomforge.workflows._sweep_report.make_report`). A point that fails is
    reported and the others go on; the parent run ends ``FAILED`` if any did."""
    from ._sweep_report import make_report

    config.output.mkdir(parents=True, exist_ok=True)
    subsets = _Subsets(config, registry)
    points = plan_points(config)
    devices = _devices(config.device)
    _check_points(config, registry, points, subsets, devices)
    results = _done_points(config, points, subsets)
    tracker = _parent_tracker(config, registry, resume=True)
    failed: dict[str, str] = {}
    try:
        tracker.log_artifact(config.output / "subsets" / PLAN_FILE, "subsets")
        todo = [p for p in points if p.key not in results]
        if verbose:
            print(f"sweep {config.name}: {len(points)} points, {len(results)} done, {len(todo)} to run "
                  f"({config.executor.kind}, {config.executor.workers} worker(s))", file=sys.stderr)
        tasks = [_task(config, p, subsets, devices[k % len(devices)], tracker, verbose) for k, p in enumerate(todo)]
        for key, record, error in _execute(config, tasks, registry):
            if error is None:
                results[key] = record
            else:
                failed[key] = error
            if verbose:
                _say_point(key, record, error, len(results) + len(failed), len(points), config.fits.metric)
        report = make_report(config, registry, tracker=tracker, fallback=list(results.values()))
    except BaseException:
        tracker.end("KILLED" if sys.exc_info()[0] is KeyboardInterrupt else "FAILED")
        raise
    tracker.end("FAILED" if failed else "FINISHED")
    return SweepOutcome(config.output, results, failed, report)


def _result_path(config: SweepConfig, point: SweepPoint) -> Path:
    return config.output / "points" / point.key / RESULT_FILE


def point_signature(raw: Mapping[str, Any]) -> str:
    """Hash of a point's training config, without what may change between attempts (tracking,
    device, threads): a done point whose config changed since is refused, not silently reused."""
    plain = merge(raw)
    plain.pop("tracking", None)
    for key in ("device", "num_threads"):
        plain.get("training", {}).pop(key, None)
    return hashlib.sha256(json.dumps(plain, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _done_points(config: SweepConfig, points: Sequence[SweepPoint], subsets: "_Subsets") -> dict[str, dict[str, Any]]:
    """The records of the points already done, each checked against the config it has now."""
    results = {}
    for point in points:
        path = _result_path(config, point)
        if not path.exists():
            continue
        record = read_json(path)
        now = point_signature(point_config(config, point, subsets, "cpu", "none")[0])
        if record.get("config_sha256") not in (None, now):
            raise ConfigError(
                f"sweep point {point.key} is done, but was trained with another config than the sweep gives it now "
                f"(training config hash {record.get('config_sha256')} then, {now} now: the base, its model, budget or "
                f"init changed). Restore the config, delete {path.parent} to train that point again, or choose another "
                "output folder (nothing was changed)")
        results[point.key] = record
    return results


def _devices(device: str) -> list[str]:
    """The devices points are spread over: every GPU for ``auto``/``cuda`` (if any), else one."""
    from ..devices import resolve_device

    if device in ("auto", "cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count:
            return [f"cuda:{k}" for k in range(count)]
        return [str(resolve_device(device))]  # cuda without a GPU: the clear error
    return [str(resolve_device(device))]


def _check_points(config: SweepConfig, registry: Registry, points: Sequence[SweepPoint], subsets: _Subsets,
                  devices: Sequence[str]) -> None:
    """Build and check every point's training config before anything trains (a typo in the 7th
    model fails now, not after hours)."""
    seen = set()
    for point in points:
        signature = (point.model, point.budget, point.init)
        if signature in seen:
            continue
        seen.add(signature)
        raw, _ = point_config(config, point, subsets, devices[0], "none")
        try:
            check_config(registry, config_from_dict(raw, config.base_dir))
        except AtomforgeError as error:  # a config error or an unknown plugin name, named with its point
            raise ConfigError(f"sweep point {point.key} (model {point.model}, budget {point.budget}, init "
                              f"{point.init}): {error}") from error
    for source in config.data.test.values():  # a missing test file fails now, not after training
        load_source(registry, source, config.base_dir)


def _parent_tracker(config: SweepConfig, registry: Registry, *, resume: bool) -> Tracker:
    """The sweep's parent run, opened (or reopened: ``sweep.json``) in the tracker's store."""
    options = {k: v for k, v in config.tracking.items() if k != "name"}
    spec = registry.get(PluginKind.TRACKER, config.tracking["name"])
    try:
        tracker = spec.factory(run_dir=config.output, **options)
    except TypeError as error:
        raise ConfigError(f"tracker {config.tracking['name']!r} rejected its options {sorted(options)}: {error}") from error
    state = read_json(config.output / STATE_FILE) or {}
    previous = state.get("parent_run_id") if resume else None
    run_id = tracker.start(run_name=config.name, resume_run_id=previous)
    write_json_atomic(config.output / STATE_FILE, {"parent_run_id": run_id, "tracking_uri": getattr(tracker, "uri", None),
                                                  "name": config.name, "experiment": options.get("experiment")})
    if run_id != previous:
        record = _plain(config.record)
        tracker.log_params(flatten(record))
        tracker.log_dict(record, "sweep.yaml")
    if hasattr(tracker, "set_tags"):
        tracker.set_tags({"atomforge.sweep": config.name, "atomforge.kind": "sweep"})
    return tracker


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value) if isinstance(value, Path) else value


def _task(config: SweepConfig, point: SweepPoint, subsets: _Subsets, device: str, tracker: Tracker,
          verbose: bool) -> PointTask:
    nested = tracker.nested_options() if hasattr(tracker, "nested_options") else {}
    block: dict[str, Any] | str = {"name": config.tracking["name"], **nested, "run_name": point.key} if nested else "none"
    raw, epoch = point_config(config, point, subsets, device, block)
    init = next(i for i in config.inits if i.name == point.init)
    tests = {name: {"source": s.source, **s.options} for name, s in config.data.test.items()}
    return PointTask(key=point.key, axes=point.axes(), raw=raw, base_dir=str(config.base_dir),
                     point_dir=str(config.output / "points" / point.key), subset=subsets.record(point.seed, point.size),
                     tests=tests, head=init.head, epoch_structures=epoch, stability=config.stability,
                     stability_dir=str(config.config_dir), stability_reference=str(config.output / "stability_reference"),
                     tracking=block if isinstance(block, dict) else None, signature=point_signature(raw),
                     family=next(m.family for m in config.models if m.name == point.model),
                     verbose=verbose and config.executor.kind == "serial")


def _execute(config: SweepConfig, tasks: Sequence[PointTask], registry: Registry):  # noqa: ANN202 - a generator
    """``(key, record, error)`` of each task as it finishes, on the configured executor."""
    if not tasks:
        return
    if config.executor.kind == "serial":
        for task in tasks:
            try:
                yield task.key, run_point(task, registry), None
            except Exception as error:  # noqa: BLE001 - one point's failure is recorded; the others go on
                yield task.key, None, _failure(task, error)
        return
    executor, close = _make_executor(config.executor)
    try:
        futures: dict[Future, PointTask] = {executor.submit(run_point, task): task for task in tasks}
        for future in as_completed(futures):
            task = futures[future]
            try:
                yield task.key, future.result(), None
            except Exception as error:  # noqa: BLE001
                yield task.key, None, _failure(task, error)
    finally:
        if isinstance(executor, ProcessPoolExecutor):  # a kill: points not started are dropped
            executor.shutdown(wait=True, cancel_futures=True)
        else:
            executor.shutdown(wait=True)
        close()


def _failure(task: PointTask, error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}"
    folder = Path(task.point_dir)
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(folder / "error.txt", text + "\n\n" + "".join(traceback.format_exception(error)))
    return text


def _make_executor(options: ExecutorConfig) -> tuple[Executor, Any]:
    """A local process pool (spawned: each worker imports torch afresh), or a dask cluster's
    executor (the scheduler at ``address``, else a local cluster of ``workers`` processes), and
    what closes it."""
    if options.kind == "process":
        return ProcessPoolExecutor(max_workers=options.workers, mp_context=get_context("spawn")), lambda: None
    try:
        from distributed import Client
    except ImportError as error:
        raise ConfigError("executor 'dask' needs dask.distributed: pip install 'atomforge[dask]'") from error
    client = Client(options.address) if options.address else Client(n_workers=options.workers, threads_per_worker=1)
    return client.get_executor(), client.close


def _say_point(key: str, record: Mapping[str, Any] | None, error: str | None, done: int, total: int,
               metric: str) -> None:
    if error is not None:
        print(f"[{done}/{total}] {key}: FAILED ({error})", file=sys.stderr)
        return
    shown = {k: v for k, v in record["metrics"].items() if k.endswith(metric)}  # type: ignore[index]
    text = ", ".join(f"{k} {v:.3g}" for k, v in shown.items())
    print(f"[{done}/{total}] {key}: {text} ({record['params']} parameters, {record['train_s']:.0f} s)",  # type: ignore[index]
          file=sys.stderr)


def sweep_report_only(config: SweepConfig, registry: Registry) -> dict[str, Any]:
    """Fits, plots and tables from the tracker's store alone (``--report-only``): the sweep's
    parent run is found by ``sweep.json`` or, without it, by its name tag in the store."""
    from ._sweep_report import make_report

    return make_report(config, registry, tracker=None, fallback=None)
