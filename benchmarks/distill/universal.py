"""Distillation benchmark 2 (issue 19), "universal teacher": SevenNet-0 (or CHGNet) → small PaiNN
students on one material system made here, a binary fcc alloy (default Cu–Au) that ASE's EMT
covers, so that a *reference oracle* (EMT) labels the same held-out structures.

Structures (``<out>/data/``, fixed seeds independent of ``--seeds``):

* ``train.extxyz`` — ``--n-train`` 32-atom cells (2×2×2 conventional fcc), composition x of the
  second element uniform in 0.1–0.9 per cell (random sites, Vegard lattice constant), a random
  symmetric strain with every component in ±3 % (shear included), a Gaussian rattle with σ uniform
  in 0.02–0.15 Å; unlabelled (the teacher labels them);
* ``test.extxyz`` — ``--n-test`` cells of the same distribution, another seed; EMT labels;
* ``hot.extxyz`` — ``--n-hot`` 108-atom cells (3×3×3), strain ±6 %, rattle σ 0.10–0.20 Å: out of
  the training distribution in strain, rattle and cell size; EMT labels;
* ``timing_<n>.extxyz`` — x = 0.5 cells of 32, 500 (5×5×5) and 1024 (8×8×4) atoms for timing.

Teacher: the ``sevenn`` (7net-0) or ``chgnet`` (0.3.0) oracle plugin, through ``atomforge distill``:
configurations = the training cells + teacher MD (the ``md`` explorer, Langevin at
``--md-temperatures`` from ``--md-starts`` cells) with distill's physical sanity cut; labels cached in
``<out>/labels/`` (distill's ``labels.dir``) and shared by every student. ``--rows R`` adds students
trained with R Hessian rows per structure (the ``hessian`` loss); an oracle's rows are central
differences of its forces, 2 teacher calls per row per structure, on the *same* configurations
(the Hessian label set's data is the plain set's ``configurations.extxyz``, so the teacher MD is
not run twice). The seconds per row are measured from the two label sets and reported.

Students: PaiNN ``--students`` (default 16x2 and 32x2), ``--student-seconds`` of training each, one
thread, training seed = each of ``--seeds`` (the labels are the same for all seeds).

Evaluation (``<out>/eval/<teacher>/s<seed>.json``, logged onto each student's MLflow run; the
teacher's own zero-shot errors on a run of its own): force MAE / RMSE (meV/Å, all components),
per-frame force-RMSE p95 / p99 / max, energy MAE (meV/atom) on ``test`` and ``hot``, each **against the
teacher's labels** (what the student is trained to reproduce) **and against EMT** (the reference
oracle). EMT and the teacher are different levels of theory (an effective-medium model vs a
PBE-trained universal potential), so the teacher's error against EMT is a disagreement between
methods, not an error of the teacher, and a student cannot be expected to beat it: the student's
target is the teacher. Absolute energies of two methods differ by a per-element reference, so
``energy_mae_offset_fit`` removes a per-element constant fitted (least squares) on the compared
set itself before the MAE; ``energy_mae`` is raw. Time per calculator call (ms, ``get_forces``,
one thread; :func:`benchmarks._bench_timing.median_call_ms`) at each ``--timing-sizes`` size,
teacher and students **interleaved** over ``--rounds`` rounds, median over rounds.

    cd /work/main && . .venv/bin/activate
    taskset -c 0 python benchmarks/distill/universal.py run --seeds 0 1 --teacher sevenn
    python benchmarks/distill/universal.py summary
    python benchmarks/distill/universal.py run --dry-run      # tiny sizes, a few minutes

Every step is skipped when its output exists, so a killed run continues where it stopped.
Outputs: run folders in ``benchmarks/distill/results-universal/`` (git-ignored; MLflow store
``mlflow.db`` there); ``results.json`` and ``summary.md`` in ``docs/benchmarks/issue19/universal/``.
A dry run writes to ``results-universal-dry/`` and its report to ``results-universal-dry/report/``.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import yaml
from ase import Atoms
from ase.build import bulk
from ase.data import atomic_numbers
from ase.io import read, write

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "benchmarks"))
from _bench_timing import median_call_ms  # noqa: E402
from run import LOSS, _run, _training  # noqa: E402  (benchmark 1/3 driver: loss, training block, runner)

EXPERIMENT = "issue19-distill-universal"
TEACHERS = {"sevenn": {"name": "sevenn", "model": "7net-0"}, "chgnet": {"name": "chgnet", "model": "0.3.0"}}
LATTICE = {"Al": 4.050, "Ni": 3.524, "Cu": 3.615, "Pd": 3.891, "Ag": 4.086, "Pt": 3.924, "Au": 4.078}  # Å, fcc, expt.
TIMING_REPEATS = {32: (2, 2, 2), 108: (3, 3, 3), 500: (5, 5, 5), 1024: (8, 8, 4)}
SETS = ("test", "hot")
FIXED = ("elements", "n_train", "n_test", "n_hot", "md_starts", "md_steps", "md_interval", "md_temperatures",
         "student_seconds", "hessian_weight", "timing_sizes", "rounds", "valid_fraction")  # one per results folder
REAL = {"n_train": 400, "n_test": 100, "n_hot": 40, "md_starts": 4, "md_steps": 250, "md_interval": 10,
        "student_seconds": 600.0, "timing_sizes": [32, 500, 1024], "rounds": 3, "valid_fraction": 0.05}
DRY = {"n_train": 8, "n_test": 4, "n_hot": 2, "md_starts": 1, "md_steps": 10, "md_interval": 5,
       "student_seconds": 15.0, "timing_sizes": [32, 500], "rounds": 1, "valid_fraction": 0.2}


# -- structures -----------------------------------------------------------------------------------
def alloy_cell(rng: np.random.Generator, elements: Sequence[str], repeat: Sequence[int], *, x: float,
               strain: float, rattle: float) -> Atoms:
    """An fcc A(1−x)B(x) cell: random sites, Vegard lattice constant, symmetric strain with every
    component uniform in ±``strain`` (normal and shear), Gaussian rattle of σ ``rattle`` Å."""
    first, second = elements
    a = (1 - x) * LATTICE[first] + x * LATTICE[second]
    atoms = bulk(first, "fcc", a=a, cubic=True).repeat(tuple(repeat))
    numbers = np.full(len(atoms), atomic_numbers[first])
    numbers[rng.permutation(len(atoms))[: int(round(x * len(atoms)))]] = atomic_numbers[second]
    atoms.numbers = numbers
    eps = rng.uniform(-strain, strain, (3, 3))
    atoms.set_cell(atoms.cell[:] @ (np.eye(3) + (eps + eps.T) / 2), scale_atoms=True)
    atoms.positions += rng.normal(0.0, rattle, atoms.positions.shape)
    atoms.info.update({"x": float(np.mean(numbers == atomic_numbers[second])), "rattle": rattle, "strain_max": strain})
    return atoms


def make_set(seed: int, n: int, elements: Sequence[str], repeat: Sequence[int], strain: float,
             rattle: tuple[float, float]) -> list[Atoms]:
    """``n`` cells with x uniform in 0.1–0.9 and σ uniform in ``rattle``."""
    rng = np.random.default_rng(seed)
    return [alloy_cell(rng, elements, repeat, x=rng.uniform(0.1, 0.9), strain=strain,
                       rattle=rng.uniform(*rattle)) for _ in range(n)]


def _write_atomic(path: Path, frames: Sequence[Atoms]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(str(tmp), list(frames), format="extxyz")
    os.replace(tmp, path)


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def _label(oracle: Any, frames: Sequence[Atoms]) -> list[Atoms]:
    return [oracle.label(a) for a in frames]


def make_structures(args: argparse.Namespace, registry: Any) -> None:
    """train (unlabelled), test and hot (EMT labels), timing cells; skipped when present."""
    from atomforge import PluginKind

    data = args.out / "data"
    emt = registry.get(PluginKind.ORACLE, "emt").factory()
    plans = {"train": (1, args.n_train, (2, 2, 2), 0.03, (0.02, 0.15), False),
             "test": (2, args.n_test, (2, 2, 2), 0.03, (0.02, 0.15), True),
             "hot": (3, args.n_hot, (3, 3, 3), 0.06, (0.10, 0.20), True)}
    for name, (seed, n, repeat, strain, rattle, labelled) in plans.items():
        if not (data / f"{name}.extxyz").exists():
            frames = make_set(seed, n, args.elements, repeat, strain, rattle)
            _write_atomic(data / f"{name}.extxyz", _label(emt, frames) if labelled else frames)
    for size in args.timing_sizes:
        if not (data / f"timing_{size}.extxyz").exists():
            rng = np.random.default_rng(4)
            _write_atomic(data / f"timing_{size}.extxyz",
                          [alloy_cell(rng, args.elements, TIMING_REPEATS[size], x=0.5, strain=0.01, rattle=0.05)])


# -- distill runs ---------------------------------------------------------------------------------
def _tracking(args: argparse.Namespace) -> dict:
    return {"name": "mlflow", "experiment": EXPERIMENT, "tracking_uri": f"sqlite:///{args.out / 'mlflow.db'}"}


def _configurations(args: argparse.Namespace, rows: int) -> dict:
    """The plain set: training cells + teacher MD. The Hessian set: the plain set's frames as data."""
    if rows:
        base = Path(json.loads((args.out / "eval" / args.teacher / "labels.json").read_text())["0"]["labels"])
        return {"data": str(base.parent / "configurations.extxyz"), "starts": args.md_starts, "include_data": True,
                "sampling": [], "min_distance_ratio": 0.5}
    md = {"name": "md", "temperatures": args.md_temperatures, "steps": args.md_steps, "interval": args.md_interval,
          "timestep_fs": 2.0}
    return {"data": str(args.out / "data" / "train.extxyz"), "starts": args.md_starts, "include_data": True,
            "sampling": [md], "min_distance_ratio": 0.5}


