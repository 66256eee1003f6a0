"""Evaluate and time several ethanol models side by side: atomforge model files and MACE files.

Runs in the mace venv (it has atomforge installed too: ``pip install -e .`` there), one thread::

    OMP_NUM_THREADS=1 benchmarks/ethanol/.venv-mace/bin/python benchmarks/ethanol/evaluate_models.py \\
        --data benchmarks/ethanol/data-i16 --out results/side.json \\
        af_mace=results/af-mace/model.pt mace_cli=results/mace-cli/mace.model painn=results/painn/model.pt

For every model (``NAME=PATH``; ``*.model`` is read with ``MACECalculator``, anything else with
``atomforge.load_calculator``) and both held-out sets — ``test.extxyz`` (an independent 600 K
trajectory) and ``test_1000K.extxyz`` (a hotter one): energy MAE (meV/atom), force MAE and RMSE
over all components (meV/Å), per-frame force RMSE p50 / p90 / p99 / max, and the largest single
component error. Then calculator time per ``get_forces()`` (median ms, positions nudged by 1e-4 Å
before every call) on one ethanol and on the 999-atom box, **interleaved**: ``--rounds`` rounds, each
timing every model in turn, so that a change of machine load hits all models alike; the median
over rounds is reported, with the spread.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from ase.io import read

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _bench_timing import median_call_ms  # noqa: E402


def calculator(path: Path, dtype: str):
    if path.suffix == ".model":
        import mace  # noqa: F401  (before e3nn)
        from mace.calculators import MACECalculator

        return MACECalculator(model_paths=str(path), device="cpu", default_dtype=dtype)
    import atomforge

    return atomforge.load_calculator(path)


def errors(calc, frames) -> dict:
    e_err, f_err, frame_rmse = [], [], []
    for atoms in frames:
        ref_e, ref_f = atoms.get_potential_energy(), atoms.get_forces()
        work = atoms.copy()
        work.calc = calc
        e_err.append((work.get_potential_energy() - ref_e) / len(atoms))
        diff = work.get_forces() - ref_f
        f_err.append(diff.reshape(-1))
        frame_rmse.append(np.sqrt(np.mean(diff**2)))
    f = np.concatenate(f_err) * 1e3
    rmse = np.array(frame_rmse) * 1e3
    return {"energy_mae_meV_per_atom": float(np.mean(np.abs(e_err)) * 1e3), "force_mae": float(np.mean(np.abs(f))),
            "force_rmse": float(np.sqrt(np.mean(f**2))), "force_max_component_error": float(np.max(np.abs(f))),
            "frame_rmse_p50": float(np.percentile(rmse, 50)), "frame_rmse_p90": float(np.percentile(rmse, 90)),
            "frame_rmse_p99": float(np.percentile(rmse, 99)), "frame_rmse_max": float(rmse.max()), "frames": len(frames)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="NAME=PATH")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--mace-dtype", default="float64", help="MACECalculator default_dtype (as trained)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls-small", type=int, default=60)
    p.add_argument("--calls-large", type=int, default=3)
    p.add_argument("--no-errors", action="store_true", help="timing only")
    p.add_argument("--no-timing", action="store_true", help="errors only")
    args = p.parse_args()
    torch.set_num_threads(1)
    models = dict(item.split("=", 1) for item in args.models)
    calcs = {name: calculator(Path(path), args.mace_dtype) for name, path in models.items()}
    result: dict = {"data": str(args.data), "models": models, "threads": 1, "torch": torch.__version__}
    if not args.no_errors:
        sets = {"test": read(args.data / "test.extxyz", ":"), "hot": read(args.data / "test_1000K.extxyz", ":")}
        for name, calc in calcs.items():
            result[name] = {key: errors(calc, frames) for key, frames in sets.items()}
            print(name, json.dumps(result[name]), flush=True)
    if args.no_timing:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        return
    small, large = read(args.data / "test.extxyz", 0), read(args.data / "ethanol_999.extxyz")
    times: dict = {name: {"9": [], "999": []} for name in calcs}
    for round_ in range(args.rounds):
        for name, calc in calcs.items():
            times[name]["9"].append(median_call_ms(calc, small, args.calls_small, 10, round_))
            times[name]["999"].append(median_call_ms(calc, large, args.calls_large, 1, round_))
    for name in calcs:
        result.setdefault(name, {})["timing_ms"] = {
            size: {"median": float(np.median(v)), "min": float(np.min(v)), "max": float(np.max(v))}
            for size, v in times[name].items()}
        print(name, "timing", json.dumps(result[name]["timing_ms"]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
