"""Active-learning benchmark on EMT Cu: uncertainty selection vs random selection of MD frames.

The arms run the same `atomforge al run` campaign — same 20 initial frames, explorer (Langevin MD
from the same start pool), model, UQ head, training settings, label budget and fixed test set —
and differ only in the selector: ``diversity`` (adaptive trust window + farthest-point spread in
latent space) vs ``random``. The test force MAE after every iteration gives the learning curves.

    # the runs reported in docs/benchmarks.md (each ≈ 12-15 min on the shared 2-core VM):
    OMP_NUM_THREADS=1 python benchmarks/active_learning/run_al_cu.py --tag hi20 --hi 20
    OMP_NUM_THREADS=1 python benchmarks/active_learning/run_al_cu.py --tag hi6 --hi 6 \
        --arms uncertainty random random_window
    OMP_NUM_THREADS=1 python benchmarks/active_learning/run_al_cu.py --tag hi6-seed1 --hi 6 --seed 1 \
        --arms uncertainty random random_window
    OMP_NUM_THREADS=1 python benchmarks/active_learning/run_al_cu.py --tag hi6 --plot-only   # redraw

Output: benchmarks/active_learning/results/data/ and results/TAG/<arm>/ (campaign directories,
git-ignored), the summary docs/benchmarks/al-cu-2026-11-29-TAG.json and the learning curve
docs/benchmarks/al-cu-learning-curve-TAG.png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml
from ase import units
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.io import write
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

from atomforge import attach_labels

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
PLOT = HERE.parents[1] / "docs" / "benchmarks" / "al-cu-learning-curve.png"
SUMMARY = PLOT.with_name("al-cu-2026-11-29.json")  # results/ is git-ignored; the summary is kept here


def cell(strain: float = 0.0, shear: float = 0.0, vacancy: bool = False):
    """A 32-atom fcc Cu cell (2×2×2 cubic), optionally strained/sheared, optionally with a vacancy."""
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 2))
    deform = np.eye(3) * (1 + strain)
    deform[0, 1] = shear
    atoms.set_cell(atoms.cell[:] @ deform, scale_atoms=True)
    if vacancy:
        del atoms[0]
    return atoms


def label(atoms):
    work = atoms.copy()
    work.calc = EMT()
    return attach_labels(atoms.copy(), energy=work.get_potential_energy(), forces=work.get_forces(),
                         stress=work.get_stress())


def emt_md(atoms, temperature: float, frames: int, every: int, seed: int):
    """``frames`` EMT Langevin frames at ``temperature`` K, one every ``every`` 2-fs steps."""
    work = atoms.copy()
    work.calc = EMT()
    MaxwellBoltzmannDistribution(work, temperature_K=temperature, rng=np.random.default_rng(seed))
    dyn = Langevin(work, 2 * units.fs, temperature_K=temperature, friction=0.02, rng=np.random.default_rng(seed))
    out = []
    for _ in range(frames):
        dyn.run(every)
        out.append(label(work))
    return out


def data_paths(folder: Path) -> dict[str, Path]:
    """The files every campaign of a benchmark reads: initial data, test set, exploration starts."""
    return {name: folder / f"{name}.extxyz" for name in ("initial", "test", "starts")}


def make_data(folder: Path) -> dict[str, Path]:
    """Initial (20 rattled, mildly strained perfect cells), test set (MD at 300–1500 K over perfect,
    strained, sheared and vacancy cells) and the exploration start pool (unlabelled)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    initial = []
    for _ in range(20):
        atoms = cell(strain=rng.uniform(-0.01, 0.01))
        atoms.positions += rng.normal(0, 0.05, atoms.positions.shape)
        initial.append(label(atoms))
    kinds = [dict(), dict(strain=0.03), dict(strain=-0.03), dict(shear=0.05), dict(vacancy=True),
             dict(strain=0.02, vacancy=True)]
    test = []
    for k, kind in enumerate(kinds):
        for t, temperature in enumerate((300, 700, 1100, 1500)):
            test += emt_md(cell(**kind), temperature, frames=3, every=100, seed=1000 + 10 * k + t)
    starts = [cell(**kind) for kind in kinds] + [cell(strain=-0.02, shear=0.03), cell(strain=0.04)]
    paths = data_paths(folder)
    write(paths["initial"], initial)
    write(paths["test"], test)
    write(paths["starts"], starts)
    return paths