def _arm(width: int, layers: int, rows: int) -> str:
    return f"painn{width}x{layers}" + (f"-h{rows}" if rows else "")


def distill_config(args: argparse.Namespace, output: Path, seed: int, width: int, layers: int, rows: int) -> dict:
    """An ``atomforge distill`` config; the label settings depend on ``rows`` only (shared cache)."""
    loss = LOSS + ([{"name": "hessian", "weight": args.hessian_weight, "rows": min(rows, 2)}] if rows else [])
    model = {"backbone": "painn", "cutoff": 5.0, "hidden_channels": width, "num_layers": layers, "num_rbf": 16}
    return {"output": str(output), "teacher": {"oracle": dict(TEACHERS[args.teacher]), "timeout": 600},
            "configurations": _configurations(args, rows),
            "labels": {"hessian_rows": rows, "batch_size": 16, "dir": str(args.out / "labels")},
            "student": {"model": model, "loss": loss, "training": _training(args.student_seconds, seed)},
            "valid_fraction": args.valid_fraction, "seed": 0, "tracking": _tracking(args)}


def _write_config(args: argparse.Namespace, name: str, raw: dict) -> Path:
    path = args.out / "configs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def teacher_label_set(args: argparse.Namespace, rows: int) -> dict:
    """``atomforge distill --labels-only`` for ``rows`` Hessian rows; its manifest (cached)."""
    record_path = args.out / "eval" / args.teacher / "labels.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    if str(rows) not in record:
        (width, layers), name = args.students[0], f"labels-{args.teacher}-h{rows}"
        config = _write_config(args, name, distill_config(args, args.out / "labels-runs" / name, 0, width, layers, rows))
        stdout = args.out / "logs" / f"{name}.stdout"
        stdout.parent.mkdir(parents=True, exist_ok=True)
        with stdout.open("w") as out, (args.out / "logs" / f"{name}.log").open("a") as err:
            done = subprocess.run([sys.executable, "-m", "atomforge", "distill", str(config), "--labels-only", "--quiet"],
                                  stdout=out, stderr=err, check=False)
        found = re.findall(r'"labels":\s*"([^"]+)"', stdout.read_text())
        if done.returncode != 0 or not found:
            raise SystemExit(f"labelling with {args.teacher} failed; see {stdout} and {err.name}")
        manifest = json.loads((Path(found[-1]).parent / "manifest.json").read_text())
        record[str(rows)] = {"labels": found[-1], **manifest}
        _write_json(record_path, record)
    return record[str(rows)]


