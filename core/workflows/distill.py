"""Distillation: a fast, specialised student trained on a big teacher's labels (docs/distill.md).

``atomforge distill CONFIG`` / :func:`distill`:

1. **configurations** — structures of a data source (their labels are ignored) plus frames that
   explorer plugins (``md``, ``perturb``, ``normal_modes`` …) sample *with the teacher*; the
   campaigns' physical sanity cut (``min_distance_ratio``) drops exploded frames;
2. **teacher labels** — energy, forces (and stress for periodic cells) of every configuration,
   plus ``labels.hessian_rows`` random rows of its Hessian: by autograd for an atomforge model
   file, by central differences of the forces (2 calls per row) for an oracle/calculator teacher
   or a teacher with a UQ head. Labels are appended batch by batch to
   ``<labels.dir>/<key>/teacher.extxyz`` (a killed run resumes there) and reused by every later
   student run with the same teacher, configurations and label settings (``key`` hashes them);
3. **student** — an ordinary ``atomforge train`` run (any backbone, loss — e.g. the ``hessian``
   term —, UQ head, engine) on those labels, so a student keeps every atomforge capability;
4. **report** — teacher and student on a held-out *reference* set (``test``, not teacher
   labels) when given, and the time per calculator call of both, logged to the student's
   MLflow run with the teacher's identity (model file hash or oracle settings) and the sampling.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator
from ase.io import read, write

from .. import keys as K
from .._errors import ConfigError
from .._specs import PluginKind
from ..analysis.hessian import attach_hessian_rows, fd_hessian_rows, hessian_rows, pick_rows
from ..config import _check_keys, _mapping, _source, apply_overrides, config_from_dict, read_yaml
from ..data.structures import attach_labels
from ..exploration.oracle import OracleCalculator, label_safely
from ..exploration.records import unphysical_reason
from ..registry import Registry

__all__ = ["DistillConfig", "DistillOutcome", "distill", "distill_config_from_dict", "load_distill_config",
           "teacher_labels"]

_log = logging.getLogger(__name__)

_TOP = ("output", "teacher", "configurations", "labels", "student", "valid_fraction", "test", "tracking", "seed")
_TEACHER = ("model", "head", "oracle", "hessian", "timeout", "retries")
_CONFIGS = ("data", "sampling", "starts", "include_data", "max_structures", "min_distance_ratio")
_LABELS = ("hessian_rows", "fd_step", "batch_size", "dir")
_STUDENT_FORBIDDEN = ("data", "output", "tracking")


@dataclass
class DistillConfig:
    """A distillation run (``atomforge distill`` YAML, docs/distill.md)."""

    output: Path  # run folder: labels (by default), student/, distill.json
    teacher: dict[str, Any]  # {model: FILE, head: NAME} or {oracle: {name: ..., options}}; hessian: auto|autograd|finite_difference
    data: Any  # SourceConfig of the starting structures (labels ignored)
    sampling: list[dict[str, Any]] = field(default_factory=list)  # explorer plugins run with the teacher
    starts: int = 8  # structures of the data drawn as exploration starts
    include_data: bool = True  # label the data's own structures too
    max_structures: int | None = None  # cap on configurations (a seeded random subset)
    min_distance_ratio: float | None = 0.5  # sanity cut (× covalent radii sum), as in campaigns
    hessian_rows: int = 0  # Hessian rows per structure (0 = none)
    fd_step: float = 0.005  # Å, central-difference step for calculator teachers
    batch_size: int = 16  # structures per teacher batch (and per append to the label file)
    labels_dir: Path | None = None  # where labels are kept and shared between students (default <output>/labels)
    student: dict[str, Any] = field(default_factory=dict)  # an `atomforge train` config without data/output/tracking
    valid_fraction: float = 0.1
    test: Any = None  # SourceConfig of reference-labelled held-out data (optional)
    tracking: Any = "mlflow"
    seed: int = 0
    base_dir: Path = Path(".")


@dataclass
class DistillOutcome:
    """What :func:`distill` produced."""

    labels: Path  # the teacher-labelled extxyz
    model_path: Path  # the student's model file
    report: dict[str, Any]  # also in <output>/distill.json


# -- config ---------------------------------------------------------------------------------------
def distill_config_from_dict(raw: Mapping[str, Any], base_dir: Path | str = ".") -> DistillConfig:
    """A validated :class:`DistillConfig`; unknown keys and missing parts are :class:`ConfigError`\\ s."""
    base = Path(base_dir).resolve()
    raw = dict(raw)
    _check_keys(raw, _TOP, "distill config")
    for key in ("output", "teacher", "configurations", "student"):
        if raw.get(key) is None:
            raise ConfigError(f"distill config: {key!r} is required (docs/distill.md)")
    teacher = _teacher(raw["teacher"], base)
    configs = _mapping(raw["configurations"], "configurations")
    _check_keys(configs, _CONFIGS, "configurations")
    if configs.get("data") is None:
        raise ConfigError("configurations.data is required: the structures sampling starts from (a data source)")
    labels = _mapping(raw.get("labels"), "labels")
    _check_keys(labels, _LABELS, "labels")
    student = _mapping(raw["student"], "student")
    clash = sorted(set(student) & set(_STUDENT_FORBIDDEN))
    if clash:
        raise ConfigError(f"student: {clash} are set by distill (the teacher's labels, <output>/student, the run's "
                          "tracking); remove them from the student block")
    config = DistillConfig(
        output=(base / str(raw["output"])).resolve(), teacher=teacher,
        data=_source(configs["data"], base, "configurations.data"),
        sampling=[_sampler(s, k, base) for k, s in enumerate(configs.get("sampling") or [])],
        starts=int(configs.get("starts", 8)), include_data=bool(configs.get("include_data", True)),
        max_structures=None if configs.get("max_structures") is None else int(configs["max_structures"]),
        min_distance_ratio=configs.get("min_distance_ratio", 0.5),
        hessian_rows=int(labels.get("hessian_rows", 0)), fd_step=float(labels.get("fd_step", 0.005)),
        batch_size=int(labels.get("batch_size", 16)),
        labels_dir=None if labels.get("dir") is None else (base / str(labels["dir"])).resolve(),
        student=student, valid_fraction=float(raw.get("valid_fraction", 0.1)),
        test=_source(raw.get("test"), base, "test"), tracking=raw.get("tracking", "mlflow"),
        seed=int(raw.get("seed", 0)), base_dir=base)
    _check_ranges(config)
    return config


def _teacher(value: Any, base: Path) -> dict[str, Any]:
    teacher = {"model": value} if isinstance(value, (str, Path)) else _mapping(value, "teacher")
    _check_keys(teacher, _TEACHER, "teacher")
    if (teacher.get("model") is None) == (teacher.get("oracle") is None):
        raise ConfigError("teacher: give exactly one of model (an atomforge model file) or oracle "
                          "({name: xtb, ...}: an oracle plugin, e.g. ase_calculator for any ASE calculator)")
    if teacher.get("model") is not None:
        path = Path(str(teacher["model"])).expanduser()
        teacher["model"] = str(path if path.is_absolute() else (base / path).resolve())
        if not Path(teacher["model"]).is_file():
            raise ConfigError(f"teacher.model {teacher['model']!r} does not exist")
    else:
        oracle = {"name": teacher["oracle"]} if isinstance(teacher["oracle"], str) else _mapping(teacher["oracle"], "teacher.oracle")
        if "name" not in oracle:
            raise ConfigError("teacher.oracle: give the oracle plugin's name, e.g. {name: xtb}")
        teacher["oracle"] = oracle
    hessian = teacher.setdefault("hessian", "auto")
    if hessian not in ("auto", "autograd", "finite_difference"):
        raise ConfigError(f"teacher.hessian: expected auto, autograd or finite_difference; got {hessian!r}")
    if hessian == "autograd" and teacher.get("model") is None:
        raise ConfigError("teacher.hessian: autograd needs an atomforge model teacher; an oracle's Hessian rows "
                          "come from finite differences (hessian: finite_difference or auto)")
    return teacher


def _sampler(value: Any, k: int, base: Path) -> dict[str, Any]:
    sampler = {"name": value} if isinstance(value, str) else _mapping(value, f"configurations.sampling[{k}]")
    if "name" not in sampler:
        raise ConfigError(f"configurations.sampling[{k}]: give an explorer's name (md, perturb, normal_modes …)")
    for key in ("path", "paths"):  # explorer options with files, as in campaigns
        if sampler.get(key) is not None:
            sampler[key] = _resolve(sampler[key], base)
    return sampler


def _resolve(value: Any, base: Path) -> Any:
    if isinstance(value, list):
        return [_resolve(v, base) for v in value]
    return str((base / str(value)).resolve())


def _check_ranges(config: DistillConfig) -> None:
    problems = [name for name, bad in (
        ("configurations.starts ≥ 1", config.starts < 1),
        ("labels.hessian_rows ≥ 0", config.hessian_rows < 0),
        ("labels.fd_step > 0", config.fd_step <= 0),
        ("labels.batch_size ≥ 1", config.batch_size < 1),
        ("0 < valid_fraction < 1", not 0 < config.valid_fraction < 1),
        ("configurations.max_structures ≥ 1", config.max_structures is not None and config.max_structures < 1),
        ("configurations: include_data or sampling", not config.include_data and not config.sampling),
    ) if bad]
    if problems:
        raise ConfigError("distill config: expected " + "; ".join(problems))


def load_distill_config(path: Path | str, overrides: Sequence[str] = ()) -> DistillConfig:
    """Read a distill YAML file, apply ``--set`` overrides, resolve paths against its folder."""
    return distill_config_from_dict(apply_overrides(read_yaml(path, "distill config"), overrides), Path(path).parent)


# -- the teacher ----------------------------------------------------------------------------------
class Teacher:
    """Labels structures with energy, forces, stress and Hessian rows, and gives explorers a
    calculator. A model teacher labels in batches (one forward pass per batch)."""

    def __init__(self, spec: Mapping[str, Any], registry: Registry) -> None:
        from ..model.calculator import load_calculator
        from ..model.modelfile import load_model

        self.spec = dict(spec)
        self.registry = registry
        self.model = None
        if spec.get("model") is not None:
            self.calculator = load_calculator(spec["model"], registry=registry, head=spec.get("head"))
            self.model = load_model(spec["model"], registry=registry).eval()
            plain = type(self.model).__name__ == "Potential"
            mode = spec.get("hessian", "auto")
            if mode == "autograd" and not plain:
                raise ConfigError("teacher.hessian: autograd needs a model file without a UQ head; use "
                                  "finite_difference (the UQ head's mean forces, differenced)")
            self.autograd = plain and mode != "finite_difference"
        else:
            options = {k: v for k, v in spec["oracle"].items() if k != "name"}
            self.oracle = registry.get(PluginKind.ORACLE, spec["oracle"]["name"]).factory(**options)
            self.calculator = OracleCalculator(self.oracle, timeout=spec.get("timeout"),
                                               retries=int(spec.get("retries", 0)))
            self.autograd = False

    def identity(self) -> dict[str, Any]:
        """What the labels came from: a model file's content hash, or the oracle's settings."""
        if self.spec.get("model") is not None:
            from ..model.modelfile import read_model_file

            config, metadata, _ = read_model_file(self.spec["model"])
            return {"kind": "model", "path": self.spec["model"], "sha256": _file_hash(self.spec["model"]),
                    "backbone": config.get("backbone"), "head": self.spec.get("head"),
                    "uq": (config.get("uq") or {}).get("name") if isinstance(config.get("uq"), dict) else config.get("uq"),
                    "hessian": "autograd" if self.autograd else "finite_difference"}
        return {"kind": "oracle", **self.spec["oracle"], "hessian": "finite_difference"}

    def label(self, structures: Sequence[Atoms], rows: int, fd_step: float, rng: np.random.Generator,
              timeout: float | None = None, retries: int = 0) -> list[Atoms]:
        """Teacher labels (and ``rows`` Hessian rows each) of ``structures``; a structure the
        oracle cannot label is dropped with a warning."""
        labelled = self._model_labels(structures) if self.model is not None else self._oracle_labels(
            structures, timeout, retries)
        indices = [pick_rows(len(a), rows, rng) if rows else None for a in labelled]
        if rows and self.autograd:
            self._autograd_rows(labelled, indices)
        elif rows:
            for atoms, index in zip(labelled, indices):
                attach_hessian_rows(atoms, index, fd_hessian_rows(atoms, self.calculator, index, step=fd_step))
        return labelled

    def _model_labels(self, structures: Sequence[Atoms]) -> list[Atoms]:
        """One batched forward pass for the whole chunk (stress when every cell is periodic)."""
        from ..analysis.evaluate import predicted_batches
        from ..analysis.physics import _potential_of
        from ..data.graph import GraphDataset

        dtype = next(p.dtype for p in self.model.parameters() if p.is_floating_point())
        bare = [_bare(a) for a in structures]
        dataset = GraphDataset(bare, _potential_of(self.model).cutoff, dtype=dtype, source="distill configurations",
                               fields=self.registry.fields)
        periodic = all(bool(a.pbc.all()) for a in bare)
        (batch, outputs), = predicted_batches(self.model, dataset, len(bare), compute_stress=periodic,
                                              head=self.spec.get("head"))
        energy = outputs[K.ENERGY].double().numpy()
        forces = outputs[K.FORCES].double().numpy()
        stress = outputs[K.STRESS].double().numpy() if periodic else None
        starts = np.concatenate([[0], np.cumsum([len(a) for a in bare])])
        return [attach_labels(a, energy=float(energy[b]), forces=forces[starts[b]:starts[b + 1]],
                              stress=None if stress is None else stress[b]) for b, a in enumerate(bare)]

    def _oracle_labels(self, structures: Sequence[Atoms], timeout: float | None, retries: int) -> list[Atoms]:
        out = []
        for k, atoms in enumerate(structures):
            result = label_safely(self.oracle, _bare(atoms), key=str(k), timeout=timeout, retries=retries)
            if not result.ok:
                _log.warning("teacher oracle failed on a configuration (%s); it is left out", result.error)
                continue
            labelled = result.atoms
            labelled.info.update({k: v for k, v in atoms.info.items() if k not in labelled.info})
            out.append(labelled)
        return out

    def _autograd_rows(self, structures: Sequence[Atoms], indices: Sequence[np.ndarray]) -> None:
        from ..data.fields import collate
        from ..data.graph import atoms_to_graph
        from ..model.potential import with_head

        dtype = next(p.dtype for p in self.model.parameters() if p.is_floating_point())
        graphs = [atoms_to_graph(a, self.model.cutoff, dtype=dtype) for a in structures]
        batch = with_head(self.model, collate(graphs), self.spec.get("head"))
        rows = hessian_rows(self.model, batch, torch.as_tensor(np.stack(indices))).detach().double().numpy()
        start = 0
        for atoms, index in zip(structures, indices):
            attach_hessian_rows(atoms, index, rows[start:start + len(atoms)])
            start += len(atoms)


def _bare(atoms: Atoms) -> Atoms:
    """A label-free copy keeping provenance (sampler, temperature …) in ``info``."""
    out = Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
    out.info.update({k: v for k, v in atoms.info.items() if not k.startswith("REF_") and k not in ("energy", "stress")})
    return out


def _file_hash(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# -- configurations and labels --------------------------------------------------------------------
def sample_configurations(config: DistillConfig, teacher: Teacher, registry: Registry) -> list[Atoms]:
    """The data's structures (if ``include_data``) plus every sampler's frames run with the
    teacher from ``starts`` random data structures; unphysical frames dropped; capped."""
    from .train import load_source

    rng = np.random.default_rng(config.seed)
    data = [_bare(a) for a in load_source(registry, config.data, config.base_dir)]
    if not data:
        raise ConfigError("configurations.data holds no structures")
    for a in data:
        a.info["sampler"] = "data"
    starts = [data[i] for i in rng.permutation(len(data))[: config.starts]]
    frames = list(data) if config.include_data else []
    for k, sampler in enumerate(config.sampling):
        options = {key: v for key, v in sampler.items() if key != "name"}
        explorer = registry.get(PluginKind.EXPLORER, sampler["name"]).factory(**options)
        found = explorer.explore(starts, teacher.calculator, hi=None, seed=config.seed + 1000 * (k + 1))
        for frame in found:
            frame.info["sampler"] = sampler["name"]
        frames.extend(found)
        _log.info("distill: sampler %r proposed %d configurations", sampler["name"], len(found))
    kept = [f for f in frames if unphysical_reason(f, config.min_distance_ratio) is None]
    if len(kept) < len(frames):
        _log.warning("distill: %d unphysical configuration(s) dropped (atoms closer than %s × covalent radii)",
                     len(frames) - len(kept), config.min_distance_ratio)
    if config.max_structures is not None and len(kept) > config.max_structures:
        kept = [kept[i] for i in sorted(rng.permutation(len(kept))[: config.max_structures])]
    return kept


def labels_key(config: DistillConfig, identity: Mapping[str, Any]) -> str:
    """Hash of everything the teacher labels depend on: the teacher, the data, the sampling, the
    Hessian settings and the seed. Student runs with the same key share one label file."""
    data = {"source": config.data.source, "options": config.data.options}
    payload = {"teacher": {k: v for k, v in identity.items() if k != "path"}, "data": data,
               "sampling": config.sampling, "starts": config.starts, "include_data": config.include_data,
               "max_structures": config.max_structures, "min_distance_ratio": config.min_distance_ratio,
               "hessian_rows": config.hessian_rows, "fd_step": config.fd_step, "seed": config.seed}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def teacher_labels(config: DistillConfig, registry: Registry, teacher: Teacher | None = None) -> Path:
    """The teacher-labelled configurations (computed once per :func:`labels_key`, resumable)."""
    teacher = teacher or Teacher(config.teacher, registry)
    identity = teacher.identity()
    folder = (config.labels_dir or config.output / "labels") / labels_key(config, identity)
    folder.mkdir(parents=True, exist_ok=True)
    manifest_path, labels_path = folder / "manifest.json", folder / "teacher.extxyz"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    if manifest.get("complete"):
        _log.info("distill: reusing %d teacher labels in %s", manifest["labelled"], labels_path)
        return labels_path
    configs_path = folder / "configurations.extxyz"
    started = time.perf_counter()
    if not configs_path.exists():
        frames = sample_configurations(config, teacher, registry)
        write(str(configs_path) + ".tmp", frames, format="extxyz")
        os.replace(str(configs_path) + ".tmp", configs_path)
        manifest.update({"teacher": identity, "configurations": len(frames),
                         "sampling_seconds": time.perf_counter() - started})
        _write_json(manifest_path, manifest)
    frames = read(configs_path, index=":")
    done = _complete_frames(labels_path)
    labelled_before = len(done)
    rng = np.random.default_rng([config.seed, labelled_before])
    started = time.perf_counter()
    attempted = int(manifest.get("attempted", labelled_before))
    for start in range(attempted, len(frames), config.batch_size):
        chunk = frames[start:start + config.batch_size]
        labelled = teacher.label(chunk, config.hessian_rows, config.fd_step, rng,
                                 timeout=config.teacher.get("timeout"), retries=int(config.teacher.get("retries", 0)))
        _append(labels_path, labelled)
        manifest["attempted"] = start + len(chunk)
        manifest["labelled"] = len(done) + len(labelled)
        done += labelled
        _write_json(manifest_path, manifest)
    manifest.update({"complete": True, "labelled": len(done),
                     "labelling_seconds": manifest.get("labelling_seconds", 0.0) + time.perf_counter() - started,
                     "hessian_rows": config.hessian_rows})
    _write_json(manifest_path, manifest)
    return labels_path


def _complete_frames(path: Path) -> list[Atoms]:
    """The frames of an append-only extxyz; a torn last frame (a kill mid-write) is cut off."""
    if not path.exists():
        return []
    text = path.read_text()
    lines, frames, good_end, k = text.splitlines(keepends=True), 0, 0, 0
    while k < len(lines):
        try:
            n = int(lines[k].strip())
        except ValueError:
            break
        if k + 2 + n > len(lines) or not lines[k + 1 + n].endswith("\n"):
            break
        k += 2 + n
        frames += 1
        good_end = sum(len(line) for line in lines[:k])
    if good_end < len(text):
        path.write_text(text[:good_end])
    return read(path, index=":") if frames else []


def _append(path: Path, frames: Sequence[Atoms]) -> None:
    if not frames:
        return
    with open(path, "a") as handle:
        write(handle, list(frames), format="extxyz")
        handle.flush()
        os.fsync(handle.fileno())


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


# -- the student and the report -------------------------------------------------------------------
def student_config(config: DistillConfig, labels: Path) -> dict[str, Any]:
    """The student's ``atomforge train`` config: the user's block plus the teacher's labels."""
    raw = copy.deepcopy(config.student)
    data: dict[str, Any] = {"train": {"source": "ase", "path": str(labels)}, "valid_fraction": config.valid_fraction}
    if config.test is not None:
        data["test"] = {"source": config.test.source, **config.test.options}
    raw.update({"data": data, "output": str(config.output / "student"), "tracking": _student_tracking(config)})
    raw.setdefault("training", {}).setdefault("seed", config.seed)
    return raw


