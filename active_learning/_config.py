"""The campaign config: YAML in, frozen dataclasses out (schema in ``docs/active_learning.md``)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping


from atomforge import (ConfigError, SourceConfig, StabilityConfig, apply_overrides, config_from_dict, read_yaml,
                       stability_config_from_dict)

__all__ = ["PluginChoice", "OracleConfig", "BudgetConfig", "StopConfig", "ExecutorConfig",
           "CampaignConfig", "campaign_from_dict", "load_campaign"]


@dataclass(frozen=True)
class PluginChoice:
    """A registry name and the plugin's keyword options."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OracleConfig:
    name: str  # oracle plugin: emt | lj | xtb | pyscf | chgnet | sevenn | ase_calculator | ...
    timeout: float | None = 600.0  # seconds per label attempt; null = no limit
    retries: int = 1  # extra attempts after an error or NaN (timeouts are final)
    options: dict[str, Any] = field(default_factory=dict)  # the oracle's options


@dataclass(frozen=True)
class BudgetConfig:
    per_iteration: int = 10  # most labels requested per iteration
    total: int = 100  # most labels requested over the campaign (failed requests count)
    # split each iteration's budget evenly over groups of candidates by these keys (``explorer`` or
    # an atoms.info key an explorer sets, e.g. ``temperature``); empty: one pool (see _stratify.py)
    stratify: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        keys = (self.stratify,) if isinstance(self.stratify, str) else self.stratify
        if not isinstance(keys, (list, tuple)) or not all(isinstance(k, str) and k for k in keys):
            raise ConfigError(f"budget.stratify: expected a key or a list of keys (e.g. temperature, "
                              f"explorer); got {self.stratify!r}")
        object.__setattr__(self, "stratify", tuple(keys))


@dataclass(frozen=True)
class StopConfig:
    max_iterations: int = 10  # explore-label rounds; the model after the last one is final
    target_forces_mae: float | None = None  # meV/Å on the validation set (test set if given)
    target_energy_mae: float | None = None  # meV/atom, likewise
    accurate_fraction: float | None = None  # stop when this fraction of explored configs has σ < lo
    # gate: a target above stops the campaign only once the model passes this MD-stability suite
    # (no target: stop when it passes); run on every iteration's model (docs/stability.md)
    md_stable: StabilityConfig | None = None


@dataclass(frozen=True)
class ExecutorConfig:
    kind: str = "process"  # process | thread | serial | dask
    max_workers: int | None = None  # default: CPU count (process/thread), 1 (local dask)
    start_method: str = "spawn"  # process pool: spawn | forkserver | fork
    address: str | None = None  # dask scheduler address; null starts a local in-process cluster


@dataclass(frozen=True)
class CampaignConfig:
    initial_data: SourceConfig  # labelled structures to start from (any data source)
    oracle: OracleConfig
    train: dict[str, Any]  # an `atomforge train` config without data/output: model, uq, loss, training
    explorers: tuple[PluginChoice, ...]  # run in turn each iteration
    selector: PluginChoice
    output: Path  # the campaign directory
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    stop: StopConfig = field(default_factory=StopConfig)
    test: SourceConfig | None = None  # optional fixed test set, for reporting (and target errors)
    starts: SourceConfig | None = None  # exploration starting points; default: the initial data
    starts_per_iteration: int = 4  # starting structures drawn per iteration
    valid_fraction: float = 0.2  # of the labelled data, held out for validation in each training
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    tracking: dict[str, Any] = field(default_factory=lambda: {"name": "mlflow"})  # tracker name + options
    seed: int = 0  # seeds exploration, selection and training
    min_distance_ratio: float | None = 0.5  # drop explored frames with atoms closer than this × covalent radii sum
    base_dir: Path = Path(".")  # folder of the campaign file


_TOP = ("initial_data", "oracle", "train", "explorers", "selector", "output", "budget", "stop", "test",
        "starts", "starts_per_iteration", "valid_fraction", "executor", "tracking", "seed", "min_distance_ratio")
_TRAIN_KEYS = ("model", "uq", "loss", "training", "finetune", "processes", "warm_start", "replay",
               "head")  # + engines' options blocks
CAMPAIGN_ONLY = ("processes", "warm_start", "replay", "head")  # train keys that are not `atomforge train`'s
TRAIN_KEYS = _TRAIN_KEYS


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    return dict(value)


def _source(value: Any, base_dir: Path, where: str) -> SourceConfig | None:
    if value is None:
        return None
    options = {"path": str(value)} if isinstance(value, (str, Path)) else _mapping(value, where)
    name = str(options.pop("source", "ase"))
    return SourceConfig(name, _resolve_paths(options, base_dir))


