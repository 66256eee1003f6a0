"""MD stability as a first-class evaluation: how long does a model's MD stay physical?

Force errors do not predict how a potential behaves in MD (Fu et al., "Forces are not enough",
2023), so a model is also judged by running it. :func:`run_stability_suite` (``atomforge
stability MODEL CONFIG``, docs/stability.md) measures, for one model (a model file or any ASE
calculator):

* **stable time** — Langevin NVT runs at each of ``temperatures`` from each of ``n_starts``
  starting structures, checked every ``check_every`` steps by the physics checks of
  :mod:`atomforge.analysis.physics` (overlapping atoms, broken starting bonds in open structures,
  non-finite values, and a temperature ceiling ``max_temperature_factor`` × T); a run's stable
  time is the time before its first failed check;
* **NVE drift** — the slope of the total energy per atom in one velocity-Verlet run;
* **a structural observable** — the radial distribution function of the model's NVT MD against
  reference MD (a trajectory file, or MD generated once with an oracle plugin — EMT, xTB … — and
  cached), as one number ``rdf_error``.

Pass criteria (``min_stable_fraction``, ``max_rdf_error``, ``max_nve_drift``) turn the numbers
into a verdict (:func:`stability_verdict`): a model-selection criterion, and the ``md_stable``
stop gate of active-learning campaigns.

**RDF.** For a 3D-periodic cell, the partial g_ab(r) over ordered pairs (i ∈ a, j ∈ b, periodic
images included): ``g_ab(r) = V · n_ab(r) / (N_a N_b · 4π/3 (r₂³ − r₁³))``, averaged over frames
(→ 1 at large r). A structure without a cell (a molecule) has no volume, so its "RDF" is the
**pair-distance distribution** ``p_ab(r) = n_ab(r) / (P_ab Δr)``: the density of the distances of
its P_ab a–b pairs, normalised by *all* of them, so pairs that leave ``[0, r_max]`` (a molecule
falling apart) show as missing weight. Partly periodic cells (slabs) are not supported.
``rdf_error`` = mean over the pair channels of ``Σ_r |g_model − g_ref| / Σ_r g_ref`` (the
integrated absolute difference relative to the reference's integral): 0 for identical
distributions, 2 for ones that do not overlap at all.

Deterministic given ``seed``: run (T, k) draws its velocities and Langevin noise from
``seed + 7919 k + round(T)``; the generated reference MD uses that seed + 1, so the oracle
compared with its own reference gives the sampling noise of ``rdf_error``, not 0.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator
from ase.data import atomic_numbers, chemical_symbols

from .._errors import ConfigError
from .._io import write_json_atomic, write_text_atomic
from .._specs import PluginKind
from ..config import SourceConfig, _check_keys, _mapping, _source, apply_overrides, read_yaml
from ..data.graph import neighbor_list
from ..exploration.oracle import OracleCalculator
from .physics import MDStability, checked_md
from .plots import pyplot, save_figure

__all__ = ["StabilityConfig", "NVEConfig", "ReferenceConfig", "RDFConfig", "stability_config_from_dict",
           "load_stability_config", "config_record", "run_stability_suite", "stability_verdict",
           "radial_distribution", "rdf_error", "reference_frames"]

_TOP = ("starts", "temperatures", "n_starts", "steps", "timestep_fs", "friction_per_fs", "check_every",
        "min_distance", "bond_stretch", "max_energy_deviation", "max_temperature_factor", "nve", "reference", "rdf",
        "min_stable_fraction", "max_rdf_error", "max_nve_drift", "seed")


@dataclass(frozen=True)
class NVEConfig:
    """The NVE run that measures the energy drift (from the first start)."""

    steps: int | None = None  # None: the suite's ``steps``
    temperature: float | None = None  # K, Maxwell–Boltzmann velocities; None: the first of ``temperatures``
    timestep_fs: float | None = None  # None: the suite's ``timestep_fs``


@dataclass(frozen=True)
class ReferenceConfig:
    """Reference MD for the RDF: a trajectory file, or MD generated (once, cached) with an oracle."""

    trajectory: Path | None = None  # frames of reference MD (any ase.io format), used as they are
    oracle: dict[str, Any] | None = None  # {name: emt | xtb | ..., **options}: run the reference MD with it
    temperature: float | None = None  # K, of the reference MD and the model's RDF run; None: first of temperatures
    steps: int | None = None  # length of both runs; None: the suite's ``steps``
    seed: int | None = None  # generated reference MD; None: the model run's seed + 1


@dataclass(frozen=True)
class RDFConfig:
    """Histogram of the RDF (periodic) or pair-distance distribution (molecules)."""

    r_max: float = 6.0  # Å
    bins: int = 120
    pairs: tuple[tuple[str, str], ...] | None = None  # element pairs, e.g. (("C", "H"),); None: all atoms
    skip: float = 0.2  # fraction of each run's length dropped as equilibration (generated MD only)


@dataclass(frozen=True)
class StabilityConfig:
    """The MD-stability suite (docs/stability.md); built by :func:`stability_config_from_dict`."""

    starts: Any = None  # SourceConfig (a data source) or a sequence of ase.Atoms; run k starts from starts[k % len]
    temperatures: tuple[float, ...] = (300.0,)  # K, one Langevin NVT run per temperature and start
    n_starts: int = 2  # starting structures (and velocity seeds) per temperature
    steps: int = 1000  # MD steps per run
    timestep_fs: float = 1.0
    friction_per_fs: float = 0.01  # Langevin friction
    check_every: int = 10  # steps between stability checks (and RDF frames)
    min_distance: float = 0.5  # Å; two atoms closer than this = unstable
    bond_stretch: float = 1.6  # open structures: a starting bond longer than this × Σ r_cov = broken
    max_energy_deviation: float = 0.25  # eV/atom; the NVE run's total energy leaving this window = unstable
    max_temperature_factor: float = 3.0  # NVT: instantaneous temperature above this × T = blow-up
    nve: NVEConfig | None = field(default_factory=NVEConfig)  # None: no NVE run
    reference: ReferenceConfig | None = None  # None: no RDF comparison
    rdf: RDFConfig = field(default_factory=RDFConfig)
    min_stable_fraction: float = 1.0  # pass: this fraction of the NVT runs completes without a failed check
    max_rdf_error: float | None = None  # pass: rdf_error at most this (needs a reference)
    max_nve_drift: float | None = None  # pass: |NVE drift| at most this, meV/atom/ps
    seed: int = 0
    base_dir: Path = Path(".")  # folder of the config file (data sources and paths resolve against it)


# -- config ---------------------------------------------------------------------------------------
def _number(value: Any, where: str, *, low: float | None = None, high: float | None = None,
            integer: bool = False, strict_low: bool = False) -> float:
    """``value`` as a number within the bounds, else a :class:`ConfigError` saying what was expected."""
    kind = "an integer" if integer else "a number"
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and (not integer or float(value).is_integer())
    if ok and low is not None:
        ok = value > low if strict_low else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        bounds = "" if low is None else f" {'>' if strict_low else '≥'} {low:g}"
        bounds += "" if high is None else f" and ≤ {high:g}"
        raise ConfigError(f"{where}: expected {kind}{bounds}; got {value!r}")
    return int(value) if integer else float(value)


def _optional(value: Any, where: str, **bounds: Any) -> Any:
    return None if value is None else _number(value, where, **bounds)


def _temperatures(value: Any) -> tuple[float, ...]:
    items = value if isinstance(value, (list, tuple)) else [value]
    if not items:
        raise ConfigError("temperatures: give at least one temperature in K, e.g. [300, 600]")
    temperatures = tuple(_number(t, "temperatures", low=0.0, strict_low=True) for t in items)
    if len(set(temperatures)) < len(temperatures):
        raise ConfigError(f"temperatures: each temperature once (more starts: n_starts); got {list(temperatures)}")
    return temperatures


def _pairs(value: Any) -> tuple[tuple[str, str], ...] | None:
    """``all`` / None, or element pairs given as ``"C-H"`` or ``[C, H]``."""
    if value is None or value == "all":
        return None
    items = value if isinstance(value, (list, tuple)) else [value]
    out = []
    for item in items:
        pair = item.split("-") if isinstance(item, str) else list(item) if isinstance(item, (list, tuple)) else []
        if len(pair) != 2 or not all(isinstance(p, str) and p.strip() in atomic_numbers for p in pair):
            raise ConfigError(f"rdf.pairs: expected 'all' or element pairs such as C-H or [C, H]; got {item!r}")
        out.append((pair[0].strip(), pair[1].strip()))
    return tuple(out)


def _nve(value: Any) -> NVEConfig | None:
    if value is None or value is False:
        return None
    data = {} if value is True else _mapping(value, "nve")
    _check_keys(data, ("steps", "temperature", "timestep_fs"), "nve")
    return NVEConfig(steps=_optional(data.get("steps"), "nve.steps", low=1, integer=True),
                     temperature=_optional(data.get("temperature"), "nve.temperature", low=0.0, strict_low=True),
                     timestep_fs=_optional(data.get("timestep_fs"), "nve.timestep_fs", low=0.0, strict_low=True))


def _reference(value: Any, base: Path) -> ReferenceConfig | None:
    if value is None:
        return None
    data = _mapping(value, "reference")
    _check_keys(data, ("trajectory", "oracle", "temperature", "steps", "seed"), "reference")
    if (data.get("trajectory") is None) == (data.get("oracle") is None):
        raise ConfigError("reference: give exactly one of trajectory (a file of reference MD frames) or oracle "
                          "({name: emt}, {name: xtb}: reference MD is generated with it once and cached)")
    oracle = data.get("oracle")
    if oracle is not None:
        oracle = {"name": oracle} if isinstance(oracle, str) else _mapping(oracle, "reference.oracle")
        if not isinstance(oracle.get("name"), str):
            raise ConfigError("reference.oracle: give the oracle plugin's name, e.g. {name: emt} "
                              "(see `atomforge plugins`)")
    trajectory = None
    if data.get("trajectory") is not None:
        trajectory = Path(str(data["trajectory"])).expanduser()
        trajectory = trajectory if trajectory.is_absolute() else (base / trajectory).resolve()
    return ReferenceConfig(
        trajectory=trajectory, oracle=oracle,
        temperature=_optional(data.get("temperature"), "reference.temperature", low=0.0, strict_low=True),
        steps=_optional(data.get("steps"), "reference.steps", low=1, integer=True),
        seed=_optional(data.get("seed"), "reference.seed", integer=True))


def _rdf(value: Any) -> RDFConfig:
    data = _mapping(value, "rdf")
    _check_keys(data, ("r_max", "bins", "pairs", "skip"), "rdf")
    return RDFConfig(r_max=_number(data.get("r_max", 6.0), "rdf.r_max", low=0.0, strict_low=True),
                     bins=_number(data.get("bins", 120), "rdf.bins", low=1, integer=True),
                     pairs=_pairs(data.get("pairs")),
                     skip=_number(data.get("skip", 0.2), "rdf.skip", low=0.0, high=0.95))


def _starts(value: Any, base: Path) -> Any:
    if value is None:
        return None
    if isinstance(value, Atoms):
        return (value,)
    if isinstance(value, (list, tuple)) and value and all(isinstance(a, Atoms) for a in value):
        return tuple(value)
    return _source(value, base, "starts")


def stability_config_from_dict(raw: Mapping[str, Any] | None, base_dir: Path | str = ".") -> StabilityConfig:
    """A validated :class:`StabilityConfig` from plain data (YAML); paths resolve against
    ``base_dir``. Unknown keys and values out of range are :class:`ConfigError`\\ s."""
    base = Path(base_dir).resolve()
    data = _mapping(raw, "stability config")
    _check_keys(data, _TOP, "stability config")
    d = StabilityConfig()
    get = data.get
    config = StabilityConfig(
        starts=_starts(get("starts"), base),
        temperatures=_temperatures(get("temperatures", list(d.temperatures))),
        n_starts=_number(get("n_starts", d.n_starts), "n_starts", low=1, integer=True),
        steps=_number(get("steps", d.steps), "steps", low=1, integer=True),
        timestep_fs=_number(get("timestep_fs", d.timestep_fs), "timestep_fs", low=0.0, strict_low=True),
        friction_per_fs=_number(get("friction_per_fs", d.friction_per_fs), "friction_per_fs", low=0.0, strict_low=True),
        check_every=_number(get("check_every", d.check_every), "check_every", low=1, integer=True),
        min_distance=_number(get("min_distance", d.min_distance), "min_distance", low=0.0, strict_low=True),
        bond_stretch=_number(get("bond_stretch", d.bond_stretch), "bond_stretch", low=1.0, strict_low=True),
        max_energy_deviation=_number(get("max_energy_deviation", d.max_energy_deviation), "max_energy_deviation",
                                     low=0.0, strict_low=True),
        max_temperature_factor=_number(get("max_temperature_factor", d.max_temperature_factor),
                                       "max_temperature_factor", low=1.0, strict_low=True),
        nve=_nve(get("nve", {})),
        reference=_reference(get("reference"), base),
        rdf=_rdf(get("rdf")),
        min_stable_fraction=_number(get("min_stable_fraction", 1.0), "min_stable_fraction", low=0.0, high=1.0),
        max_rdf_error=_optional(get("max_rdf_error"), "max_rdf_error", low=0.0),
        max_nve_drift=_optional(get("max_nve_drift"), "max_nve_drift", low=0.0),
        seed=_number(get("seed", 0), "seed", integer=True),
        base_dir=base)
    if config.max_rdf_error is not None and config.reference is None:
        raise ConfigError("max_rdf_error needs a reference to compare with: add reference: {oracle: {name: ...}} "
                          "or reference: {trajectory: FILE}")
    if config.max_nve_drift is not None and config.nve is None:
        raise ConfigError("max_nve_drift needs the NVE run: remove `nve: null` (or give nve: {steps: ...})")
    return config


def load_stability_config(path: Path | str, overrides: Sequence[str] = ()) -> StabilityConfig:
    """Read a stability YAML file, apply ``--set`` overrides, resolve paths against its folder."""
    raw = apply_overrides(read_yaml(path, "stability config"), list(overrides))
    return stability_config_from_dict(raw, Path(path).parent)


def config_record(config: StabilityConfig) -> dict[str, Any]:
    """``config`` as plain, YAML/JSON-able data (structures given in Python are counted, not copied)."""
    def plain(value: Any) -> Any:
        if isinstance(value, Atoms):
            return value.get_chemical_formula()
        if is_dataclass(value) and not isinstance(value, type):
            return {k: plain(v) for k, v in asdict(value).items()} if not isinstance(value, SourceConfig) else \
                {"source": value.source, **value.options}
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return str(value) if isinstance(value, Path) else value

    record = {f: plain(getattr(config, f)) for f in config.__dataclass_fields__ if f != "base_dir"}
    return record


# -- the suite ------------------------------------------------------------------------------------
def _oracle_calculator(spec: Mapping[str, Any], registry: Any) -> Calculator:
    """The ASE calculator of an oracle plugin: its own (``make_calculator``) when it has one."""
    options = {k: v for k, v in spec.items() if k != "name"}
    oracle = registry.get(PluginKind.ORACLE, spec["name"]).factory(**options)
    make = getattr(oracle, "make_calculator", None)
    return make() if callable(make) else OracleCalculator(oracle)


def _model_calculator(model: Any, registry: Any, head: str | None, device: str) -> Any:
    if isinstance(model, (str, Path)):
        from ..model.calculator import load_calculator

        return load_calculator(model, registry=registry, head=head, device=device)
    if not hasattr(model, "get_forces"):
        raise ConfigError(f"run_stability_suite: expected a model file path or an ASE calculator; got "
                          f"{type(model).__name__}")
    return model


def _read_starts(config: StabilityConfig, registry: Any) -> list[Atoms]:
    """The ``n_starts`` starting structures (bare copies): start k is structure k mod the count."""
    if config.starts is None:
        raise ConfigError("stability config: `starts` is required: a file of starting structures (any ase.io "
                          "format) or {source: NAME, ...}; from Python, a list of ase.Atoms")
    if isinstance(config.starts, SourceConfig):
        spec = registry.get(PluginKind.DATA_SOURCE, config.starts.source)
        structures = list(spec.factory(dict(config.starts.options), config.base_dir))
    else:
        structures = list(config.starts)
    if not structures:
        raise ConfigError("stability config: `starts` holds no structure")
    for atoms in structures:
        if atoms.pbc.any() and not atoms.pbc.all():
            raise ConfigError(f"stability: {atoms.get_chemical_formula()} is periodic along some axes only "
                              f"(pbc={atoms.pbc.tolist()}); the suite handles molecules (no pbc) and 3D-periodic cells")
    return [_bare(structures[k % len(structures)]) for k in range(config.n_starts)]


def _bare(atoms: Atoms) -> Atoms:
    return Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=atoms.pbc)


def _seed(config: StabilityConfig, temperature: float, start: int) -> int:
    """Seed of the NVT run at ``temperature`` from start ``start`` (velocities and Langevin noise)."""
    return config.seed + 7919 * start + int(round(temperature))


def _nvt(atoms: Atoms, calc: Any, config: StabilityConfig, temperature: float, steps: int, seed: int,
         keep_frames: bool) -> MDStability:
    return checked_md(atoms, calc, config, steps=steps, temperature=temperature, timestep_fs=config.timestep_fs,
                      seed=seed, check_every=config.check_every, friction_per_fs=config.friction_per_fs,
                      max_temperature=config.max_temperature_factor * temperature, keep_frames=keep_frames)


def _reference_protocol(config: StabilityConfig) -> tuple[float, int]:
    """(temperature, steps) of the reference MD and of the model's RDF run."""
    ref = config.reference or ReferenceConfig()
    return (ref.temperature or config.temperatures[0]), (ref.steps or config.steps)


