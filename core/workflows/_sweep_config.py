"""The configuration of a scaling sweep (``atomforge sweep`` YAML, docs/sweep.md): typed
dataclasses, read from plain data with clear errors, ``--set`` overrides like ``atomforge train``."""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from .._errors import ConfigError
from ..config import SourceConfig, _check_keys, _mapping, _resolve_path, _source, apply_overrides, read_yaml

__all__ = ["SweepConfig", "SweepData", "AxisValue", "ExecutorConfig", "FitsConfig", "sweep_config_from_dict",
           "load_sweep_config", "merge", "stability_module", "EXECUTORS", "COMPUTE_MEASURES", "RESAMPLE"]

_TOP = ("name", "output", "base", "data", "models", "budgets", "init", "seeds", "executor", "device", "tracking",
        "stability", "fits")
_DATA = ("train", "valid", "valid_size", "sizes", "test", "seed", "resample")
_EXECUTOR = ("kind", "workers", "address", "threads")
_FITS = ("metric", "test", "bootstrap", "confidence", "compute", "irreducible")
EXECUTORS = ("serial", "process", "dask")
COMPUTE_MEASURES = ("params_x_samples", "samples", "train_s")
RESAMPLE = ("per_seed", "fixed")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.]*$")  # axis names: safe in folder names and keys ('-' separates)
_INIT_KEYS = ("name", "init_from", "pretrained", "heads", "head", "replay", "finetune", "training", "overrides")


@dataclass(frozen=True)
class AxisValue:
    """One value of a model, budget or initialisation axis: a name and what it changes."""

    name: str  # used in point keys, folder names and the tracker's tags
    overrides: dict[str, Any] = field(default_factory=dict)  # merged into the base training config
    init_from: Any = None  # init axis: a model file, or {model name: file} (one pretrained file per model size)
    head: str | None = None  # init axis: the head the sweep's data train and are scored on (model.heads)
    replay: tuple[dict[str, Any], ...] = ()  # init axis: sources mixed into training, each with a ratio
    family: str | None = None  # model axis: the family parameter and compute laws are fitted per (default: the backbone)


@dataclass(frozen=True)
class SweepData:
    """Where the structures of every point come from."""

    train: SourceConfig  # the pool the nested training subsets are drawn from
    sizes: tuple[int, ...]  # training structures per point
    valid: SourceConfig | None = None  # a fixed validation set; else valid_size structures of the pool
    valid_size: int = 0  # structures of the pool held out for validation (when valid is not given)
    test: dict[str, SourceConfig] = field(default_factory=dict)  # named test sets, each scored per point
    seed: int = 0  # seeds the validation draw and the subsets' permutations
    resample: str = "per_seed"  # per_seed: each training seed its own nested subsets | fixed: one for all


@dataclass(frozen=True)
class ExecutorConfig:
    kind: str = "serial"  # serial | process | dask
    workers: int = 1  # points at a time (process pool size)
    address: str | None = None  # dask: the scheduler's address (default: a local cluster)
    threads: int | None = None  # torch threads per point (training.num_threads unless the base sets it)


@dataclass(frozen=True)
class FitsConfig:
    metric: str = "forces_mae"  # the error L that is fitted (a metric name of evaluate: forces_mae, energy_rmse, ...)
    test: str | None = None  # the test set it is measured on (default: the first; none given: validation)
    bootstrap: int = 1000  # bootstrap resamples for the intervals
    confidence: float = 0.95  # interval width
    compute: str = "params_x_samples"  # compute measure: params_x_samples | samples | train_s
    irreducible: bool = True  # fit an offset c (L = a·x^-α + c); false: a pure power law


@dataclass(frozen=True)
class SweepConfig:
    """A sweep (``atomforge sweep`` YAML, docs/sweep.md)."""

    name: str  # the parent run's name and tag (default: the output folder's name)
    output: Path  # sweep folder: subsets/, points/<key>/, report/
    base: dict[str, Any]  # a training config (as read from YAML) without data sources, output or tracking
    base_dir: Path  # where relative paths of the base resolve
    data: SweepData
    models: tuple[AxisValue, ...]
    budgets: tuple[AxisValue, ...]
    inits: tuple[AxisValue, ...]
    seeds: tuple[int, ...]
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    device: str = "auto"  # auto (GPUs round-robin if any, else CPU) | cpu | cuda | cuda:N
    tracking: dict[str, Any] = field(default_factory=lambda: {"name": "mlflow"})  # the tracker plugin and options
    stability: dict[str, Any] | None = None  # per-point MD stability suite (atomforge.analysis.stability), when given
    config_dir: Path = Path(".")  # folder of the sweep config (the stability section's paths resolve against it)
    fits: FitsConfig = field(default_factory=FitsConfig)
    record: dict[str, Any] = field(default_factory=dict, repr=False)  # the config as given (logged)


