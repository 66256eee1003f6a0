"""Issue 20 benchmark: how the error of PaiNN and the transformer falls with data, parameters and compute.

    cd /work/main && . .venv/bin/activate
    python benchmarks/scaling/run.py --workers 4 --device auto        # the benchmark (many hours on CPUs)
    python benchmarks/scaling/run.py --report-only                    # refit and re-plot from the MLflow store
    python benchmarks/scaling/run.py --dry-run                        # tiny settings: checks the wiring (minutes)
    python benchmarks/scaling/run.py --print-config                   # the sweep YAML(s), nothing run

Everything runs through ``atomforge sweep`` (``run_sweep``, docs/sweep.md), so the benchmark is
resumable (run the same command again after a kill), tracked (one MLflow parent run per sweep in
``<out>/mlflow.db``; every point a child run) and its report regenerates from the store.

Data (GFN2-xTB, ``benchmarks/ethanol/data-i16``): the pool is ``train.extxyz`` (1000 ethanol
frames, 600 K); ``--valid`` of them (50) are held out once for validation, the nested training
subsets of ``--sizes`` (25 … 800: 6 sizes, 1.5 decades) are drawn from the other 950 per seed;
test sets ``t600K`` (``test.extxyz``, an independent 600 K trajectory) and ``t1000K``
(``test_1000K.extxyz``).

Models (cutoff 5 Å, float32, energy ×1 + forces ×10): three sizes (``--widths``/``--depths``,
default s = 32×2, m = 64×3, l = 128×4) of each backbone —

* ``painn_*``: PaiNN (equivariant, conservative forces);
* ``tfd_*``: the transformer with ``forces: direct`` (a force head, not −∂E/∂r);
* ``tfc_*``: the transformer with ``forces: conservative`` (−∂E/∂r through the same trunk).

Budget: ``--budget`` of wall time per point (AdamW lr ``--lr``, batch 8, EMA 0.995, ``cosine_time``
over the budget, early model selection on the validation set); seeds ``--seeds`` (2). The parameter
and compute laws are fitted per backbone, the data law per model.

Fine-tune vs scratch (``--finetune``, on when ``benchmarks/finetune/data/pretrain_xtb.extxyz`` exists):
a first sweep pre-trains every model once on that multi-molecule xTB set (ethanol, methanol,
acetaldehyde, dimethyl ether; validation ``pretrain_valid_xtb.extxyz``) for ``--pretrain-budget``;
the main sweep then has the init axis ``[scratch, ft]``, ``ft`` starting from the model's
pre-trained file (same level of theory: one head) with lr ``--ft-lr``. The report's
``finetune.md`` gives the ratio to scratch per data size.

Cost with the defaults: 6 sizes × 9 models × 2 seeds × 2 inits = 216 points of ``--budget`` (15 min)
= 54 point-hours, plus 9 pre-trainings of ``--pretrain-budget`` (60 min) = 9 point-hours; divide by
``--workers`` (each ``--threads`` cores, or sharing the GPUs with ``--device auto``). Halve it with
``--no-finetune``; ``--families painn`` for one backbone.

MD stability (``--stability``, on by default; benchmark 2): every point's model runs the suite of
docs/stability.md — Langevin NVT at 600 / 1000 / 1500 K from two starts (``--md-steps`` of 0.5 fs
each: 1 ps by default), NVE at 600 K, and ethanol's pair-distance distribution at 600 K against
GFN2-xTB MD (generated once). About 14,000 model steps per point (~45 s for a PaiNN 32×2 on one
core); the report gives the Spearman rank correlation between force MAE and mean stable time.

Outputs: ``<out>/pretrain/`` and ``<out>/sweep/`` (the sweep folders: ``report/`` with the
plots, ``exponents.md``, ``finetune.md``, ``points.csv``), ``<out>/summary.md`` (the tables of
both) and ``<out>/run.json`` (the command, versions and configs).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
ETHANOL = ROOT / "benchmarks" / "ethanol" / "data-i16"
PRETRAIN = ROOT / "benchmarks" / "finetune" / "data"
FAMILIES = {"painn": ("painn", {}), "tfd": ("transformer", {"forces": "direct"}),
            "tfc": ("transformer", {"forces": "conservative"})}
SIZE_NAMES = ("s", "m", "l", "xl")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--sizes", type=int, nargs="+", default=[25, 50, 100, 200, 400, 800])
    parser.add_argument("--valid", type=int, default=50, help="pool structures held out for validation")
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--widths", type=int, nargs="+", default=[32, 64, 128], help="hidden channels per model size")
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 3, 4], help="layers per model size")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--budget", default="15m", help="wall time per point (e.g. 15m)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--finetune", action=argparse.BooleanOptionalAction, default=None,
                        help="add the fine-tune-vs-scratch axis (default: when the pre-training data exist)")
    parser.add_argument("--pretrain-budget", default="60m", help="wall time of each model's pre-training")
    parser.add_argument("--ft-lr", type=float, default=1e-3)
    parser.add_argument("--stability", action=argparse.BooleanOptionalAction, default=True,
                        help="run the MD stability suite on every point's model (benchmark 2: force error vs stable time)")
    parser.add_argument("--md-steps", type=int, default=2000, help="steps of 0.5 fs per stability run")
    parser.add_argument("--workers", type=int, default=1, help="points at a time (a process pool)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per point")
    parser.add_argument("--device", default="auto", help="auto (GPUs round-robin if any) | cpu | cuda")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--report-only", action="store_true", help="fit and plot from the MLflow store only")
    parser.add_argument("--print-config", action="store_true", help="print the sweep config(s) and stop")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny settings (sizes 8-32, 8-16 channels, 2 epochs, 1 seed) in <out>-dry: checks the wiring")
    args = parser.parse_args(argv)
    if len(args.widths) != len(args.depths):
        parser.error("--widths and --depths give one value per model size: the same number of each")
    if args.finetune is None:
        args.finetune = (PRETRAIN / "pretrain_xtb.extxyz").exists()
    if args.dry_run:
        args.out = args.out.with_name(args.out.name + "-dry")
        args.sizes, args.widths, args.depths, args.seeds = [8, 16, 32], [8, 16], [1, 1], [0]
        args.valid, args.bootstrap = 10, 50
    return args


def models(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The model axis: every family at every size."""
    out = []
    for family in args.families:
        backbone, extra = FAMILIES[family]
        for k, (width, depth) in enumerate(zip(args.widths, args.depths)):
            block = {"backbone": backbone, "hidden_channels": width, "num_layers": depth, **extra}
            if backbone == "transformer":
                block["num_heads"] = 4 if width >= 16 else 2
            out.append({"name": f"{family}_{SIZE_NAMES[k]}", "family": family, "overrides": {"model": block}})
    return out