def run_stability_suite(model: Path | str | Any, config: StabilityConfig, *, out_dir: Path, tracker: Any = None,
                        registry: Any = None, head: str | None = None, device: str = "cpu",
                        reference_dir: Path | None = None,
                        progress: Callable[[str], None] | None = None) -> dict[str, float]:
    """Run the suite on ``model`` (a model file, loaded on ``device`` with ``head``, or any ASE
    calculator); write ``stability.json`` and the plots to ``out_dir``, log them (and the
    metrics) to ``tracker`` when given, and return the metrics (docs/stability.md).

    Generated reference MD is cached in ``reference_dir`` (default ``out_dir/reference``), keyed
    by the oracle, the start and the protocol, so it is run once for any number of models."""
    from ..registry import make_registry

    registry = registry or make_registry()
    say = progress or (lambda message: None)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    calc = _model_calculator(model, registry, head, device)
    starts = _read_starts(config, registry)
    rdf_protocol = _reference_protocol(config) if config.reference is not None else None
    runs: dict[tuple[float, int], MDStability] = {}
    for temperature in config.temperatures:
        for k, start in enumerate(starts):
            say(f"stability: NVT {temperature:g} K, start {k}, {config.steps} steps")
            keep = rdf_protocol == (temperature, config.steps) and k == 0
            runs[(temperature, k)] = _nvt(start, calc, config, temperature, config.steps,
                                          _seed(config, temperature, k), keep)
    metrics = _stability_metrics(config, runs)
    details: dict[str, Any] = {"runs": [_run_record(config, t, k, md) for (t, k), md in runs.items()]}
    if config.nve is not None:
        nve = _nve_run(starts[0], calc, config, say)
        metrics.update(nve[0])
        details["nve"] = nve[1]
    plots = [_stable_time_plot(config, runs, out_dir / "stability_time.png")]
    if config.reference is not None:
        rdf_metrics, rdf_details, rdf_plot = _rdf_comparison(config, calc, starts[0], runs, registry,
                                                             reference_dir or out_dir / "reference", out_dir, say)
        metrics.update(rdf_metrics)
        details["rdf"] = rdf_details
        plots.append(rdf_plot)
    passed, verdict = stability_verdict(metrics, config)
    metrics["passed"] = float(passed)
    details.update(metrics=metrics, verdict=verdict, config=config_record(config))
    report = write_json_atomic(out_dir / "stability.json", details)
    if tracker is not None:
        tracker.log_metrics(metrics)
        for path in (*plots, report):
            tracker.log_artifact(path, "stability")
    return metrics


