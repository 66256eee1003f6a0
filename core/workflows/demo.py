"""The main job on an embedded default: label Cu with the built-in EMT oracle, train PaiNN,
evaluate it, run MD with it, and track everything in a local MLflow store."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import yaml
from ase import Atoms, units
from ase.build import bulk
from ase.io import write
from ase.md.langevin import Langevin

from .._specs import PluginKind
from ..analysis.md import run_md
from ..config import config_from_dict
from ..model.calculator import load_calculator
from ..registry import Registry
from .train import has_checkpoint, train

__all__ = ["make_cu_data", "run_demo"]


def _md_snapshots(oracle_calc_factory, start: Atoms, temperature: float, n: int, stride: int,
                  rng: np.random.Generator) -> list[Atoms]:
    atoms = start.copy()
    atoms.calc = oracle_calc_factory()
    dyn = Langevin(atoms, timestep=2 * units.fs, temperature_K=temperature, friction=0.02 / units.fs, rng=rng,
                   fixcm=False)
    frames = []
    for _ in range(n):
        dyn.run(stride)
        frames.append(atoms.copy())
    return frames


def make_cu_data(registry: Registry, *, n_train: int, n_test: int, seed: int = 0) -> tuple[list[Atoms], list[Atoms]]:
    """Cu configurations (32-atom cells, 300–1200 K MD, ±3 % strain) labelled by the ``emt`` oracle."""
    oracle = registry.get(PluginKind.ORACLE, "emt").factory()
    from ase.calculators.emt import EMT

    rng = np.random.default_rng(seed)
    frames: list[Atoms] = []
    temps = (300.0, 600.0, 900.0, 1200.0)
    per_run = (n_train + n_test) // len(temps) + 1
    for temperature in temps:
        start = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 2))
        strain = np.eye(3) + np.diag(rng.uniform(-0.03, 0.03, 3))
        start.set_cell(start.cell[:] @ strain, scale_atoms=True)
        start.rattle(0.05, seed=int(rng.integers(1 << 30)))
        frames += _md_snapshots(EMT, start, temperature, per_run, 5, rng)
    order = rng.permutation(len(frames))
    labelled = [oracle.label(frames[i]) for i in order[: n_train + n_test]]
    return labelled[:n_train], labelled[n_train:]


def run_demo(registry: Registry, out: Path, *, quick: bool = False, tracking: str = "mlflow") -> dict:
    """Generate data, train, evaluate and run MD; returns a summary dict (also written as JSON)."""
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    n_train, n_test = (60, 20) if quick else (240, 60)
    print(f"[1/4] labelling {n_train + n_test} Cu structures with the EMT oracle ...", file=sys.stderr)
    train_set, test_set = make_cu_data(registry, n_train=n_train, n_test=n_test)
    write(out / "train.extxyz", train_set)
    write(out / "test.extxyz", test_set)
    raw = {
        "data": {"train": "train.extxyz", "test": "test.extxyz", "valid_fraction": 0.15},
        "model": {"backbone": "painn", "cutoff": 4.5, "hidden_channels": 32 if quick else 64,
                  "num_layers": 2, "num_rbf": 16},
        "loss": [{"name": "energy", "weight": 1.0}, {"name": "forces", "weight": 10.0},
                 {"name": "stress", "weight": 100.0}],
        "training": {"max_epochs": 6 if quick else 60, "max_time": "30s" if quick else "4m",
                     "batch_size": 4, "lr": 0.003, "seed": 0, "num_threads": 1, "scheduler": {"name": "plateau", "patience": 5}},
        "output": "run",
        "tracking": {"name": tracking, "experiment": "atomforge-demo"},
    }
    (out / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    print(f"[2/4] training PaiNN (config: {out / 'config.yaml'}) ...", file=sys.stderr)
    resume = has_checkpoint(out / "run")
    outcome = train(config_from_dict(raw, out), registry, resume=resume)
    print("[3/4] test errors: " + ", ".join(f"{k} {v:.2f}" for k, v in outcome.test_metrics.items()
                                               if k.startswith("test_")), file=sys.stderr)
    print("[4/4] 200 steps of NVT MD at 600 K with the trained model ...", file=sys.stderr)
    md = run_md(test_set[0], load_calculator(outcome.model_path), steps=40 if quick else 200,
                temperature=600.0, out=out / "md.extxyz", interval=10)
    store = json.loads((outcome.run_dir / "tracking.json").read_text()).get("tracking_uri")  # the project's store
    summary = {"model": str(outcome.model_path), "test_metrics": outcome.test_metrics, "md": asdict(md),
               "mlflow_ui": f"mlflow ui --backend-store-uri {store}" if store else None}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"done. model: {outcome.model_path}" + (f"\nsee the run: {summary['mlflow_ui']}" if store else ""),
          file=sys.stderr)
    return summary
