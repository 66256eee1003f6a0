"""Universal → specific (issue 18, benchmark 2): SevenNet-0 and CHGNet 0.3.0 zero-shot, fine-tuned, and
PaiNN from scratch on an EMT Cu–Au alloy task, at several label counts.

    cd /work/main && . .venv/bin/activate
    python benchmarks/finetune/materials.py --workers 2
    python benchmarks/finetune/materials.py --summarize-only

Data (made here, ``--out/data``, deterministic): 16-atom fcc Cu(1−x)Au(x) cells (2×2×1 conventional), x
uniform in [0, 1], lattice parameter by Vegard's law (Cu 3.61, Au 4.08 Å) times a random isotropic strain
of ±3 % and a random shear of ±2 %, atoms rattled with σ uniform in [0.03, 0.15] Å, labelled with ASE's
EMT (energy, forces, stress). ``train`` (400, seed 0; the first N are the N labels, the last
``max(3, round(0.15 N))`` of them validate), ``test`` (100, seed 1, same distribution) and ``hot`` (50,
seed 2, σ in [0.12, 0.20] Å and ±5 % strain: off-distribution).

Arms, for N in ``--sizes`` and each seed (one torch thread per run, ``--workers`` runs at a time):

* ``zeroshot_<model>``: the pretrained model with its reference energies refitted to the N labels
  (``max_epochs: 0``, ``finetune.reference_energies: refit``): EMT's energy zero differs from PBE's by
  eV per atom, so only the per-element offsets are fitted — the forces are the foundation model's.
* ``ft_<model>``: fine-tuned on the N labels for ``--budget`` s (lr ``--ft-lr``, energy ×1 + forces ×10
  + stress ×1, reference energies refitted first, EMA 0.995, ``cosine_time``).
* ``scratch``: PaiNN 64×3, cutoff 5 Å, the same labels and budget, lr 3e-3.

Evaluation: energy MAE (meV/atom), force MAE/RMSE (meV/Å), per-frame force-RMSE p99, on ``test`` and
``hot``. Raw: ``docs/benchmarks/issue18/materials/results.json``; table: ``summary.md`` next to it.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import json
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

PRETRAINED = {"sevennet": "7net-0", "chgnet": "0.3.0"}
LOSS = [{"name": "energy", "weight": 1.0}, {"name": "forces", "weight": 10.0}, {"name": "stress", "weight": 1.0}]


def make_cells(n: int, seed: int, rattle: tuple[float, float], strain: float) -> list:
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = rng.uniform()
        atoms = bulk("Cu", "fcc", a=3.61 * (1 - x) + 4.08 * x, cubic=True).repeat((2, 2, 1))
        atoms.symbols[rng.permutation(len(atoms))[: int(round(x * len(atoms)))]] = "Au"
        deform = np.eye(3) * (1 + rng.uniform(-strain, strain)) + rng.uniform(-0.02, 0.02, (3, 3))
        atoms.set_cell(atoms.cell[:] @ deform, scale_atoms=True)
        atoms.positions += rng.normal(0, rng.uniform(*rattle), atoms.positions.shape)
        atoms.calc = EMT()
        e, f, s = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()
        atoms.calc = SinglePointCalculator(atoms, energy=e, forces=f, stress=s)
        out.append(atoms)
    return out


def make_data(folder: Path) -> None:
    from ase.io import write

    folder.mkdir(parents=True, exist_ok=True)
    for name, n, seed, rattle, strain in (("train", 400, 0, (0.03, 0.15), 0.03), ("test", 100, 1, (0.03, 0.15), 0.03),
                                          ("hot", 50, 2, (0.12, 0.20), 0.05)):
        if not (folder / f"{name}.extxyz").exists():
            write(folder / f"{name}.extxyz", make_cells(n, seed, rattle, strain))


def split(data: Path, n: int) -> tuple[Path, Path]:
    from ase.io import read, write

    train, valid = data / f"train_{n}.extxyz", data / f"valid_{n}.extxyz"
    if not train.exists():
        frames = read(data / "train.extxyz", index=f":{n}")
        v = max(3, round(0.15 * n))
        write(valid, frames[n - v :])
        write(train, frames[: n - v])
    return train, valid


def jobs(args: argparse.Namespace) -> list[dict]:
    out = []
    training = lambda seconds, lr, seed, epochs=100_000: {  # noqa: E731
        "max_epochs": epochs, "max_time": seconds, "batch_size": 4, "lr": lr, "seed": seed, "num_threads": 1,
        "ema_decay": 0.995, "scheduler": {"name": "cosine_time", "min_lr": 1e-5}}
    for n in args.sizes:
        train, valid = split(args.out / "data", n)
        data = {"train": str(train), "valid": str(valid)}
        for seed in args.seeds:
            for backbone, name in PRETRAINED.items():
                model = {"backbone": backbone, "pretrained": name}
                if seed == args.seeds[0]:  # zero-shot is deterministic: one seed
                    out.append({"name": f"zeroshot_{backbone}/n{n}/s{seed}", "raw": {
                        "data": data, "model": model, "loss": LOSS, "finetune": {"reference_energies": "refit"},
                        "training": training(None, 1e-4, seed, epochs=0)}})
                out.append({"name": f"ft_{backbone}/n{n}/s{seed}", "raw": {
                    "data": data, "model": model, "loss": LOSS, "finetune": {"reference_energies": "refit"},
                    "training": training(args.budget, args.ft_lr, seed)}})
            out.append({"name": f"scratch/n{n}/s{seed}", "raw": {
                "data": data, "loss": LOSS, "training": training(args.budget, 3e-3, seed),
                "model": {"backbone": "painn", "cutoff": 5.0, "hidden_channels": 64, "num_layers": 3}}})
    return out


def run_job(job: dict, out: str) -> dict:
    import torch

    torch.set_num_threads(1)
    from ase.io import read
    from evaluate_models import errors

    from atomforge import config_from_dict, load_model, make_registry
    from atomforge.model.calculator import AtomforgeCalculator
    from atomforge.workflows.train import train

    run_dir = Path(out) / "runs" / job["name"]
    started = time.perf_counter()
    if not (run_dir / "model.pt").exists():
        shutil.rmtree(run_dir, ignore_errors=True)
        raw = dict(job["raw"])
        if raw["training"]["max_time"] is None:
            raw["training"] = {k: v for k, v in raw["training"].items() if k not in ("max_time", "scheduler")}
        train(config_from_dict({**raw, "output": str(run_dir), "tracking": {"name": "mlflow", "experiment": "issue18-materials", "run_name": job["name"].replace("/", "-"), "tracking_uri": f"sqlite:///{Path(out) / 'mlflow.db'}"}}), make_registry(), verbose=False)
    seconds = time.perf_counter() - started
    calc = AtomforgeCalculator(load_model(run_dir / "model.pt"))
    return {"name": job["name"], "train_seconds": seconds,
            "errors": {split_: errors(calc, read(Path(out) / "data" / f"{split_}.extxyz", index=":"))
                       for split_ in ("test", "hot")}}


def summarize(results: dict, path: Path) -> None:
    def cell(rows: list[dict], key: str, metric: str) -> str:
        values = [r["errors"][key][metric] for r in rows]
        return f"{np.mean(values):.1f}" + (f" ({', '.join(f'{v:.1f}' for v in values)})" if len(values) > 1 else "")

    groups: dict[tuple[str, int], list[dict]] = {}
    for name, row in results.items():
        arm, n, _ = name.split("/")
        groups.setdefault((arm, int(n[1:])), []).append(row)
    lines = ["| arm | N | test F-MAE | test F-RMSE | test frame-RMSE p99 | test E-MAE meV/atom | hot F-MAE | "
             "hot F-RMSE | train s |", "|" + "---|" * 9]
    for (arm, n), rows in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        lines.append(f"| {arm} | {n} | {cell(rows, 'test', 'force_mae')} | {cell(rows, 'test', 'force_rmse')} | "
                     f"{cell(rows, 'test', 'frame_rmse_p99')} | {cell(rows, 'test', 'energy_mae_meV_per_atom')} | "
                     f"{cell(rows, 'hot', 'force_mae')} | {cell(rows, 'hot', 'force_rmse')} | "
                     f"{np.mean([r['train_seconds'] for r in rows]):.0f} |")
    path.write_text("Forces in meV/Å; each cell: mean over seeds (per seed).\n\n" + "\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=HERE / "results-materials")
    p.add_argument("--report", type=Path, default=ROOT / "docs" / "benchmarks" / "issue18" / "materials")
    p.add_argument("--sizes", type=int, nargs="+", default=[25, 100, 400])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--budget", type=float, default=240.0, help="training seconds per fine-tuned / scratch run")
    p.add_argument("--ft-lr", type=float, default=3e-4)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--summarize-only", action="store_true")
    args = p.parse_args()
    args.out = args.out.resolve()
    args.report.mkdir(parents=True, exist_ok=True)
    results_file = args.report / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    if not args.summarize_only:
        started = time.perf_counter()
        make_data(args.out / "data")
        todo = [j for j in jobs(args) if j["name"] not in results]
        with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
            for job, future in [(j, pool.submit(run_job, j, str(args.out))) for j in todo]:
                row = future.result()
                row["config"] = job["raw"]
                results[job["name"]] = row
                results_file.write_text(json.dumps(results, indent=1))
                print(f"{job['name']}: test F-MAE {row['errors']['test']['force_mae']:.1f} meV/Å "
                      f"({row['train_seconds']:.0f} s)", flush=True)
        (args.report / "meta.json").write_text(json.dumps({
            "command": " ".join(sys.argv), "wall_seconds": time.perf_counter() - started,
            "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}, indent=1))
    summarize(results, args.report / "summary.md")
    print((args.report / "summary.md").read_text())


if __name__ == "__main__":
    main()