def _stability_metrics(config: StabilityConfig, runs: Mapping[tuple[float, int], MDStability]) -> dict[str, float]:
    to_ps = config.timestep_fs / 1000.0
    times = np.array([md.stable_steps * to_ps for md in runs.values()])
    stable = [not md.failure for md in runs.values()]
    metrics = {"stable_fraction": float(np.mean(stable)), "stable_time_ps_mean": float(times.mean()),
               "stable_time_ps_min": float(times.min()), "run_time_ps": config.steps * to_ps, "runs": float(len(runs)),
               "ms_per_step": float(np.mean([md.ms_per_step for md in runs.values()]))}
    for temperature in config.temperatures:
        per_t = [md.stable_steps * to_ps for (t, _), md in runs.items() if t == temperature]
        metrics[f"stable_time_ps/{temperature:g}K"] = float(np.mean(per_t))
    return metrics


def _run_record(config: StabilityConfig, temperature: float, k: int, md: MDStability) -> dict[str, Any]:
    return {"temperature": temperature, "start": k, "seed": _seed(config, temperature, k), "steps": md.steps,
            "stable_steps": md.stable_steps, "stable_time_ps": md.stable_steps * config.timestep_fs / 1000.0,
            "failure": md.failure, "ms_per_step": md.ms_per_step}