#: What differs between the benchmark systems; everything else in :func:`campaign` is shared.
CU_SYSTEM = {"oracle": {"name": "emt", "timeout": 60, "retries": 0}, "cutoff": 4.5,
             "md": {"temperatures": [300, 900, 1500], "steps": 100, "timestep_fs": 2.0}}


UQ_CHOICES = {  # the UQ head of every arm, and the loss terms it needs
    "latent_distance": ({"name": "latent_distance"}, []),
    "shallow_vector": ({"name": "shallow_ensemble", "num_heads": 8, "force_spread": "vector"},
                       [{"name": "energy_nll", "weight": 0.01, "detach_mean": True}, {"name": "forces_nll", "weight": 0.01}]),
    "deep_ensemble": ({"name": "deep_ensemble", "num_members": 3}, []),
}


def campaign(paths: dict[str, Path], output: Path, selector: dict, budget: int, per_iteration: int,
             epochs: int, max_time: str, seed: int = 0, system: dict = CU_SYSTEM, uq: str = "latent_distance",
             warm_lr: float | None = None, starts: int = 4, steps: int | None = None) -> dict:
    """One arm's campaign config; arms differ only in ``selector`` (and ``seed``).

    ``warm_lr``: warm-start every iteration after the first from the previous model (same
    epochs, this lr); ``starts``/``steps``: MD starts per iteration and steps per trajectory."""
    head, extra_loss = UQ_CHOICES[uq]
    train: dict = {
        "model": {"backbone": "painn", "cutoff": system["cutoff"], "hidden_channels": 32, "num_layers": 2, "num_rbf": 16},
        "uq": dict(head),
        "loss": [{"name": "energy", "weight": 1.0}, {"name": "forces", "weight": 10.0}, *extra_loss],
        "training": {"max_epochs": epochs, "max_time": max_time, "batch_size": 8, "lr": 0.005}}
    if warm_lr is not None:
        train["warm_start"] = {"training": {**train["training"], "lr": warm_lr}}
    md = {**system["md"], **({} if steps is None else {"steps": steps})}
    selector = dict(selector)
    stratify = selector.pop("_stratify", None)
    return {
        "output": str(output), "initial_data": str(paths["initial"]), "test": str(paths["test"]),
        "starts": str(paths["starts"]), "starts_per_iteration": starts, "valid_fraction": 0.1, "seed": seed,
        "oracle": dict(system["oracle"]),
        "train": train,
        "explorers": [{"name": "md", "interval": 10, **md}],
        "selector": selector,
        "budget": {"per_iteration": per_iteration, "total": budget, **({"stratify": stratify} if stratify else {})},
        "stop": {"max_iterations": 1000},
        "executor": {"kind": "serial"}, "tracking": "none",
    }


def arms(hi: float) -> dict[str, dict]:
    """The selectors compared. ``hi`` (a multiple of the calibration σ) also stops MD trajectories.

    - ``uncertainty``: adaptive trust window [1, hi) × calibration + farthest-point diversity;
    - ``random``: uniform over every explored MD frame (trajectories never stopped);
    - ``random_window``: uniform over the frames below hi (the same stopped trajectories as
      ``uncertainty``; a stronger baseline that only drops the frames the model finds wildest).
    """
    return {
        "uncertainty": {"name": "diversity", "method": "farthest_point", "lo": 1.0, "hi": hi, "adaptive": True},
        "random": {"name": "random"},
        "random_window": {"name": "trust_window", "lo": 0.0, "hi": hi, "adaptive": True},
        # variants of the uncertainty arm (same campaign otherwise; compare with the same seed's random arm)
        "uncertainty_lo2": {"name": "diversity", "method": "farthest_point", "lo": 2.0, "hi": hi, "adaptive": True},
        "uncertainty_topk": {"name": "top_k", "hi": hi, "adaptive": True},
        "uncertainty_short": {"name": "diversity", "method": "farthest_point", "lo": 1.0, "hi": hi, "adaptive": True,
                              "shortlist": 2},
        # the same selectors with each iteration's budget split evenly over MD temperatures
        # (budget.stratify; "_stratify" is moved there by campaign())
        "uncertainty_strat": {"name": "diversity", "method": "farthest_point", "lo": 1.0, "hi": hi, "adaptive": True,
                              "_stratify": "temperature"},
        "uncertainty_short_strat": {"name": "diversity", "method": "farthest_point", "lo": 1.0, "hi": hi,
                                    "adaptive": True, "shortlist": 2, "_stratify": "temperature"},
        # σ · latent density (top_k density: 1): uncertain but typical frames first
        "uncertainty_density": {"name": "top_k", "hi": hi, "adaptive": True, "density": 1.0},
        "uncertainty_density_strat": {"name": "top_k", "hi": hi, "adaptive": True, "density": 1.0,
                                      "_stratify": "temperature"},
    }