def _resolve_paths(options: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    """``options`` with its ``path`` / ``paths`` (a list) made absolute against ``base_dir``."""
    for key in ("path", "paths"):
        if options.get(key) is not None:
            paths = options[key] if isinstance(options[key], list) else [options[key]]
            resolved = [str((base_dir / Path(str(p)).expanduser()).resolve()) for p in paths]
            options[key] = resolved if isinstance(options[key], list) else resolved[0]
    return options


def _choice(value: Any, where: str, base_dir: Path | None = None) -> PluginChoice:
    """A plugin choice; with ``base_dir``, its ``path`` / ``paths`` options resolve against it."""
    item = {"name": value} if isinstance(value, str) else _mapping(value, where)
    if "name" not in item:
        raise ConfigError(f"{where}: missing 'name' (a registry name; see `atomforge plugins`)")
    name = str(item.pop("name"))
    return PluginChoice(name, item if base_dir is None else _resolve_paths(item, base_dir))


def _typed(cls: type, value: Any, where: str) -> Any:
    data = _mapping(value, where)
    names = set(cls.__dataclass_fields__) - {"options"}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(names)}")
    return cls(**data)


def _oracle(value: Any) -> OracleConfig:
    item = {"name": value} if isinstance(value, str) else _mapping(value, "oracle")
    if "name" not in item:
        raise ConfigError("oracle: missing 'name' (emt, lj, xtb, pyscf, chgnet, sevenn, ase_calculator, ...)")
    known = {k: item.pop(k) for k in ("name", "timeout", "retries") if k in item}
    config = OracleConfig(**known, options=item)
    if config.retries < 0 or (config.timeout is not None and config.timeout <= 0):
        raise ConfigError(f"oracle: retries must be ≥ 0 and timeout > 0; got {config.retries}, {config.timeout}")
    return config


def _train(value: Any, base_dir: Path = Path(".")) -> dict[str, Any]:
    train = _mapping(value, "train")
    if train.get("replay") is not None:
        train["replay"] = _replay(train["replay"], base_dir)
    head = train.get("head")
    if head is not None and (not isinstance(head, str) or not head):
        raise ConfigError(f"train.head: expected the name of one of model.heads (the oracle's level of theory); "
                          f"got {head!r}")
    unknown = sorted(k for k, v in train.items() if k not in _TRAIN_KEYS and not isinstance(v, Mapping))
    if unknown:
        raise ConfigError(f"train: unknown key(s) {unknown}; valid keys: {list(_TRAIN_KEYS)} and options blocks named "
                          "like an engine (e.g. deepspeed: {...}); data and output are set by the campaign")
    processes = train.get("processes", 1)
    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
        raise ConfigError(f"train.processes: expected an integer ≥ 1 (processes of each training job), got {processes!r}")
    _warm_start(train.get("warm_start", False))
    _check_training_block(train)
    return train


def _check_training_block(train: Mapping[str, Any]) -> None:
    """Validate the `atomforge train` part of ``train`` (types and ranges of model, loss and
    training options, also with the warm-start overrides) when the campaign is read, not at its
    first training. Model files named by ``model.init_from`` are read when training starts."""
    block = {k: v for k, v in train.items() if k not in CAMPAIGN_ONLY}
    if isinstance(block.get("model"), Mapping):  # model files and pretrained models are read when training starts
        block["model"] = {k: v for k, v in block["model"].items() if k not in ("init_from", "pretrained")}
    warm = train.get("warm_start")
    variants = [block]
    if isinstance(warm, Mapping):
        variants.append({**block, "training": {**dict(block.get("training") or {}), **dict(warm.get("training") or {})}})
    for variant in variants:
        try:
            config_from_dict({**variant, "data": {"train": "campaign-data.extxyz"}, "tracking": "none"})
        except ConfigError as error:
            raise ConfigError(f"train: {error}") from None


def _replay(value: Any, base_dir: Path) -> list[dict[str, Any]]:
    """``train.replay``: data (e.g. the pre-training set, a structure store) mixed into every
    iteration's training set, each with its ``ratio`` (share of each epoch; the campaign's own
    data get the rest) and optionally the ``head`` it trains."""
    items = value if isinstance(value, (list, tuple)) else [value]
    out = []
    for k, item in enumerate(items):
        where = f"train.replay[{k}]"
        options = {"source": "ase", "path": str(item)} if isinstance(item, (str, Path)) else _mapping(item, where)
        ratio = options.get("ratio")
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
            raise ConfigError(f"{where}.ratio: expected a share of each epoch in (0, 1) (the campaign's own data get "
                              f"the rest); got {ratio!r}")
        out.append(_resolve_paths(options, base_dir))
    if sum(float(o["ratio"]) for o in out) >= 1:
        raise ConfigError("train.replay: the ratios add up to ≥ 1, leaving nothing for the campaign's own data")
    return out


