"""Train and benchmark atomforge's PaiNN on the ethanol GFN2-xTB data (same budget as the peers).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ethanol/run_atomforge.py \\
        --budget-seconds 900 --out benchmarks/ethanol/results/atomforge.json

Steps: write an ``atomforge train`` config (950 train / 50 validation structures split off
``data/train.extxyz``, ``data/test.extxyz`` as the independent test trajectory), train on ONE
thread for ``--budget-seconds`` through the public API (the same code path as the CLI),
evaluate the exported (best EMA) model on the test set, and time the ASE calculator on one
ethanol (9 atoms) and on ``data/ethanol_999.extxyz``: median ms per ``get_forces()`` with a
1e-4 Å random nudge before every call so nothing is cached. ``--time-only MODEL`` re-times a
trained model (run_all.sh times both peers one after the other, on an idle machine).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from ase import Atoms
from ase.io import read

import atomforge
from atomforge.workflows.train import train

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _bench_timing import median_call_ms  # noqa: E402

HERE = Path(__file__).resolve().parent


def config(args: argparse.Namespace) -> dict:
    """The training config; every choice is visible here and echoed into the result JSON."""
    if args.backbone == "mace":
        return mace_config(args)
    if args.backbone not in ("painn", "tensornet"):
        raise SystemExit(f"--backbone {args.backbone!r}: painn, tensornet or mace")
    model = {"backbone": args.backbone, "cutoff": args.cutoff, "hidden_channels": args.hidden,
             "num_layers": args.layers, "num_rbf": args.num_rbf, **json.loads(args.model_options)}
    return {
        "data": {"train": str(args.data / "train.extxyz"), "test": str(args.data / "test.extxyz"),
                 "valid_fraction": 0.05},
        "model": model,
        "loss": [{"name": "energy", "weight": 1.0, **loss_kind(args)},
                 {"name": "forces", "weight": args.forces_weight, **loss_kind(args)}],
        "training": {"max_epochs": 100_000, "max_time": args.budget_seconds, "batch_size": args.batch_size,
                     "lr": args.lr, "seed": args.seed, "num_threads": 1, "ema_decay": 0.995,
                     "scheduler": {"name": args.scheduler, "patience": args.patience, "factor": 0.6,
                                   "min_lr": args.min_lr}},
        "output": str(args.run_dir),
        "tracking": "none",
    }


def loss_kind(args: argparse.Namespace) -> dict:
    return {} if args.loss_kind == "mse" else {"kind": args.loss_kind, "delta": args.huber_delta}


def mace_config(args: argparse.Namespace) -> dict:
    """MACE inside atomforge with ``mace_run_train``'s settings (run_mace_cli.sh): float64, 64x0e,
    max_ell 3, correlation 3, lr 0.01 AMSGrad, weight decay 5e-7, batch 10, energy 1 / forces 100
    (per-atom energy MSE, force-component MSE: MACE's weighted loss), ReduceLROnPlateau 0.8 / 50,
    clip 10, EMA 0.99, 5 % validation."""
    return {
        "data": {"train": str(args.data / "train.extxyz"), "test": str(args.data / "test.extxyz"),
                 "valid_fraction": 0.05},
        "model": {"backbone": "mace", "cutoff": args.cutoff, "dtype": args.dtype, "num_channels": args.hidden,
                  "max_L": 0, "max_ell": 3, "correlation": 3, "num_interactions": 2},
        "loss": [{"name": "energy", "weight": 1.0}, {"name": "forces", "weight": 100.0}],
        "training": {"max_epochs": 100_000, "max_time": args.budget_seconds, "batch_size": 10, "valid_batch_size": 10,
                     "lr": 0.01, "weight_decay": 5e-7, "grad_clip": 10.0, "seed": args.seed, "num_threads": 1,
                     "ema_decay": 0.99, "scheduler": {"name": "plateau", "patience": 50, "factor": 0.8}},
        "output": str(args.run_dir),
        "tracking": "none",
    }


def time_calculator(calc: object, atoms: Atoms, n_calls: int, n_warmup: int, seed: int) -> float:
    """Median ms per ``get_forces()`` (see ``benchmarks/_bench_timing.py``)."""
    return median_call_ms(calc, atoms, n_calls, n_warmup, seed)


def timings(model_path: Path, args: argparse.Namespace) -> dict:
    calc = atomforge.load_calculator(model_path)
    small = read(args.data / "test.extxyz", 0)
    large = read(args.data / "ethanol_999.extxyz")
    return {"calc_ms_9_atoms": time_calculator(calc, small, args.n_calls_small, 20, args.seed),
            "calc_ms_999_atoms": time_calculator(calc, large, args.n_calls_large, 2, args.seed)}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=HERE / "data")
    p.add_argument("--out", type=Path, default=HERE / "results" / "atomforge.json")
    p.add_argument("--run-dir", type=Path, default=HERE / "results" / "atomforge-run")
    p.add_argument("--budget-seconds", type=float, default=900.0)
    p.add_argument("--time-only", type=Path, default=None, metavar="MODEL")
    p.add_argument("--n-calls-small", type=int, default=300)
    p.add_argument("--n-calls-large", type=int, default=15)
    p.add_argument("--backbone", default="painn", help="painn (the settings below) or mace (mace_run_train's)")
    p.add_argument("--dtype", default="float64", help="mace only (mace_run_train's default: float64)")
    p.add_argument("--cutoff", type=float, default=5.0)
    p.add_argument("--num-rbf", type=int, default=20)
    p.add_argument("--model-options", default="{}", help="more model options, JSON")
    p.add_argument("--loss-kind", default="mse", help="mse | huber (energy and forces)")
    p.add_argument("--huber-delta", type=float, default=0.01)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=0.003)
    p.add_argument("--forces-weight", type=float, default=10.0)
    p.add_argument("--scheduler", default="cosine_time", help="cosine_time | plateau | ...")
    p.add_argument("--min-lr", type=float, default=1e-5)
    p.add_argument("--patience", type=int, default=8, help="plateau scheduler only")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.time_only:
        result = json.loads(args.out.read_text()) if args.out.exists() else {}
        result.update(timings(args.time_only, args))
        args.out.write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))
        return
    cfg = config(args)
    resume = atomforge.has_checkpoint(args.run_dir)
    outcome = train(atomforge.config_from_dict(cfg), atomforge.make_registry(), resume=resume, verbose=False)
    history = atomforge.read_training_state(args.run_dir)["history"]
    n_train = 950
    steps_time = history[-1]["elapsed"]
    model = atomforge.load_model(outcome.model_path)
    result = {
        "model": f"atomforge-{args.backbone}-{args.hidden}" + (f"x{args.layers}" if args.backbone != "mace" else "x0e"),
        "config": cfg,
        "n_params": sum(p.numel() for p in model.parameters()),
        "train_seconds": steps_time,
        "epochs": outcome.epochs,
        "stopped_because": outcome.stopped_because,
        "train_structures_per_s": sum(h["steps"] for h in history) * args.batch_size / steps_time,
        "test_energy_mae_meV_per_atom": outcome.test_metrics["test_energy_mae"],
        "test_force_mae_meV_per_A": outcome.test_metrics["test_forces_mae"],
        "test_force_rmse_meV_per_A": outcome.test_metrics["test_forces_rmse"],
        "n_train": n_train,
        "threads": 1,
        "torch_version": torch.__version__,
        "atomforge_version": atomforge.__version__,
        **timings(outcome.model_path, args),
    }
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
