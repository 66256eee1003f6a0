"""UQ benchmark: cost, ranking (Spearman ρ) and calibration of every built-in UQ head.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/uq/run_uq.py --system ethanol --budget-seconds 120 \\
        --out benchmarks/uq/results/ethanol.json
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/uq/run_uq.py --system cu --budget-seconds 60 \\
        --out benchmarks/uq/results/cu.json

Systems: ``ethanol`` — the project's GFN2-xTB ethanol (``benchmarks/ethanol/data``): 950/50
train/validation frames of the 600 K trajectory, the independent 600 K ``test`` set
(in-distribution) and the 1000 K ``test_1000K`` set (out-of-distribution). ``cu`` — EMT-labelled
32-atom fcc Cu cells made here: rattle 0.05 Å and ±1 % strain for train/validation/test, rattle
0.12 Å and ±4 % strain for the out-of-distribution set.

Heads, each trained through ``atomforge.workflow.train`` (the CLI's code path) with the same
PaiNN, one thread, ``--budget-seconds`` of wall clock per trained model: ``deep_ensemble``
(5 members → 5 budgets), ``shallow_ensemble`` (8 heads; energy MSE + forces MSE + 0.01 ×
``energy_nll`` with ``detach_mean``), ``mc_dropout`` (p 0.1 on the readout, 8 samples),
``shallow_vector`` (the shallow ensemble with ``force_spread: vector``: 8 equivariant force heads
on PaiNN's vector features, + 0.01 × ``forces_nll``). The
``latent_distance`` head (k-NN, k = 5) is fitted on the deep ensemble's member 0 (no training).
Every head is calibrated (variance scale) on the validation set.

Reported per head: median ms per ASE ``get_forces()`` on one structure, relative to the single
model (member 0); on the test and out-of-distribution sets the per-structure Spearman ρ between
the RMS predicted force std and the force RMSE, the per-atom ρ, the force miscalibration area and
NLL after calibration, and the mean predicted force std.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from ase import Atoms
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.io import read, write

import atomforge
from atomforge import AtomforgeCalculator, UQFitContext, attach_labels, calibrate, evaluate_uncertainty
from atomforge.data.graph import GraphDataset
from atomforge.model.uncertainty import build_uq_head
from atomforge.workflows.train import train

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _bench_timing import median_call_ms  # noqa: E402

HERE = Path(__file__).resolve().parent
ETHANOL = HERE.parent / "ethanol" / "data"


def cu_cells(n: int, seed: int, rattle: float, strain: float) -> list[Atoms]:
    """``n`` EMT-labelled 32-atom Cu cells, rattled and strained."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 2))
        atoms.set_cell(atoms.cell[:] @ (np.eye(3) + np.diag(rng.uniform(-strain, strain, 3))), scale_atoms=True)
        atoms.positions += rng.normal(0, rattle, atoms.positions.shape)
        atoms.calc = EMT()
        out.append(attach_labels(atoms, energy=atoms.get_potential_energy(), forces=atoms.get_forces(),
                                 stress=atoms.get_stress()))
    return out


def data_files(system: str, folder: Path) -> dict[str, Path]:
    if system == "ethanol":
        return {"train": ETHANOL / "train.extxyz", "test": ETHANOL / "test.extxyz",
                "ood": ETHANOL / "test_1000K.extxyz"}
    folder.mkdir(parents=True, exist_ok=True)
    files = {"train": folder / "train.extxyz", "test": folder / "test.extxyz", "ood": folder / "ood.extxyz"}
    if not files["ood"].exists():
        write(files["train"], cu_cells(300, 1, 0.05, 0.01))
        write(files["test"], cu_cells(60, 2, 0.05, 0.01))
        write(files["ood"], cu_cells(60, 3, 0.12, 0.04))
    return files


def config(args: argparse.Namespace, files: dict[str, Path], run: Path, uq: dict, loss: list) -> dict:
    """The ``atomforge train`` config of one head (echoed into the result JSON)."""
    return {
        "data": {"train": str(files["train"]), "test": str(files["test"]), "valid_fraction": 0.05
                 if args.system == "ethanol" else 0.15},
        "model": {"backbone": "painn", "cutoff": 5.0 if args.system == "ethanol" else 4.5,
                  "hidden_channels": 64, "num_layers": 3, "num_rbf": 20},
        "loss": loss,
        "training": {"max_epochs": 100_000, "max_time": args.budget_seconds, "batch_size": 4, "lr": 3e-3,
                     "seed": 0, "num_threads": 1, "ema_decay": 0.995,
                     "scheduler": {"name": "cosine_time", "min_lr": 1e-5}},
        "output": str(run),
        "tracking": "none",
        "uq": uq,
    }


BASE_LOSS = [{"name": "energy", "weight": 1.0}, {"name": "forces", "weight": 10.0}]
HEADS = {
    "deep_ensemble": ({"name": "deep_ensemble", "num_members": 5}, BASE_LOSS),
    "shallow_ensemble": ({"name": "shallow_ensemble", "num_heads": 8},
                         BASE_LOSS + [{"name": "energy_nll", "weight": 0.01, "detach_mean": True}]),
    "mc_dropout": ({"name": "mc_dropout", "p": 0.1, "samples": 8}, BASE_LOSS),
    # 8 equivariant force heads on PaiNN's vector features, spread trained by forces_nll (no extra backward)
    "shallow_vector": ({"name": "shallow_ensemble", "num_heads": 8, "force_spread": "vector"},
                       BASE_LOSS + [{"name": "energy_nll", "weight": 0.01, "detach_mean": True},
                                    {"name": "forces_nll", "weight": 0.01}]),
}