def _student_tracking(config: DistillConfig) -> Any:
    """The distill run's tracking, with the student's run named ``<output folder>-student`` (not
    plain ``student``, so several students can be told apart in one store) unless a name is given."""
    tracking = config.tracking
    if isinstance(tracking, str):
        tracking = {"name": tracking}
    if not isinstance(tracking, Mapping) or tracking.get("name", "mlflow") in ("none", None):
        return config.tracking
    return {"run_name": f"{config.output.name}-student", **tracking}


def call_seconds(calculator: Calculator, atoms: Atoms, calls: int = 20) -> float:
    """Median seconds of one energy+forces call (positions nudged each call, so nothing is cached)."""
    work = atoms.copy()
    work.calc = calculator
    rng = np.random.default_rng(0)
    base = atoms.positions.copy()
    times = []
    for _ in range(calls):
        work.positions = base + rng.normal(0.0, 1e-4, base.shape)
        start = time.perf_counter()
        work.get_forces()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _errors(calculator: Calculator, frames: Sequence[Atoms]) -> dict[str, float]:
    """Force MAE/RMSE (meV/Å) and energy MAE (meV/atom) of a calculator on labelled frames."""
    de, df = [], []
    for atoms in frames:
        work = atoms.copy()
        work.calc = calculator
        de.append((work.get_potential_energy() - atoms.get_potential_energy()) / len(atoms))
        df.append((work.get_forces() - atoms.get_forces()).reshape(-1))
    f = np.concatenate(df) * 1e3
    return {"forces_mae": float(np.abs(f).mean()), "forces_rmse": float(np.sqrt((f ** 2).mean())),
            "energy_mae": float(np.abs(de).mean() * 1e3)}


