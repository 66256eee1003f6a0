"""Active-learning benchmark on GFN2-xTB ethanol: uncertainty selection vs random MD frames.

The same two arms as ``run_al_cu.py`` (shared code imported from there), on one ethanol molecule
labelled by the ``xtb`` oracle (tblite). Two protocols (``--protocol``):

``md600`` (sessions 2–3)
    20 initial frames drawn at random from ``benchmarks/ethanol/data/train.extxyz`` (600 K MD), a
    fixed test set of 100 frames of the independent 600 K trajectory plus 100 of the 1000 K one,
    exploration by Langevin MD at 300/600/1000 K from 8 training frames. The initial data are
    already drawn from the test distribution.
``broad`` (the Cu benchmark's design, repeated on the molecule)
    20 initial frames near equilibrium (the GFN2-xTB-relaxed anti conformer, rattled by 0.05 Å,
    as Cu's initial frames are rattled perfect cells); a fixed test set of independent GFN2-xTB
    MD at 300/700/1100/1500 K from the anti and gauche conformers (8 trajectories × 25 frames, as
    Cu's test spans 300–1500 K and 6 cell kinds); exploration by model MD at 300/900/1500 K from 8
    starts (4 anti, 4 gauche).

    OMP_NUM_THREADS=1 python benchmarks/active_learning/run_al_ethanol.py
    OMP_NUM_THREADS=1 python benchmarks/active_learning/run_al_ethanol.py --protocol broad --tag broad-p10 \
        --budget 300 --per-iteration 10 --warm-lr 0.002 --starts 8 --arms uncertainty random
    OMP_NUM_THREADS=1 python benchmarks/active_learning/run_al_ethanol.py --plot-only

Output: benchmarks/active_learning/results/ethanol/ (git-ignored),
docs/benchmarks/al-ethanol-learning-curve.png and docs/benchmarks/al-ethanol-2026-11-29.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from ase.io import read, write

from atomforge import attach_labels

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_al_cu import ARMS, HERE, PLOT, add_arguments, data_paths, run_and_summarise  # noqa: E402
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
    paths = data_paths(folder)
    write(paths["initial"], [train[i] for i in picked[:20]])
    write(paths["starts"], [train[i] for i in picked[20:28]])
    write(paths["test"], read(DATA / "test.extxyz", index=":100") + read(DATA / "test_1000K.extxyz", index=":100"))
    return paths


def make_data_broad(folder: Path) -> dict[str, Path]:
    """The ``broad`` protocol's files: initial (20 rattled relaxed anti), test (xTB MD at
    300–1500 K from both conformers), starts (4 anti + 4 gauche, slightly rattled)."""
    sys.path.insert(0, str(HERE.parent / "ethanol"))
    from make_data import TrajSpec, make_calculator, relaxed_ethanol, run_trajectory  # noqa: PLC0415

    folder.mkdir(parents=True, exist_ok=True)
    paths = data_paths(folder)
    if all(path.exists() for path in paths.values()):
        return paths
    anti = relaxed_ethanol()
    gauche = anti.copy()
    gauche.set_dihedral(0, 1, 2, 3, 60.0, indices=[3])  # rotate the hydroxyl H: C-C-O-H 180° -> 60°
    rng = np.random.default_rng(0)

    def labelled(atoms):  # noqa: ANN001, ANN202
        work = atoms.copy()
        work.calc = make_calculator()
        return attach_labels(atoms.copy(), energy=work.get_potential_energy(), forces=work.get_forces())

    initial = []
    for _ in range(20):
        atoms = anti.copy()
        atoms.positions += rng.normal(0, 0.05, atoms.positions.shape)
        initial.append(labelled(atoms))
    test = []
    for k, (conformer, temperature) in enumerate((c, t) for c in (anti, gauche) for t in (300, 700, 1100, 1500)):
        spec = TrajSpec(f"test-{k}", "", float(temperature), 25, 2000 + k)
        test += run_trajectory(conformer, spec, n_therm=400, stride=20)  # frames carry their xTB labels
    starts = []
    for conformer in (anti, gauche):
        for _ in range(4):
            atoms = conformer.copy()
            atoms.positions += rng.normal(0, 0.02, atoms.positions.shape)
            starts.append(atoms)
    write(paths["initial"], initial)
    write(paths["test"], test)
    write(paths["starts"], starts)
    return paths


ETHANOL_SYSTEM = {"oracle": {"name": "xtb", "timeout": 120, "retries": 1}, "cutoff": 5.0,
                  "md": {"temperatures": [300, 600, 1000], "steps": 200, "timestep_fs": 0.5}}


#: --protocol: (data files, MD temperatures of the explorer)
PROTOCOLS = {
    "md600": (make_data, [300, 600, 1000]),
    "broad": (lambda folder: make_data_broad(folder.with_name("data-broad")), [300, 900, 1500]),
}


def campaign(paths: dict[str, Path], output: Path, selector: dict, budget: int, per_iteration: int,
             epochs: int, max_time: str, seed: int = 0, uq: str = "latent_distance",
             temperatures: list[int] | None = None, **explore: object) -> dict:
    """The Cu benchmark's campaign with the ethanol oracle, cutoff and MD settings."""
    system = ETHANOL_SYSTEM if temperatures is None else {
        **ETHANOL_SYSTEM, "md": {**ETHANOL_SYSTEM["md"], "temperatures": temperatures}}
    return cu_campaign(paths, output, selector, budget, per_iteration, epochs, max_time, seed=seed,
                       system=system, uq=uq, **explore)


