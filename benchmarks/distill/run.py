"""Distillation benchmarks (issue 19) on GFN2-xTB ethanol: speed for accuracy, and direct → conservative.

Data: ``benchmarks/ethanol/data-i16`` (950 training frames at 600 K; ``test`` = an independent 600 K
trajectory; ``test_1000K`` = a 1000 K one; ``ethanol_999`` = 111 molecules for timing). Every error
below is against those **reference xTB labels**, never the teacher's.

``speed``: teacher = ``--teacher`` (default: the 64×3 PaiNN of the ethanol benchmark,
``benchmarks/ethanol/results/i16-painn-s0/model.pt``). Students (PaiNN ``--student-width`` ×
``--student-layers``), each ``--student-seconds`` of training, one thread:

* ``reference``: the student architecture trained on the 950 reference labels (no teacher);
* ``distill``: on the teacher's labels of the 950 frames + teacher MD at 300/600/1000 K;
* ``distill_hessian``: the same configurations with 4 Hessian rows each and the ``hessian`` loss;
* ``few`` / ``few_hessian``: only ``--few`` configurations (the paper's few-configuration regime).

``conservation``: teacher = a direct-force transformer trained here on the 950 reference frames
(``--teacher-seconds``); student = a conservative PaiNN distilled from it; both run the same NVE
check (``--nve-ps`` ps at 0.5 fs from the first test frame) through ``student.evaluation.physics``.

    cd /work/main && . .venv/bin/activate
    taskset -c 0 python benchmarks/distill/run.py speed --seeds 0 1
    taskset -c 0 python benchmarks/distill/run.py conservation --seeds 0 1
    python benchmarks/distill/run.py summary

Outputs: run folders in ``benchmarks/distill/results/`` (git-ignored), the summary in
``docs/benchmarks/issue19/`` (``results.json``, ``summary.md``); timing and errors by
``benchmarks/ethanol/evaluate_models.py`` (teacher and students interleaved in one process).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
DATA = ROOT / "benchmarks" / "ethanol" / "data-i16"
LOSS = [{"name": "energy", "weight": 1.0}, {"name": "forces", "weight": 10.0}]


def _training(seconds: float, seed: int, lr: float = 3e-3) -> dict:
    return {"max_epochs": 100_000, "max_time": seconds, "batch_size": 4, "lr": lr, "seed": seed, "num_threads": 1,
            "ema_decay": 0.995, "scheduler": {"name": "cosine_time", "min_lr": 1e-5}}


def _student_model(args: argparse.Namespace) -> dict:
    return {"backbone": "painn", "cutoff": 5.0, "hidden_channels": args.student_width,
            "num_layers": args.student_layers, "num_rbf": 16}


def _run(command: list[str], log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    with log.open("a") as handle:
        done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed; see {log}")


def train_run(args: argparse.Namespace, name: str, raw: dict) -> Path:
    """``atomforge train`` (skipped when the model exists)."""
    out = args.out / name
    if not (out / "model.pt").exists():
        raw = {**raw, "output": str(out), "tracking": {"name": "mlflow", "experiment": "issue19-distill",
                                                       "tracking_uri": f"sqlite:///{args.out / 'mlflow.db'}"}}
        config = args.out / "configs" / f"{name.replace('/', '-')}.yaml"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(yaml.safe_dump(raw, sort_keys=False))
        _run([sys.executable, "-m", "atomforge", "train", str(config), "--quiet"], args.out / "logs" / f"{name.replace('/', '-')}.log")
    return out / "model.pt"


def distill_run(args: argparse.Namespace, name: str, teacher: Path, seed: int, *, rows: int, hessian_weight: float,
                max_structures: int | None, evaluation: dict | None = None, model: dict | None = None) -> Path:
    """``atomforge distill`` with the shared label cache (skipped when the student exists)."""
    out = args.out / name
    if (out / "student" / "model.pt").exists() and (out / "distill.json").exists():
        return out / "student" / "model.pt"
    loss = LOSS + ([{"name": "hessian", "weight": hessian_weight}] if rows else [])
    student = {"model": model or _student_model(args), "loss": loss, "training": _training(args.student_seconds, seed)}
    if evaluation:
        student["evaluation"] = evaluation
    raw = {"output": str(out), "teacher": {"model": str(teacher)},
           "configurations": {"data": str(DATA / "train.extxyz"), "starts": 8, "include_data": True,
                              "max_structures": max_structures,
                              "sampling": [{"name": "md", "temperatures": [300, 600, 1000], "steps": args.md_steps,
                                            "interval": 20, "timestep_fs": 0.5}]},
           "labels": {"hessian_rows": rows, "batch_size": 32, "dir": str(args.out / "labels")},
           "student": student, "test": str(DATA / "test.extxyz"), "valid_fraction": 0.05, "seed": 0,
           "tracking": {"name": "mlflow", "experiment": "issue19-distill",
                        "tracking_uri": f"sqlite:///{args.out / 'mlflow.db'}"}}
    config = args.out / "configs" / f"{name.replace('/', '-')}.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    _run([sys.executable, "-m", "atomforge", "distill", str(config), "--quiet"], args.out / "logs" / f"{name.replace('/', '-')}.log")
    return out / "student" / "model.pt"


def evaluate(args: argparse.Namespace, name: str, models: dict[str, Path]) -> dict:
    """Errors on test/hot and per-call time at 9 and 999 atoms, all models in one process."""
    out = args.out / "eval" / f"{name}.json"
    if not out.exists():
        _run([sys.executable, str(ROOT / "benchmarks" / "ethanol" / "evaluate_models.py"),
              *(f"{k}={v}" for k, v in models.items()), "--data", str(DATA), "--out", str(out)],
             args.out / "logs" / f"eval-{name}.log")
    return json.loads(out.read_text())


def speed(args: argparse.Namespace) -> None:
    for seed in args.seeds:
        models = {"teacher": args.teacher}
        models["reference"] = train_run(args, f"speed/reference/s{seed}", {
            "data": {"train": str(DATA / "train.extxyz"), "test": str(DATA / "test.extxyz"), "valid_fraction": 0.05},
            "model": _student_model(args), "loss": LOSS, "training": _training(args.student_seconds, seed)})
        for arm, rows, cap in (("distill", 0, args.max_structures), ("distill_hessian", 4, args.max_structures),
                               ("few", 0, args.few), ("few_hessian", 4, args.few)):
            models[arm] = distill_run(args, f"speed/{arm}/s{seed}", args.teacher, seed, rows=rows,
                                      hessian_weight=args.hessian_weight, max_structures=cap)
        evaluate(args, f"speed-s{seed}", models)


def conservation(args: argparse.Namespace) -> None:
    nve = {"physics": True, "structures": 4, "rotations": 2, "curl_probes": 4,
           "nve_steps": int(round(args.nve_ps * 2000)), "timestep_fs": 0.5, "temperature": 300.0}
    for seed in args.seeds:
        teacher = train_run(args, f"conservation/teacher/s{seed}", {
            "data": {"train": str(DATA / "train.extxyz"), "test": str(DATA / "test.extxyz"), "valid_fraction": 0.05},
            "model": {"backbone": "transformer", "cutoff": 5.0, "hidden_channels": 64, "num_layers": 3, "num_heads": 4,
                      "num_rbf": 16, "forces": "direct"},
            "loss": LOSS, "training": _training(args.teacher_seconds, seed, lr=1e-3)})
        student = distill_run(args, f"conservation/student/s{seed}", teacher, seed, rows=0, hessian_weight=0.0,
                              max_structures=args.max_structures, evaluation=nve,
                              model={"backbone": "painn", "cutoff": 5.0, "hidden_channels": 64, "num_layers": 3,
                                     "num_rbf": 20})
        evaluate(args, f"conservation-s{seed}", {"teacher": teacher, "student": student})


def summary(args: argparse.Namespace) -> None:
    """results.json and summary.md from the evaluations and distill reports."""
    results: dict = {"speed": {}, "conservation": {}}
    for path in sorted((args.out / "eval").glob("*.json")):
        kind, seed = path.stem.rsplit("-", 1)
        results[kind][seed] = json.loads(path.read_text())
    for seed in list(results["conservation"]):
        report = args.out / "conservation" / "student" / seed / "distill.json"
        if report.exists():
            results["conservation"][seed]["physics"] = json.loads(report.read_text()).get("physics")
    args.report.mkdir(parents=True, exist_ok=True)
    (args.report / "results.json").write_text(json.dumps(results, indent=2))
    lines = ["Forces in meV/Å against the reference GFN2-xTB labels; time per calculator call in ms (one thread).", "",
             "| bench | seed | model | test F-MAE | test F-RMSE | hot F-MAE | hot F-RMSE | p99 frame RMSE (test) | ms/call 9 atoms | ms/call 999 atoms |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for kind, seeds in results.items():
        for seed, evals in seeds.items():
            for model, e in evals.items():
                if not isinstance(e, dict) or "test" not in e:
                    continue
                t = e.get("timing_ms", {})
                lines.append(f"| {kind} | {seed} | {model} | {e['test']['force_mae']:.1f} | {e['test']['force_rmse']:.1f} | "
                             f"{e['hot']['force_mae']:.1f} | {e['hot']['force_rmse']:.1f} | {e['test']['frame_rmse_p99']:.1f} | "
                             f"{t.get('9', {}).get('median', float('nan')):.2f} | {t.get('999', {}).get('median', float('nan')):.1f} |")
    for seed, evals in results["conservation"].items():
        physics = evals.get("physics") or {}
        for who in ("teacher", "student"):
            p = physics.get(who, {})
            lines.append(f"\nconservation {seed} {who}: NVE drift {p.get('physics_nve_energy_drift')} meV/atom/ps, "
                         f"stable {p.get('physics_md_stable_ps')} ps, curl_relative {p.get('physics_curl_relative')}")
    (args.report / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bench", choices=("speed", "conservation", "summary"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--report", type=Path, default=ROOT / "docs" / "benchmarks" / "issue19")
    p.add_argument("--teacher", type=Path, default=ROOT / "benchmarks" / "ethanol" / "results" / "i16-painn-s0" / "model.pt")
    p.add_argument("--teacher-seconds", type=float, default=900.0)
    p.add_argument("--student-seconds", type=float, default=600.0)
    p.add_argument("--student-width", type=int, default=16)
    p.add_argument("--student-layers", type=int, default=2)
    p.add_argument("--hessian-weight", type=float, default=0.1)
    p.add_argument("--md-steps", type=int, default=2000, help="teacher MD steps per trajectory (8 starts x 3 T)")
    p.add_argument("--max-structures", type=int, default=3000)
    p.add_argument("--few", type=int, default=100)
    p.add_argument("--nve-ps", type=float, default=10.0)
    args = p.parse_args()
    {"speed": speed, "conservation": conservation, "summary": summary}[args.bench](args)


if __name__ == "__main__":
    main()
