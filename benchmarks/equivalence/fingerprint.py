"""Fingerprints of seeded training runs, to prove that a refactor changes no result.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/equivalence/fingerprint.py --out before.json
    (change the code)
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/equivalence/fingerprint.py --out after.json
    .venv/bin/python benchmarks/equivalence/fingerprint.py --compare before.json after.json

Every scenario trains through the public path (``atomforge train`` config → ``workflow.train``,
DeepSpeed through ``torchrun -m atomforge train``) with a fixed seed and an epoch limit (never a
wall-clock one, which is not reproducible), and records the SHA-256 of the exported model's
weights, the per-epoch train/valid losses and the final metrics. ``--compare`` reports, per
scenario, whether the weights are bit-identical and the largest relative difference of any
recorded number.

Scenarios: PaiNN 64×3 on GFN2-xTB ethanol (the ethanol benchmark's model and settings, with an
epoch-based cosine schedule); PaiNN on EMT Cu with energy/forces/stress + rotation augmentation;
the direct-force transformer with a curl penalty; a 2-member deep ensemble; a shallow ensemble
trained with ``energy_nll``; 2-process DeepSpeed ZeRO 0, 1, 2, 3 (stage 3 with gradient
accumulation 2). The ethanol data come from ``benchmarks/ethanol/make_data.py`` (``--ethanol``);
without it the ethanol scenario is skipped.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import argparse
import hashlib
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.io import write

import atomforge
from atomforge.workflows.train import train

HERE = Path(__file__).resolve().parent


def cu_structures(n: int, seed: int) -> list:
    """Rattled, strained 8-atom Cu cells labelled with EMT (energy, forces, stress)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((1, 1, 2))
        atoms.set_cell(atoms.cell[:] @ (np.eye(3) + np.diag(rng.uniform(-0.02, 0.02, 3))), scale_atoms=True)
        atoms.positions += rng.normal(0, 0.08, atoms.positions.shape)
        work = atoms.copy()
        work.calc = EMT()
        out.append(atomforge.attach_labels(atoms, energy=work.get_potential_energy(), forces=work.get_forces(),
                                           stress=work.get_stress()))
    return out


def weights_hash(model_path: Path) -> str:
    state = torch.load(model_path, weights_only=True)["state_dict"]
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


def history_of(run_dir: Path) -> list[dict[str, float]]:
    """Per-epoch losses from the run's checkpoint (this version's ``checkpoint/`` folder, or the
    0.1 layout: ``checkpoint.pt`` or ``deepspeed_checkpoint/``)."""
    if (run_dir / "checkpoint" / "latest").exists():
        history = atomforge.read_training_state(run_dir)["history"]
    elif (run_dir / "checkpoint.pt").exists():
        history = torch.load(run_dir / "checkpoint.pt", weights_only=True)["history"]
    else:
        folder = run_dir / "deepspeed_checkpoint"
        tag = (folder / "latest").read_text().strip()
        states = sorted((folder / tag).glob("*model_states.pt"))
        history = torch.load(states[0], weights_only=False)["history"]
    return [{"train_loss": h["train_loss"], "valid_loss": h["valid_loss"]} for h in history]


def record(run_dir: Path) -> dict[str, Any]:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {"weights": weights_hash(run_dir / "model.pt"), "history": history_of(run_dir),
            "metrics": {k: v for k, v in metrics.items() if isinstance(v, float) and math.isfinite(v)}}


def base(train_file: Path, valid_file: Path, output: Path, **training: Any) -> dict[str, Any]:
    return {
        "data": {"train": str(train_file), "valid": str(valid_file), "test": str(valid_file)},
        "model": {"backbone": "painn", "cutoff": 4.0, "hidden_channels": 16, "num_layers": 2, "num_rbf": 8},
        "loss": [{"name": "energy", "weight": 1.0}, {"name": "forces", "weight": 10.0}],
        "training": {"max_epochs": 3, "batch_size": 4, "lr": 0.005, "seed": 3, "num_threads": 1, **training},
        "output": str(output),
        "tracking": "none",
    }