def by_temperature(results: Path, arms: list[str], test: Path) -> dict:
    """Each arm's final model on the test set, force MAE (meV/Å) per test temperature, and the
    labels it chose per explorer temperature with their GFN2-xTB energies (eV above the test
    set's lowest): where the labels went, and whether they look like the test set."""
    from atomforge import load_calculator
    from atomforge.active_learning import final_model_path

    frames = read(test, index=":")
    floor = min(a.get_potential_energy() for a in frames)
    out: dict = {"test_energy_above_min": {}}
    for temperature in sorted({a.info["temperature_K"] for a in frames}):
        e = [a.get_potential_energy() - floor for a in frames if a.info["temperature_K"] == temperature]
        out["test_energy_above_min"][str(temperature)] = {"median": float(np.median(e)), "p90": float(np.percentile(e, 90))}
    for arm in arms:
        model = str(final_model_path(results / arm))
        calc, errors = load_calculator(model), {}
        for atoms in frames:
            work = atoms.copy()
            work.calc = calc
            errors.setdefault(str(atoms.info["temperature_K"]), []).append(
                1000 * float(np.abs(work.get_forces() - atoms.get_forces()).mean()))
        labels = read(results / arm / "labelled.extxyz", index="20:")
        chosen: dict = {}
        for temperature in sorted({a.info.get("temperature") for a in labels}):
            e = [a.get_potential_energy() - floor for a in labels if a.info.get("temperature") == temperature]
            chosen[str(temperature)] = {"labels": len(e), "energy_median": float(np.median(e)),
                                        "energy_p90": float(np.percentile(e, 90))}
        out[arm] = {"model": model, "test_forces_mae_by_temperature": {t: float(np.mean(v)) for t, v in errors.items()},
                    "labels_by_explorer_temperature": chosen}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser, budget=100, per_iteration=20, epochs=60, hi=6.0)
    parser.add_argument("--arms", nargs="+", default=["uncertainty", "random"], choices=list(ARMS))
    parser.add_argument("--protocol", default="md600", choices=list(PROTOCOLS),
                        help="initial/test/start data and MD temperatures (see the module docstring)")
    parser.add_argument("--by-temperature", action="store_true",
                        help="no run: each arm's final model per test temperature, and where its labels went")
    args = parser.parse_args()
    if args.by_temperature:
        results = RESULTS / args.tag if args.tag else RESULTS
        test = RESULTS / ("data-broad" if args.protocol == "broad" else "data") / "test.extxyz"
        summary = by_temperature(results, args.arms, test)
        (results / "by_temperature.json").write_text(json.dumps(summary, indent=2))
        ETHANOL_SUMMARY.with_name(f"{ETHANOL_SUMMARY.stem}-{args.tag}-by-temperature.json").write_text(
            json.dumps(summary, indent=2))
        print(json.dumps(summary, indent=2))
        return
    make_files, temperatures = PROTOCOLS[args.protocol]

    def make_campaign(*positional: object, **keywords: object) -> dict:
        return campaign(*positional, temperatures=temperatures, **keywords)  # type: ignore[arg-type]

    run_and_summarise(args, args.arms, RESULTS, make_files, make_campaign, ETHANOL_PLOT, ETHANOL_SUMMARY,
                      f"GFN2-xTB ethanol ({args.protocol}): active learning vs random MD frames")


if __name__ == "__main__":
    main()
