"""Per-call time of the ASE calculator (``load_calculator``) on a small molecule and on ~1000 atoms.

What MD and active-learning exploration pay on every step: one ``get_forces()`` (energy, forces,
and stress for the periodic box) after the atoms moved a little, so nothing is served from ASE's
cache. Models: untrained PaiNN 16×2 (a distillation student) and 64×3 (the ethanol teacher's
size), cutoff 5 Å, float32 (``--dtype``), random weights (the time does not depend on training).
Systems: ethanol (``ase.build.molecule('CH3CH2OH')``, 9 atoms, open boundaries) and 111 randomly
oriented ethanol molecules in a periodic cubic box (999 atoms, 24 Å, with stress). One torch thread;
reported: the median over many calls of the calling thread's CPU time (what a quiet machine's wall
time would be) and of the wall time. Run it pinned to a quiet core::

    taskset -c 1 python benchmarks/calls/small_molecule.py                    # current numbers
    taskset -c 1 python benchmarks/calls/small_molecule.py --compare-ref main  # before/after table

``--compare-ref GITREF`` exports GITREF's tree (``git archive``) to a temporary folder and times it
side by side with the working tree: each round runs one fresh process per side, the sides
alternating (``--rounds``), both loading the very same model files (written by the working tree's
code); the table gives each side's median over rounds, the speed-up, and the largest relative
difference of energy, forces and stress between the two sides on one fixed configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
MODELS = {"painn16x2": (16, 2), "painn64x3": (64, 3)}
SYSTEMS = ("ethanol9", "ethanol999")


def ethanol_box(n_molecules: int = 111, n_grid: int = 5, spacing: float = 4.8, seed: int = 3):
    """``n_molecules`` randomly oriented ethanols on a periodic cubic grid (no two atoms of
    different molecules closer than 1.5 Å), as ``benchmarks/ethanol/make_data.py`` builds its box."""
    from ase import Atoms
    from ase.build import molecule
    from scipy.spatial.transform import Rotation

    template = molecule("CH3CH2OH")
    rng = np.random.default_rng(seed)
    length = n_grid * spacing
    base = template.positions - template.get_center_of_mass()
    sites = np.array([(i, j, k) for i in range(n_grid) for j in range(n_grid) for k in range(n_grid)], float)
    placed = np.zeros((0, 3))
    for site in sites[np.sort(rng.choice(len(sites), size=n_molecules, replace=False))]:
        for _ in range(200):
            pos = base @ Rotation.random(random_state=rng).as_matrix().T + (site + 0.5) * spacing
            delta = pos[:, None, :] - placed[None, :, :]
            delta -= length * np.round(delta / length)
            if not len(placed) or np.sqrt((delta**2).sum(-1)).min() >= 1.5:
                break
        placed = np.vstack([placed, pos])
    box = Atoms(numbers=np.tile(template.numbers, n_molecules), positions=placed, cell=[length] * 3, pbc=True)
    box.wrap()
    return box


def systems() -> dict:
    from ase.build import molecule

    return {"ethanol9": molecule("CH3CH2OH"), "ethanol999": ethanol_box()}


def write_models(folder: Path, dtype: str) -> dict[str, Path]:
    """The benchmark's model files (random weights, seed 0), written with the working tree's code."""
    import torch

    from atomforge import make_registry, save_model
    from atomforge.model.modelfile import build_model

    paths = {}
    for name, (width, layers) in MODELS.items():
        torch.manual_seed(0)
        config = {"backbone": "painn", "cutoff": 5.0, "elements": [1, 6, 8], "dtype": dtype,
                  "atomic_energies": [-13.6, -1029.0, -2041.0], "scale": 1.0, "shift": 0.0,
                  "options": {"hidden_channels": width, "num_layers": layers}}
        paths[name] = save_model(build_model(config, make_registry()), folder / f"{name}.pt", config=config)
    return paths


def median_call(calculator, atoms, calls: int, warmup: int, seed: int = 0) -> tuple[float, float]:
    """Median (CPU, wall) ms of ``get_forces()`` (+ stress on a periodic cell), positions nudged by
    ~1e-4 Å before every call (MD-like: the neighbour list and every tensor are rebuilt)."""
    atoms = atoms.copy()
    atoms.calc = calculator
    rng = np.random.default_rng(seed)
    cpu, wall = [], []
    for k in range(warmup + calls):
        atoms.positions = atoms.positions + rng.normal(scale=1e-4, size=atoms.positions.shape)
        start, start_cpu = time.perf_counter(), time.thread_time()
        atoms.get_forces()
        if atoms.pbc.all():
            atoms.get_stress()
        if k >= warmup:
            cpu.append(1e3 * (time.thread_time() - start_cpu))
            wall.append(1e3 * (time.perf_counter() - start))
    return statistics.median(cpu), statistics.median(wall)


def fingerprint(calculator, atoms) -> dict[str, list]:
    """Energy, forces (and stress) at one fixed configuration: to compare two code versions."""
    atoms = atoms.copy()
    atoms.positions = atoms.positions + 0.01 * np.sin(np.arange(atoms.positions.size)).reshape(-1, 3)
    atoms.calc = calculator
    out = {"energy": [atoms.get_potential_energy()], "forces": atoms.get_forces().ravel().tolist()}
    if atoms.pbc.all():
        out["stress"] = atoms.get_stress().tolist()
    return out


def worker(args: argparse.Namespace) -> None:
    """Time every model on every system in this process (whatever ``atomforge`` imports as)."""
    import torch

    import atomforge

    torch.set_num_threads(1)
    models = json.loads(args.worker)
    record = {"atomforge": str(Path(atomforge.__file__).parent), "torch": torch.__version__, "results": {}}
    for system, atoms in systems().items():
        large = len(atoms) > 100
        for name, path in models.items():
            calculator = atomforge.load_calculator(path)
            cpu, wall = median_call(calculator, atoms, args.large_calls if large else args.calls,
                                    2 if large else 200)
            record["results"][f"{system} {name}"] = {"cpu_ms": cpu, "wall_ms": wall, "atoms": len(atoms),
                                                     "fingerprint": fingerprint(calculator, atoms)}
    args.json.write_text(json.dumps(record))


def exported_tree(ref: str, folder: Path) -> Path:
    """``ref``'s tree under ``folder``/src, importable as ``atomforge`` from ``folder``/pkg (the
    package-dir mapping of pyproject.toml: core → atomforge, plugins → atomforge.plugins, ...)."""
    src, pkg = folder / "src", folder / "pkg" / "atomforge"
    src.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    pkg.mkdir(parents=True)
    for entry in (src / "core").iterdir():
        (pkg / entry.name).symlink_to(entry)
    (pkg / "plugins").symlink_to(src / "plugins")
    (pkg / "active_learning").symlink_to(src / "active_learning")
    return pkg.parent


def run_worker(models: dict[str, Path], args: argparse.Namespace, out: Path, pythonpath: Path | None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    command = [sys.executable, __file__, "--worker", json.dumps({k: str(v) for k, v in models.items()}),
               "--json", str(out), "--calls", str(args.calls), "--large-calls", str(args.large_calls)]
    subprocess.run(command, check=True, env=env, cwd=tempfile.gettempdir())
    return json.loads(out.read_text())


def relative_difference(a: dict, b: dict) -> float:
    worst = 0.0
    for key in a:
        x, y = np.asarray(a[key]), np.asarray(b[key])
        worst = max(worst, float(np.abs(x - y).max() / max(np.abs(x).max(), 1e-30)))
    return worst


def table(rounds: dict[str, list[dict]], args: argparse.Namespace) -> dict:
    """Median over rounds per side; printed as a table, returned as a record."""
    sides = list(rounds)
    rows = {}
    for key in rounds[sides[-1]][0]["results"]:
        row = {}
        for side in sides:
            results = [r["results"][key] for r in rounds[side]]
            row[side] = {unit: statistics.median(r[unit] for r in results) for unit in ("cpu_ms", "wall_ms")}
        if len(sides) == 2:
            ref, now = (rounds[s][0]["results"][key]["fingerprint"] for s in sides)
            row["max_rel_diff"] = relative_difference(ref, now)
        rows[key] = row
    head = "".join(f"{side + ' cpu/wall ms':>26s}" for side in sides)
    tail = f"{'speed-up (cpu)':>16s}{'max rel diff':>14s}" if len(sides) == 2 else ""
    print(f"\n{'system model':28s}{head}{tail}")
    for key, row in rows.items():
        line = f"{key:28s}" + "".join(f"{row[s]['cpu_ms']:>15.3f} /{row[s]['wall_ms']:>9.3f}" for s in sides)
        if len(sides) == 2:
            line += f"{row[sides[0]]['cpu_ms'] / row[sides[1]]['cpu_ms']:>15.2f}x{row['max_rel_diff']:>14.1e}"
        print(line)
    return {"dtype": args.dtype, "calls": args.calls, "large_calls": args.large_calls, "rounds": args.rounds,
            "threads": 1, "rows": rows, "imported_from": {s: rounds[s][0]["atomforge"] for s in sides}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compare-ref", metavar="GITREF", help="also time GITREF's code, side by side")
    parser.add_argument("--calls", type=int, default=2000, help="timed calls on 9 atoms (after 200 warm-up calls)")
    parser.add_argument("--large-calls", type=int, default=7, help="timed calls on 999 atoms (after 2 warm-up calls)")
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes per side (alternating)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--json", type=Path, help="write the table here (as JSON)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        models = write_models(folder, args.dtype)
        sides: dict[str, Path | None] = {}
        if args.compare_ref:
            sides[f"ref {args.compare_ref}"] = exported_tree(args.compare_ref, folder)
        sides["working tree"] = None
        rounds: dict[str, list[dict]] = {side: [] for side in sides}
        for k in range(args.rounds):
            for side, pythonpath in sides.items():
                record = run_worker(models, args, folder / f"{len(rounds[side])}-{k}.json", pythonpath)
                expected = ROOT / "core" if pythonpath is None else pythonpath / "atomforge"
                if Path(record["atomforge"]) != expected:
                    raise SystemExit(f"{side}: atomforge was imported from {record['atomforge']}, not {expected}")
                rounds[side].append(record)
                print(f"round {k + 1}/{args.rounds} {side}: " + ", ".join(
                    f"{key} {r['cpu_ms']:.3f}" for key, r in record["results"].items()), flush=True)
        record = table(rounds, args)
    if args.json:
        args.json.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
