"""Typed run configuration: YAML in, ``--set a.b=c`` overrides, dataclasses out.

Relative paths resolve against the config file's folder. Unknown keys are errors that list the
valid ones. The resolved config (:meth:`RunConfig.to_dict`) is echoed whole into the tracker.
See ``docs/config.md`` for the schema.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from ._errors import ConfigError
from .training.optim import SCHEDULERS

__all__ = [
    "SourceConfig",
    "DataConfig",
    "ModelConfig",
    "LossTermConfig",
    "SchedulerConfig",
    "TrainingConfig",
    "TrackingConfig",
    "UQConfig",
    "EvaluationConfig",
    "RunConfig",
    "load_config",
    "config_from_dict",
    "apply_overrides",
    "read_yaml",
    "parse_duration",
]


@dataclass(frozen=True)
class SourceConfig:
    """A data-source plugin name and its options (``path`` resolved to an absolute path)."""

    source: str = "ase"  # registry name of the data-source plugin
    options: dict[str, Any] = field(default_factory=dict)  # passed to the plugin
    ratio: float | None = None  # share of each epoch drawn from this source (data.train as a list: mixing)
    head: str | None = None  # the model head (model.heads) this source's structures train and are scored on


@dataclass(frozen=True)
class LoaderConfig:
    """How streaming data sets (``source: store``) are read during training."""

    workers: int = 0  # worker processes reading structures and building neighbour lists (0: the training process)
    prefetch: int = 4  # batches each worker keeps ready
    cache_gb: float = 1.0  # a streamed data set whose graphs fit this budget keeps them after the first epoch (0: never)


@dataclass(frozen=True)
class DataConfig:
    train: SourceConfig  # training structures
    valid: SourceConfig | None = None  # validation structures; else split off ``train``
    valid_fraction: float = 0.1  # fraction of ``train`` held out when ``valid`` is absent
    test: SourceConfig | None = None  # optional test structures, evaluated after training
    mix: tuple[SourceConfig, ...] = ()  # more training sources (data.train given as a list), drawn by their ratios
    epoch_size: int | None = None  # structures per epoch when mixing; default: all sources' sizes summed
    loader: LoaderConfig = field(default_factory=LoaderConfig)  # streaming reader settings


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "painn"  # registry name of the backbone plugin
    cutoff: float = 5.0  # neighbour cutoff, Å
    dtype: str = "float32"  # float32 | float64
    options: dict[str, Any] = field(default_factory=dict)  # other keys: the backbone's options
    init_from: str | None = None  # a model file to start from (fine-tune; see core/finetune.py)
    heads: tuple[str, ...] | None = None  # readout heads (levels of theory / data sources); null: one
    E0s: Any = "fit"  # reference energies from scratch: fit (MACE: average) | isolated | {element: eV}


@dataclass(frozen=True)
class FinetuneConfig:
    """What a run starting from ``model.init_from`` keeps, refits and trains (docs/finetune.md)."""

    freeze: tuple[str, ...] = ()  # parameter groups (Backbone.parameter_groups) or name patterns not trained
    lr: dict[str, float] = field(default_factory=dict)  # learning rate per parameter group / pattern
    reference_energies: Any = "auto"  # auto | keep | refit | {head: keep|refit|{element: eV}} | {element: eV}


@dataclass(frozen=True)
class LossTermConfig:
    name: str  # registry name of the loss plugin
    weight: float = 1.0  # multiplies the term
    head: str | None = None  # only the structures of this head (model.heads); null: all
    options: dict[str, Any] = field(default_factory=dict)  # other keys: the plugin's options


@dataclass(frozen=True)
class SchedulerConfig:
    name: str = "plateau"  # plateau | cosine | cosine_time (over max_time) | exponential | none
    factor: float = 0.5  # plateau: LR multiplier on a plateau
    patience: int = 10  # plateau: epochs without improvement before reducing
    min_lr: float = 1e-6  # lower bound of the LR
    gamma: float = 0.99  # exponential: LR multiplier per epoch


@dataclass(frozen=True)
class TrainingConfig:
    engine: str = "torch"  # registry name of the training engine
    max_epochs: int = 100  # hard limit on epochs
    max_time: float | None = None  # wall-clock limit in s; YAML may say "15m", "1h30m", "90s"
    batch_size: int = 8  # structures per step
    valid_batch_size: int = 32  # structures per validation step
    lr: float = 1e-3  # initial learning rate (AdamW)
    weight_decay: float = 0.0  # AdamW weight decay (not on biases/embeddings)
    seed: int = 0  # seeds initialisation, the validation split and shuffling
    grad_clip: float | None = 10.0  # max gradient norm; null disables
    ema_decay: float | None = 0.99  # EMA decay of weights; null disables
    patience: int | None = None  # early stopping patience in epochs; null disables
    num_threads: int | None = None  # torch intra-op threads; null keeps torch's default
    device: str = "auto"  # auto (CUDA if available, else CPU) | cpu | cuda | cuda:N
    precision: str = "fp32"  # fp32 | bf16 (autocast of the forward; fp32 master weights)
    batch_atoms: int | None = None  # size-aware batches: at most this many atoms per step (batch_size caps structures)
    batch_edges: int | None = None  # size-aware batches: at most this many edges (neighbour pairs) per step
    checkpoint_steps: int | None = None  # also checkpoint every N steps inside an epoch (resume mid-epoch)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)


@dataclass(frozen=True)
class TrackingConfig:
    name: str = "mlflow"  # registry name of the tracker: mlflow | none
    experiment: str = "atomforge"  # experiment name
    run_name: str | None = None  # run name; default: the output folder's name
    options: dict[str, Any] = field(default_factory=dict)  # other keys: the tracker's options


@dataclass(frozen=True)
class UQConfig:
    name: str  # registry name of the UQ head: deep_ensemble | shallow_ensemble | mc_dropout | latent_distance
    calibration: str = "scale"  # fitted on the validation set: scale | isotonic | none
    options: dict[str, Any] = field(default_factory=dict)  # other keys: the head's options


@dataclass(frozen=True)
class EvaluationConfig:
    """Physics metrics after training (``atomforge.analysis.physics``; docs/physics.md)."""

    physics: bool = False  # compute them after training and log them (physics_* metrics)
    structures: int = 16  # first N test (else validation) structures for rotation and curl
    rotations: int = 8  # random rotations per structure for the equivariance error
    curl_probes: int = 4  # Hutchinson probes per batch for the curl estimate
    nve_steps: int = 2000  # NVE steps from the first structure (0 = no MD)
    timestep_fs: float = 0.5  # NVE time step, fs
    temperature: float = 300.0  # K, initial Maxwell-Boltzmann velocities
    min_distance: float = 0.5  # Å; two atoms closer than this = overlap (MD unstable)
    bond_stretch: float = 1.6  # open systems: a bond longer than this x the covalent-radii sum is broken
    max_energy_deviation: float = 0.25  # eV/atom; total energy leaving this window = blow-up
    seed: int = 0  # rotations, probes and MD velocities


DEFAULT_LOSS = (LossTermConfig("energy", 1.0), LossTermConfig("forces", 10.0))


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: tuple[LossTermConfig, ...] = DEFAULT_LOSS
    training: TrainingConfig = field(default_factory=TrainingConfig)
    output: Path = Path("runs/train")  # run directory (resolved against the config file)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    uq: UQConfig | None = None  # optional uncertainty head (docs/uq.md)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)  # freezing, per-group LR, reference energies
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)  # physics metrics
    engine_blocks: dict[str, dict[str, Any]] = field(default_factory=dict)  # top-level blocks named like engines
    base_dir: Path = Path(".")  # folder of the config file; data sources resolve paths against it

    @property
    def engine_options(self) -> dict[str, Any] | None:
        """The options block of ``training.engine`` (``deepspeed:`` for deepspeed), if given."""
        return self.engine_blocks.get(self.training.engine)

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain YAML-able data (inverse of :func:`config_from_dict`); the
        engines' options blocks go back under their names."""
        out = _plain(self)
        out.pop("base_dir")
        out.update(out.pop("engine_blocks"))
        data = out["data"]
        mix = data.pop("mix")
        for source in (data["train"], *mix, data.get("valid"), data.get("test")):
            for key in ("ratio", "head"):
                if source is not None and source.get(key) is None:
                    source.pop(key, None)
        for term in out["loss"]:
            if term.get("head") is None:
                term.pop("head", None)
        if out["model"].get("E0s") == "fit":  # the default; configs of older runs (resume) do not have it
            out["model"].pop("E0s", None)
        if out["model"].get("heads") is None:
            out["model"].pop("heads", None)
        else:
            out["model"]["heads"] = list(out["model"]["heads"])
        if mix:
            data["train"] = [data["train"], *mix]
        return out


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        out: dict[str, Any] = {}
        for f in dataclasses.fields(obj):
            value = _plain(getattr(obj, f.name))
            if f.name == "options" and isinstance(value, dict):
                out.update(value)
            else:
                out[f.name] = value
        return out
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