def sweep_config_from_dict(raw: Mapping[str, Any], base_dir: Path | str = ".") -> SweepConfig:
    """A validated :class:`SweepConfig`; unknown keys, bad axes and impossible sizes are
    :class:`~atomforge.ConfigError`\\ s that say what to change."""
    base_dir = Path(base_dir).resolve()
    raw = _mapping(raw, "sweep config")
    _check_keys(raw, _TOP, "sweep config")
    for key in ("output", "base", "data"):
        if raw.get(key) is None:
            raise ConfigError(f"sweep config: {key!r} is required (docs/sweep.md)")
    output = Path(_resolve_path(raw["output"], base_dir))
    base, base_base = _base(raw["base"], base_dir)
    models = _axis(raw.get("models"), "models", "model")
    data = _data(raw["data"], base_dir)
    config = SweepConfig(
        name=str(raw.get("name") or output.name), output=output, base=base, base_dir=base_base,
        data=data, models=models, budgets=_axis(raw.get("budgets"), "budgets", "training"),
        inits=_inits(raw.get("init"), base_dir, [m.name for m in models]), seeds=_seeds(raw.get("seeds", [0])),
        executor=_executor(raw.get("executor")), device=str(raw.get("device", "auto")),
        tracking=_tracking(raw.get("tracking", "mlflow")), stability=_stability(raw.get("stability"), base_dir, data),
        config_dir=base_dir, fits=_fits(raw.get("fits")), record=copy.deepcopy(dict(raw)))
    if not _NAME.match(config.name.replace("-", "_")):
        raise ConfigError(f"sweep config: name {config.name!r} must be letters, digits, '_', '-' or '.'")
    if config.fits.test is not None and config.fits.test not in config.data.test:
        raise ConfigError(f"fits.test {config.fits.test!r} is not one of data.test {sorted(config.data.test)}")
    return config


def load_sweep_config(path: Path | str, overrides: Sequence[str] = ()) -> SweepConfig:
    """Read a sweep YAML file, apply ``--set`` overrides, resolve paths against its folder."""
    return sweep_config_from_dict(apply_overrides(read_yaml(path, "sweep config"), overrides), Path(path).parent)


def _base(value: Any, base_dir: Path) -> tuple[dict[str, Any], Path]:
    """The base training config (a mapping, or a YAML file whose folder its paths resolve against)."""
    if isinstance(value, (str, Path)):
        path = Path(_resolve_path(value, base_dir))
        value, base_dir = read_yaml(path, "sweep base config"), path.parent
    base = copy.deepcopy(_mapping(value, "base"))
    clash = sorted(k for k in ("output", "tracking") if k in base)
    data = _mapping(base.get("data"), "base.data")
    clash += [f"data.{k}" for k in ("train", "valid", "test", "valid_fraction", "epoch_size") if k in data]
    if clash:
        raise ConfigError(f"base: {clash} are set by the sweep for every point (its subsets, validation and test sets "
                          "are in the sweep's data block; output and tracking are the sweep's); remove them")
    return base, base_dir


def _named(value: Any, where: str) -> dict[str, Any]:
    entry = {"name": value} if isinstance(value, str) else _mapping(value, where)
    name = entry.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"{where}: name {name!r} must be letters, digits, '_' or '.' (no '-': it separates the "
                          "axes in point keys)")
    return entry


def _unique(values: Sequence[AxisValue], where: str) -> tuple[AxisValue, ...]:
    names = [v.name for v in values]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"{where}: the name(s) {twice} are used twice; give every value its own name")
    return tuple(values)


def _axis(value: Any, where: str, block: str) -> tuple[AxisValue, ...]:
    """``models``/``budgets``: ``[{name, overrides: {...}, <keys of the `block` section>}]``."""
    if value is None:
        return (AxisValue("base"),)
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(f"{where}: expected a non-empty list of {{name: ..., ...}}; got {value!r}")
    out = []
    for k, item in enumerate(value):
        entry = _named(item, f"{where}[{k}]")
        overrides = copy.deepcopy(_mapping(entry.pop("overrides", None), f"{where}[{k}].overrides"))
        family = entry.pop("family", None) if block == "model" else None
        if family is not None and (not isinstance(family, str) or not _NAME.match(family)):
            raise ConfigError(f"{where}[{k}].family: expected a name (letters, digits, '_', '.'); got {family!r}")
        shorthand = {key: v for key, v in entry.items() if key != "name"}
        if shorthand:  # e.g. {name: s, hidden_channels: 16} → model.hidden_channels
            overrides = merge(overrides, {block: shorthand})
        out.append(AxisValue(entry["name"], overrides, family=family))
    return _unique(out, where)