def _nve_run(start: Atoms, calc: Any, config: StabilityConfig,
             say: Callable[[str], None]) -> tuple[dict[str, float], dict[str, Any]]:
    nve = config.nve or NVEConfig()
    steps, dt = nve.steps or config.steps, nve.timestep_fs or config.timestep_fs
    temperature = nve.temperature or config.temperatures[0]
    say(f"stability: NVE {temperature:g} K, {steps} steps of {dt:g} fs")
    md = checked_md(start, calc, config, steps=steps, temperature=temperature, timestep_fs=dt,
                    seed=_seed(config, temperature, 0), check_every=config.check_every)
    metrics = {"nve_drift_meV_per_atom_ps": md.energy_drift,
               "nve_max_energy_deviation_meV_per_atom": md.max_energy_deviation,
               "nve_stable_time_ps": md.stable_steps * dt / 1000.0}
    record = {"temperature": temperature, "steps": steps, "timestep_fs": dt, "stable_steps": md.stable_steps,
              "failure": md.failure, **metrics}
    return metrics, record


# -- reference MD and the RDF ---------------------------------------------------------------------
def _structure_key(atoms: Atoms) -> list[Any]:
    return [atoms.numbers.tolist(), np.round(atoms.positions, 6).tolist(), np.round(atoms.cell[:], 6).tolist(),
            atoms.pbc.tolist()]