def student_run(args: argparse.Namespace, seed: int, width: int, layers: int, rows: int) -> Path:
    """One ``atomforge distill`` student on the cached labels (skipped when done)."""
    arm = _arm(width, layers, rows)
    out = args.out / "students" / args.teacher / arm / f"s{seed}"
    if not ((out / "student" / "model.pt").exists() and (out / "distill.json").exists()):
        name = f"{args.teacher}-{arm}-s{seed}"
        config = _write_config(args, name, distill_config(args, out, seed, width, layers, rows))
        _run([sys.executable, "-m", "atomforge", "distill", str(config), "--quiet"], args.out / "logs" / f"{name}.log")
    return out


# -- evaluation -----------------------------------------------------------------------------------
def predict(calc: Any, frames: Sequence[Atoms]) -> list[tuple[float, np.ndarray]]:
    """Energy and forces of ``calc`` on every frame."""
    out = []
    for atoms in frames:
        work = Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
        work.calc = calc
        out.append((float(work.get_potential_energy()), np.array(work.get_forces())))
    return out


def error_metrics(predicted: Sequence[tuple[float, np.ndarray]], reference: Sequence[Atoms]) -> dict:
    """Forces in meV/Å (all components; per-frame RMSE percentiles), energies in meV/atom (raw and
    after a per-element offset fitted on this set: two methods' energy zeros differ)."""
    diffs = [p[1] - r.get_forces() for p, r in zip(predicted, reference)]
    flat = np.concatenate([d.reshape(-1) for d in diffs]) * 1e3
    frame = np.array([np.sqrt(np.mean(d ** 2)) for d in diffs]) * 1e3
    de = np.array([p[0] - r.get_potential_energy() for p, r in zip(predicted, reference)])
    n_atoms = np.array([len(r) for r in reference], dtype=float)
    species = sorted({int(z) for r in reference for z in r.numbers})
    counts = np.array([[np.sum(r.numbers == z) for z in species] for r in reference], dtype=float)
    offset, *_ = np.linalg.lstsq(counts, de, rcond=None)
    return {"force_mae": float(np.mean(np.abs(flat))), "force_rmse": float(np.sqrt(np.mean(flat ** 2))),
            "frame_rmse_p95": float(np.percentile(frame, 95)), "frame_rmse_p99": float(np.percentile(frame, 99)),
            "frame_rmse_max": float(frame.max()), "energy_mae": float(np.mean(np.abs(de / n_atoms)) * 1e3),
            "energy_mae_offset_fit": float(np.mean(np.abs((de - counts @ offset) / n_atoms)) * 1e3),
            "frames": len(reference)}