def _inits(value: Any, base_dir: Path, models: Sequence[str]) -> tuple[AxisValue, ...]:
    """``init``: ``scratch``, a model file, or ``{name, init_from|pretrained, heads, head, replay,
    finetune, training, overrides}``."""
    if value is None:
        return (AxisValue("scratch"),)
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(f"init: expected a list of scratch, model files or {{name, init_from, ...}}; got {value!r}")
    out = [_init(item, k, base_dir, models) for k, item in enumerate(value)]
    return _unique(out, "init")


def _init(item: Any, k: int, base_dir: Path, models: Sequence[str]) -> AxisValue:
    where = f"init[{k}]"
    if isinstance(item, str) and item != "scratch":  # a model file: fine-tune from it, named by its stem
        item = {"name": re.sub(r"[^A-Za-z0-9_.]", "_", Path(item).stem), "init_from": item}
    entry = _named(item, where)
    _check_keys(entry, _INIT_KEYS, where)
    overrides = copy.deepcopy(_mapping(entry.get("overrides"), f"{where}.overrides"))
    for block in ("finetune", "training"):
        if entry.get(block) is not None:
            overrides = merge(overrides, {block: _mapping(entry[block], f"{where}.{block}")})
    if entry.get("heads") is not None:
        overrides = merge(overrides, {"model": {"heads": entry["heads"]}})
    if entry.get("pretrained") is not None:
        overrides = merge(overrides, {"model": {"pretrained": entry["pretrained"]}})
    init_from = entry.get("init_from")
    if isinstance(init_from, Mapping):
        missing = sorted(set(models) - set(init_from))
        if missing:
            raise ConfigError(f"{where}.init_from: a file per model is given, but not for {missing}")
        init_from = {str(m): _existing(f, base_dir, f"{where}.init_from.{m}") for m, f in init_from.items()}
    elif init_from is not None:
        init_from = _existing(init_from, base_dir, f"{where}.init_from")
    replay = tuple(_replay(r, f"{where}.replay[{j}]", base_dir) for j, r in enumerate(entry.get("replay") or []))
    if sum(r["ratio"] for r in replay) >= 1:
        raise ConfigError(f"{where}.replay: the ratios sum to ≥ 1; the sweep's own subset needs a share of each epoch")
    head = entry.get("head")
    if head is not None and not isinstance(head, str):
        raise ConfigError(f"{where}.head: expected the name of one of model.heads; got {head!r}")
    return AxisValue(entry["name"], overrides, init_from, head, replay)


def _existing(value: Any, base_dir: Path, where: str) -> str:
    if str(value).startswith("pretrained:"):
        return str(value)
    path = Path(_resolve_path(value, base_dir))
    if not path.is_file():
        raise ConfigError(f"{where}: model file {str(path)!r} does not exist")
    return str(path)


def _replay(value: Any, where: str, base_dir: Path) -> dict[str, Any]:
    source = _source(value, base_dir, where)
    if source is None or source.ratio is None or not 0 < source.ratio < 1:
        raise ConfigError(f"{where}: expected a data source with a ratio in (0, 1), e.g. "
                          "{source: store, path: pre.store, ratio: 0.3, head: xtb}")
    return {"source": source.source, **source.options, "ratio": source.ratio,
            **({"head": source.head} if source.head else {})}


def _sizes(value: Any) -> tuple[int, ...]:
    if isinstance(value, Mapping):
        spec = dict(value)
        _check_keys(spec, ("base", "from", "to"), "data.sizes")
        try:
            base, lo, hi = int(spec.get("base", 2)), int(spec["from"]), int(spec["to"])
        except (KeyError, TypeError, ValueError):
            raise ConfigError(f"data.sizes: expected {{base: 2, from: K0, to: K1}} (sizes base^K0 … base^K1); "
                              f"got {dict(value)!r}") from None
        value = [base ** k for k in range(lo, hi + 1)]
    if not isinstance(value, (list, tuple)) or not value or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value):
        raise ConfigError(f"data.sizes: expected a list of whole numbers ≥ 1 (training structures per point) or "
                          f"{{base: 2, from: 4, to: 9}}; got {value!r}")
    return tuple(sorted(set(value)))