def train_heads(args: argparse.Namespace, files: dict[str, Path], registry: atomforge.Registry) -> dict:
    models = {}
    for name, (uq, loss) in HEADS.items():
        run = args.run_dir / name
        cfg = config(args, files, run, uq, loss)
        if not (run / "model.pt").exists():
            started = time.perf_counter()
            train(atomforge.config_from_dict(cfg), registry, resume=atomforge.has_checkpoint(run), verbose=False)
            print(f"{name}: trained in {time.perf_counter() - started:.0f} s", flush=True)
        models[name] = atomforge.load_model(run / "model.pt", registry=registry)
    return models


def latent_head(deep: torch.nn.Module, sets: dict[str, GraphDataset], registry: atomforge.Registry) -> torch.nn.Module:
    """latent_distance (k-NN) on the deep ensemble's member 0, fitted and calibrated like train() does."""
    head = build_uq_head(copy.deepcopy(deep.potential), {"name": "latent_distance", "options": {}}, registry)
    head.fit(UQFitContext(sets["train"], sets["valid"], train_member=None, batch_size=32))
    calibrate(head, sets["valid"], method="scale")
    return head.eval()


def split_sets(args: argparse.Namespace, files: dict[str, Path]) -> dict[str, GraphDataset]:
    """The same train/valid split as ``train`` makes (seed 0), plus test and OOD."""
    structures = read(files["train"], ":")
    fraction = 0.05 if args.system == "ethanol" else 0.15
    n_valid = max(1, int(round(fraction * len(structures))))
    order = np.random.default_rng(0).permutation(len(structures))
    cutoff = 5.0 if args.system == "ethanol" else 4.5
    make = lambda atoms: GraphDataset(atoms, cutoff, dtype=torch.float32)  # noqa: E731
    return {"train": make([structures[i] for i in order[n_valid:]]),
            "valid": make([structures[i] for i in order[:n_valid]]),
            "test": make(read(files["test"], ":")), "ood": make(read(files["ood"], ":"))}


def time_calculator(model: torch.nn.Module, atoms: Atoms, calls: int, warmup: int = 10) -> float:
    """Median ms per ``get_forces()`` (see ``benchmarks/_bench_timing.py``)."""
    return median_call_ms(AtomforgeCalculator(model), atoms, calls, warmup)


def variants(models: dict) -> dict[str, torch.nn.Module]:
    """Every head plus the single model and the compared evaluation modes."""
    deep = copy.deepcopy(models["deep_ensemble"])
    deep.vectorize = True  # the two modes side by side (the head's default, auto, picks by size)
    loop = copy.deepcopy(deep)
    loop.vectorize = False
    local = copy.deepcopy(models["shallow_ensemble"])
    local.force_spread = "local"
    return {"single": deep.potential, "deep_ensemble": deep, "deep_ensemble_loop": loop,
            "shallow_ensemble": models["shallow_ensemble"], "shallow_ensemble_local": local,
            "shallow_ensemble_vector": models["shallow_vector"],
            "mc_dropout": models["mc_dropout"], "latent_distance": models["latent_distance"]}


def costs(models: dict[str, torch.nn.Module], atoms: Atoms, calls: int, tag: str) -> dict:
    ms = {name: time_calculator(model, atoms, calls) for name, model in models.items()}
    return {f"{name}_{tag}": {"ms": t, "relative": t / ms["single"]} for name, t in ms.items()}


def quality(models: dict[str, torch.nn.Module], sets: dict[str, GraphDataset]) -> dict:
    keep = ("forces_spearman_structure", "forces_spearman_atom", "forces_miscalibration_area", "forces_nll",
            "forces_std_mean", "energy_spearman", "energy_miscalibration_area", "energy_std_mean", "forces_ence")
    out = {}
    for name, model in models.items():
        if name in ("single", "deep_ensemble_loop"):
            continue
        for set_name in ("test", "ood"):
            metrics = evaluate_uncertainty(model, sets[set_name]).metrics()
            out[f"{name}/{set_name}"] = {k: metrics[k] for k in keep}
            acc = atomforge.analysis.evaluate(model, sets[set_name])
            out[f"{name}/{set_name}"]["forces_mae_meV"] = acc.metrics()["forces_mae"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--system", choices=("ethanol", "cu"), required=True)
    p.add_argument("--budget-seconds", type=float, default=120.0)
    p.add_argument("--run-dir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--calls", type=int, default=200, help="timed calls on one structure")
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    args.run_dir = args.run_dir or HERE / "results" / f"{args.system}-runs"
    args.out = args.out or HERE / "results" / f"{args.system}.json"
    registry = atomforge.make_registry()
    files = data_files(args.system, args.run_dir / "data")
    models = train_heads(args, files, registry)
    sets = split_sets(args, files)
    models["latent_distance"] = latent_head(models["deep_ensemble"], sets, registry)
    all_models = variants(models)
    result = {"system": args.system, "budget_seconds": args.budget_seconds,
              "configs": {n: config(args, files, args.run_dir / n, *HEADS[n]) for n in HEADS},
              "calibration": {n: m.calibration.to_dict() for n, m in models.items()}}
    result["quality"] = quality(all_models, sets)
    one = read(files["test"], 0)
    result["cost"] = costs(all_models, one, args.calls, f"{len(one)}_atoms")
    if args.system == "ethanol":
        result["cost"].update(costs(all_models, read(ETHANOL / "ethanol_999.extxyz"), 5, "999_atoms"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({"quality": result["quality"], "cost": result["cost"]}, indent=1))


if __name__ == "__main__":
    main()
