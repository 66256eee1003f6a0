"""Generate >= 1,000,000 labelled structures as extxyz shards, for the structure-store benchmark.

The store benchmark must pack a million labelled structures and stream training over them, so
the data has to be *varied* (periodic and non-periodic, many sizes: size-aware batching must
matter) yet cheap to label. The oracle is ASE's EMT, with its neighbour list swapped for vesin's
(``FastEMT``: the same energies, forces and stress to ~1e-14, 3-5x faster on these small cells).

Every structure is drawn from a *group* (``atoms.info["group"]`` = ``source_index`` of the
group's first member; 1-8 consecutive members share prototype, composition and decoration and
differ in strain/rattle/rotation), so a group-wise split can be tested. Kinds, per group:

* ``bulk`` (69 %): FCC Al/Cu/Ag/Au/Ni/Pd/Pt alloy supercells of 1-32 atoms (primitive or cubic
  cell repeated 1-2 times per axis), 1-3 species with random fractions, Vegard lattice constant
  scaled by +-4 %, symmetric strain <= 2 %, Gaussian rattle sigma 0.02-0.15 A; energy, forces, stress.
* ``large_bulk`` (1 %): the same as cubic cells repeated 2-4 times per axis, 64-256 atoms (the tail).
* ``cluster`` (12 %): 2-13-atom fragments (centre + shell sites) of a 13-atom FCC cuboctahedron
  of 1-2 metals, rotated, rattled 0.02-0.10 A, min distance >= 2.0 A; energy, forces.
* ``molecule`` (18 %): the 81 H/C/N/O molecules of ASE's g2 set (2-14 atoms), rotated, rattled
  0.01-0.05 A; energy, forces.

Non-periodic structures have pbc False and no cell. No two atoms are closer than 0.5 A and no
label is NaN (both checked, redrawn otherwise). Positions are rounded to the 8 printed decimals
*before* labelling, so the file is self-consistent. Shard k depends only on (seed, k); a shard is
written under a temporary name and renamed when complete, so a killed run resumes.

    python benchmarks/store/make_structures.py --out DIR --n 1000000 --shard-size 50000 --workers 2
    python benchmarks/store/make_structures.py --check      # write 200, read back with ase.io.read
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import vesin
from ase import Atoms
from ase.calculators.calculator import all_changes
from ase.calculators.emt import EMT
from ase.collections import g2
from ase.data import atomic_numbers, chemical_symbols, reference_states

KINDS = ("bulk", "large_bulk", "cluster", "molecule")
KIND_P = (0.69, 0.01, 0.12, 0.18)
METALS = np.array([atomic_numbers[s] for s in ("Al", "Cu", "Ag", "Au", "Ni", "Pd", "Pt")])
FCC_A = {int(z): float(reference_states[z]["a"]) for z in METALS}
MOLECULES = sorted(n for n in g2.names
                   if set(g2[n].get_chemical_symbols()) <= {"H", "C", "N", "O"} and len(g2[n]) > 1)
PRIM = (0.5 * np.array([[0.0, 1, 1], [1, 0, 1], [1, 1, 0]]), np.zeros((1, 3)))
CUBIC = (np.eye(3), np.array([[0.0, 0, 0], [0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]]))
# cuboctahedron: centre + 12 nearest neighbours, at unit nearest-neighbour distance
CUBOCT = np.array([[0.0, 0, 0]] + [v for v in ([1, 1, 0], [1, -1, 0], [-1, 1, 0], [-1, -1, 0],
                                                 [1, 0, 1], [1, 0, -1], [-1, 0, 1], [-1, 0, -1],
                                                 [0, 1, 1], [0, 1, -1], [0, -1, 1], [0, -1, -1])]) / np.sqrt(2)
PROPS = "Properties=species:S:1:pos:R:3:forces:R:3"


class _VesinNeighborList:
    """The two methods of ``ase.neighborlist.NeighborList`` that EMT uses, computed by vesin."""

    def __init__(self, cutoff: float) -> None:
        self._nl = vesin.NeighborList(cutoff=cutoff, full_list=True)
        self.min_distance = np.inf

    def update(self, atoms: Atoms) -> bool:
        periodic = bool(atoms.pbc.all())
        box = atoms.cell.array if periodic else np.zeros((3, 3))
        i, j, shifts, d = self._nl.compute(atoms.positions, box, periodic, quantities="ijSd")
        order = np.argsort(i, kind="stable")
        self._j, self._shifts = j[order].astype(np.intp), shifts[order]
        self._start = np.searchsorted(i[order], np.arange(len(atoms) + 1))
        self.min_distance = float(d.min()) if len(d) else np.inf
        return True

    def get_neighbors(self, a: int) -> tuple[np.ndarray, np.ndarray]:
        s, e = self._start[a], self._start[a + 1]
        return self._j[s:e], self._shifts[s:e]


class FastEMT(EMT):
    """ASE's EMT with vesin's neighbour list (ASE's own dominates the time of small cells)."""

    def initialize(self, atoms: Atoms) -> None:
        super().initialize(atoms)
        self.nl = _VesinNeighborList(self.rc_list)


@dataclass
class Frame:
    numbers: np.ndarray
    positions: np.ndarray
    cell: np.ndarray | None  # None: non-periodic
    info: dict[str, str | int]
    energy: float = 0.0
    forces: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    stress: np.ndarray | None = None  # Voigt xx yy zz yz xz xy


def _rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def _base(kind: str, rng: np.random.Generator) -> dict:
    """The part of a structure shared by a group: prototype, composition, decoration."""
    if kind == "molecule":
        mol = g2[MOLECULES[rng.integers(len(MOLECULES))]]
        return {"numbers": mol.numbers.copy(), "pos": mol.positions - mol.positions.mean(0)}
    n_species = rng.integers(1, 3) if kind == "cluster" else rng.choice([1, 2, 3], p=[0.25, 0.5, 0.25])
    species = rng.choice(METALS, size=n_species, replace=False)
    frac = rng.dirichlet(np.ones(len(species)))
    if kind == "cluster":
        n = int(rng.integers(2, 14))
        sites = CUBOCT[np.concatenate([[0], 1 + rng.permutation(12)[: n - 1]])]
        numbers = rng.choice(species, size=n, p=frac)
        d = np.mean([FCC_A[int(z)] for z in numbers]) / np.sqrt(2)
        return {"numbers": numbers, "pos": sites * d}
    if kind == "bulk":
        unit, basis = PRIM if rng.random() < 0.5 else CUBIC
        reps = rng.integers(1, 3, size=3)
    else:
        unit, basis = CUBIC
        while not 16 <= np.prod(reps := rng.integers(2, 5, size=3)) <= 64:
            pass
    grid = np.stack(np.meshgrid(*[np.arange(r) for r in reps], indexing="ij"), -1).reshape(-1, 1, 3)
    fracs = ((grid + basis[None]) / reps).reshape(-1, 3)
    numbers = rng.choice(species, size=len(fracs), p=frac)
    a0 = np.mean([FCC_A[int(z)] for z in numbers])  # Vegard
    return {"numbers": numbers, "frac": fracs, "cell": a0 * unit * reps[:, None]}


def _member(kind: str, base: dict, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
    """Positions (rounded to the printed precision) and cell of one draw from ``base``."""
    if kind in ("bulk", "large_bulk"):
        eps = rng.uniform(-0.02, 0.02, size=(3, 3))
        cell = base["cell"] * rng.uniform(0.96, 1.04) @ (np.eye(3) + 0.5 * (eps + eps.T))
        pos = base["frac"] @ cell + rng.normal(scale=rng.uniform(0.02, 0.15), size=base["frac"].shape)
    else:
        cell = None
        sigma = rng.uniform(0.01, 0.05) if kind == "molecule" else rng.uniform(0.02, 0.10)
        scale = 1.0 if kind == "molecule" else rng.uniform(0.97, 1.03)
        pos = scale * base["pos"] @ _rotation(rng).T + rng.normal(scale=sigma, size=base["pos"].shape)
    return np.round(pos, 8), cell


def label(frame: Frame) -> float:
    """EMT energy/forces(/stress) into ``frame``; returns the minimum interatomic distance."""
    periodic = frame.cell is not None
    atoms = Atoms(numbers=frame.numbers, positions=frame.positions, cell=frame.cell, pbc=periodic)
    calc = FastEMT()
    calc.calculate(atoms, ["energy", "forces"] + (["stress"] if periodic else []), all_changes)
    frame.energy = float(calc.results["energy"])
    frame.forces = calc.results["forces"].copy()
    frame.stress = calc.results["stress"].copy() if periodic else None
    return calc.nl.min_distance


def generate(seed: int, shard: int, count: int, first_index: int,
             kind_p: tuple[float, ...] = KIND_P) -> Iterator[Frame]:
    """The ``count`` labelled structures of one shard; depends only on (seed, shard, count)."""
    rng = np.random.default_rng([seed, shard])
    i = 0
    while i < count:
        kind = KINDS[rng.choice(len(KINDS), p=kind_p)]
        base, group = _base(kind, rng), first_index + i
        for _ in range(min(int(rng.integers(1, 9)), count - i)):
            rmin = 2.0 if kind == "cluster" else 0.5
            for _attempt in range(1000):
                pos, cell = _member(kind, base, rng)
                frame = Frame(base["numbers"], pos, cell,
                              {"config_type": kind, "source_index": first_index + i, "group": group})
                dmin = label(frame)
                labels = [frame.energy, frame.forces] + ([frame.stress] if cell is not None else [])
                if dmin >= rmin and all(np.isfinite(x).all() for x in labels):
                    break
            else:
                raise RuntimeError(f"no valid {kind} structure after 1000 draws")
            yield frame
            i += 1


def format_frame(f: Frame) -> str:
    """One extxyz frame as ``ase.io.write(format='extxyz')`` would write it (without energies)."""
    head = []
    if f.cell is not None:
        head.append('Lattice="' + " ".join(map(str, f.cell.ravel().tolist())) + '"')
    head.append(PROPS)
    head += [f"{k}={v}" for k, v in f.info.items()]
    head.append(f"energy={f.energy!r}")
    if f.stress is not None:
        xx, yy, zz, yz, xz, xy = f.stress.tolist()
        head.append('stress="' + " ".join(map(str, (xx, xy, xz, xy, yy, yz, xz, yz, zz))) + '"')
    head.append('pbc="T T T"' if f.cell is not None else 'pbc="F F F"')
    n = len(f.numbers)
    flat: list = []
    for z, row in zip(f.numbers.tolist(), np.hstack([f.positions, f.forces]).tolist()):
        flat.append(chemical_symbols[z])
        flat.extend(row)
    return f"{n}\n{' '.join(head)}\n" + ("%-2s %.8f %.8f %.8f %.8f %.8f %.8f\n" * n) % tuple(flat)


@dataclass
class ShardStats:
    shard: int
    structures: int = 0
    atoms: int = 0
    min_atoms: int = 1 << 30
    max_atoms: int = 0
    kinds: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    skipped: bool = False

    def add(self, natoms: int, kind: str) -> None:
        self.structures += 1
        self.atoms += natoms
        self.min_atoms, self.max_atoms = min(self.min_atoms, natoms), max(self.max_atoms, natoms)
        self.kinds[kind] = self.kinds.get(kind, 0) + 1


def shard_path(out: Path, shard: int) -> Path:
    return out / f"shard-{shard:05d}.extxyz"


def write_shard(job: tuple[str, int, int, int, int]) -> ShardStats:
    """Generate shard ``shard`` into ``out`` (temporary name, renamed when complete)."""
    out, seed, shard, count, first_index = job
    start, stats = time.perf_counter(), ShardStats(shard)
    final = shard_path(Path(out), shard)
    tmp = final.with_name(f".{final.name}.partial")
    chunk: list[str] = []
    with open(tmp, "w") as fh:
        for frame in generate(seed, shard, count, first_index):
            stats.add(len(frame.numbers), str(frame.info["config_type"]))
            chunk.append(format_frame(frame))
            if len(chunk) >= 1000:
                fh.write("".join(chunk))
                chunk.clear()
        fh.write("".join(chunk))
    os.replace(tmp, final)
    stats.seconds = time.perf_counter() - start
    return stats


def scan_shard(path: Path, shard: int) -> ShardStats:
    """Stats of an existing complete shard, from its header lines."""
    stats, kind_re = ShardStats(shard, skipped=True), re.compile(r"config_type=(\w+)")
    with open(path) as fh:
        for line in fh:
            natoms = int(line)
            stats.add(natoms, kind_re.search(fh.readline()).group(1))  # type: ignore[union-attr]
            for _ in range(natoms):
                next(fh)
    return stats


def run(out: Path, n: int, shard_size: int, workers: int, seed: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    params = {"shard_size": shard_size, "seed": seed, "kind_p": list(KIND_P)}  # --n may grow
    params_file = out / "params.json"
    if params_file.exists() and json.loads(params_file.read_text()) != params:
        sys.exit(f"{out} holds shards of other parameters {params_file.read_text()}; use another --out")
    params_file.write_text(json.dumps(params))
    n_shards = -(-n // shard_size)
    jobs = [(str(out), seed, k, min(shard_size, n - k * shard_size), k * shard_size) for k in range(n_shards)]
    done = [scan_shard(shard_path(out, k), k) for k in range(n_shards) if shard_path(out, k).exists()]
    done = [s for s in done if s.structures == jobs[s.shard][3]]  # a last shard of another --n: redo
    todo = [jobs[k] for k in sorted(set(range(n_shards)) - {s.shard for s in done})]
    print(f"{n_shards} shards of {shard_size}: {len(done)} already complete, {len(todo)} to write "
          f"with {workers} workers", flush=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    start, new = time.perf_counter(), 0
    with mp.get_context("spawn").Pool(workers) as pool:
        for stats in pool.imap_unordered(write_shard, todo):
            done.append(stats)
            new += stats.structures
            elapsed = time.perf_counter() - start
            print(f"[{len(done)}/{n_shards}] shard-{stats.shard:05d}: {stats.structures} structures in "
                  f"{stats.seconds:.1f} s; this run {new} structures, {new / elapsed:.0f} structures/s",
                  flush=True)
    seconds = time.perf_counter() - start
    total = sum(s.structures for s in done)
    atoms = sum(s.atoms for s in done)
    nbytes = sum(shard_path(out, s.shard).stat().st_size for s in done)
    kinds: dict[str, int] = {}
    for s in done:
        for k, v in s.kinds.items():
            kinds[k] = kinds.get(k, 0) + v
    fractions = ", ".join(f"{k} {kinds.get(k, 0) / total:.3f}" for k in KINDS)
    print(f"atoms per structure: min {min(s.min_atoms for s in done)}, mean {atoms / total:.2f}, "
          f"max {max(s.max_atoms for s in done)}; fractions: {fractions}")
    print(f"TOTAL {total} structures, {atoms} atoms, {seconds:.1f} s ({new / max(seconds, 1e-9):.0f} "
          f"structures/s this run), {nbytes} bytes on disk ({nbytes / total:.0f} bytes/structure)")


def check(n: int = 200) -> None:
    """Write ``n`` structures (all kinds equally likely), read back with ase.io.read, compare;
    compare FastEMT with ASE's EMT; time this writer against ase.io.write."""
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import read, write

    frames = list(generate(seed=12345, shard=0, count=n, first_index=0, kind_p=(0.25,) * 4))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "check.extxyz"
        t0 = time.perf_counter()
        path.write_text("".join(format_frame(f) for f in frames))
        t_own = time.perf_counter() - t0
        back = read(path, index=":")
        images = []
        for f in frames:
            a = Atoms(f.numbers, f.positions, cell=f.cell, pbc=f.cell is not None, info=dict(f.info))
            res = {"energy": f.energy, "forces": f.forces} | ({"stress": f.stress} if f.cell is not None else {})
            a.calc = SinglePointCalculator(a, **res)
            images.append(a)
        t0 = time.perf_counter()
        write(Path(tmp) / "ase.extxyz", images, format="extxyz")
        t_ase = time.perf_counter() - t0
    assert len(back) == n, (len(back), n)
    worst = {"positions": 0.0, "forces": 0.0, "emt": 0.0}
    for f, a, ref in zip(frames, back, images):
        periodic = f.cell is not None
        assert (a.numbers == f.numbers).all()
        assert (a.pbc == periodic).all()
        assert np.array_equal(a.cell.array, f.cell if periodic else np.zeros((3, 3)))
        assert a.info == f.info, (a.info, f.info)
        assert a.calc.results["energy"] == f.energy
        assert ("stress" in a.calc.results) == periodic
        if periodic:
            assert np.array_equal(a.calc.results["stress"], f.stress)
        worst["positions"] = max(worst["positions"], np.abs(a.positions - f.positions).max())
        worst["forces"] = max(worst["forces"], np.abs(a.calc.results["forces"] - f.forces).max())
        ref.calc = EMT()  # stock ASE EMT on the same structure
        diffs = [abs(ref.get_potential_energy() - f.energy), np.abs(ref.get_forces() - f.forces).max()]
        if periodic:
            diffs.append(np.abs(ref.get_stress() - f.stress).max())
        worst["emt"] = max(worst["emt"], *diffs)
        d = ref.get_all_distances(mic=periodic) + 9 * np.eye(len(ref))
        assert len(ref) == 1 or d.min() >= 0.5
    assert worst["positions"] == 0.0 and worst["forces"] <= 5e-9 and worst["emt"] < 1e-9, worst
    kinds = {k: sum(f.info["config_type"] == k for f in frames) for k in KINDS}
    print(f"check OK: {n} structures {kinds} read back by ase.io.read: numbers, cell, pbc, info, energy, "
          f"stress identical; max |dpos| {worst['positions']:.1e}, max |dF| {worst['forces']:.1e} A "
          f"(8 printed decimals); FastEMT vs ase EMT max diff {worst['emt']:.1e}; writer "
          f"{1e6 * t_own / n:.0f} us/frame vs ase.io.write {1e6 * t_ase / n:.0f} us/frame")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--shard-size", type=int, default=50_000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check", action="store_true", help="self-check of the writer and the oracle, then exit")
    args = p.parse_args(argv)
    if args.check:
        check()
    elif args.out is None:
        p.error("--out is required (or --check)")
    else:
        run(args.out, args.n, args.shard_size, args.workers, args.seed)


if __name__ == "__main__":
    main()