def training(args: argparse.Namespace, budget: str, lr: float) -> dict[str, Any]:
    if args.dry_run:
        return {"max_epochs": 2, "batch_size": 4, "lr": lr, "ema_decay": 0.9}
    return {"max_epochs": 100_000, "max_time": budget, "batch_size": 8, "lr": lr, "ema_decay": 0.995,
            "scheduler": {"name": "cosine_time", "min_lr": 1e-5}}


def base(args: argparse.Namespace) -> dict[str, Any]:
    return {"model": {"cutoff": 5.0, "num_rbf": 16},
            "loss": [{"name": "energy", "weight": 1.0}, {"name": "forces", "weight": 10.0}],
            "training": training(args, args.budget, args.lr)}


def common(args: argparse.Namespace) -> dict[str, Any]:
    return {"models": models(args), "seeds": list(args.seeds), "device": args.device,
            "executor": {"kind": "process" if args.workers > 1 else "serial", "workers": args.workers,
                         "threads": args.threads},
            "tracking": {"name": "mlflow", "experiment": "issue20-scaling"},
            "fits": {"metric": "forces_mae", "test": "t600K", "bootstrap": args.bootstrap}}


def pretrain_sweep(args: argparse.Namespace) -> dict[str, Any]:
    """Every model pre-trained once on the multi-molecule xTB set (a one-size sweep)."""
    pool = PRETRAIN / "pretrain_xtb.extxyz"
    size = 64 if args.dry_run else _count(pool)
    raw = {"name": "issue20-pretrain", "output": str(args.out / "pretrain"), "base": base(args),
           "data": {"train": str(pool), "valid": str(PRETRAIN / "pretrain_valid_xtb.extxyz"), "sizes": [size],
                    "test": {"t600K": str(ETHANOL / "test.extxyz")}},
           "budgets": [{"name": "pre", **({} if args.dry_run else {"max_time": args.pretrain_budget})}],
           **common(args)}
    raw["seeds"] = [0]
    return raw