def _data(value: Any, base_dir: Path) -> SweepData:
    data = _mapping(value, "data")
    _check_keys(data, _DATA, "data")
    if data.get("train") is None or data.get("sizes") is None:
        raise ConfigError("data: 'train' (the pool subsets are drawn from: a file or {source: store, path: ...}) and "
                          "'sizes' are required")
    tests = _mapping(data.get("test"), "data.test")
    resample = str(data.get("resample", "per_seed"))
    if resample not in RESAMPLE:
        raise ConfigError(f"data.resample: expected one of {', '.join(RESAMPLE)}; got {resample!r}")
    valid = _source(data.get("valid"), base_dir, "data.valid")
    valid_size = data.get("valid_size", 0 if valid is not None else None)
    sizes = _sizes(data["sizes"])
    if valid_size is None:
        valid_size = max(1, round(0.1 * max(sizes)))
    if isinstance(valid_size, bool) or not isinstance(valid_size, int) or valid_size < 0 or (
            valid is None and valid_size < 1):
        raise ConfigError(f"data.valid_size: expected a whole number ≥ 1 (held out of the pool for validation) "
                          f"unless data.valid is given; got {valid_size!r}")
    if valid is not None and valid_size:
        raise ConfigError("data: give data.valid (a fixed validation set) or data.valid_size (drawn from the pool), "
                          "not both")
    return SweepData(train=_source(data["train"], base_dir, "data.train"), sizes=sizes,  # type: ignore[arg-type]
                     valid=valid, valid_size=int(valid_size),
                     test={str(n): _source(s, base_dir, f"data.test.{n}") for n, s in tests.items()},  # type: ignore[misc]
                     seed=int(data.get("seed", 0)), resample=resample)


def _seeds(value: Any) -> tuple[int, ...]:
    value = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(value, (list, tuple)) or not value or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value) or len(set(value)) < len(value):
        raise ConfigError(f"seeds: expected a list of distinct whole numbers ≥ 0; got {value!r}")
    return tuple(value)


def _executor(value: Any) -> ExecutorConfig:
    data = {"kind": value} if isinstance(value, str) else _mapping(value, "executor")
    _check_keys(data, _EXECUTOR, "executor")
    kind = str(data.get("kind", "serial"))
    if kind not in EXECUTORS:
        raise ConfigError(f"executor.kind: expected one of {', '.join(EXECUTORS)}; got {kind!r}")
    workers, threads = data.get("workers", 1), data.get("threads")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1 or (
            threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1)):
        raise ConfigError(f"executor: workers and threads must be whole numbers ≥ 1; got {workers!r}, {threads!r}")
    return ExecutorConfig(kind, workers, data.get("address"), threads)


def _tracking(value: Any) -> dict[str, Any]:
    tracking = {"name": value} if isinstance(value, str) else _mapping(value, "tracking")
    tracking.setdefault("name", "mlflow")
    tracking.setdefault("experiment", "atomforge-sweep")
    return tracking


def _stability(value: Any, base_dir: Path, data: SweepData) -> dict[str, Any] | None:
    """The ``stability`` section (a stability-suite config, docs/stability.md), validated now;
    its ``starts`` default to the first test set's structures."""
    if value is None:
        return None
    mapping = _mapping(value, "stability")
    if mapping.get("starts") is None and data.test:
        first = next(iter(data.test.values()))
        mapping["starts"] = {"source": first.source, **first.options}
    stability_module().stability_config_from_dict(mapping, base_dir)
    return mapping


def stability_module() -> Any:
    try:
        from ..analysis import stability
    except ImportError as error:
        raise ConfigError(f"sweep: the stability section needs atomforge.analysis.stability, which this installation "
                          f"lacks ({error}); remove the section") from error
    return stability


def _fits(value: Any) -> FitsConfig:
    data = _mapping(value, "fits")
    _check_keys(data, _FITS, "fits")
    try:
        fits = FitsConfig(metric=str(data.get("metric", "forces_mae")), test=data.get("test"),
                          bootstrap=int(data.get("bootstrap", 1000)), confidence=float(data.get("confidence", 0.95)),
                          compute=str(data.get("compute", "params_x_samples")),
                          irreducible=bool(data.get("irreducible", True)))
    except (TypeError, ValueError) as error:
        raise ConfigError(f"fits: bootstrap must be a whole number and confidence a number; {error}") from None
    if fits.compute not in COMPUTE_MEASURES:
        raise ConfigError(f"fits.compute: expected one of {', '.join(COMPUTE_MEASURES)}; got {fits.compute!r}")
    if not 0 < float(fits.confidence) < 1 or int(fits.bootstrap) < 0:
        raise ConfigError(f"fits: confidence must be in (0, 1) and bootstrap ≥ 0; got {fits.confidence}, {fits.bootstrap}")
    return fits


def merge(base: Mapping[str, Any], *updates: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``updates`` merged in, mappings recursively (other values replaced)."""
    out = copy.deepcopy(dict(base))
    for update in updates:
        for key, value in update.items():
            if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
                out[key] = merge(out[key], value)
            else:
                out[key] = copy.deepcopy(value)
    return out