def _warm_start(value: Any) -> None:
    """``train.warm_start``: false, true, or ``{training: {...}}`` — the training settings that
    replace ``train.training``'s for warm-started iterations (e.g. fewer epochs, a lower lr)."""
    if isinstance(value, bool):
        return
    if not isinstance(value, Mapping) or set(value) - {"training"} or not isinstance(value.get("training", {}), Mapping):
        raise ConfigError(f"train.warm_start: expected true, false or {{training: {{max_epochs: ..., lr: ...}}}}, "
                          f"got {value!r}")


def _ratio(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 2:
        raise ConfigError(f"min_distance_ratio: expected a number in [0, 2) or null, got {value!r}")
    return float(value)


def _stop(value: Any, base_dir: Path) -> StopConfig:
    """``stop``, with its ``md_stable`` gate read by :func:`atomforge.stability_config_from_dict`
    (``true``: the suite's defaults, starting from the campaign's initial data)."""
    data = _mapping(value, "stop")
    gate = data.pop("md_stable", None)
    stop = _typed(StopConfig, data, "stop")
    if gate is None or gate is False:
        return stop
    try:
        return replace(stop, md_stable=stability_config_from_dict({} if gate is True else gate, base_dir))
    except ConfigError as error:
        raise ConfigError(f"stop.md_stable: {error}") from None


def _check(config: CampaignConfig) -> CampaignConfig:
    if not config.explorers:
        raise ConfigError("explorers: give at least one, e.g. [{name: md, temperatures: [300]}]")
    if config.budget.per_iteration < 1 or config.budget.total < 1 or config.stop.max_iterations < 0:
        raise ConfigError("budget.per_iteration and budget.total must be ≥ 1 and stop.max_iterations ≥ 0; "
                          f"got {config.budget}, {config.stop}")
    if not 0.0 < config.valid_fraction < 1.0:
        raise ConfigError(f"valid_fraction must be in (0, 1); got {config.valid_fraction}")
    if config.starts_per_iteration < 1:
        raise ConfigError(f"starts_per_iteration must be ≥ 1; got {config.starts_per_iteration}")
    return config


def campaign_from_dict(raw: Mapping[str, Any], base_dir: Path | str = ".") -> CampaignConfig:
    """Build a :class:`CampaignConfig` from plain data; paths resolve against ``base_dir``."""
    base_dir = Path(base_dir).resolve()
    raw = _mapping(raw, "campaign")
    unknown = sorted(set(raw) - set(_TOP))
    if unknown:
        raise ConfigError(f"campaign: unknown key(s) {unknown}; valid keys: {sorted(_TOP)}")
    for required in ("initial_data", "oracle", "train", "explorers", "selector", "output"):
        if required not in raw:
            raise ConfigError(f"campaign: {required!r} is required (see docs/active_learning.md)")
    explorers = raw["explorers"] if isinstance(raw["explorers"], list) else [raw["explorers"]]
    tracking = raw.get("tracking", "mlflow")
    return _check(CampaignConfig(
        initial_data=_source(raw["initial_data"], base_dir, "initial_data"),  # type: ignore[arg-type]
        oracle=_oracle(raw["oracle"]),
        train=_train(raw["train"], base_dir),
        explorers=tuple(_choice(e, f"explorers[{i}]", base_dir) for i, e in enumerate(explorers)),
        selector=_choice(raw["selector"], "selector"),
        output=(base_dir / Path(str(raw["output"])).expanduser()).resolve(),
        budget=_typed(BudgetConfig, raw.get("budget"), "budget"),
        stop=_stop(raw.get("stop"), base_dir),
        test=_source(raw.get("test"), base_dir, "test"),
        starts=_source(raw.get("starts"), base_dir, "starts"),
        starts_per_iteration=int(raw.get("starts_per_iteration", 4)),
        valid_fraction=float(raw.get("valid_fraction", 0.2)),
        executor=_typed(ExecutorConfig, raw.get("executor"), "executor"),
        tracking={"name": tracking} if isinstance(tracking, str) else _mapping(tracking, "tracking"),
        seed=int(raw.get("seed", 0)),
        min_distance_ratio=_ratio(raw.get("min_distance_ratio", 0.5)),
        base_dir=base_dir,
    ))


def load_campaign(path: Path | str, overrides: tuple[str, ...] = ()) -> CampaignConfig:
    """Read a campaign YAML file (with ``--set a.b=c`` overrides)."""
    raw = read_yaml(path, "campaign file")
    return campaign_from_dict(apply_overrides(raw, list(overrides)), Path(path).parent)
