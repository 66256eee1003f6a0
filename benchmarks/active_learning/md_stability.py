"""Do the AL benchmark's final ethanol models run stable MD? (what uncertainty selection is for)

The learning-curve benchmark scores models on equilibrium MD frames; active learning labels the
configurations where the model is unsure, which are mostly the ones its own MD wanders into. This
script runs each arm's final model as the MD engine — Langevin at ``--temperature`` K, 0.5 fs,
``--steps`` steps from each of the 8 exploration starts — and checks every ``--every`` steps
against GFN2-xTB (tblite): the force error along the model's own trajectory, how far above the
test set's lowest energy the true energy has gone, and whether the molecule broke (a bonded
pair beyond 2 Å, or two atoms closer than 0.7 Å).

    OMP_NUM_THREADS=1 python benchmarks/active_learning/md_stability.py --tag broad-p10 \\
        --arms random uncertainty uncertainty_short

Writes ``results/ethanol/<tag>/md_stability.json`` and a copy under ``docs/benchmarks/``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from ase import units
from ase.constraints import FixCom
from ase.io import read
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import Stationary, ZeroRotation, thermalize_momenta

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ethanol"))
from make_data import make_calculator  # noqa: E402

from atomforge import load_calculator  # noqa: E402
from atomforge.active_learning import final_model_path  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "ethanol"
DOCS = HERE.parents[1] / "docs" / "benchmarks"
BONDS = [(0, 1), (1, 2), (2, 3), (1, 4), (1, 5), (0, 6), (0, 7), (0, 8)]  # ase molecule("CH3CH2OH")


def broken(atoms) -> bool:  # noqa: ANN001
    d = atoms.get_all_distances()
    np.fill_diagonal(d, np.inf)
    return bool(d.min() < 0.7 or max(d[i, j] for i, j in BONDS) > 2.0)


def run_arm(model: str, starts: list, floor: float, temperature: float, steps: int, every: int, seed: int) -> dict:
    """MD with the model from every start; xTB checks every ``every`` steps."""
    calc, xtb = load_calculator(model), make_calculator()
    errors, heights, broke, checked = [], [], 0, 0
    for k, start in enumerate(starts):
        atoms = start.copy()
        atoms.calc = calc
        rng = np.random.RandomState(seed + k)
        thermalize_momenta(atoms, temperature, rng=rng)
        Stationary(atoms)
        ZeroRotation(atoms)
        atoms.set_constraint(FixCom())
        dyn = Langevin(atoms, 0.5 * units.fs, temperature_K=temperature, friction=0.01 / units.fs, rng=rng,
                       fixcm=False)
        for _ in range(steps // every):
            try:
                dyn.run(every)
            except Exception:  # noqa: BLE001 - the model refused the geometry (atoms too close): broken
                broke += 1
                break
            frame = atoms.copy()
            frame.set_constraint()
            frame.calc = xtb
            checked += 1
            heights.append(frame.get_potential_energy() - floor)
            errors.append(1000 * float(np.abs(frame.get_forces() - atoms.get_forces(apply_constraint=False)).mean()))
            if broken(frame):
                broke += 1
                break
    return {"model": model, "trajectories": len(starts), "broken": broke, "frames_checked": checked,
            "force_mae_along_trajectory": float(np.mean(errors)) if errors else None,
            "force_mae_p90": float(np.percentile(errors, 90)) if errors else None,
            "energy_above_min_median": float(np.median(heights)) if heights else None,
            "energy_above_min_max": float(np.max(heights)) if heights else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tag", required=True)
    parser.add_argument("--arms", nargs="+", required=True)
    parser.add_argument("--temperature", type=float, default=1500.0)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    data = RESULTS / "data-broad"
    starts = read(data / "starts.extxyz", index=":")
    floor = min(a.get_potential_energy() for a in read(data / "test.extxyz", index=":"))
    out: dict = {"temperature": args.temperature, "steps": args.steps, "every": args.every, "arms": {}}
    for arm in args.arms:
        model = str(final_model_path(RESULTS / args.tag / arm))
        out["arms"][arm] = run_arm(model, starts, floor, args.temperature, args.steps, args.every, args.seed)
        print(arm, json.dumps(out["arms"][arm]), flush=True)
    text = json.dumps(out, indent=2)
    (RESULTS / args.tag / "md_stability.json").write_text(text)
    (DOCS / f"al-ethanol-2026-11-29-{args.tag}-md-stability.json").write_text(text)


if __name__ == "__main__":
    main()
