"""Peak memory and time of one calculator call on large fcc Cu cells: PaiNN with edge chunking
(the default, ``edge_chunk: auto``) vs without (``edge_chunk: 0``).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/memory/calculator_memory.py \
        --out docs/benchmarks/calculator-memory.json
    ... --sizes 1000 4000 --skip-unchunked-above 4000     # when memory is short (unchunked 10k: ~13 GB)

The model is an untrained default PaiNN (``hidden_channels`` 128, 3 layers, 20 RBF, cutoff 5 Å,
float32, seed 0) with its per-element energy, scale and shift fitted (``fit_normalization``) on
a handful of EMT-labelled 32-atom Cu cells, written twice with the same weights: once with no
``edge_chunk`` in its options (as every model file written before the option: ``auto``) and once
with ``edge_chunk: 0`` (off). Speed and memory do not depend on the weights' values.

Every measurement runs in its own fresh Python process (``--child``): import atomforge, load the
calculator with ``atomforge.load_calculator``, warm up on a 32-atom cell, build the cell (fcc Cu,
a = 3.61 Å, cubic supercell, positions rattled by 0.05 Å with seed 0), read the baseline
``ru_maxrss`` (peak resident set so far), time one ``atoms.get_forces()`` (one model evaluation:
energy, forces and, the cell being periodic, stress) and then ``atoms.get_stress()`` (served from
that call's results), and read ``ru_maxrss`` again. ``peak_mb`` is the increase of the peak
resident memory over the baseline; ``peak_total_mb`` the process's whole peak. Then a second
``get_forces()`` after nudging the positions by ~1e-3 Å, as an MD step would
(``second_call_seconds``, ``peak_after_second_call_mb``). ``--breakdown`` adds, per variant on
the largest cell, the resident memory after each stage (import, load, graph, forward, backward,
sampled every 2 ms) and the bytes autograd keeps between the forward and backward pass. The energy,
forces and stress are saved so that the parent compares chunked with unchunked (max |Δ| over
max |x| of the unchunked value). One thread (``torch.set_num_threads(1)``).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

#: supercell repeats of the 4-atom cubic fcc cell for the requested atom counts
REPEATS = {32: (2, 2, 2), 1000: (5, 5, 10), 4000: (10, 10, 10), 10000: (10, 10, 25)}
VARIANTS = {"chunked": {}, "unchunked": {"edge_chunk": 0}}
LATTICE = 3.61


def _cell(n_atoms: int, rattle: float = 0.05, seed: int = 0):  # noqa: ANN202 - ase.Atoms
    from ase.build import bulk

    atoms = bulk("Cu", "fcc", a=LATTICE, cubic=True).repeat(REPEATS[n_atoms])
    atoms.positions += np.random.default_rng(seed).normal(0.0, rattle, atoms.positions.shape)
    return atoms


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def build_models(folder: Path, seed: int = 0) -> dict[str, Path]:
    """The two model files (same weights): options ``{}`` (auto chunking) and ``edge_chunk: 0``."""
    import torch
    from ase.build import bulk
    from ase.calculators.emt import EMT

    from atomforge import build_potential, fit_normalization, make_registry, save_model

    rng = np.random.default_rng(seed)
    cells, energies, forces = [], [], []
    for _ in range(6):
        atoms = bulk("Cu", "fcc", a=LATTICE, cubic=True).repeat((2, 2, 2))
        atoms.set_cell(atoms.cell[:] @ (np.eye(3) + np.diag(rng.uniform(-0.02, 0.02, 3))), scale_atoms=True)
        atoms.positions += rng.normal(0, 0.08, atoms.positions.shape)
        atoms.calc = EMT()
        cells.append(atoms.numbers)
        energies.append(atoms.get_potential_energy())
        forces.append(atoms.get_forces())
    atomic, scale, shift = fit_normalization(cells, np.array(energies), forces, [29])
    registry = make_registry()
    config = {"backbone": "painn", "provider": registry.provided("backbones", "painn").distribution,
              "cutoff": 5.0, "dtype": "float32", "options": {}, "elements": [29],
              "atomic_energies": [float(e) for e in atomic], "scale": scale, "shift": shift}
    torch.manual_seed(seed)
    potential = build_potential(config, registry)
    paths = {}
    for name, options in VARIANTS.items():
        paths[name] = folder / f"painn-cu-{name}.pt"
        save_model(potential, paths[name], config={**config, "options": options})
    return paths


def child(spec: dict) -> dict:
    """One measurement, in this (fresh) process."""
    import torch

    torch.set_num_threads(1)
    import atomforge

    calc = atomforge.load_calculator(spec["model"])
    warm = _cell(32, seed=1)
    warm.calc = calc
    warm.get_forces()
    atoms = _cell(spec["atoms"])
    atoms.calc = calc
    baseline = _peak_mb()
    start = time.perf_counter()
    forces = atoms.get_forces()
    forces_s = time.perf_counter() - start
    start = time.perf_counter()
    stress = atoms.get_stress()
    stress_s = time.perf_counter() - start
    peak = _peak_mb()
    energy = atoms.get_potential_energy()
    start = time.perf_counter()
    i, _, _, _ = atomforge.neighbor_list(atoms, calc.model.cutoff)
    neighbour_list_s = time.perf_counter() - start
    results = (np.array([energy]), forces.copy(), stress.copy())
    atoms.positions = atoms.positions + np.random.default_rng(1).normal(0.0, 1e-3, atoms.positions.shape)
    start = time.perf_counter()
    atoms.get_forces()  # a second call (as in MD): time, and whether the peak grows
    second_s = time.perf_counter() - start
    peak_second = _peak_mb()
    np.savez(spec["save"], energy=results[0], forces=results[1], stress=results[2])
    backbone = calc.model.backbone
    chunk = backbone.chunk_size(int(i.shape[0]), calc.dtype)
    return {
        "atoms": len(atoms), "edges": int(i.shape[0]), "edges_per_atom": i.shape[0] / len(atoms),
        "edge_chunk_option": backbone.edge_chunk, "chunk_edges": chunk,
        "chunks_per_layer": 1 if chunk is None else -(-int(i.shape[0]) // chunk),
        "peak_mb": peak - baseline, "peak_total_mb": peak, "baseline_mb": baseline,
        "peak_kb_per_atom": 1024.0 * (peak - baseline) / len(atoms),
        "seconds": forces_s, "get_stress_seconds": stress_s, "neighbour_list_seconds": neighbour_list_s,
        "second_call_seconds": second_s, "peak_after_second_call_mb": peak_second - baseline,
        "energy_ev": float(energy),
    }


def breakdown(spec: dict) -> dict:
    """Where the memory goes, in this (fresh) process: resident memory (MB, sampled every 2 ms)
    after each stage of the calculator's work, done here step by step with the public API, and
    the bytes of the distinct tensors autograd keeps between the forward and the backward pass
    (allocator-independent, from ``saved_tensors_hooks``)."""
    import threading

    import torch

    torch.set_num_threads(1)
    import atomforge
    from atomforge import keys as K

    def rss() -> float:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    peak, running = [0.0], [True]

    def sample() -> None:
        while running[0]:
            peak[0] = max(peak[0], rss())
            time.sleep(0.002)

    stages = {"import": rss()}
    calc = atomforge.load_calculator(spec["model"])
    model = calc.model
    stages["load_model"] = rss()
    atoms = _cell(spec["atoms"])
    threading.Thread(target=sample, daemon=True).start()
    start = time.perf_counter()
    batch = atomforge.collate([atomforge.atoms_to_graph(atoms, model.cutoff, dtype=calc.dtype)])
    seconds = {"graph": time.perf_counter() - start}
    stages["graph"] = rss()
    graph_mb = sum(t.untyped_storage().nbytes() for t in batch.values()) / 2**20
    kept: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        kept[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    peak[0] = rss()
    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        positions, strain = atomforge.differentiable_inputs(batch, True, True)
        out = model.energy_outputs(batch, positions, strain)
    seconds["forward"] = time.perf_counter() - start
    stages["after_forward"], stages["peak_forward"] = rss(), peak[0]
    peak[0] = rss()
    start = time.perf_counter()
    atomforge.energy_derivatives(out[K.ENERGY], batch, positions, strain, create_graph=False)
    seconds["backward"] = time.perf_counter() - start
    stages["after_backward"], stages["peak_backward"] = rss(), peak[0]
    running[0] = False
    return {"atoms": len(atoms), "edges": int(batch[K.EDGE_INDEX].shape[1]), "rss_mb": stages,
            "graph_tensors_mb": graph_mb, "kept_for_backward_mb": sum(kept.values()) / 2**20,
            "largest_kept_mb": max(kept.values()) / 2**20, "seconds": seconds}


def measure(model: Path, variant: str, n_atoms: int, folder: Path) -> dict:
    spec = {"model": str(model), "atoms": n_atoms, "save": str(folder / f"{variant}-{n_atoms}.npz")}
    return _run_child("--child", spec, variant, n_atoms)


def _run_child(flag: str, spec: dict, variant: str, n_atoms: int) -> dict:
    done = subprocess.run([sys.executable, __file__, flag, json.dumps(spec)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        return {"variant": variant, "atoms": n_atoms, "error": done.stderr[-2000:]}
    return {"variant": variant, **json.loads(done.stdout.strip().splitlines()[-1])}


def _skipped(variant: str, n_atoms: int, above: int | None) -> bool:
    return variant == "unchunked" and above is not None and n_atoms > above


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 10000], choices=sorted(REPEATS))
    parser.add_argument("--skip-unchunked-above", type=int, default=None,
                        help="no unchunked run for cells with more atoms (the unchunked 10k cell needs ~13 GB)")
    parser.add_argument("--out", type=Path, default=None, help="results JSON (default: print only)")
    parser.add_argument("--breakdown", action="store_true",
                        help="also one stage-by-stage memory breakdown per variant on the largest cell")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--breakdown-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    if args.breakdown_child:
        print(json.dumps(breakdown(json.loads(args.breakdown_child))))
        return
    import torch

    rows, differences = [], []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        models = build_models(folder)
        for n_atoms in args.sizes:
            for variant in VARIANTS:
                if _skipped(variant, n_atoms, args.skip_unchunked_above):
                    continue
                row = measure(models[variant], variant, n_atoms, folder)
                rows.append(row)
                print(json.dumps(row), flush=True)
            saved = {v: folder / f"{v}-{n_atoms}.npz" for v in VARIANTS}
            if all(p.is_file() for p in saved.values()):
                a, b = np.load(saved["chunked"]), np.load(saved["unchunked"])
                differences.append({"atoms": n_atoms, **{f"{k}_max_rel": _relative(a[k], b[k])
                                                         for k in ("energy", "forces", "stress")},
                                    "forces_norm_rel": float(np.linalg.norm(a["forces"] - b["forces"])
                                                             / np.linalg.norm(b["forces"]))})
                print(json.dumps(differences[-1]), flush=True)
        breakdowns = []
        if args.breakdown:
            n_atoms = max(args.sizes)
            for variant in VARIANTS:
                if _skipped(variant, n_atoms, args.skip_unchunked_above):
                    continue
                spec = {"model": str(models[variant]), "atoms": n_atoms}
                row = _run_child("--breakdown-child", spec, variant, n_atoms)
                breakdowns.append({"variant": variant, **row})
                print(json.dumps(breakdowns[-1]), flush=True)
    result = {
        "benchmark": "calculator memory: one get_forces() (+ get_stress()) call, PaiNN 128x3, cutoff 5 Å, fcc Cu",
        "command": "OMP_NUM_THREADS=1 .venv/bin/python " + " ".join(sys.argv),
        "torch": torch.__version__, "threads": 1, "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "model": {"backbone": "painn", "hidden_channels": 128, "num_layers": 3, "num_rbf": 20, "cutoff": 5.0,
                  "dtype": "float32", "variants": VARIANTS},
        "measurements": rows,
        "chunked_vs_unchunked": differences,
        "breakdown": breakdowns,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
