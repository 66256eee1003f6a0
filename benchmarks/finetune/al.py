"""Active learning from a foundation model (issue 18, benchmark 3): foundation vs scratch vs random.

Three arms run the same ``atomforge al run`` campaign on ethanol with a **B3LYP/6-31G\\* oracle**
(PySCF, computed live), the same label budget, explorer and UQ head; they differ in where the first
model starts and how labels are chosen:

* ``foundation``: iteration 0 fine-tunes the GFN2-xTB pre-trained PaiNN of benchmark 1
  (``results/pretrain/s0/model.pt``, heads ``[xtb]``) into heads ``[xtb, b3lyp]`` — the oracle's
  labels train ``b3lyp`` (``train.head``), the xTB pre-training set is replayed on ``xtb``
  (``train.replay``, 30 % of each epoch); later iterations warm-start from the previous model;
  selection by uncertainty (``diversity`` over the adaptive trust window, budget stratified over
  the MD temperatures — the ethanol setting of ``docs/active_learning.md``);
* ``scratch``: the same PaiNN from random weights, the same selection, warm-started iterations;
* ``foundation_random``: as ``foundation``, but labels drawn uniformly from the explored frames.

Per campaign: 8 initial B3LYP frames (drawn at random per seed from ``ft_train_b3lyp``, an
independent 600 K trajectory), ``--per-iteration`` labels per iteration up to ``--budget`` new
labels, every training ``--train-seconds`` s (cosine over the time, EMA 0.995, one torch thread,
batch 4), exploration by Langevin MD with the model at 300/600/1000 K from 4 starts per iteration
(200 steps of 0.5 fs, a frame every 10 steps; trajectories stop at σ ≥ 20 × calibration), UQ
``latent_distance``. The campaign's own test set is ``ft_test_b3lyp`` (independent 600 K
trajectory, 100 frames); after the run, every iteration's model is also evaluated on the 1000 K
``ft_hot_b3lyp`` set (50 frames): MAE, RMSE and per-frame RMSE percentiles.

    cd /work/main && . .venv/bin/activate
    taskset -c 0 python benchmarks/finetune/al.py --seeds 0 1 2           # ~12 min per campaign, serial
    python benchmarks/finetune/al.py --summarize-only

Every campaign is tracked in one MLflow store (``results-al/mlflow.db``, experiment
``issue18-al``: a parent run per campaign, a child per iteration). Raw: the campaign folders in
``benchmarks/finetune/results-al/`` (git-ignored); summary: ``docs/benchmarks/issue18/al/``.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "benchmarks" / "ethanol"))

ARMS = ("foundation", "scratch", "foundation_random")
UNCERTAIN = {"name": "diversity", "method": "farthest_point", "lo": 1.0, "hi": 20.0, "adaptive": True}
RANDOM = {"name": "random"}
LOSS = [{"name": "energy", "weight": 1.0}, {"name": "forces", "weight": 10.0}]
ORACLE = {"name": "pyscf", "xc": "B3LYP", "basis": "6-31G*", "conv_tol": 1e-9, "max_cycle": 200,
          "timeout": 300, "retries": 1}


def make_files(args: argparse.Namespace, seed: int) -> dict[str, Path]:
    """Per seed: 8 initial B3LYP frames and 8 exploration starts, disjoint, drawn from
    ``ft_train_b3lyp`` (the starts' labels are dropped: the explorer only needs geometries)."""
    from ase import Atoms
    from ase.io import read, write

    folder = args.out / "data" / f"s{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"initial": folder / "initial.extxyz", "starts": folder / "starts.extxyz"}
    if all(p.exists() for p in paths.values()):
        return paths
    frames = read(args.data / "ft_train_b3lyp.extxyz", index=":")
    order = np.random.default_rng(1000 + seed).permutation(len(frames))
    write(paths["initial"], [frames[i] for i in order[: args.initial]])
    write(paths["starts"], [Atoms(frames[i].numbers, frames[i].positions) for i in order[args.initial: args.initial + 8]])
    return paths


def campaign(args: argparse.Namespace, arm: str, seed: int, paths: dict[str, Path]) -> dict:
    """The campaign file of one arm and seed."""
    model = {"backbone": "painn", "cutoff": 5.0, "hidden_channels": 64, "num_layers": 3, "num_rbf": 20}
    training = {"max_epochs": 100_000, "max_time": args.train_seconds, "batch_size": 4, "lr": 3e-3,
                "num_threads": 1, "ema_decay": 0.995, "scheduler": {"name": "cosine_time", "min_lr": 1e-5}}
    train: dict = {"model": model, "uq": {"name": "latent_distance"}, "loss": LOSS, "training": training,
                   "warm_start": {"training": {"lr": args.warm_lr}}}
    if arm.startswith("foundation"):
        train["model"] = {"init_from": str(args.pretrained), "heads": ["xtb", "b3lyp"]}
        train["training"] = {**training, "lr": args.ft_lr}
        train["head"] = "b3lyp"
        train["replay"] = [{"source": "ase", "path": str(args.data / "pretrain_xtb.extxyz"), "head": "xtb",
                            "ratio": args.replay}]
    return {
        "output": str(args.out / arm / f"s{seed}"), "initial_data": str(paths["initial"]),
        "test": str(args.data / "ft_test_b3lyp.extxyz"), "starts": str(paths["starts"]),
        "starts_per_iteration": 4, "valid_fraction": 0.15, "seed": seed, "oracle": dict(ORACLE),
        "train": train,
        "explorers": [{"name": "md", "temperatures": [300, 600, 1000], "steps": 200, "timestep_fs": 0.5,
                       "interval": 10}],
        "selector": dict(RANDOM if arm.endswith("random") else UNCERTAIN),
        "budget": {"per_iteration": args.per_iteration, "total": args.budget, "stratify": "temperature"},
        "stop": {"max_iterations": 1000},
        "executor": {"kind": "serial"},
        "tracking": {"name": "mlflow", "experiment": "issue18-al",
                     "tracking_uri": f"sqlite:///{args.out / 'mlflow.db'}"},
    }


def run_campaign(args: argparse.Namespace, arm: str, seed: int) -> float:
    """``atomforge al run`` for one arm and seed (resumes a killed one); returns its wall time."""
    paths = make_files(args, seed)
    config = args.out / "configs" / f"{arm}-s{seed}.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(yaml.safe_dump(campaign(args, arm, seed, paths), sort_keys=False))
    log = args.out / "logs" / f"{arm}-s{seed}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    start = time.perf_counter()
    with log.open("a") as handle:
        subprocess.run([sys.executable, "-m", "atomforge", "al", "run", str(config), "--quiet"], stdout=handle,
                       stderr=subprocess.STDOUT, env=env, check=False)
    return time.perf_counter() - start


def curve(folder: Path, initial: int) -> list[dict]:
    """Labels (initial + new) and test force MAE after every iteration of one campaign."""
    path = folder / "state.json"
    state = json.loads(path.read_text()) if path.exists() else {}
    return [{"iteration": k, "labels": initial + int(h["train_labels"]), "test_forces_mae": h.get("test_forces_mae"),
             "test_energy_mae": h.get("test_energy_mae")} for k, h in enumerate(state.get("history", []))]


def evaluate_iterations(folder: Path, data: Path) -> list[dict]:
    """Every iteration's model on the B3LYP test (600 K) and hot (1000 K) sets, on the b3lyp head
    when the model has one (cached in ``folder/eval.json``)."""
    import torch
    from ase.io import read
    from evaluate_models import errors

    from atomforge import load_calculator

    cache = folder / "eval.json"
    done = json.loads(cache.read_text()) if cache.exists() else {}
    torch.set_num_threads(1)
    sets = {"test": read(data / "ft_test_b3lyp.extxyz", index=":"), "hot": read(data / "ft_hot_b3lyp.extxyz", index=":")}
    out = []
    for model in sorted(folder.glob("iterations/*/train/model.pt")):
        key = model.parts[-3]
        if key not in done:
            try:
                calc = load_calculator(str(model), head="b3lyp")
            except Exception:  # noqa: BLE001  (the scratch model has one unnamed head)
                calc = load_calculator(str(model))
            done[key] = {name: errors(calc, frames) for name, frames in sets.items()}
            cache.write_text(json.dumps(done, indent=2))
        out.append({"iteration": int(key), **done[key]})
    return out


def summarize(args: argparse.Namespace) -> dict:
    """Curves, labels-to-target per arm and seed, and the final models' test/hot errors."""
    results: dict = {"arms": {}, "settings": {k: str(v) for k, v in vars(args).items()}}
    for arm in ARMS:
        for seed in args.seeds:
            folder = args.out / arm / f"s{seed}"
            if not (folder / "state.json").exists():
                continue
            points = curve(folder, args.initial)
            evals = {e["iteration"]: e for e in evaluate_iterations(folder, args.data)}
            for p in points:
                if p["iteration"] in evals:
                    p["test"], p["hot"] = evals[p["iteration"]]["test"], evals[p["iteration"]]["hot"]
            reach = {str(t): next((p["labels"] for p in points if p.get("test", {}).get("force_mae", 1e9) <= t), None)
                     for t in args.targets}
            results["arms"].setdefault(arm, {})[f"s{seed}"] = {"curve": points, "labels_to_reach": reach}
    args.report.mkdir(parents=True, exist_ok=True)
    (args.report / "results.json").write_text(json.dumps(results, indent=2))
    (args.report / "summary.md").write_text(table(results, args))
    plot(results, args.report / "learning-curves.png")
    return results


def table(results: dict, args: argparse.Namespace) -> str:
    """Markdown: per arm, mean (per seed) errors after each iteration, and labels to each target."""
    lines = ["B3LYP/6-31G* ethanol, forces in meV/Å; each cell: mean over seeds (per seed).", "",
             "| arm | labels | test F-MAE | test F-RMSE | test frame-RMSE p99 | hot F-MAE | hot F-RMSE | hot frame-RMSE p99 |",
             "|---|---|---|---|---|---|---|---|"]

    def cell(values: list[float]) -> str:
        return f"{np.mean(values):.1f} ({', '.join(f'{v:.1f}' for v in values)})" if values else "–"

    for arm, seeds in results["arms"].items():
        n = min(len(s["curve"]) for s in seeds.values())
        for k in range(n):
            pts = [s["curve"][k] for s in seeds.values() if "test" in s["curve"][k]]
            if not pts:
                continue
            labels = sorted({p["labels"] for p in pts})
            vals = [cell([p[where][m] for p in pts]) for where, m in (
                ("test", "force_mae"), ("test", "force_rmse"), ("test", "frame_rmse_p99"),
                ("hot", "force_mae"), ("hot", "force_rmse"), ("hot", "frame_rmse_p99"))]
            lines.append(f"| {arm} | {'/'.join(map(str, labels))} | " + " | ".join(vals) + " |")
    lines += ["", "Labels (initial + selected) for the test force MAE to reach a target (— = not within the budget):", "",
              "| arm | " + " | ".join(f"≤ {t:g}" for t in args.targets) + " |", "|---|" + "---|" * len(args.targets)]
    for arm, seeds in results["arms"].items():
        row = []
        for t in args.targets:
            got = [s["labels_to_reach"][str(t)] for s in seeds.values()]
            row.append(", ".join("—" if g is None else str(g) for g in got))
        lines.append(f"| {arm} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    """Test and hot force MAE vs labels, every seed of every arm (mean as a line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharex=True)
    for ax, where in zip(axes, ("test", "hot")):
        for arm, seeds in results["arms"].items():
            n = min(len(s["curve"]) for s in seeds.values())
            pts = [[s["curve"][k] for s in seeds.values()] for k in range(n)]
            pts = [row for row in pts if all(where in p for p in row)]
            if not pts:
                continue
            x = [np.mean([p["labels"] for p in row]) for row in pts]
            y = np.array([[p[where]["force_mae"] for p in row] for row in pts])
            line, = ax.plot(x, y.mean(1), "o-", label=f"{arm} ({y.shape[1]} seeds)")
            ax.fill_between(x, y.min(1), y.max(1), color=line.get_color(), alpha=0.2)
        ax.set_yscale("log")
        ax.set_xlabel("B3LYP labels (initial + selected)")
        ax.set_ylabel(f"{where} force MAE (meV/Å)")
        ax.set_title({"test": "independent 600 K trajectory", "hot": "1000 K trajectory"}[where], fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=HERE / "data")
    p.add_argument("--out", type=Path, default=HERE / "results-al")
    p.add_argument("--report", type=Path, default=ROOT / "docs" / "benchmarks" / "issue18" / "al")
    p.add_argument("--pretrained", type=Path, default=HERE / "results" / "pretrain" / "s0" / "model.pt")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--initial", type=int, default=8)
    p.add_argument("--per-iteration", type=int, default=8)
    p.add_argument("--budget", type=int, default=40, help="new labels per campaign")
    p.add_argument("--train-seconds", type=float, default=60.0)
    p.add_argument("--ft-lr", type=float, default=1e-3)
    p.add_argument("--warm-lr", type=float, default=1e-3)
    p.add_argument("--replay", type=float, default=0.3)
    p.add_argument("--targets", type=float, nargs="+", default=[100.0, 70.0, 55.0])
    p.add_argument("--summarize-only", action="store_true")
    args = p.parse_args()
    if not args.summarize_only:
        if not args.pretrained.exists():
            raise SystemExit(f"{args.pretrained} is missing: run benchmarks/finetune/run.py --pretrain-only first")
        args.out.mkdir(parents=True, exist_ok=True)
        times = {}
        for seed in args.seeds:  # seed by seed: a partial run already compares the arms
            for arm in args.arms:
                times[f"{arm}/s{seed}"] = run_campaign(args, arm, seed)
                print(f"{arm} s{seed}: {times[f'{arm}/s{seed}']:.0f} s", flush=True)
        (args.out / "times.json").write_text(json.dumps(times, indent=2))
    print(json.dumps(summarize(args)["arms"], indent=1)[:4000])


if __name__ == "__main__":
    main()
