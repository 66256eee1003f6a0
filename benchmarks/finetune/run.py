"""Cheap → expensive level of theory (issue 18, benchmark 1): pre-train on GFN2-xTB, fine-tune to B3LYP.

    cd /work/main && . .venv/bin/activate
    python benchmarks/finetune/run.py --workers 2                 # every arm, then the summary
    python benchmarks/finetune/run.py --summarize-only            # rebuild summary.md from the results

Data (``benchmarks/finetune/make_data.py``, in ``--data``): ``pretrain_xtb.extxyz`` (ethanol, methanol,
acetaldehyde, dimethyl ether; GFN2-xTB MD frames), ``pretrain_valid_xtb.extxyz``, ``ft_train_b3lyp.extxyz``
(ethanol frames of an independent 600 K trajectory relabelled with B3LYP/6-31G*, in order), and the held-out
sets ``ft_test_b3lyp`` (600 K, frames of an independent trajectory), ``ft_hot_b3lyp`` (1000 K) and the same
geometries with their xTB labels, ``ft_test_xtb`` / ``ft_hot_xtb``.

Labels: the first N frames of ``ft_train_b3lyp`` for N in ``--sizes``; of those, the last
``max(3, round(0.15 N))`` validate (early selection of the EMA weights) and the rest train — the same split
for every arm and seed.

Arms (PaiNN ``--hidden`` x ``--layers``, cutoff 5 Å, float32, AdamW, batch 4, EMA 0.995, ``cosine_time``
over ``max_time``, one torch thread per run, ``--workers`` runs at a time):

* ``pretrain`` (per seed): heads ``[xtb]``, energy ×1 + forces ×10 on ``pretrain_xtb``, ``--pre`` s, lr 3e-3.
* ``scratch``: one head, the N B3LYP labels only, ``--ft`` s, lr 3e-3, from random weights.
* ``ft``: ``model.init_from`` the seed's pre-trained file with ``heads: [xtb, b3lyp]`` (the new ``b3lyp``
  head starts as a copy of ``xtb`` with its reference energies refitted: ``finetune.reference_energies:
  auto``), the B3LYP labels on head ``b3lyp`` mixed 70/30 with **replay** of ``pretrain_xtb`` on head
  ``xtb`` (``data.train`` as a list with ratios), ``--ft`` s, lr ``--ft-lr``.
* ``ft_noreplay``: as ``ft`` without the replayed xTB data (to measure forgetting).
* ``ft_r<R>`` (``--replay-ratios R``, at ``--variant-sizes``): as ``ft`` with replay share R and the
  embedding frozen (``finetune.freeze: [embedding]``).
* ``joint``: a multi-head model trained from scratch on both at once (``heads: [xtb, b3lyp]``, xTB and
  B3LYP mixed 50/50), ``--pre`` + ``--ft`` s (the pre-training and fine-tuning budgets together), for N in
  ``--joint-sizes``.

Evaluation of each exported model: B3LYP test/hot on the ``b3lyp`` head (``scratch``: its only head) and
xTB test/hot on the ``xtb`` head (pre-trained, fine-tuned and joint models) with
``benchmarks/ethanol/evaluate_models.py``'s ``errors`` (energy MAE meV/atom, force MAE/RMSE meV/Å,
per-frame force RMSE percentiles). Raw: ``docs/benchmarks/issue18/finetune/results.json``; table:
``summary.md`` next to it; run folders: ``benchmarks/finetune/results/`` (git-ignored).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import json
import math
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "benchmarks" / "ethanol"))

LOSS = [{"name": "energy", "weight": 1.0}, {"name": "forces", "weight": 10.0}]


def _training(seconds: float, lr: float, seed: int) -> dict:
    return {"max_epochs": 100_000, "max_time": seconds, "batch_size": 4, "lr": lr, "seed": seed, "num_threads": 1,
            "ema_decay": 0.995, "scheduler": {"name": "cosine_time", "min_lr": 1e-5}}


def _model(args: argparse.Namespace, **extra: object) -> dict:
    return {"backbone": "painn", "cutoff": 5.0, "hidden_channels": args.hidden, "num_layers": args.layers,
            "num_rbf": 20, **extra}


def split_labels(args: argparse.Namespace, n: int) -> tuple[Path, Path]:
    """The first ``n`` B3LYP frames as train/valid files (the same for every arm and seed)."""
    from ase.io import read, write

    folder = args.out / "labels"
    folder.mkdir(parents=True, exist_ok=True)
    train, valid = folder / f"train_{n}.extxyz", folder / f"valid_{n}.extxyz"
    if not train.exists():
        frames = read(args.data / "ft_train_b3lyp.extxyz", index=f":{n}")
        if len(frames) < n:
            raise SystemExit(f"{args.data / 'ft_train_b3lyp.extxyz'} holds {len(frames)} frames; {n} asked")
        v = max(3, round(0.15 * n))
        write(valid, frames[n - v :])
        write(train, frames[: n - v])
    return train, valid


def jobs(args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """(phase 1, phase 2) run configs: pre-training and from-scratch arms first, then the ones that
    start from a pre-trained file."""
    d = args.data
    first, second = [], []
    for seed in args.seeds:
        first.append({"name": f"pretrain/s{seed}", "raw": {
            "data": {"train": {"path": str(d / "pretrain_xtb.extxyz"), "head": "xtb"},
                     "valid": {"path": str(d / "pretrain_valid_xtb.extxyz"), "head": "xtb"}},
            "model": _model(args, heads=["xtb"]), "loss": LOSS, "training": _training(args.pre, 3e-3, seed)}})
        if args.pretrain_only:
            continue
        for n in args.sizes:
            train, valid = split_labels(args, n)
            own = {"path": str(train), "head": "b3lyp"}
            first.append({"name": f"scratch/n{n}/s{seed}", "raw": {
                "data": {"train": str(train), "valid": str(valid)}, "model": _model(args), "loss": LOSS,
                "training": _training(args.ft, 3e-3, seed)}})
            pre = str(args.out / f"pretrain/s{seed}/model.pt")
            replay = {"path": str(d / "pretrain_xtb.extxyz"), "head": "xtb", "ratio": 0.3}
            epoch = math.ceil((n - max(3, round(0.15 * n))) / 0.7)
            for arm, train_data in (("ft", [{**own, "ratio": 0.7}, replay]), ("ft_noreplay", own)):
                second.append({"name": f"{arm}/n{n}/s{seed}", "raw": {
                    "data": {"train": train_data, "valid": {"path": str(valid), "head": "b3lyp"},
                             **({"epoch_size": epoch} if isinstance(train_data, list) else {})},
                    "model": {"init_from": pre, "heads": ["xtb", "b3lyp"]}, "loss": LOSS,
                    "training": _training(args.ft, args.ft_lr, seed)}})
            for ratio in args.replay_ratios if n in args.variant_sizes else ():  # more replay, frozen embedding
                share = 1.0 - ratio
                second.append({"name": f"ft_r{ratio:g}/n{n}/s{seed}", "raw": {
                    "data": {"train": [{**own, "ratio": share}, {**replay, "ratio": ratio}],
                             "valid": {"path": str(valid), "head": "b3lyp"},
                             "epoch_size": math.ceil((n - max(3, round(0.15 * n))) / share)},
                    "model": {"init_from": pre, "heads": ["xtb", "b3lyp"]}, "loss": LOSS,
                    "finetune": {"freeze": ["embedding"]},
                    "training": _training(args.ft, args.ft_lr, seed)}})
            if n in args.joint_sizes:
                second.append({"name": f"joint/n{n}/s{seed}", "raw": {
                    "data": {"train": [{"path": str(d / "pretrain_xtb.extxyz"), "head": "xtb", "ratio": 0.5},
                                       {**own, "ratio": 0.5}],
                             "valid": {"path": str(valid), "head": "b3lyp"}},
                    "model": _model(args, heads=["xtb", "b3lyp"]), "loss": LOSS,
                    "training": _training(args.pre + args.ft, 3e-3, seed)}})
    return first, second


def run_job(job: dict, out: str, evaluate: bool = True) -> dict:
    """Train one arm (skipped when its model exists) and evaluate it."""
    import torch

    torch.set_num_threads(1)
    from atomforge import config_from_dict, make_registry
    from atomforge.workflows.train import train

    run_dir = Path(out) / job["name"]
    model_path = run_dir / "model.pt"
    started = time.perf_counter()
    if not model_path.exists():
        shutil.rmtree(run_dir, ignore_errors=True)  # a killed run starts over
        raw = {**job["raw"], "output": str(run_dir), "tracking": {"name": "mlflow", "experiment": "issue18-finetune", "run_name": job["name"].replace("/", "-"), "tracking_uri": f"sqlite:///{Path(out) / 'mlflow.db'}"}}
        train(config_from_dict(raw), make_registry(), verbose=False)
    return {"name": job["name"], "train_seconds": time.perf_counter() - started,
            "errors": evaluate_arm(model_path, job["name"]) if evaluate else {}}


def evaluate_arm(model_path: Path, name: str) -> dict:
    from ase.io import read
    from evaluate_models import errors

    from atomforge import load_model
    from atomforge.model.calculator import AtomforgeCalculator

    data = Path(os.environ.get("FT_DATA", HERE / "data"))
    model = load_model(model_path)
    heads = getattr(model, "heads", ["default"])
    out = {}
    for level in ("b3lyp", "xtb"):
        head = level if level in heads else (heads[0] if name.startswith("scratch") and level == "b3lyp" else None)
        if head is None:
            continue
        calc = AtomforgeCalculator(model, head=head)
        for split in ("test", "hot"):
            out[f"{level}_{split}"] = errors(calc, read(data / f"ft_{split}_{level}.extxyz", index=":"))
    if "xtb" in heads:  # the pre-trained level's forces against B3LYP: how far apart the levels are
        calc = AtomforgeCalculator(model, head="xtb")
        out["xtb_head_on_b3lyp_test"] = errors(calc, read(data / "ft_test_b3lyp.extxyz", index=":"))
    return out


def summarize(results: dict, path: Path, args: argparse.Namespace) -> None:
    """A markdown table: per arm and N, mean over seeds (and each seed) of force MAE / RMSE."""

    def cell(rows: list[dict], key: str, metric: str) -> str:
        values = [r["errors"][key][metric] for r in rows if key in r["errors"]]
        if not values:
            return "–"
        return f"{np.mean(values):.1f}" + (f" ({', '.join(f'{v:.1f}' for v in values)})" if len(values) > 1 else "")

    lines = ["| arm | N | B3LYP test F-MAE | test F-RMSE | hot F-MAE | hot F-RMSE | test frame-RMSE p99 | "
             "B3LYP test E-MAE meV/atom | xTB test F-MAE | xTB hot F-MAE |", "|" + "---|" * 10]
    groups: dict[tuple[str, int], list[dict]] = {}
    for name, row in results.items():
        parts = name.split("/")
        n = int(parts[1][1:]) if parts[1].startswith("n") else 0
        groups.setdefault((parts[0], n), []).append(row)
    order = {"pretrain": 0, "scratch": 1, "ft": 2, "ft_noreplay": 3, "joint": 4}  # then ft_r<R> variants
    for (arm, n), rows in sorted(groups.items(), key=lambda kv: (kv[0][1], order.get(kv[0][0], 9))):
        lines.append(f"| {arm} | {n or '–'} | {cell(rows, 'b3lyp_test', 'force_mae')} | "
                     f"{cell(rows, 'b3lyp_test', 'force_rmse')} | {cell(rows, 'b3lyp_hot', 'force_mae')} | "
                     f"{cell(rows, 'b3lyp_hot', 'force_rmse')} | {cell(rows, 'b3lyp_test', 'frame_rmse_p99')} | "
                     f"{cell(rows, 'b3lyp_test', 'energy_mae_meV_per_atom')} | {cell(rows, 'xtb_test', 'force_mae')} | "
                     f"{cell(rows, 'xtb_hot', 'force_mae')} |")
    ratios = ["", "Ratios (mean over seeds):", ""]
    for n in args.sizes:
        ft = [r["errors"]["b3lyp_test"]["force_mae"] for r in groups.get(("ft", n), [])]
        sc = [r["errors"]["b3lyp_test"]["force_mae"] for r in groups.get(("scratch", n), [])]
        if ft and sc:
            ratios.append(f"- N = {n}: fine-tuned / from scratch B3LYP test force MAE = {np.mean(ft) / np.mean(sc):.2f}")
    pre = [r["errors"]["xtb_test"]["force_mae"] for r in groups.get(("pretrain", 0), [])]
    for arm in ("ft", "ft_noreplay", *sorted({name.split("/")[0] for name in results if name.startswith("ft_r")})):
        for n in args.sizes:
            after = [r["errors"]["xtb_test"]["force_mae"] for r in groups.get((arm, n), [])]
            if pre and after:
                ratios.append(f"- forgetting, {arm} N = {n}: xTB test force MAE after / before = "
                              f"{np.mean(after) / np.mean(pre):.2f}")
    path.write_text("Forces in meV/Å; each cell: mean over seeds (per seed).\n\n" + "\n".join(lines + ratios) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=HERE / "data")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--report", type=Path, default=ROOT / "docs" / "benchmarks" / "issue18" / "finetune")
    p.add_argument("--sizes", type=int, nargs="+", default=[25, 50, 100, 200])
    p.add_argument("--joint-sizes", type=int, nargs="*", default=[100])
    p.add_argument("--replay-ratios", type=float, nargs="*", default=[],
                   help="extra arms ft_r<R>: replay share R (and the embedding frozen), at --variant-sizes")
    p.add_argument("--variant-sizes", type=int, nargs="*", default=[100])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--pre", type=float, default=600.0, help="pre-training seconds")
    p.add_argument("--ft", type=float, default=150.0, help="fine-tuning (and from-scratch) seconds")
    p.add_argument("--ft-lr", type=float, default=1e-3)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--summarize-only", action="store_true")
    p.add_argument("--pretrain-only", action="store_true", help="only the pre-training runs (before the B3LYP labels exist)")
    args = p.parse_args()
    args.data, args.out = args.data.resolve(), args.out.resolve()
    os.environ["FT_DATA"] = str(args.data)
    args.report.mkdir(parents=True, exist_ok=True)
    results_file = args.report / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    if not args.summarize_only:
        started = time.perf_counter()
        first, second = jobs(args)
        context = get_context("spawn")
        for phase in (first, second):
            todo = [j for j in phase if j["name"] not in results]
            with ProcessPoolExecutor(args.workers, mp_context=context) as pool:
                for job, future in [(j, pool.submit(run_job, j, str(args.out), not args.pretrain_only)) for j in todo]:
                    row = future.result()
                    if args.pretrain_only:
                        print(f"{job['name']}: trained ({row['train_seconds']:.0f} s)", flush=True)
                        continue
                    row["config"] = job["raw"]
                    results[job["name"]] = row
                    results_file.write_text(json.dumps(results, indent=1))
                    print(f"{job['name']}: B3LYP test F-MAE "
                          f"{row['errors'].get('b3lyp_test', {}).get('force_mae', float('nan')):.1f} meV/Å "
                          f"({row['train_seconds']:.0f} s)", flush=True)
        meta = {"command": " ".join(sys.argv), "wall_seconds": time.perf_counter() - started,
                "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
        (args.report / "meta.json").write_text(json.dumps(meta, indent=1))
    summarize(results, args.report / "summary.md", args)
    print((args.report / "summary.md").read_text())


if __name__ == "__main__":
    main()