def scenarios(folder: Path, ethanol: Path | None) -> dict[str, dict[str, Any]]:
    tr, va = folder / "train.extxyz", folder / "valid.extxyz"
    out: dict[str, dict[str, Any]] = {}
    if ethanol is not None:
        out["ethanol_painn64x3"] = {
            "data": {"train": str(ethanol / "train.extxyz"), "test": str(ethanol / "test.extxyz"),
                     "valid_fraction": 0.05},
            "model": {"backbone": "painn", "cutoff": 5.0, "hidden_channels": 64, "num_layers": 3, "num_rbf": 20},
            "loss": [{"name": "energy", "weight": 1.0}, {"name": "forces", "weight": 10.0}],
            "training": {"max_epochs": 2, "batch_size": 4, "lr": 0.003, "seed": 0, "num_threads": 1,
                         "ema_decay": 0.995, "scheduler": {"name": "cosine", "min_lr": 1e-5}},
            "tracking": "none",
        }
    cu = base(tr, va, folder / "x", scheduler={"name": "plateau", "patience": 1})
    cu["loss"] = [{"name": "energy", "weight": 1.0}, {"name": "forces", "weight": 10.0},
                  {"name": "stress", "weight": 5.0}, {"name": "rotation_augmentation"}]
    out["cu_stress_augmentation"] = cu
    direct = base(tr, va, folder / "x", max_epochs=2)
    direct["model"] = {"backbone": "transformer", "cutoff": 4.0, "forces": "direct", "hidden_channels": 16,
                       "num_layers": 1, "num_heads": 2}
    direct["loss"] = [{"name": "energy", "weight": 1.0}, {"name": "forces", "weight": 10.0},
                      {"name": "curl_penalty", "weight": 0.1}]
    out["transformer_direct_curl"] = direct
    out["deep_ensemble"] = {**base(tr, va, folder / "x", max_epochs=2), "uq": {"name": "deep_ensemble",
                                                                                "num_members": 2}}
    shallow = base(tr, va, folder / "x", max_epochs=2)
    shallow["uq"] = {"name": "shallow_ensemble", "num_heads": 4}
    shallow["loss"].append({"name": "energy_nll", "weight": 0.01, "detach_mean": True})
    out["shallow_ensemble"] = shallow
    for stage, accumulation in ((0, 1), (1, 1), (2, 1), (3, 2)):
        ds = base(tr, va, folder / "x", engine="deepspeed", scheduler="none")
        ds["deepspeed"] = {"zero_stage": stage, "gradient_accumulation_steps": accumulation}
        out[f"deepspeed_zero{stage}"] = ds
    return out


def run(name: str, raw: dict[str, Any], folder: Path) -> dict[str, Any]:
    raw = {**raw, "output": str(folder / name)}
    if raw["training"].get("engine") == "deepspeed":
        path = folder / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw))
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                   "-m", "atomforge", "train", str(path), "--quiet"]
        done = subprocess.run(command, env=env, cwd=folder, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{name} failed:\n{done.stderr[-3000:]}")
    else:
        torch.set_num_threads(1)
        train(atomforge.config_from_dict(raw, folder), atomforge.make_registry(), verbose=False)
    return record(folder / name)


def compare(before: Path, after: Path) -> int:
    a, b = json.loads(before.read_text()), json.loads(after.read_text())
    worst_all = 0.0
    for name in sorted(set(a) | set(b)):
        if name not in a or name not in b:
            print(f"{name:<28} only in {'after' if name in b else 'before'}")
            continue
        numbers = lambda r: [v for h in r["history"] for v in h.values()] + [r["metrics"][k] for k in sorted(r["metrics"])]  # noqa: E731
        x, y = numbers(a[name]), numbers(b[name])
        worst = max((abs(p - q) / max(abs(p), 1e-12) for p, q in zip(x, y)), default=0.0) if len(x) == len(y) else math.inf
        worst_all = max(worst_all, worst)
        same = "identical" if a[name]["weights"] == b[name]["weights"] else "DIFFERENT"
        print(f"{name:<28} weights {same:<9}  max rel. difference of losses/metrics {worst:.2e}")
    return 0 if worst_all < 1e-6 else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--ethanol", type=Path, default=None, help="folder of make_data.py output")
    parser.add_argument("--only", nargs="*", default=None, help="scenario names")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    args = parser.parse_args()
    if args.compare:
        return compare(*args.compare)
    ethanol = args.ethanol.resolve() if args.ethanol else None
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write(folder / "train.extxyz", cu_structures(24, seed=1))
        write(folder / "valid.extxyz", cu_structures(8, seed=2))
        results = {}
        for name, raw in scenarios(folder, ethanol).items():
            if args.only and name not in args.only:
                continue
            results[name] = run(name, raw, folder)
            print(f"{name}: {results[name]['weights'][:16]}", file=sys.stderr)
    args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