_DURATION = re.compile(r"^\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s?)?\s*$")


def parse_duration(value: Any) -> float | None:
    """Seconds from a number or a string such as ``"15m"``, ``"1h30m"``, ``"90s"``, ``"45"``."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    match = _DURATION.match(str(value))
    if not match or not any(match.groups()):
        raise ConfigError(f"training.max_time: expected seconds or e.g. '15m', '1h30m'; got {value!r}")
    h, m, s = (float(g) if g else 0.0 for g in match.groups())
    return h * 3600 + m * 60 + s


def _check_keys(data: Mapping[str, Any], allowed: Sequence[str], where: str) -> None:
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {unknown}; valid keys: {sorted(allowed)}"
        )


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
    return dict(value)


def _resolve_path(value: Any, base_dir: Path) -> Any:
    if isinstance(value, (list, tuple)):
        return [_resolve_path(v, base_dir) for v in value]
    path = Path(str(value)).expanduser()
    return str(path if path.is_absolute() else (base_dir / path).resolve())


def _source(value: Any, base_dir: Path, where: str) -> SourceConfig | None:
    if value is None:
        return None
    if isinstance(value, (str, Path)):
        value = {"source": "ase", "path": str(value)}
    options = _mapping(value, where)
    name = str(options.pop("source", "ase"))
    ratio = options.pop("ratio", None)
    if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or ratio < 0):
        raise ConfigError(f"{where}.ratio: expected a number ≥ 0 (a share of each epoch); got {ratio!r}")
    head = options.pop("head", None)
    if head is not None and (not isinstance(head, str) or not head):
        raise ConfigError(f"{where}.head: expected the name of one of model.heads; got {head!r}")
    for key in ("path", "paths"):
        if key in options:
            options[key] = _resolve_path(options[key], base_dir)
    return SourceConfig(name, options, None if ratio is None else float(ratio), head)


def _train_sources(value: Any, base_dir: Path) -> tuple[SourceConfig, ...]:
    """``data.train``: one source, or a list of sources with mixing ratios."""
    if not isinstance(value, (list, tuple)):
        return (_source(value, base_dir, "data.train"),)  # type: ignore[return-value]
    if not value:
        raise ConfigError("data.train: an empty list; give a source or a list of sources with ratios")
    sources = tuple(_source(v, base_dir, f"data.train[{k}]") for k, v in enumerate(value))
    if len(sources) > 1 and any(s.ratio is None for s in sources):  # type: ignore[union-attr]
        raise ConfigError("data.train lists several sources: give each a ratio (its share of every epoch), "
                          "e.g. [{source: store, path: a.lmdb, ratio: 0.8}, {source: store, path: b.lmdb, ratio: 0.2}]")
    return sources  # type: ignore[return-value]


def _loader(value: Any) -> LoaderConfig:
    data = _mapping(value, "data.loader")
    _check_keys(data, _fields_of(LoaderConfig), "data.loader")
    loader = LoaderConfig(**_coerce(data, LoaderConfig, "data.loader"))
    if loader.workers < 0 or loader.prefetch < 1 or loader.cache_gb < 0:
        raise ConfigError(f"data.loader: workers must be ≥ 0, prefetch ≥ 1 and cache_gb ≥ 0; got {loader.workers}, "
                          f"{loader.prefetch}, {loader.cache_gb}")
    return loader


def _fields_of(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.name != "options"]


def _simple(cls: type, data: Mapping[str, Any], where: str, *, open_options: bool = False) -> Any:
    data = dict(data)
    names = _fields_of(cls)
    if open_options:
        known = {k: data.pop(k) for k in list(data) if k in names}
        return cls(**known, options=data)
    _check_keys(data, names, where)
    return cls(**data)


PRECISIONS = ("fp32", "bf16")


def _coerce(data: dict[str, Any], cls: type, where: str) -> dict[str, Any]:
    """Convert numbers given as YAML ints/strings to the field's type; clear error otherwise."""
    kinds = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    for key, value in list(data.items()):
        kind = kinds.get(key, "")
        if value is None and "None" in kind:
            continue
        try:
            if kind.startswith("int"):
                if isinstance(value, bool) or float(value) != int(float(value)):
                    raise ValueError
                data[key] = int(float(value))
            elif kind.startswith("float"):
                if isinstance(value, bool):
                    raise ValueError
                data[key] = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}.{key}: expected {kind.replace(' | None', ' or null')}, got {value!r}") from None
    return data