def _oracle(args: argparse.Namespace, registry: Any) -> Any:
    from atomforge import PluginKind

    options = {k: v for k, v in TEACHERS[args.teacher].items() if k != "name"}
    return registry.get(PluginKind.ORACLE, args.teacher).factory(**options)


def teacher_sets(args: argparse.Namespace, registry: Any) -> dict[str, list[Atoms]]:
    """The teacher's labels of test and hot (computed once per teacher, cached)."""
    out, oracle = {}, None
    for name in SETS:
        path = args.out / "data" / f"teacher-{args.teacher}" / f"{name}.extxyz"
        if not path.exists():
            oracle = oracle or _oracle(args, registry)
            frames = read(args.out / "data" / f"{name}.extxyz", ":")
            _write_atomic(path, _label(oracle, [Atoms(a.numbers, a.positions, cell=a.cell, pbc=a.pbc) for a in frames]))
        out[name] = read(path, ":")
    return out


def _calls(size: int) -> tuple[int, int]:
    """(timed calls, warm-up calls) per round: ~600 atom-calls timed, 1 warm-up at most sizes."""
    calls = max(1, min(20, 600 // size))
    return calls, max(1, calls // 4)


def timing(args: argparse.Namespace, calcs: dict[str, Any]) -> dict:
    """ms per call, every model and size interleaved within each round; median/min/max over rounds."""
    cells = {size: read(args.out / "data" / f"timing_{size}.extxyz") for size in args.timing_sizes}
    times: dict = {name: {size: [] for size in cells} for name in calcs}
    for round_ in range(args.rounds):
        for name, calc in calcs.items():
            for size, atoms in cells.items():
                times[name][size].append(median_call_ms(calc, atoms, *_calls(size), seed=round_))
    return {name: {str(size): {"median": float(np.median(v)), "min": float(np.min(v)), "max": float(np.max(v))}
                   for size, v in sizes.items()} for name, sizes in times.items()}


def evaluate(args: argparse.Namespace, registry: Any, seed: int, students: dict[str, Path]) -> dict:
    """Errors of every student (vs teacher and EMT) and timing of teacher + students, one process."""
    import torch

    import atomforge

    path = args.out / "eval" / args.teacher / f"s{seed}.json"
    cached = json.loads(path.read_text()) if path.exists() else {}
    if set(cached.get("students", {})) == set(students):  # a new arm (e.g. --rows) re-evaluates the seed
        return cached
    torch.set_num_threads(1)
    reference = {name: read(args.out / "data" / f"{name}.extxyz", ":") for name in SETS}
    teacher = teacher_sets(args, registry)
    calcs = {"teacher": _oracle(args, registry).make_calculator()}
    result: dict = {"seed": seed, "teacher": args.teacher, "threads": 1, "torch": torch.__version__, "students": {}}
    for arm, folder in students.items():
        calcs[arm] = atomforge.load_calculator(folder / "student" / "model.pt")
        result["students"][arm] = {"run": str(folder)}
        for name in SETS:
            predicted = predict(calcs[arm], reference[name])
            result["students"][arm][name] = {"vs_teacher": error_metrics(predicted, teacher[name]),
                                             "vs_emt": error_metrics(predicted, reference[name])}
    result["timing_ms"] = timing(args, calcs)
    _write_json(path, result)
    _log_student_runs(args, registry, result)
    return result


def _tracker(args: argparse.Namespace, registry: Any) -> Any:
    from atomforge import PluginKind

    track = _tracking(args)
    return registry.get(PluginKind.TRACKER, "mlflow").factory(run_dir=args.out, experiment=track["experiment"],
                                                             tracking_uri=track["tracking_uri"])


def _flat_metrics(prefix: str, data: dict) -> dict[str, float]:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flat_metrics(f"{prefix}.{key}", value))
        elif isinstance(value, (int, float)) and np.isfinite(value):
            out[f"{prefix}.{key}"] = float(value)
    return out


def _log_student_runs(args: argparse.Namespace, registry: Any, result: dict) -> None:
    """Each student's errors, its time per call and its speed-up onto its own MLflow run."""
    teacher_ms = result["timing_ms"]["teacher"]
    for arm, evaluation in result["students"].items():
        tracking = Path(evaluation["run"]) / "student" / "tracking.json"
        run_id = json.loads(tracking.read_text()).get("run_id") if tracking.exists() else None
        tracker, name = _tracker(args, registry), f"{args.teacher}-{arm}-s{result['seed']}"
        tracker.start(run_name=name, resume_run_id=run_id)
        try:
            tracker.set_tags({"mlflow.runName": name})  # distill names every student run "student"
            ms = result["timing_ms"][arm]
            metrics = _flat_metrics("universal", {k: v for k, v in evaluation.items() if k in SETS})
            metrics.update({f"universal.ms_per_call.{n}": t["median"] for n, t in ms.items()})
            metrics.update({f"universal.teacher_ms_per_call.{n}": t["median"] for n, t in teacher_ms.items()})
            metrics.update({f"universal.speedup.{n}": teacher_ms[n]["median"] / t["median"] for n, t in ms.items()})
            tracker.log_metrics(metrics)
            tracker.log_params({"universal.teacher": args.teacher, "universal.arm": arm})
        finally:
            tracker.end()


def teacher_zero_shot(args: argparse.Namespace, registry: Any) -> dict:
    """The teacher's own labels against EMT on test and hot, on an MLflow run of its own (once)."""
    path = args.out / "eval" / args.teacher / "teacher.json"
    if path.exists():
        return json.loads(path.read_text())
    teacher = teacher_sets(args, registry)
    result: dict = {}
    for name in SETS:
        emt = read(args.out / "data" / f"{name}.extxyz", ":")
        result[name] = {"vs_emt": error_metrics([(a.get_potential_energy(), a.get_forces()) for a in teacher[name]], emt)}
    tracker = _tracker(args, registry)
    result["mlflow_run_id"] = tracker.start(run_name=f"teacher-{args.teacher}-zero-shot")
    try:
        tracker.log_params({"teacher.oracle": json.dumps(TEACHERS[args.teacher]), "elements": "-".join(args.elements)})
        tracker.log_metrics(_flat_metrics("teacher", {k: v for k, v in result.items() if k in SETS}))
    finally:
        tracker.end()
    _write_json(path, result)
    return result


# -- driver and report ----------------------------------------------------------------------------
def run(args: argparse.Namespace) -> None:
    from atomforge import make_registry

    registry = make_registry()
    _check_fixed_settings(args)
    _write_json(args.out / "eval" / args.teacher / "settings.json", _settings(args))
    make_structures(args, registry)
    teacher_label_set(args, 0)
    if args.rows:
        teacher_label_set(args, args.rows)
    teacher_zero_shot(args, registry)
    for seed in args.seeds:
        students = {_arm(w, l, r): student_run(args, seed, w, l, r)
                    for r in ([0, args.rows] if args.rows else [0]) for w, l in args.students}
        evaluate(args, registry, seed, students)
    summary(args)


def _check_fixed_settings(args: argparse.Namespace) -> None:
    """Cached steps are found by file name, so one results folder holds one setting of the sizes,
    budgets and timing (seeds, students, --rows and the teacher may grow between runs)."""
    path = args.out / "settings.json"
    now = json.loads(json.dumps({k: getattr(args, k) for k in FIXED}))
    before = json.loads(path.read_text()) if path.exists() else now
    changed = {k: (before.get(k), now[k]) for k in FIXED if before.get(k) != now[k]}
    if changed:
        raise SystemExit(f"{args.out} holds a run made with other settings {changed} (before, now); "
                         "give another --out or the same settings")
    _write_json(path, now)


def _settings(args: argparse.Namespace) -> dict:
    """The command line of a run (JSON-ready), kept per teacher for the report."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def _label_costs(labels: dict, teacher_ms: float | None) -> dict:
    """Sampling and labelling seconds of each label set; seconds per Hessian row (measured: the
    extra labelling time per structure of the row set over the plain set, per row; and expected:
    2 teacher calls at the timed 32-atom cost)."""
    out = {rows: {k: labels[rows].get(k) for k in ("configurations", "labelled", "sampling_seconds",
                                                     "labelling_seconds", "hessian_rows", "labels")}
           for rows in labels}
    plain = labels.get("0")
    for rows, record in labels.items():
        r = int(rows)
        if r and plain and record.get("labelled") and plain.get("labelled"):
            extra = record["labelling_seconds"] / record["labelled"] - plain["labelling_seconds"] / plain["labelled"]
            out[rows]["seconds_per_row_measured"] = extra / r
            out[rows]["seconds_per_row_expected"] = None if teacher_ms is None else 2 * teacher_ms / 1e3
    return out


def _aggregate(per_seed: dict) -> dict:
    """Mean and std over seeds of every student metric (errors and ms per call)."""
    arms = sorted({arm for e in per_seed.values() for arm in e["students"]})
    out: dict = {}
    for arm in arms:
        rows = [(_flat_metrics("", {k: v for k, v in e["students"][arm].items() if k in SETS}),
                 {f".ms.{n}": t["median"] for n, t in e["timing_ms"][arm].items()}) for e in per_seed.values()
                if arm in e["students"]]
        merged = [{**a, **b} for a, b in rows]
        out[arm] = {k[1:]: {"mean": float(np.mean([m[k] for m in merged])), "std": float(np.std([m[k] for m in merged])),
                            "n": len(merged)} for k in merged[0]}
    return out


def summary(args: argparse.Namespace) -> None:
    """results.json and summary.md from the evaluations, label manifests and teacher runs."""
    results: dict = {"teachers": {}}
    for folder in sorted((args.out / "eval").glob("*")):
        per_seed = {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("s*.json"))}
        labels = json.loads((folder / "labels.json").read_text()) if (folder / "labels.json").exists() else {}
        zero = json.loads((folder / "teacher.json").read_text()) if (folder / "teacher.json").exists() else {}
        ms32 = [e["timing_ms"]["teacher"].get("32", {}).get("median") for e in per_seed.values()]
        ms32 = [m for m in ms32 if m is not None]
        settings = folder / "settings.json"
        results["teachers"][folder.name] = {
            "oracle": TEACHERS.get(folder.name), "settings": json.loads(settings.read_text()) if settings.exists() else None,
            "zero_shot_vs_emt": zero, "labels": _label_costs(
                labels, float(np.median(ms32)) if ms32 else None),
            "per_seed": per_seed, "students_mean": _aggregate(per_seed) if per_seed else {}}
    args.report.mkdir(parents=True, exist_ok=True)
    _write_json(args.report / "results.json", results)
    text = "\n".join(_markdown(args, results)) + "\n"
    (args.report / "summary.md").write_text(text)
    print(text)


def _fmt(value: Any, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _markdown(args: argparse.Namespace, results: dict) -> list[str]:
    lines = [f"# Issue 19, benchmark 2: universal teacher → small PaiNN ({'-'.join(args.elements)} fcc alloy)", "",
             "Forces in meV/Å (MAE/RMSE over all components; p95/p99 of the per-frame force RMSE), energies in "
             "meV/atom. `vs teacher`: against the teacher's own labels of the same structures (what the student is "
             "trained to reproduce). `vs EMT`: against ASE's EMT, the reference oracle here — a *different level of "
             "theory* than the PBE-trained teacher, so the teacher's own disagreement with EMT is the floor a student "
             "of it can reach there; energies vs EMT after a per-element offset fitted on the set. "
             "`test`: 32-atom cells of the training distribution; `hot`: 108-atom cells, strain ±6 %, rattle "
             "0.10–0.20 Å. Time per `get_forces` call in ms, one thread, teacher and students interleaved, median "
             "over rounds.", ""]
    for teacher, block in results["teachers"].items():
        lines += [f"## Teacher: {teacher} {block.get('oracle')}", ""]
        lines += _zero_shot_lines(block.get("zero_shot_vs_emt", {}))
        lines += _label_lines(block.get("labels", {}))
        lines += _error_lines(block["per_seed"])
        lines += _mean_lines(block.get("students_mean", {}))
        lines += _timing_lines(block["per_seed"])
    return lines


def _zero_shot_lines(zero: dict) -> list[str]:
    if not zero:
        return []
    lines = ["Teacher (zero-shot) vs EMT:", "", "| set | F-MAE | F-RMSE | p95 | p99 | E-MAE (offset fit) |",
             "|---|---|---|---|---|---|"]
    for name in SETS:
        e = zero[name]["vs_emt"]
        lines.append(f"| {name} | {_fmt(e['force_mae'])} | {_fmt(e['force_rmse'])} | {_fmt(e['frame_rmse_p95'])} | "
                     f"{_fmt(e['frame_rmse_p99'])} | {_fmt(e['energy_mae_offset_fit'])} |")
    return lines + [""]


def _label_lines(labels: dict) -> list[str]:
    lines = []
    for rows, r in labels.items():
        lines.append(f"Labels with {rows} Hessian rows: {r.get('configurations')} configurations, {r.get('labelled')} "
                     f"labelled; teacher MD sampling {_fmt(r.get('sampling_seconds'), 0)} s, labelling "
                     f"{_fmt(r.get('labelling_seconds'), 0)} s.")
        if "seconds_per_row_measured" in r:
            lines.append(f"Cost of one Hessian row (finite differences, 2 teacher calls): "
                         f"{_fmt(r['seconds_per_row_measured'], 2)} s per row per structure measured, "
                         f"{_fmt(r.get('seconds_per_row_expected'), 2)} s expected from the timed 32-atom call.")
    return lines + [""] if lines else []


def _error_lines(per_seed: dict) -> list[str]:
    lines = ["| seed | student | vs | test F-MAE | test F-RMSE | test p95 | test p99 | test E-MAE | hot F-MAE | "
             "hot F-RMSE | hot p95 | hot p99 | hot E-MAE |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for seed, e in per_seed.items():
        for arm, s in e["students"].items():
            for vs in ("vs_teacher", "vs_emt"):
                energy = "energy_mae" if vs == "vs_teacher" else "energy_mae_offset_fit"
                cells = [f"{_fmt(s[n][vs]['force_mae'])} | {_fmt(s[n][vs]['force_rmse'])} | "
                         f"{_fmt(s[n][vs]['frame_rmse_p95'])} | {_fmt(s[n][vs]['frame_rmse_p99'])} | "
                         f"{_fmt(s[n][vs][energy], 2)}" for n in SETS]
                lines.append(f"| {seed} | {arm} | {vs[3:]} | " + " | ".join(cells) + " |")
    return lines + [""]


def _mean_lines(means: dict) -> list[str]:
    """Force MAE and ms per call, mean ± std over seeds."""
    if not means:
        return []
    keys = [f"{n}.{vs}.force_mae" for vs in ("vs_teacher", "vs_emt") for n in SETS]
    sizes = sorted((k for k in next(iter(means.values())) if k.startswith("ms.")), key=lambda k: int(k[3:]))
    lines = ["Mean ± std over seeds:", "", "| student | seeds | " + " | ".join(f"{k.split('.')[0]} F-MAE {k.split('.')[1]}"
                                                                         for k in keys)
             + " | " + " | ".join(f"ms @ {k[3:]}" for k in sizes) + " |", "|---|---|" + "---|" * (len(keys) + len(sizes))]
    for arm, m in means.items():
        cells = [f"{_fmt(m[k]['mean'])} ± {_fmt(m[k]['std'])}" for k in keys]
        cells += [f"{_fmt(m[k]['mean'], 2)} ± {_fmt(m[k]['std'], 2)}" for k in sizes]
        lines.append(f"| {arm} | {m[keys[0]]['n']} | " + " | ".join(cells) + " |")
    return lines + [""]


def _timing_lines(per_seed: dict) -> list[str]:
    if not per_seed:
        return []
    sizes = list(next(iter(per_seed.values()))["timing_ms"]["teacher"])
    lines = ["| seed | model | " + " | ".join(f"ms @ {n} atoms (speed-up)" for n in sizes) + " |",
             "|---|---|" + "---|" * len(sizes)]
    for seed, e in per_seed.items():
        teacher = e["timing_ms"]["teacher"]
        for model, t in e["timing_ms"].items():
            cells = [f"{_fmt(t[n]['median'], 2)} ({_fmt(teacher[n]['median'] / t[n]['median'], 0)}×)" for n in sizes]
            lines.append(f"| {seed} | {model} | " + " | ".join(cells) + " |")
    return lines + [""]


def _students(text: Sequence[str]) -> list[tuple[int, int]]:
    out = []
    for item in text:
        width, _, layers = item.partition("x")
        out.append((int(width), int(layers)))
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bench", choices=("run", "summary"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="student training seeds")
    p.add_argument("--teacher", choices=sorted(TEACHERS), default="sevenn")
    p.add_argument("--elements", nargs=2, default=["Cu", "Au"], choices=sorted(LATTICE), help="the binary alloy")
    p.add_argument("--n-train", type=int, help="made 32-atom training cells (teacher MD adds frames); 400")
    p.add_argument("--n-test", type=int, help="held-out 32-atom cells; 100")
    p.add_argument("--n-hot", type=int, help="out-of-distribution 108-atom cells; 40")
    p.add_argument("--md-starts", type=int, help="teacher MD starting cells; 4")
    p.add_argument("--md-steps", type=int, help="teacher MD steps per trajectory (2 fs); 250")
    p.add_argument("--md-interval", type=int, help="keep every k-th MD frame; 10")
    p.add_argument("--md-temperatures", type=float, nargs="+", default=[500.0, 1000.0])
    p.add_argument("--students", nargs="+", default=["16x2", "32x2"], help="PaiNN WIDTHxLAYERS")
    p.add_argument("--student-seconds", type=float, help="training time per student; 600")
    p.add_argument("--rows", type=int, default=0, help="also train students on R Hessian rows per structure "
                   "(finite differences of the oracle: 2R extra teacher calls per structure); 0 = none")
    p.add_argument("--hessian-weight", type=float, default=0.1)
    p.add_argument("--timing-sizes", type=int, nargs="+", choices=sorted(TIMING_REPEATS), help="32 500 1024")
    p.add_argument("--rounds", type=int, help="interleaved timing rounds; 3")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes (a few minutes) into results-universal-dry/")
    p.add_argument("--out", type=Path)
    p.add_argument("--report", type=Path)
    args = p.parse_args(argv)
    for key, value in (DRY if args.dry_run else REAL).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.out = (args.out or HERE / ("results-universal-dry" if args.dry_run else "results-universal")).resolve()
    args.report = (args.report or (args.out / "report" if args.dry_run else
                                   ROOT / "docs" / "benchmarks" / "issue19" / "universal")).resolve()
    args.students = _students(args.students)
    if len(set(args.elements)) != 2:
        raise SystemExit("--elements: give two different elements")
    return args


def main() -> None:
    args = parse_args()
    {"run": run, "summary": summary}[args.bench](args)


if __name__ == "__main__":
    main()
