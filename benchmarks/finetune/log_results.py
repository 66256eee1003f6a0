"""Log a fine-tuning benchmark's evaluated errors into the MLflow run of each arm (issue 18).

``run.py``, ``materials.py`` and ``al.py`` track every training in ``<out>/mlflow.db`` (one run per
arm, named ``<arm>-n<N>-s<seed>``); the errors that the tables report — held-out test and hot sets,
both heads, per-frame tails — are computed after training by the script itself. This puts them
next to the training curves, as ``eval.<set>.<metric>`` metrics (e.g. ``eval.b3lyp_test.force_mae``)
plus the tag ``benchmark.results`` (the results file), so the MLflow store alone holds every point.

    python benchmarks/finetune/log_results.py docs/benchmarks/issue18/finetune/results.json \\
        benchmarks/finetune/results/mlflow.db issue18-finetune
    python benchmarks/finetune/log_results.py docs/benchmarks/issue18/materials/results.json \\
        benchmarks/finetune/results-materials/mlflow.db issue18-materials

Idempotent: logging again overwrites the same values at step 0. An arm with no run in the store is
reported and makes the exit code 1.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def flat_metrics(errors: dict) -> dict[str, float]:
    """``{set: {metric: value}}`` → ``{"eval.<set>.<metric>": value}`` (finite numbers only)."""
    out = {}
    for split, values in errors.items():
        for key, value in (values or {}).items():
            if isinstance(value, (int, float)) and math.isfinite(float(value)):
                out[f"eval.{split}.{key}"] = float(value)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", type=Path, help="the benchmark's results.json")
    p.add_argument("store", type=Path, help="the mlflow.db the benchmark tracked to")
    p.add_argument("experiment", help="its experiment (issue18-finetune, issue18-materials, ...)")
    args = p.parse_args()
    from mlflow.entities import Metric, RunTag
    from mlflow.tracking import MlflowClient

    if not args.store.exists():
        raise SystemExit(f"{args.store}: no such MLflow store (run the benchmark first)")
    results = json.loads(args.results.read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{args.store.resolve()}")
    experiment = client.get_experiment_by_name(args.experiment)
    if experiment is None:
        raise SystemExit(f"{args.store}: no experiment {args.experiment!r}")
    runs = {}
    for run in client.search_runs([experiment.experiment_id], max_results=5000):
        runs.setdefault(run.info.run_name, run)  # newest first: a re-run arm's latest run
    missing, logged = [], 0
    for name, row in results.items():
        run = runs.get(name.replace("/", "-"))
        if run is None:
            missing.append(name)
            continue
        metrics = flat_metrics(row.get("errors", {}))
        if "train_seconds" in row:
            metrics["eval.wall_seconds"] = float(row["train_seconds"])
        stamp = run.info.end_time or run.info.start_time
        client.log_batch(run.info.run_id, metrics=[Metric(k, v, stamp, 0) for k, v in metrics.items()],
                         tags=[RunTag("benchmark.results", str(args.results))])
        logged += 1
    print(f"{logged} runs got their evaluation metrics" + (f"; no run for {missing}" if missing else ""))
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