def _training(data: Mapping[str, Any]) -> TrainingConfig:
    data = _mapping(data, "training")
    _check_keys(data, _fields_of(TrainingConfig), "training")
    scheduler = data.pop("scheduler", None)
    if isinstance(scheduler, str):
        scheduler = {"name": scheduler}
    data["max_time"] = parse_duration(data.get("max_time"))
    data = _coerce(data, TrainingConfig, "training")
    sched = _mapping(scheduler, "training.scheduler")
    _check_keys(sched, _fields_of(SchedulerConfig), "training.scheduler")
    sched = SchedulerConfig(**_coerce(sched, SchedulerConfig, "training.scheduler"))
    if sched.name not in SCHEDULERS:
        raise ConfigError(f"training.scheduler.name: unknown scheduler {sched.name!r}; valid: {', '.join(SCHEDULERS)}")
    config = TrainingConfig(**data, scheduler=sched)
    if config.precision not in PRECISIONS:
        raise ConfigError(f"training.precision: expected one of {', '.join(PRECISIONS)}; got {config.precision!r}")
    if not isinstance(config.device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", config.device.strip().lower()):
        raise ConfigError(f"training.device: expected auto, cpu, cuda or cuda:N; got {config.device!r}")
    if not isinstance(config.engine, str) or not config.engine:
        raise ConfigError(f"training.engine: expected the name of an engine plugin (torch, deepspeed, …); "
                          f"got {config.engine!r}")
    if sched.name == "cosine_time" and not config.max_time:
        raise ConfigError("training.scheduler cosine_time decays the LR over training.max_time; set max_time")
    for key in ("batch_atoms", "batch_edges", "checkpoint_steps"):
        if getattr(config, key) is not None and getattr(config, key) < 1:
            raise ConfigError(f"training.{key}: expected a whole number ≥ 1 or null; got {getattr(config, key)!r}")
    if config.batch_size < 1 or config.max_epochs < 0 or config.lr <= 0:
        raise ConfigError(
            "training: batch_size must be ≥ 1, max_epochs ≥ 0 and lr > 0; "
            f"got batch_size={config.batch_size}, max_epochs={config.max_epochs}, lr={config.lr}"
        )
    return config


def _loss(value: Any) -> tuple[LossTermConfig, ...]:
    if value is None:
        return DEFAULT_LOSS
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(f"loss: expected a non-empty list of {{name: ..., weight: ...}}, got {value!r}")
    terms = []
    for k, item in enumerate(value):
        item = {"name": item} if isinstance(item, str) else _mapping(item, f"loss[{k}]")
        if "name" not in item:
            raise ConfigError(f"loss[{k}]: missing 'name' (a loss plugin such as energy, forces)")
        term = _simple(LossTermConfig, item, f"loss[{k}]", open_options=True)
        weight = _coerce({"weight": term.weight}, LossTermConfig, f"loss[{k}]")["weight"]
        terms.append(dataclasses.replace(term, weight=weight))
    return tuple(terms)


_TOP = ("data", "model", "loss", "training", "output", "tracking", "uq", "finetune", "evaluation")
CONFIG_SECTIONS = _TOP  # the top-level sections; any other key must be an engine's options block


def _uq(value: Any) -> UQConfig | None:
    if value is None:
        return None
    item = {"name": value} if isinstance(value, str) else _mapping(value, "uq")
    if "name" not in item:
        raise ConfigError("uq: missing 'name' (a UQ head such as deep_ensemble, shallow_ensemble)")
    config = _simple(UQConfig, item, "uq", open_options=True)
    if config.calibration not in ("scale", "isotonic", "none"):
        raise ConfigError(f"uq.calibration: unknown method {config.calibration!r}; valid: scale, isotonic, none")
    return config


def _evaluation(value: Any) -> EvaluationConfig:
    data = _mapping(value, "evaluation")
    _check_keys(data, _fields_of(EvaluationConfig), "evaluation")
    if not isinstance(data.get("physics", False), bool):
        raise ConfigError(f"evaluation.physics: expected true or false, got {data['physics']!r}")
    config = EvaluationConfig(**_coerce(data, EvaluationConfig, "evaluation"))
    if min(config.structures, config.rotations, config.curl_probes) < 1 or config.nve_steps < 0:
        raise ConfigError("evaluation: structures, rotations and curl_probes must be ≥ 1 and nve_steps ≥ 0; got "
                          f"{config.structures}, {config.rotations}, {config.curl_probes}, {config.nve_steps}")
    return config


def _model_block(value: Any, base_dir: Path) -> dict[str, Any]:
    """The ``model`` mapping; with ``init_from`` the architecture keys not given come from that file."""
    block = _mapping(value, "model")
    if block.get("pretrained") is not None:
        if block.get("init_from") is not None:
            raise ConfigError("model: give pretrained (a model shipped with the backbone's package) or "
                              "init_from (a model file), not both")
        block["init_from"] = f"pretrained:{block.pop('pretrained')}"
    block.pop("pretrained", None)
    if block.get("init_from") is None:
        block.pop("init_from", None)
        return block
    from .model.finetune import merge_model_config
    from .model.modelfile import is_pretrained_ref

    if is_pretrained_ref(block["init_from"]):
        return merge_model_config(block, block["init_from"])
    path = Path(_resolve_path(str(block["init_from"]), base_dir))
    if not path.is_file():
        raise ConfigError(f"model.init_from: model file {str(path)!r} does not exist")
    return merge_model_config(block, path)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _ranges(config: "RunConfig") -> list[tuple[str, Any, bool, str]]:
    """(key, value, ok, expected) for every numeric option with a physical or sensible range."""
    t, s, e = config.training, config.training.scheduler, config.evaluation
    optional = lambda v, test: v is None or (_finite(v) and test(v))  # noqa: E731
    return [
        ("model.cutoff", config.model.cutoff, _finite(config.model.cutoff) and config.model.cutoff > 0, "> 0 Å"),
        ("training.max_time", t.max_time, optional(t.max_time, lambda v: v > 0), "> 0 s (or null: no limit)"),
        ("training.valid_batch_size", t.valid_batch_size, t.valid_batch_size >= 1, "≥ 1"),
        ("training.lr", t.lr, _finite(t.lr) and t.lr > 0, "> 0"),
        ("training.weight_decay", t.weight_decay, _finite(t.weight_decay) and t.weight_decay >= 0, "≥ 0"),
        ("training.grad_clip", t.grad_clip, optional(t.grad_clip, lambda v: v > 0), "> 0 (or null: no clipping)"),
        ("training.ema_decay", t.ema_decay, optional(t.ema_decay, lambda v: 0 < v < 1), "in (0, 1) (or null: no EMA)"),
        ("training.patience", t.patience, t.patience is None or t.patience >= 1, "≥ 1 epoch (or null)"),
        ("training.num_threads", t.num_threads, t.num_threads is None or t.num_threads >= 1, "≥ 1 (or null)"),
        ("training.scheduler.factor", s.factor, _finite(s.factor) and 0 < s.factor < 1, "in (0, 1)"),
        ("training.scheduler.patience", s.patience, s.patience >= 0, "≥ 0"),
        ("training.scheduler.min_lr", s.min_lr, _finite(s.min_lr) and s.min_lr >= 0, "≥ 0"),
        ("training.scheduler.gamma", s.gamma, _finite(s.gamma) and 0 < s.gamma <= 1, "in (0, 1]"),
        *((f"loss[{k}].weight ({term.name})", term.weight, _finite(term.weight) and term.weight >= 0,
           "≥ 0 (a loss term cannot reward error)") for k, term in enumerate(config.loss)),
        ("evaluation.timestep_fs", e.timestep_fs, _finite(e.timestep_fs) and e.timestep_fs > 0, "> 0 fs"),
        ("evaluation.temperature", e.temperature, _finite(e.temperature) and e.temperature >= 0, "≥ 0 K"),
        ("evaluation.min_distance", e.min_distance, _finite(e.min_distance) and e.min_distance > 0, "> 0 Å"),
        ("evaluation.bond_stretch", e.bond_stretch, _finite(e.bond_stretch) and e.bond_stretch > 1, "> 1"),
        ("evaluation.max_energy_deviation", e.max_energy_deviation,
         _finite(e.max_energy_deviation) and e.max_energy_deviation > 0, "> 0 eV/atom"),
    ]


def check_ranges(config: "RunConfig") -> None:
    """A :class:`ConfigError` listing every numeric option outside its range (e.g. a negative
    ``max_time``, cutoff or loss weight), with what is expected."""
    bad = [f"{key} = {value!r} (expected {expected})" for key, value, ok, expected in _ranges(config) if not ok]
    if bad:
        raise ConfigError("config values out of range: " + "; ".join(bad))


def config_from_dict(raw: Mapping[str, Any], base_dir: Path | str = ".") -> RunConfig:
    """Build a :class:`RunConfig` from plain data; relative paths resolve against ``base_dir``."""
    base_dir = Path(base_dir).resolve()
    raw = _mapping(raw, "config")
    blocks = {key: value for key, value in raw.items() if key not in _TOP}
    not_blocks = sorted(key for key, value in blocks.items() if not isinstance(value, Mapping))
    if not_blocks:
        raise ConfigError(f"config: unknown key(s) {not_blocks}; valid keys: {sorted(_TOP)}, plus options blocks "
                          "named like an engine (e.g. `deepspeed:` for training.engine: deepspeed)")
    data = _mapping(raw.get("data"), "data")
    _check_keys(data, ("train", "valid", "valid_fraction", "test", "epoch_size", "loader"), "data")
    if "train" not in data:
        raise ConfigError("data.train is required: a file path or {source: NAME, ...}")
    train_sources = _train_sources(data["train"], base_dir)
    epoch_size = data.get("epoch_size")
    if epoch_size is not None and (isinstance(epoch_size, bool) or not isinstance(epoch_size, int) or epoch_size < 1):
        raise ConfigError(f"data.epoch_size: expected a whole number ≥ 1; got {epoch_size!r}")
    data_config = DataConfig(
        train=train_sources[0],
        valid=_source(data.get("valid"), base_dir, "data.valid"),
        valid_fraction=float(data.get("valid_fraction", 0.1)),
        test=_source(data.get("test"), base_dir, "data.test"),
        mix=train_sources[1:],
        epoch_size=epoch_size,
        loader=_loader(data.get("loader")),
    )
    if not 0.0 < data_config.valid_fraction < 1.0 and data_config.valid is None:
        raise ConfigError(f"data.valid_fraction must be in (0, 1); got {data_config.valid_fraction}")
    model = _simple(ModelConfig, _model_block(raw.get("model"), base_dir), "model", open_options=True)
    model = dataclasses.replace(model, cutoff=_coerce({"cutoff": model.cutoff}, ModelConfig, "model")["cutoff"])
    if model.dtype not in ("float32", "float64"):
        raise ConfigError(f"model.dtype must be float32 or float64; got {model.dtype!r}")
    model = dataclasses.replace(model, heads=_heads(model.heads), E0s=_e0s(model.E0s, model.init_from))
    for k, term in enumerate(_loss(raw.get("loss"))):
        if term.head is not None and term.head not in (model.heads or ("default",)):
            raise ConfigError(f"loss[{k}] ({term.name}).head {term.head!r} is not one of model.heads "
                              f"{list(model.heads or ['default'])}")
    for k, source in enumerate((*train_sources, data_config.valid, data_config.test)):
        if source is not None and source.head is not None and source.head not in (model.heads or ("default",)):
            raise ConfigError(f"data source {source.source} {source.options.get('path', '')}: head {source.head!r} is "
                              f"not one of model.heads {list(model.heads or ['default'])}")
    tracking_raw = raw.get("tracking", "mlflow")
    tracking_raw = {"name": tracking_raw} if isinstance(tracking_raw, str) else tracking_raw
    config = RunConfig(
        data=data_config,
        model=model,
        loss=_loss(raw.get("loss")),
        training=_training(raw.get("training")),
        output=Path(_resolve_path(raw.get("output", "runs/train"), base_dir)),
        tracking=_simple(TrackingConfig, _mapping(tracking_raw, "tracking"), "tracking", open_options=True),
        uq=_uq(raw.get("uq")),
        finetune=_finetune(raw.get("finetune")),
        evaluation=_evaluation(raw.get("evaluation")),
        engine_blocks={key: dict(value) for key, value in blocks.items()},
        base_dir=base_dir,
    )
    check_ranges(config)
    return config


E0S_MODES = ("fit", "average", "isolated")


def _e0s(value: Any, init_from: Any) -> Any:
    """``model.E0s``: ``fit`` (``average``, MACE's name for the same least-squares fit, is read as
    ``fit``), ``isolated``, or a mapping of element (symbol or Z) to eV, kept as given (checked
    against the data's elements when training starts)."""
    if value is None or value == "average":
        value = "fit"
    if isinstance(value, Mapping):
        bad = {k: v for k, v in value.items() if isinstance(v, bool) or not isinstance(v, (int, float))}
        if not value or bad:
            raise ConfigError(f"model.E0s: expected eV per element, e.g. {{H: -13.6, O: -432.1}}; got {dict(value)!r}")
        value = {str(k): float(v) for k, v in value.items()}
    elif value not in E0S_MODES:
        raise ConfigError(f"model.E0s: expected one of {', '.join(E0S_MODES)} or a mapping of element to eV "
                          f"(e.g. {{H: -13.6}}); got {value!r}")
    if init_from is not None and value != "fit":
        raise ConfigError("model.E0s applies to training from scratch; a run with model.init_from takes its reference "
                          "energies from finetune.reference_energies (auto | keep | refit | {element: eV})")
    return value


def _heads(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(h, str) and h for h in value) \
            or len(set(value)) < len(value):
        raise ConfigError(f"model.heads: expected a list of distinct head names (e.g. [xtb, dft]); got {value!r}")
    return tuple(value)


def _finetune(value: Any) -> FinetuneConfig:
    data = _mapping(value, "finetune") if value is not None else {}
    _check_keys(data, _fields_of(FinetuneConfig), "finetune")
    freeze = data.get("freeze", ())
    freeze = [freeze] if isinstance(freeze, str) else freeze
    if not isinstance(freeze, (list, tuple)) or not all(isinstance(f, str) and f for f in freeze):
        raise ConfigError(f"finetune.freeze: expected a list of parameter groups or name patterns "
                          f"(e.g. [embedding, interaction.0]); got {freeze!r}")
    lrs = data.get("lr", {}) or {}
    if not isinstance(lrs, Mapping) or not all(_finite(v) and v > 0 for v in lrs.values()):
        raise ConfigError(f"finetune.lr: expected a mapping of parameter group (or pattern) to a learning rate > 0 "
                          f"(e.g. {{readout: 1.0e-3, embedding: 1.0e-5}}); got {lrs!r}")
    energies = data.get("reference_energies", "auto")
    if not (energies in ("auto", "keep", "refit") or isinstance(energies, Mapping)):
        raise ConfigError(f"finetune.reference_energies: expected auto, keep, refit, a mapping of element to eV, or a "
                          f"mapping of head to one of those; got {energies!r}")
    return FinetuneConfig(tuple(freeze), {str(k): float(v) for k, v in lrs.items()},
                          dict(energies) if isinstance(energies, Mapping) else energies)


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value (e.g. training.lr=0.001); got {item!r}")
        dotted, text = item.split("=", 1)
        node: Any = raw
        parts = dotted.strip().split(".")
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"--set {dotted}: {part!r} is not an index of a {len(node)}-item list")
                part = int(part)  # type: ignore[assignment]
                if last:
                    node[part] = yaml.safe_load(text)
                    break
                node = node[part]
                continue
            if not isinstance(node, dict):
                raise ConfigError(f"--set {dotted}: cannot set a key inside {node!r}")
            if last:
                node[part] = yaml.safe_load(text)
                break
            child = node.get(part)
            if child is None or (isinstance(child, str) and part in ("train", "valid", "test")):
                child = {} if child is None else {"source": "ase", "path": child}
                node[part] = child
            node = child
    return raw


class _DuplicateKey(yaml.YAMLError):
    """A mapping of the file names one key twice."""


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (YAML silently keeps the
    last one, which hides typos such as two ``training:`` blocks). Merge keys (``<<``) may still
    override what they bring in."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise _DuplicateKey(f"line {line}: key {key!r} is given twice (first on line {seen[key]}); "
                                    "keep one of them")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path | str, what: str = "config file") -> dict[str, Any]:
    """The mapping in a YAML file, with clear errors for a missing file, invalid YAML or a key
    given twice (with its line number)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {str(path)!r} does not exist")
    try:
        data = yaml.load(path.read_text(), Loader=_StrictLoader) or {}
    except _DuplicateKey as error:
        raise ConfigError(f"{path}: {error}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from error
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a mapping of sections at the top, got {type(data).__name__}")
    return dict(data)


def load_config(path: Path | str, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a YAML config, apply overrides, resolve paths against the file's folder."""
    raw = read_yaml(path)
    return config_from_dict(apply_overrides(raw, overrides), Path(path).parent)