def reference_frames(config: StabilityConfig, start: Atoms, *, registry: Any, cache_dir: Path,
                     progress: Callable[[str], None] | None = None) -> tuple[list[Atoms], dict[str, Any]]:
    """Frames of the reference MD and a record of where they came from: the trajectory file's
    frames as they are, or the oracle's Langevin NVT run from ``start`` (the model's RDF protocol,
    seed + 1) after the equilibration ``rdf.skip`` — generated once and cached in ``cache_dir``."""
    ref = config.reference
    if ref is None:
        raise ConfigError("stability config: no `reference` to compare the RDF with")
    if ref.trajectory is not None:
        from ase.io import read

        if not ref.trajectory.is_file():
            raise ConfigError(f"reference.trajectory {str(ref.trajectory)!r} does not exist")
        frames = [_bare(a) for a in read(ref.trajectory, index=":")]
        return frames, {"trajectory": str(ref.trajectory), "frames": len(frames)}
    temperature, steps = _reference_protocol(config)
    seed = ref.seed if ref.seed is not None else _seed(config, temperature, 0) + 1
    protocol = {"oracle": ref.oracle, "start": _structure_key(start), "temperature": temperature, "steps": steps,
                "timestep_fs": config.timestep_fs, "friction_per_fs": config.friction_per_fs,
                "check_every": config.check_every, "seed": seed}
    key = hashlib.sha256(json.dumps(protocol, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path, info_path = Path(cache_dir) / f"reference-{key}.extxyz", Path(cache_dir) / f"reference-{key}.json"
    if not (path.exists() and info_path.exists()):
        (progress or (lambda m: None))(f"stability: reference MD with {ref.oracle['name']!r}, {temperature:g} K, "
                                       f"{steps} steps (cached in {cache_dir})")
        md = _nvt(start, _oracle_calculator(ref.oracle, registry), config, temperature, steps, seed, True)
        _write_frames(path, list(md.frames))
        write_json_atomic(info_path, {**{k: v for k, v in protocol.items() if k != "start"}, "key": key,
                                      "stable_steps": md.stable_steps, "failure": md.failure})
    from ase.io import read

    info = json.loads(info_path.read_text())
    frames = list(read(path, index=":")) if path.stat().st_size else []
    return frames[_skipped(config, steps):], {**info, "path": str(path)}


def _write_frames(path: Path, frames: list[Atoms]) -> None:
    import io

    from ase.io import write

    buffer = io.StringIO()
    if frames:
        write(buffer, frames, format="extxyz")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, buffer.getvalue())


def _skipped(config: StabilityConfig, steps: int) -> int:
    """Checked frames dropped as equilibration: ``rdf.skip`` of the run's length."""
    return int(config.rdf.skip * (steps // config.check_every))


def _channels(pairs: tuple[tuple[str, str], ...] | None, numbers: np.ndarray) -> list[tuple[str, int, int]]:
    """(label, Z_a, Z_b) per channel; Z = 0 stands for "any element" (pairs: all)."""
    if pairs is None:
        return [("all", 0, 0)]
    present = set(numbers.tolist())
    out = []
    for a, b in pairs:
        za, zb = atomic_numbers[a], atomic_numbers[b]
        if za not in present or zb not in present:
            found = sorted({chemical_symbols[z] for z in present})
            raise ConfigError(f"rdf.pairs: {a}-{b} needs both elements in the structure; it has {found}")
        out.append((f"{a}-{b}", za, zb))
    return out


def _select(numbers: np.ndarray, z: int) -> np.ndarray:
    return np.ones(len(numbers), bool) if z == 0 else numbers == z


def radial_distribution(frames: Sequence[Atoms], rdf: RDFConfig) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Bin centres r (Å) and, per pair channel, g(r) (3D-periodic frames) or the pair-distance
    distribution p(r) in 1/Å (frames without a cell) averaged over ``frames`` (module docstring)."""
    edges = np.linspace(0.0, rdf.r_max, rdf.bins + 1)
    centres = 0.5 * (edges[1:] + edges[:-1])
    if not frames:
        return centres, {}
    numbers = frames[0].numbers
    periodic = bool(frames[0].pbc.all())
    out = {}
    for label, za, zb in _channels(rdf.pairs, numbers):
        a, b = _select(numbers, za), _select(numbers, zb)
        total = np.zeros(rdf.bins)
        for atoms in frames:
            total += _periodic_g(atoms, a, b, edges) if periodic else _pair_density(atoms, a, b, edges)
        out[label] = total / len(frames)
    return centres, out


def _periodic_g(atoms: Atoms, a: np.ndarray, b: np.ndarray, edges: np.ndarray) -> np.ndarray:
    i, j, _, d = neighbor_list(atoms, float(edges[-1]))
    keep = a[i] & b[j]
    counts = np.histogram(d[keep], bins=edges)[0]
    shells = 4.0 / 3.0 * np.pi * (edges[1:] ** 3 - edges[:-1] ** 3)
    return counts * atoms.get_volume() / (a.sum() * b.sum() * shells)


def _pair_density(atoms: Atoms, a: np.ndarray, b: np.ndarray, edges: np.ndarray) -> np.ndarray:
    i, j = np.triu_indices(len(atoms), k=1)
    keep = (a[i] & b[j]) | (a[j] & b[i])
    d = np.linalg.norm(atoms.positions[j[keep]] - atoms.positions[i[keep]], axis=1)
    return np.histogram(d, bins=edges)[0] / (max(int(keep.sum()), 1) * (edges[1] - edges[0]))


def rdf_error(model: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> float:
    """Mean over channels of Σ|g_model − g_ref| / Σ g_ref (0 identical, 2 disjoint); NaN if the
    model has no frames."""
    if not model:
        return math.nan
    errors = []
    for label, ref in reference.items():
        if ref.sum() <= 0:
            raise ConfigError(f"rdf: the reference has no {label} pairs within r_max; raise rdf.r_max")
        errors.append(float(np.abs(model[label] - ref).sum() / ref.sum()))
    return float(np.mean(errors))


def _rdf_comparison(config: StabilityConfig, calc: Any, start: Atoms, runs: Mapping[tuple[float, int], MDStability],
                    registry: Any, cache_dir: Path, out_dir: Path,
                    say: Callable[[str], None]) -> tuple[dict[str, float], dict[str, Any], Path]:
    temperature, steps = _reference_protocol(config)
    ref_frames, source = reference_frames(config, start, registry=registry, cache_dir=cache_dir, progress=say)
    if not ref_frames:
        raise ConfigError(f"rdf: the reference MD has no frames to compare with ({source})")
    if sorted(ref_frames[0].numbers.tolist()) != sorted(start.numbers.tolist()):
        raise ConfigError(f"rdf: the reference ({ref_frames[0].get_chemical_formula()}) and the first start "
                          f"({start.get_chemical_formula()}) are different systems")
    md = runs.get((temperature, 0)) if steps == config.steps else None
    if md is None:
        say(f"stability: NVT {temperature:g} K, start 0, {steps} steps for the RDF")
        md = _nvt(start, calc, config, temperature, steps, _seed(config, temperature, 0), True)
    model_frames = list(md.frames)[_skipped(config, steps):]
    r, g_ref = radial_distribution(ref_frames, config.rdf)
    _, g_model = radial_distribution(model_frames, config.rdf)
    error = rdf_error(g_model, g_ref)
    plot = _rdf_plot(r, g_model, g_ref, periodic=bool(start.pbc.all()), path=out_dir / "rdf.png")
    details = {"r": r.tolist(), "model": {k: v.tolist() for k, v in g_model.items()},
               "reference": {k: v.tolist() for k, v in g_ref.items()}, "source": source,
               "temperature": temperature, "steps": steps, "model_failure": md.failure,
               "kind": "g(r)" if start.pbc.all() else "pair-distance distribution p(r), 1/Å"}
    metrics = {"rdf_error": error, "rdf_frames": float(len(model_frames)),
               "rdf_reference_frames": float(len(ref_frames))}
    return metrics, details, plot


# -- verdict and plots ----------------------------------------------------------------------------
def stability_verdict(metrics: Mapping[str, float], config: StabilityConfig) -> tuple[bool, str]:
    """Whether ``metrics`` (of :func:`run_stability_suite`) pass ``config``'s criteria, and a
    one-line reason naming every criterion with its value."""
    checks = [(metrics["stable_fraction"] >= config.min_stable_fraction,
               f"stable_fraction {metrics['stable_fraction']:.2f} (need ≥ {config.min_stable_fraction:g})")]
    if config.max_rdf_error is not None:
        value = metrics.get("rdf_error", math.nan)
        checks.append((value <= config.max_rdf_error, f"rdf_error {value:.3g} (need ≤ {config.max_rdf_error:g})"))
    if config.max_nve_drift is not None:
        value = abs(metrics.get("nve_drift_meV_per_atom_ps", math.nan))
        checks.append((value <= config.max_nve_drift,
                       f"|NVE drift| {value:.3g} meV/atom/ps (need ≤ {config.max_nve_drift:g})"))
    passed = all(ok for ok, _ in checks)
    temperatures = ", ".join(f"{t:g}" for t in config.temperatures)
    head = "MD-stable" if passed else "not MD-stable"
    return passed, f"model {head} at {temperatures} K: " + ", ".join(text for _, text in checks)


def _stable_time_plot(config: StabilityConfig, runs: Mapping[tuple[float, int], MDStability], path: Path) -> Path:
    """Stable time per temperature: one point per start (green: completed, red: failed), the mean."""
    fig, ax = pyplot().subplots(figsize=(5, 3.5))
    to_ps = config.timestep_fs / 1000.0
    positions = np.arange(len(config.temperatures))
    spread = np.linspace(-0.15, 0.15, config.n_starts) if config.n_starts > 1 else np.zeros(1)
    for x, temperature in zip(positions, config.temperatures):
        values = [(runs[(temperature, k)].stable_steps * to_ps, not runs[(temperature, k)].failure)
                  for k in range(config.n_starts)]
        for dx, (value, ok) in zip(spread, values):
            ax.plot(x + dx, value, "o", color="tab:green" if ok else "tab:red")
        ax.hlines(np.mean([v for v, _ in values]), x - 0.25, x + 0.25, color="black")
    ax.axhline(config.steps * to_ps, color="grey", linestyle="--", label="run length")
    ax.set_xticks(positions, [f"{t:g}" for t in config.temperatures])
    ax.set_xlabel("temperature (K)")
    ax.set_ylabel("stable time (ps)")
    ax.set_ylim(bottom=0)
    ax.set_title("per start: green completed, red failed; bar: mean", fontsize=9)
    ax.legend(loc="lower left")
    return save_figure(fig, path, dpi=100)


def _rdf_plot(r: np.ndarray, model: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], *,
              periodic: bool, path: Path) -> Path:
    labels = list(reference)
    fig, axes = pyplot().subplots(1, len(labels), figsize=(4.5 * len(labels), 3.5), squeeze=False)
    for ax, label in zip(axes[0], labels):
        ax.plot(r, reference[label], color="black", label="reference")
        if label in model:
            ax.plot(r, model[label], color="tab:blue", linestyle="--", label="model")
        ax.set_title(label)
        ax.set_xlabel("r (Å)")
        ax.set_ylabel("g(r)" if periodic else "p(r) (1/Å)")
        ax.legend()
    return save_figure(fig, path, dpi=100)
