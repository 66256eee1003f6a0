"""Physics as losses: does a non-equivariant, direct-force transformer learn the physics?

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/physics/run.py --system ethanol --budget-seconds 120
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/physics/run.py --system cu --budget-seconds 120
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/physics/run.py --system ethanol --time-only   # re-time calls

Variants, each trained through ``atomforge.workflow.train`` (the CLI's code path) for the SAME
wall-clock budget on ONE thread (cosine LR over the budget), then measured with
``atomforge.analysis.physics``:

=================  =====================================================================
``direct-noaug``   transformer, ``forces: direct``, no augmentation
``direct``         transformer, ``forces: direct`` + ``rotation_augmentation``
``direct-curl``    ``direct`` + ``curl_penalty`` (weight ``--curl-weight``, 1 probe)
``conservative``   transformer, ``forces: conservative`` + ``rotation_augmentation``
``painn``          PaiNN (equivariant, conservative), for reference
=================  =====================================================================

Per variant: test force/energy MAE; rotation error (``--rotations`` random rotations of
``--structures`` test structures); curl; an NVE run of ``--nve-ps`` ps from the first test
structure (velocities at ``--temperature`` K; drift, max deviation, stability); ms per ASE
``get_forces()`` call (median, 1e-4 Å nudge before every call). Systems: ``ethanol`` (the
GFN2-xTB data of ``benchmarks/ethanol/data``, 950 train / 50 valid, 500 test, dt 0.5 fs) and
``cu`` (32-atom fcc Cu cells labelled by the ``emt`` oracle as in ``atomforge demo``: 200 train,
50 test; dt 1 fs). Results go to ``benchmarks/physics/results/<system>.json``.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from ase import Atoms
from ase.io import read, write

import atomforge
from atomforge.model.calculator import AtomforgeCalculator
from atomforge.config import EvaluationConfig
from atomforge.analysis.physics import curl_metrics, nve_stability, rotation_error
from atomforge.workflows.train import train

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _bench_timing import median_call_ms  # noqa: E402

HERE = Path(__file__).resolve().parent
VARIANTS = ("direct-noaug", "direct", "direct-curl", "conservative", "painn")


def system_data(system: str, registry: atomforge.Registry) -> tuple[Path, Path]:
    """Train and test extxyz files of the system (Cu is generated once with the emt oracle)."""
    if system == "ethanol":
        data = HERE.parent / "ethanol" / "data"
        return data / "train.extxyz", data / "test.extxyz"
    folder = HERE / "data"
    train_path, test_path = folder / "cu_train.extxyz", folder / "cu_test.extxyz"
    if not train_path.exists():
        from atomforge.workflows.demo import make_cu_data

        folder.mkdir(parents=True, exist_ok=True)
        train_set, test_set = make_cu_data(registry, n_train=200, n_test=50, seed=7)
        write(train_path, train_set)
        write(test_path, test_set)
    return train_path, test_path


def variant_config(variant: str, args: argparse.Namespace, train_path: Path, test_path: Path) -> dict:
    """The ``atomforge train`` config of one variant (everything else is shared)."""
    if variant == "painn":
        model = {"backbone": "painn", "hidden_channels": args.hidden, "num_layers": args.layers, "num_rbf": 20}
    else:
        model = {"backbone": "transformer", "hidden_channels": args.hidden, "num_layers": args.layers,
                 "num_heads": args.heads, "num_rbf": 16,
                 "forces": "conservative" if variant == "conservative" else "direct"}
    loss = [{"name": "energy", "weight": 1.0}, {"name": "forces", "weight": 10.0}]
    if variant in ("direct", "direct-curl", "conservative"):
        loss.append({"name": "rotation_augmentation"})
    if variant == "direct-curl":
        loss.append({"name": "curl_penalty", "weight": args.curl_weight, "probes": 1})
    return {
        "data": {"train": str(train_path), "test": str(test_path), "valid_fraction": 0.05},
        "model": {"cutoff": args.cutoff, **model},
        "loss": loss,
        "training": {"max_epochs": 100_000, "max_time": args.budget_seconds, "batch_size": 4, "lr": args.lr,
                     "seed": args.seed, "num_threads": 1, "ema_decay": 0.995,
                     "scheduler": {"name": "cosine_time", "min_lr": 1e-5}},
        "output": str(HERE / "results" / f"{args.system}-{variant}"),
        "tracking": "none",
    }


def time_calls(model: torch.nn.Module, atoms: Atoms, n_calls: int = 200, n_warmup: int = 20) -> float:
    """Median ms per ``get_forces()`` (see ``benchmarks/_bench_timing.py``)."""
    return median_call_ms(AtomforgeCalculator(model), atoms, n_calls, n_warmup)


def time_model(model: torch.nn.Module, atoms: Atoms, n_calls: int = 300) -> float:
    """Median ms of ``model(batch)`` (energy + forces, no stress, no neighbour list)."""
    from atomforge.data.graph import atoms_to_graph, collate

    batch = collate([atoms_to_graph(atoms, model.cutoff)])
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    times = []
    for i in range(20 + n_calls):
        start = time.perf_counter()
        model(batch, compute_forces=True, compute_stress=False)
        if i >= 20:
            times.append(1e3 * (time.perf_counter() - start))
    return float(np.median(times))


def retime(args: argparse.Namespace, paths: tuple[Path, Path]) -> None:
    """``--time-only``: re-time the calls of already trained variants (one process, idle-ish CPU)."""
    out = HERE / "results" / f"{args.system}.json"
    results = json.loads(out.read_text())
    first = read(paths[1], 0)
    for variant in results:
        model = atomforge.load_model(HERE / "results" / f"{args.system}-{variant}" / "model.pt")
        results[variant]["ms_per_call"] = time_calls(model, first)
        results[variant]["model_ms_forces"] = time_model(model, first)
        print(variant, results[variant]["ms_per_call"], results[variant]["model_ms_forces"], file=sys.stderr)
    out.write_text(json.dumps(results, indent=2))


def measure(model_path: Path, test: list[Atoms], args: argparse.Namespace) -> dict:
    """Physics metrics and the per-call cost of a trained model."""
    model = atomforge.load_model(model_path)
    subset = test[: args.structures]
    out = {**rotation_error(model, subset, rotations=args.rotations, seed=args.seed),
           **curl_metrics(model, subset, probes=8, seed=args.seed)}
    settings = EvaluationConfig(physics=True, nve_steps=int(round(args.nve_ps * 1000 / args.timestep_fs)),
                                timestep_fs=args.timestep_fs, temperature=args.temperature, seed=args.seed)
    md = nve_stability(test[0], AtomforgeCalculator(model), settings)
    out.update({f"nve_{k}": v for k, v in dataclasses.asdict(md).items()})
    out["ms_per_call"] = time_calls(model, test[0])
    out["model_ms_forces"] = time_model(model, test[0])
    out["n_params"] = sum(p.numel() for p in model.parameters())
    return out


def run_variant(variant: str, args: argparse.Namespace, registry: atomforge.Registry,
                paths: tuple[Path, Path]) -> dict:
    cfg = variant_config(variant, args, *paths)
    run_dir = Path(cfg["output"])
    if not args.reuse:
        shutil.rmtree(run_dir, ignore_errors=True)
    model_path = run_dir / "model.pt"
    if not model_path.exists():
        outcome = train(atomforge.config_from_dict(cfg), registry, verbose=False)
        metrics = outcome.test_metrics
    else:
        metrics = json.loads((run_dir / "metrics.json").read_text())
    history = atomforge.read_training_state(run_dir)["history"]
    result = {"test_forces_mae": metrics["test_forces_mae"], "test_energy_mae": metrics["test_energy_mae"],
              "epochs": len(history), "train_seconds": history[-1]["elapsed"], "config": cfg}
    result.update(measure(model_path, read(paths[1], ":"), args))
    print(json.dumps({variant: {k: v for k, v in result.items() if k != "config"}}, indent=1), file=sys.stderr)
    return result


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--system", choices=("ethanol", "cu"), required=True)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--budget-seconds", type=float, default=150.0)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--cutoff", type=float, default=None, help="default: 5.0 (ethanol), 4.5 (cu)")
    p.add_argument("--lr", type=float, default=0.002)
    p.add_argument("--curl-weight", type=float, default=1.0)
    p.add_argument("--rotations", type=int, default=8)
    p.add_argument("--structures", type=int, default=16)
    p.add_argument("--nve-ps", type=float, default=10.0)
    p.add_argument("--timestep-fs", type=float, default=None, help="default: 0.5 (ethanol), 1.0 (cu)")
    p.add_argument("--temperature", type=float, default=300.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reuse", action="store_true", help="re-measure existing models instead of retraining")
    p.add_argument("--time-only", action="store_true", help="only re-time the calls of trained variants")
    args = p.parse_args()
    args.cutoff = args.cutoff or (5.0 if args.system == "ethanol" else 4.5)
    args.timestep_fs = args.timestep_fs or (0.5 if args.system == "ethanol" else 1.0)
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    registry = atomforge.make_registry()
    paths = system_data(args.system, registry)
    if args.time_only:
        retime(args, paths)
        return
    out = HERE / "results" / f"{args.system}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(out.read_text()) if out.exists() else {}
    for variant in args.variants:
        results[variant] = run_variant(variant, args, registry, paths)
        out.write_text(json.dumps(results, indent=2))
    print(json.dumps({v: {k: r[k] for k in r if k != "config"} for v, r in results.items()}, indent=2))


if __name__ == "__main__":
    main()