def report(config: DistillConfig, teacher: Teacher, model_path: Path, registry: Registry,
           labels: Path) -> dict[str, Any]:
    """Teacher vs student on the reference test set (when given) and per-call time of both."""
    from ..model.calculator import load_calculator
    from .train import load_source

    student = load_calculator(model_path, registry=registry)
    manifest = json.loads((labels.parent / "manifest.json").read_text())
    out: dict[str, Any] = {"teacher": teacher.identity(), "labels": str(labels),
                           "configurations": manifest.get("configurations"), "labelled": manifest.get("labelled"),
                           "labelling_seconds": manifest.get("labelling_seconds"),
                           "hessian_rows": config.hessian_rows, "student_model": str(model_path)}
    probe = read(labels, index="0")
    if config.test is not None:
        reference = list(load_source(registry, config.test, config.base_dir))
        out["test"] = {"student": _errors(student, reference), "teacher": _errors(teacher.calculator, reference),
                       "frames": len(reference)}
        out["test"]["forces_mae_ratio"] = out["test"]["student"]["forces_mae"] / max(
            out["test"]["teacher"]["forces_mae"], 1e-12)
        probe = reference[0]
    t_student, t_teacher = call_seconds(student, probe), call_seconds(teacher.calculator, probe, calls=5)
    out["call_seconds"] = {"atoms": len(probe), "student": t_student, "teacher": t_teacher,
                           "speedup": t_teacher / t_student if t_student > 0 else math.inf}
    out.update(_physics_side_by_side(config, teacher, model_path, registry, labels))
    return out


