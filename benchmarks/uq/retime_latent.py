"""Re-time the latent_distance head (fitted in memory as run_uq.py does) against the single model,
interleaved A/B (4 rounds), on 9-atom ethanol, the 999-atom box and a 32-atom Cu cell.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/uq/retime_latent.py

Needs the trained runs of run_uq.py (benchmarks/uq/results/{ethanol,cu}-runs).
"""
import sys, statistics, argparse, torch
torch.set_num_threads(1)
sys.path.insert(0, "benchmarks"); sys.path.insert(0, "benchmarks/uq")
from _bench_timing import median_call_ms
import atomforge
from atomforge import AtomforgeCalculator
from ase.io import read
import run_uq
from pathlib import Path
out = {}
for system, atoms_list in (("ethanol", [("9", read("benchmarks/ethanol/data/test.extxyz", 0), 100), ("999", read("benchmarks/ethanol/data/ethanol_999.extxyz"), 5)]),
                           ("cu", None)):
    args = argparse.Namespace(system=system, run_dir=Path(f"benchmarks/uq/results/{system}-runs"))
    files = run_uq.data_files(system, args.run_dir / "data")
    sets = run_uq.split_sets(args, files)
    reg = atomforge.make_registry()
    deep = atomforge.load_model(args.run_dir / "deep_ensemble" / "model.pt")
    latent = run_uq.latent_head(deep, sets, reg)
    if atoms_list is None:
        atoms_list = [("32", read(files["test"], 0), 100)]
    for tag, atoms, calls in atoms_list:
        a, b = [], []
        for _ in range(4):
            a.append(median_call_ms(AtomforgeCalculator(deep.potential), atoms, calls, 2))
            b.append(median_call_ms(AtomforgeCalculator(latent), atoms, calls, 2))
        print(system, tag, "single", round(statistics.median(a), 2), "latent", round(statistics.median(b), 2),
              "ratio", round(statistics.median(b) / statistics.median(a), 2), flush=True)
