"""Export cost and per-call speed of exported models vs the eager calculator (docs/deploy.md).

Default-size backbones (random weights: speed does not depend on training), cutoff 5 Å, float32,
one torch thread. Per backbone: the time `export_model` takes (compile + save, without the probe
check), then the median CPU and wall time of one energy+forces(+stress) call on ethanol (9 atoms) and on
a 1000-atom Cu cell, for the eager AtomforgeCalculator, the TorchScript export
(ExportedCalculator) and the metatomic export (metatomic's own ASE calculator). Every call moves
the atoms a little, so no calculator can return a cached result.

    taskset -c 1 python benchmarks/deploy/export_speed.py [--repeat 7] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from ase.build import bulk, molecule

from atomforge import export_model, load_calculator, load_exported, make_registry, save_model
from atomforge.model.modelfile import build_model

BACKBONES = {"painn": {}, "tensornet": {}, "transformer": {}}


def model_file(folder: Path, backbone: str) -> Path:
    torch.manual_seed(0)
    config = {"backbone": backbone, "cutoff": 5.0, "elements": [1, 6, 8, 29], "dtype": "float32",
              "atomic_energies": [-1.0, -5.0, -4.0, -3.0], "scale": 1.0, "shift": 0.0, "options": BACKBONES[backbone]}
    return save_model(build_model(config, make_registry()), folder / f"{backbone}.pt", config=config)


def per_call(calculator, atoms, repeat: int) -> tuple[float, float]:
    """Median (CPU, wall) seconds of one energy + forces (+ stress for the cell) call, after 3
    warm-up calls. CPU time of the calling thread (one torch thread: all the work) is what a quiet
    machine's wall time would be; on the shared VM the wall time includes waiting for the core."""
    rng = np.random.default_rng(0)
    cpu, wall = [], []
    for k in range(repeat + 3):
        atoms.positions += rng.normal(0, 0.001, atoms.positions.shape)
        start, start_cpu = time.perf_counter(), time.thread_time()
        calculator.calculate(atoms, ["energy", "forces"] + (["stress"] if atoms.pbc.all() else []), ["positions"])
        if k >= 3:
            cpu.append(time.thread_time() - start_cpu)
            wall.append(time.perf_counter() - start)
    return statistics.median(cpu), statistics.median(wall)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    systems = {"ethanol (9 atoms)": molecule("CH3CH2OH"),
               "Cu cell (1000 atoms)": bulk("Cu", "fcc", a=3.61, cubic=True).repeat((5, 5, 10))}
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for backbone in BACKBONES:
            path = model_file(Path(folder), backbone)
            row = {}
            calculators = {"eager": load_calculator(path)}
            for fmt in ("torchscript", "metatomic"):
                start = time.perf_counter()
                report = export_model(path, format=fmt, verify=False)
                row[f"export_s[{fmt}]"] = round(time.perf_counter() - start, 2)  # wall, incl. scripting + save
                calculators[fmt] = load_exported(report.path)
            for name, atoms in systems.items():
                for kind, calculator in calculators.items():
                    cpu, wall = per_call(calculator, atoms.copy(), args.repeat)
                    row[f"{name} {kind} ms"] = {"cpu": round(1000 * cpu, 2), "wall": round(1000 * wall, 2)}
            results[backbone] = row
            print(backbone, json.dumps(row, indent=1), flush=True)
    record = {"torch": torch.__version__, "threads": 1, "repeat": args.repeat, "results": results}
    if args.json:
        args.json.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
