"""Active-learning benchmark on GFN2-xTB ethanol: uncertainty selection vs random MD frames.

The same two arms as ``run_al_cu.py`` (shared code imported from there), on one ethanol molecule
labelled by the ``xtb`` oracle (tblite): 20 initial frames drawn at random from
``benchmarks/ethanol/data/train.extxyz`` (600 K MD), a fixed test set of 100 frames of the
independent 600 K trajectory plus 100 of the 1000 K one, exploration by Langevin MD at
300/600/1000 K from 8 training frames.

    OMP_NUM_THREADS=1 python benchmarks/active_learning/run_al_ethanol.py
    OMP_NUM_THREADS=1 python benchmarks/active_learning/run_al_ethanol.py --plot-only

Output: benchmarks/active_learning/results/ethanol/ (git-ignored),
docs/benchmarks/al-ethanol-learning-curve.png and docs/benchmarks/al-ethanol-2026-11-29.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from ase.io import read, write

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_al_cu import ARMS, HERE, PLOT, add_arguments, run_and_summarise  # noqa: E402
from run_al_cu import campaign as cu_campaign  # noqa: E402

DATA = HERE.parent / "ethanol" / "data"
RESULTS = HERE / "results" / "ethanol"
ETHANOL_PLOT = PLOT.with_name("al-ethanol-learning-curve.png")
ETHANOL_SUMMARY = PLOT.with_name("al-ethanol-2026-11-29.json")


def make_data(folder: Path) -> dict[str, Path]:
    """Initial (20 random train frames), test (100 at 600 K + 100 at 1000 K), starts (8 train frames)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    train = read(DATA / "train.extxyz", index=":")
    picked = rng.permutation(len(train))
    paths = {"initial": folder / "initial.extxyz", "test": folder / "test.extxyz", "starts": folder / "starts.extxyz"}
    write(paths["initial"], [train[i] for i in picked[:20]])
    write(paths["starts"], [train[i] for i in picked[20:28]])
    write(paths["test"], read(DATA / "test.extxyz", index=":100") + read(DATA / "test_1000K.extxyz", index=":100"))
    return paths


ETHANOL_SYSTEM = {"oracle": {"name": "xtb", "timeout": 120, "retries": 1}, "cutoff": 5.0,
                  "md": {"temperatures": [300, 600, 1000], "steps": 200, "timestep_fs": 0.5}}


def campaign(paths: dict[str, Path], output: Path, selector: dict, budget: int, per_iteration: int,
             epochs: int, max_time: str, seed: int = 0, uq: str = "latent_distance", **explore: object) -> dict:
    """The Cu benchmark's campaign with the ethanol oracle, cutoff and MD settings."""
    return cu_campaign(paths, output, selector, budget, per_iteration, epochs, max_time, seed=seed,
                       system=ETHANOL_SYSTEM, uq=uq, **explore)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser, budget=100, per_iteration=20, epochs=60, hi=6.0)
    parser.add_argument("--arms", nargs="+", default=["uncertainty", "random"], choices=list(ARMS))
    args = parser.parse_args()
    run_and_summarise(args, args.arms, RESULTS, make_data, campaign, ETHANOL_PLOT, ETHANOL_SUMMARY,
                      "GFN2-xTB ethanol: active learning vs random MD frames")


if __name__ == "__main__":
    main()