def main_sweep(args: argparse.Namespace, pretrained: dict[str, str] | None) -> dict[str, Any]:
    raw = {"name": "issue20-scaling", "output": str(args.out / "sweep"), "base": base(args),
           "data": {"train": str(ETHANOL / "train.extxyz"), "sizes": list(args.sizes), "valid_size": args.valid,
                    "test": {"t600K": str(ETHANOL / "test.extxyz"), "t1000K": str(ETHANOL / "test_1000K.extxyz")}},
           "budgets": [{"name": "b" + args.budget.replace(" ", "") if not args.dry_run else "tiny"}],
           **common(args)}
    if args.stability:
        raw["stability"] = stability(args)
    if pretrained is not None:
        raw["init"] = ["scratch", {"name": "ft", "init_from": pretrained, "training": {"lr": args.ft_lr}}]
    return raw


def stability(args: argparse.Namespace) -> dict[str, Any]:
    """The MD stability suite of every point (docs/stability.md): Langevin NVT at 600 / 1000 /
    1500 K from two starts of the 600 K test trajectory, an NVE run at 600 K, and the
    pair-distance distribution at 600 K against GFN2-xTB MD (generated once, cached)."""
    steps = 40 if args.dry_run else args.md_steps
    return {"temperatures": [600, 1000, 1500], "n_starts": 2, "steps": steps, "timestep_fs": 0.5,
            "check_every": 20 if not args.dry_run else 10, "nve": {"steps": steps, "temperature": 600},
            "reference": {"oracle": {"name": "xtb"}, "temperature": 600, "steps": steps},
            "rdf": {"r_max": 5.0, "bins": 100}}


def _count(path: Path) -> int:
    from ase.io import iread

    return sum(1 for _ in iread(path, index=":"))


def pretrained_files(raw: dict[str, Any], outcome: Any) -> dict[str, str]:
    """model name → its pre-trained model file (the pre-training sweep's points)."""
    files = {}
    for record in outcome.results.values():
        files[record["model"]] = record["model_file"]
    missing = sorted({m["name"] for m in raw["models"]} - set(files))
    if missing:
        raise SystemExit(f"pre-training failed for {missing}: see {raw['output']}/points/*/error.txt")
    return files


def summary(out: Path, reports: dict[str, dict[str, Any]]) -> Path:
    lines = ["# Issue 20: scaling of PaiNN and the transformer on GFN2-xTB ethanol", ""]
    for name, report in reports.items():
        folder = Path(report["folder"])
        lines += [f"## {name} ({report['points']} points, error: {report['metric']})", ""]
        for table in ("exponents.md", "finetune.md"):
            path = folder / table
            if path.exists():
                lines += path.read_text().splitlines()[2:] + [""]
    path = out / "summary.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def run(args: argparse.Namespace) -> dict[str, Any]:
    import atomforge
    from atomforge import make_registry, run_sweep, sweep_config_from_dict, sweep_report_only

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "mlflow.db").touch()  # this folder is the project: its own MLflow store
    registry = make_registry()
    reports, configs = {}, {}
    pretrained = None
    if args.finetune:
        raw = configs["pretrain"] = pretrain_sweep(args)
        config = sweep_config_from_dict(raw)
        if args.report_only:
            reports["pretrain"] = sweep_report_only(config, registry)
        else:
            outcome = run_sweep(config, registry, verbose=args.workers == 1)
            reports["pretrain"] = outcome.report
            pretrained = pretrained_files(raw, outcome)
        reports["pretrain"]["folder"] = str(config.output / "report")
        if args.report_only:  # the files are where the pre-training sweep put them
            pretrained = {m["name"]: str(config.output / "points" / f"n{raw['data']['sizes'][0]}-{m['name']}-pre-scratch-s0"
                                         / "train" / "model.pt") for m in raw["models"]}
    raw = configs["sweep"] = main_sweep(args, pretrained)
    config = sweep_config_from_dict(raw)
    if args.report_only:
        reports["sweep"] = sweep_report_only(config, registry)
    else:
        reports["sweep"] = run_sweep(config, registry, verbose=args.workers == 1).report
    reports["sweep"]["folder"] = str(config.output / "report")
    record = {"command": " ".join(sys.argv), "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
              "versions": {"atomforge": atomforge.__version__, "python": platform.python_version()},
              "host": {"machine": platform.machine(), "cpus": os.cpu_count()}, "configs": configs,
              "summary": str(summary(args.out, reports))}
    (args.out / "run.json").write_text(json.dumps(record, indent=2, default=str))
    return record


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.print_config:
        import yaml

        configs = [main_sweep(arguments, {m["name"]: "<pre-trained file>" for m in models(arguments)}
                              if arguments.finetune else None)]
        if arguments.finetune:
            configs.insert(0, pretrain_sweep(arguments))
        print(yaml.safe_dump_all(configs, sort_keys=False))
        raise SystemExit(0)
    print(json.dumps(run(arguments), indent=2, default=str)[-2000:])
