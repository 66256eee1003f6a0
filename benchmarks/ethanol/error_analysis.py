"""Where does a model's force error come from, off-distribution? Per-frame errors by geometry.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ethanol/error_analysis.py MODEL \\
        --data benchmarks/ethanol/data-i16 --out results/analysis.json

For every frame of the hot (1000 K) and test (600 K) trajectories: the model's per-frame force
RMSE, and descriptors of the frame — the shortest interatomic distance relative to the same
pair's shortest distance in the training set (short contacts), the largest reference force
(high-force frames), the O–H and C–H bond stretch extremes, the two torsions (H–O–C–C, and the
methyl H–C–C–O), the reference energy above the training mean (eV), and the distance of the
frame's atoms to the training set in the model's latent space (mean over atoms of the distance
to the nearest training atom of the same element, features of the last layer). Reported: the
Spearman correlation of each descriptor with the frame RMSE, the error in bins of the reference
force magnitude (per component), the error per element, and the top-10 worst frames with their
descriptors.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from ase.io import read
from scipy.stats import spearmanr

import atomforge
from atomforge import keys as K
from atomforge.data.graph import atoms_to_graph, collate


def pair_minima(frames) -> dict[tuple[int, int], float]:
    out: dict[tuple[int, int], float] = {}
    for atoms in frames:
        d = atoms.get_all_distances()
        z = atoms.numbers
        for i in range(len(atoms)):
            for j in range(i + 1, len(atoms)):
                key = tuple(sorted((int(z[i]), int(z[j]))))
                out[key] = min(out.get(key, np.inf), d[i, j])
    return out


def features(potential, atoms) -> np.ndarray:
    batch = collate([atoms_to_graph(atoms, potential.cutoff)])
    with torch.no_grad():
        positions, _ = atomforge.differentiable_inputs(batch, False, False)
        out = potential.energy_outputs(batch, positions, None)
    return out[K.NODE_FEATURES].double().numpy()


def torsion(atoms, a, b, c, d) -> float:
    return float(atoms.get_dihedral(a, b, c, d))


def descriptors(atoms, minima, e_mean) -> dict[str, float]:
    d = atoms.get_all_distances()
    z = atoms.numbers
    ratio = np.inf
    for i in range(len(atoms)):
        for j in range(i + 1, len(atoms)):
            key = tuple(sorted((int(z[i]), int(z[j]))))
            ratio = min(ratio, d[i, j] / minima[key])
    f = atoms.get_forces()
    # ethanol from ase.build.molecule("CH3CH2OH"): C0 C1 O2 H3..H8 ; find the hydroxyl H and methyl C
    o = int(np.where(z == 8)[0][0])
    carbons = np.where(z == 6)[0]
    c_o = int(carbons[np.argmin(d[o, carbons])])
    c_m = int(carbons[carbons != c_o][0])
    hydrogens = np.where(z == 1)[0]
    h_o = int(hydrogens[np.argmin(d[o, hydrogens])])
    h_m = int(hydrogens[np.argmin(d[c_m, hydrogens])])
    ch = [d[c, h] for c in carbons for h in hydrogens if d[c, h] < 1.5]
    return {"short_contact_ratio": float(ratio), "max_ref_force": float(np.linalg.norm(f, axis=1).max()),
            "oh_bond": float(d[o, h_o]), "ch_bond_max": float(max(ch) if ch else np.nan),
            "ch_bond_min": float(min(ch) if ch else np.nan),
            "torsion_HOCC": abs(torsion(atoms, h_o, o, c_o, c_m) - 180.0),
            "torsion_HCCO": abs(((torsion(atoms, h_m, c_m, c_o, o) + 60.0) % 120.0) - 60.0),
            "energy_above_train_mean": float(atoms.get_potential_energy() - e_mean)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--latent-train-frames", type=int, default=300)
    args = p.parse_args()
    torch.set_num_threads(1)
    train = read(args.data / "train.extxyz", ":")
    minima = pair_minima(train)
    e_mean = float(np.mean([a.get_potential_energy() for a in train]))
    calc = atomforge.load_calculator(args.model)
    potential = atomforge.load_model(args.model)
    potential = getattr(potential, "potential", potential)
    train_feats = [(a.numbers, features(potential, a)) for a in train[:: max(1, len(train) // args.latent_train_frames)]]
    by_element = {int(z): np.concatenate([f[n == z] for n, f in train_feats]) for z in np.unique(train[0].numbers)}
    report: dict = {"model": str(args.model)}
    for name, file in (("hot", "test_1000K.extxyz"), ("test", "test.extxyz")):
        frames = read(args.data / file, ":")
        rows, comp_err, comp_ref, comp_z = [], [], [], []
        for atoms in frames:
            ref = atoms.get_forces()
            work = atoms.copy()
            work.calc = calc
            diff = work.get_forces() - ref
            feats = features(potential, atoms)
            latent = np.mean([np.min(np.linalg.norm(by_element[int(z)] - feats[i], axis=1))
                              for i, z in enumerate(atoms.numbers)])
            rows.append({"rmse": float(np.sqrt(np.mean(diff**2)) * 1e3), "latent_distance": float(latent),
                         **descriptors(atoms, minima, e_mean)})
            comp_err.append(np.abs(diff) * 1e3)
            comp_ref.append(np.abs(ref))
            comp_z.append(np.repeat(atoms.numbers[:, None], 3, axis=1))
        rmse = np.array([r["rmse"] for r in rows])
        correlations = {key: float(spearmanr(rmse, [r[key] for r in rows]).statistic)
                        for key in rows[0] if key != "rmse"}
        err, ref, zs = (np.concatenate(x).reshape(-1) for x in (comp_err, comp_ref, comp_z))
        edges = [0, 0.5, 1, 2, 3, 5, 100]
        bins = {f"{lo}-{hi} eV/Å": {"n": int(((ref >= lo) & (ref < hi)).sum()),
                                   "mae": float(err[(ref >= lo) & (ref < hi)].mean()) if ((ref >= lo) & (ref < hi)).any() else None}
                for lo, hi in zip(edges[:-1], edges[1:])}
        elements = {int(z): {"mae": float(err[zs == z].mean()), "rmse": float(np.sqrt((err[zs == z] ** 2).mean()))}
                    for z in np.unique(zs)}
        worst = sorted(rows, key=lambda r: -r["rmse"])[:10]
        report[name] = {"spearman_with_frame_rmse": correlations, "force_bins": bins, "elements": elements,
                        "worst_frames": worst,
                        "medians": {k: float(np.median([r[k] for r in rows])) for k in rows[0]}}
        print(name, json.dumps({"spearman": correlations, "bins": bins, "elements": elements}, indent=1), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