ARMS = arms(20.0)


def run_arm(results: Path, name: str, raw: dict) -> subprocess.Popen:
    """Start ``atomforge al run`` for one arm in the background (log in ``results/<name>.log``)."""
    config = results / f"{name}.yaml"
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    log = open(results / f"{name}.log", "w")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    return subprocess.Popen([sys.executable, "-m", "atomforge", "al", "run", str(config)], stdout=log,
                            stderr=subprocess.STDOUT, env=env)


def curve(results: Path, name: str) -> list[dict]:
    """Test errors vs labels used (beyond the initial data) after each iteration of one arm."""
    path = results / name / "state.json"
    state = json.loads(path.read_text()) if path.exists() else {}
    return [{"labels": h["train_labels"], "test_forces_mae": h.get("test_forces_mae"),
             "test_energy_mae": h.get("test_energy_mae")} for h in state.get("history", [])]


def summarise(results: Path = RESULTS, plot: Path = PLOT, summary_copy: Path = SUMMARY,
              title: str = "EMT Cu, 32 atoms: active learning vs random MD frames", initial: int = 20) -> dict:
    """Write the summary JSON (results/ and its copy under docs/) and the learning-curve PNG."""
    curves = {name: curve(results, name) for name in ARMS if (results / name / "state.json").exists()}
    summary: dict = {"arms": curves}
    for baseline in ("random", "random_window"):
        for arm in (name for name in curves if name.startswith("uncertainty")):
            if curves.get(baseline) and curves[arm]:
                final = curves[baseline][-1]
                reach = [p["labels"] for p in curves[arm] if p["test_forces_mae"] <= final["test_forces_mae"]]
                summary[f"{baseline}_final"] = final
                summary[f"{arm}_labels_to_reach_{baseline}_final"] = min(reach) if reach else None
    for path in (results / f"{plot.stem}.json", summary_copy):
        path.write_text(json.dumps(summary, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, points in curves.items():
        if points:
            ax.plot([p["labels"] for p in points], [p["test_forces_mae"] for p in points], "o-", label=name)
    ax.set_yscale("log")
    ax.set_xlabel(f"labels used (beyond the {initial} initial frames)")
    ax.set_ylabel("test force MAE (meV/Å)")
    ax.set_title(title, fontsize=10)
    ax.legend()
    fig.tight_layout()
    plot.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(plot, dpi=110)
    return summary


def add_arguments(parser: argparse.ArgumentParser, *, budget: int, per_iteration: int, epochs: int,
                  hi: float) -> None:
    """The options both benchmarks (Cu, ethanol) share, with each one's defaults."""
    parser.add_argument("--budget", type=int, default=budget)
    parser.add_argument("--per-iteration", type=int, default=per_iteration)
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--max-time", default="40s")
    parser.add_argument("--hi", type=float, default=hi, help="upper trust level, × calibration σ")
    parser.add_argument("--seed", type=int, default=0, help="campaign seed: training, MD, selection")
    parser.add_argument("--uq", default="latent_distance", choices=list(UQ_CHOICES), help="UQ head of every arm")
    parser.add_argument("--warm-lr", type=float, default=None,
                        help="warm-start each iteration from the previous model at this lr (default: from scratch)")
    parser.add_argument("--starts", type=int, default=4, help="MD starting structures per iteration")
    parser.add_argument("--steps", type=int, default=None, help="MD steps per trajectory (default: the system's)")
    parser.add_argument("--tag", default="", help="results subfolder (and suffix of the docs outputs)")
    parser.add_argument("--plot-only", action="store_true")


def run_and_summarise(args: argparse.Namespace, names: list[str], root: Path, make_data_files, make_campaign,
                      plot: Path, summary: Path, title: str | None = None) -> None:  # noqa: ANN001
    """Run the arms ``names`` side by side in ``root/<tag>/``, wait, then write the summary JSON
    and learning-curve PNG (their names get ``-<tag>``)."""
    results = root / args.tag if args.tag else root
    results.mkdir(parents=True, exist_ok=True)
    suffix = f"-{args.tag}" if args.tag else ""
    if not args.plot_only:
        paths = make_data_files(root / "data")
        selectors = arms(args.hi)
        procs = [run_arm(results, name, make_campaign(paths, results / name, selectors[name], args.budget,
                                                      args.per_iteration, args.epochs, args.max_time,
                                                      seed=args.seed, uq=args.uq, warm_lr=args.warm_lr,
                                                      starts=args.starts, steps=args.steps))
                 for name in names]
        for proc in procs:
            proc.wait()
    extra = {} if title is None else {"title": title}
    print(json.dumps(summarise(results, plot.with_name(f"{plot.stem}{suffix}.png"),
                               summary.with_name(f"{summary.stem}{suffix}.json"), **extra), indent=2))


def combine(tags: list[str], arms: list[str], results: Path = RESULTS, name: str = "seeds") -> dict:
    """Several seeds' runs (``results/<tag>/``) in one plot (mean ± range per arm) and one JSON
    with each seed's labels-to-reach ratio of every uncertainty arm vs that seed's random arm."""
    curves = {tag: {arm: curve(results / tag, arm) for arm in arms if (results / tag / arm / "state.json").exists()}
              for tag in tags}
    ratios: dict = {}
    for tag, by_arm in curves.items():
        final = by_arm["random"][-1]["test_forces_mae"]
        for arm in (a for a in by_arm if a != "random"):
            reach = [p["labels"] for p in by_arm[arm] if p["test_forces_mae"] <= final]
            ratios.setdefault(arm, {})[tag] = {"random_final": final, "labels": min(reach) if reach else None,
                                               "ratio": min(reach) / by_arm["random"][-1]["labels"] if reach else None}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for arm in arms:
        runs = [by_arm[arm] for by_arm in curves.values() if arm in by_arm]
        if not runs:
            continue
        length = min(len(r) for r in runs)
        x = [runs[0][i]["labels"] for i in range(length)]
        y = np.array([[r[i]["test_forces_mae"] for i in range(length)] for r in runs])
        line, = ax.plot(x, y.mean(0), "o-", label=f"{arm} (mean of {len(runs)})")
        ax.fill_between(x, y.min(0), y.max(0), color=line.get_color(), alpha=0.2)
    ax.set_yscale("log")
    ax.set_xlabel("labels used (beyond the 20 initial frames)")
    ax.set_ylabel("test force MAE (meV/Å)")
    ax.set_title(f"EMT Cu, {len(tags)} seeds: mean and range", fontsize=10)
    ax.legend()
    fig.tight_layout()
    plot = PLOT.with_name(f"{PLOT.stem}-{name}.png")
    fig.savefig(plot, dpi=110)
    summary = {"tags": tags, "labels_to_reach_random_final": ratios, "curves": curves}
    SUMMARY.with_name(f"{SUMMARY.stem}-{name}.json").write_text(json.dumps(summary, indent=2))
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser, budget=150, per_iteration=25, epochs=30, hi=20.0)
    parser.add_argument("--arms", nargs="+", default=["uncertainty", "random"], choices=list(ARMS))
    parser.add_argument("--combine", nargs="+", metavar="TAG",
                        help="no run: plot and summarise these tags' runs of --arms together (suffix: --tag)")
    args = parser.parse_args()
    if args.combine:
        print(json.dumps(combine(args.combine, args.arms, name=args.tag or "seeds"), indent=2))
        return
    run_and_summarise(args, args.arms, RESULTS, make_data, campaign, PLOT, SUMMARY)


if __name__ == "__main__":
    main()