def _physics_side_by_side(config: DistillConfig, teacher: Teacher, model_path: Path, registry: Registry,
                          labels: Path) -> dict[str, Any]:
    """With ``student.evaluation.physics``: the teacher's physics metrics (NVE drift, stability,
    curl, rotation error) on the same structures as the student's, e.g. to show that a
    conservative student of a direct-force teacher conserves energy."""
    from ..analysis.physics import physics_metrics
    from .train import load_source

    settings = config_from_dict(student_config(config, labels), config.base_dir).evaluation
    if not settings.physics or teacher.model is None:
        return {}
    structures = list(load_source(registry, config.test, config.base_dir)) if config.test is not None else \
        read(labels, index=":")
    metrics_file = model_path.parent / "metrics.json"
    student = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
    return {"physics": {"teacher": physics_metrics(teacher.model, structures, settings),
                        "student": {k: v for k, v in student.items() if k.startswith("physics_")}}}


def _log_to_student_run(config: DistillConfig, registry: Registry, summary: Mapping[str, Any]) -> None:
    """The teacher's identity, the sampling and the comparison on the student's MLflow run."""
    from ..tracking import flatten
    from .train import make_tracker

    tracking_file = config.output / "student" / "tracking.json"
    run_id = json.loads(tracking_file.read_text()).get("run_id") if tracking_file.exists() else None
    if run_id is None:
        return
    student = config_from_dict(student_config(config, Path(summary["labels"])), config.base_dir)
    tracker = make_tracker(registry, student)
    tracker.start(run_name=student.tracking.run_name or "student", resume_run_id=run_id)
    try:
        params = {"distill.teacher": summary["teacher"], "distill.sampling": config.sampling,
                  "distill.hessian_rows": config.hessian_rows, "distill.configurations": summary["configurations"]}
        tracker.log_params(flatten(params))
        logged = {"test": summary.get("test", {}), "call_seconds": summary["call_seconds"],
                  "teacher_physics": summary.get("physics", {}).get("teacher", {})}
        metrics = {f"distill.{k}": float(v) for k, v in flatten(logged).items()
                   if isinstance(v, (int, float)) and math.isfinite(float(v))}
        tracker.log_metrics(metrics)
        tracker.log_dict(dict(summary), "distill.json")
    finally:
        tracker.end()


def distill(config: DistillConfig, registry: Registry, *, verbose: bool = True) -> DistillOutcome:
    """Sample, label with the teacher (or reuse its labels), train the student, report."""
    from .train import train

    config.output.mkdir(parents=True, exist_ok=True)
    teacher = Teacher(config.teacher, registry)
    labels = teacher_labels(config, registry, teacher)
    if config.hessian_rows and not any(_term_name(t) == "hessian" for t in config.student.get("loss") or []):
        _log.warning("distill: the labels carry %d Hessian rows per structure but the student's loss has no "
                     "'hessian' term; add {name: hessian, weight: ...} to use them", config.hessian_rows)
    outcome = train(config_from_dict(student_config(config, labels), config.base_dir), registry, verbose=verbose)
    summary = report(config, teacher, Path(outcome.model_path), registry, labels)
    _write_json(config.output / "distill.json", summary)
    _log_to_student_run(config, registry, summary)
    return DistillOutcome(labels, Path(outcome.model_path), summary)


def _term_name(term: Any) -> str:
    return term if isinstance(term, str) else str(_mapping(term, "student.loss[]").get("name", ""))
