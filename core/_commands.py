"""Core CLI sub-commands, registered through the same ``register_commands`` hook as any plugin:
``train``, ``evaluate``, ``md``, ``relax``, ``import-model``, ``export``, ``plugins``, ``demo`` and ``data``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

from ._data_commands import _option as _source_option, data_command
from ._distill_command import distill_command
from ._export_command import export_command
from ._relax_command import relax_command
from ._sweep_command import sweep_command
from ._stability_command import stability_command
from ._specs import CommandSpec, PluginKind
from .hookspecs import hookimpl
from .registry import Registry

Runner = Callable[[argparse.Namespace, Registry], int]


def _train(parser: argparse.ArgumentParser) -> Runner:
    parser.add_argument("config", type=Path, help="YAML config (see docs/config.md)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set training.lr=0.002 (repeatable)")
    parser.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--nproc", type=int, default=1, metavar="N",
                        help="train with N processes on this machine (starts torchrun; needs "
                             "training.engine: deepspeed). Several nodes: see docs/distributed.md")

    def run(args: argparse.Namespace, registry: Registry) -> int:
        from . import distributed
        from .config import load_config
        from .workflows.train import train

        config = load_config(args.config, args.overrides)
        if args.nproc > 1 and not distributed.is_launched():
            argv = ["train", str(args.config), *(f"--set={o}" for o in args.overrides)]
            argv += ["--resume"] * args.resume + ["--quiet"] * args.quiet
            return _launch(args.nproc, argv)
        outcome = train(config, registry, resume=args.resume, verbose=not args.quiet)
        if distributed.is_main():
            print(json.dumps({"model": str(outcome.model_path), **outcome.test_metrics}, indent=2))
        return 0

    return run


def _launch(nproc: int, argv: list[str]) -> int:
    """Re-run this command under ``torchrun`` with ``nproc`` processes on this machine."""
    import os
    import subprocess

    env = dict(os.environ)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "atomforge", *argv]
    print("launching: " + " ".join(command), file=sys.stderr)
    return subprocess.call(command, env=env)


def _format_metrics(name: str, n: int, metrics: dict[str, Any]) -> str:
    from .analysis.metrics import format_config_type_table  # torch: imported when a table is printed

    rows = [f"{name}  ({n} structures)"]
    units = {"energy": "meV/atom", "forces": "meV/Å", "stress": "meV/Å³"}
    for prefix, unit in units.items():
        if f"{prefix}_mae" in metrics:
            count = int(metrics.get(f"{prefix}_count", n))
            rows.append(f"  {prefix:<7} MAE {metrics[prefix + '_mae']:10.3f}  RMSE "
                        f"{metrics[prefix + '_rmse']:10.3f}  {unit}  ({count} of {n} structures)")
    if len(rows) == 1:
        rows.append("  (no labels to compare against)")
    rows.extend(format_config_type_table(metrics.get("config_types", {})))
    rows.extend(_format_uq(metrics))
    rows.extend(f"  {key[8:]:<28} {value:12.5g}" for key, value in metrics.items() if key.startswith("physics_"))
    return "\n".join(rows)


def _physics_arguments(parser: argparse.ArgumentParser) -> None:
    """``--physics`` and its settings (defaults: :class:`atomforge.config.EvaluationConfig`)."""
    from .config import EvaluationConfig

    d = EvaluationConfig()
    group = parser.add_argument_group("physics metrics (--physics; see docs/physics.md)")
    group.add_argument("--physics", action="store_true",
                       help="also report rotation error, curl, NVE energy drift and MD stability")
    group.add_argument("--structures", type=int, default=d.structures, help="structures for rotation and curl")
    group.add_argument("--rotations", type=int, default=d.rotations, help="random rotations per structure")
    group.add_argument("--curl-probes", type=int, default=d.curl_probes, help="Hutchinson probes per batch")
    group.add_argument("--nve-steps", type=int, default=d.nve_steps, help="NVE steps from the first structure (0: none)")
    group.add_argument("--timestep", type=float, default=d.timestep_fs, help="NVE time step, fs")
    group.add_argument("--temperature", type=float, default=d.temperature, help="initial temperature, K")
    group.add_argument("--seed", type=int, default=d.seed)


def _physics_settings(args: argparse.Namespace) -> Any:
    """The :class:`EvaluationConfig` of the command line, validated like the config section."""
    from .config import _evaluation

    return _evaluation({"physics": True, "structures": args.structures, "rotations": args.rotations,
                        "curl_probes": args.curl_probes, "nve_steps": args.nve_steps,
                        "timestep_fs": args.timestep, "temperature": args.temperature, "seed": args.seed})


def _format_uq(metrics: dict[str, float]) -> list[str]:
    """Rows for the ``uq_*`` metrics of a model with a UQ head (see docs/uq.md)."""
    rows = []
    for quantity, unit, rho in (("energy", "eV", "energy_spearman"), ("forces", "eV/Å", "forces_spearman_structure")):
        if f"uq_{quantity}_std_mean" in metrics:
            m = {k[3:]: v for k, v in metrics.items() if k.startswith("uq_")}
            rows.append(f"  {quantity:<7} mean std {m[quantity + '_std_mean']:.4g} {unit}  Spearman ρ "
                        f"{m[rho]:.3f}  NLL {m[quantity + '_nll']:.3f}  miscal. area "
                        f"{m[quantity + '_miscalibration_area']:.3f}  ENCE {m[quantity + '_ence']:.3f}")
    return rows


def _evaluate(parser: argparse.ArgumentParser) -> Runner:
    parser.add_argument("model", type=Path, help="model file (model.pt)")
    parser.add_argument("data", nargs="+", type=Path, help="labelled structure files")
    parser.add_argument("--source", default="ase", help="data-source plugin used to read DATA")
    parser.add_argument("--option", dest="options", action="append", type=_source_option, default=[],
                        metavar="KEY=VALUE", help="an option of the data source, e.g. energy_key=REF_energy "
                        "(MACE-style files; repeatable)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto (errors and UQ metrics; "
                        "physics metrics run on the CPU)")
    parser.add_argument("--head", default=None, help="a multi-head model's head (name or index) to score every "
                        "structure on (default: each structure's fidelity)")
    _physics_arguments(parser)

    def run(args: argparse.Namespace, registry: Registry) -> int:
        from .analysis.evaluate import evaluate, uncertainty_metrics
        from .model.modelfile import load_model
        from .devices import resolve_device

        device = resolve_device(args.device)
        model = load_model(args.model, registry=registry).to(device)
        head = int(args.head) if args.head is not None and args.head.isdigit() else args.head
        if head is not None:
            getattr(model, "potential", model).head_number(head)  # an unknown head: a clear error now
        reader = registry.get(PluginKind.DATA_SOURCE, args.source).factory
        report = {}
        for path in args.data:
            structures = reader({**dict(args.options), "path": str(path)}, Path.cwd())
            acc = evaluate(model, structures, batch_size=args.batch_size, fields=registry.fields, head=head)
            report[str(path)] = {"n_structures": len(structures), **acc.metrics(),
                                 **{f"{quantity}_count": n for quantity, n in acc.counts.items()}}
            if acc.config_type_table():  # MACE's per-config_type error table
                report[str(path)]["config_types"] = acc.config_type_table()
            if hasattr(model, "calibration"):  # a UQ head: spread vs error too
                report[str(path)].update(uncertainty_metrics(model, structures, batch_size=args.batch_size))
            if args.physics:  # rotation error, curl, NVE drift, MD stability (docs/physics.md)
                from .analysis.physics import physics_metrics

                report[str(path)].update(physics_metrics(model.to("cpu"), structures, _physics_settings(args)))
                model.to(device)
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            for name, metrics in report.items():
                print(_format_metrics(name, int(metrics.pop("n_structures")), metrics))
        return 0

    return run


def _md(parser: argparse.ArgumentParser) -> Runner:
    parser.add_argument("model", type=Path)
    parser.add_argument("structure", type=Path, help="starting structure (any ase.io format)")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--temperature", type=float, required=True, help="K")
    parser.add_argument("--ensemble", choices=("nve", "nvt", "npt"), default="nvt",
                        help="nve: velocity Verlet (reports the energy drift); nvt: Langevin; npt: MTK or Berendsen "
                             "barostat (3D-periodic cells; reports mean pressure and volume)")
    parser.add_argument("--timestep", type=float, default=1.0, help="fs")
    parser.add_argument("--friction", type=float, default=0.01, help="Langevin friction, 1/fs")
    npt = parser.add_argument_group("NPT (--ensemble npt; docs/cli.md)")
    npt.add_argument("--pressure", type=float, default=0.0, help="external pressure, GPa (1 GPa = 10 kbar)")
    npt.add_argument("--barostat", choices=("mtk", "berendsen"), default="mtk",
                     help="mtk: ASE IsotropicMTKNPT (samples NPT); berendsen: NPTBerendsen (equilibration)")
    npt.add_argument("--thermostat-time", type=float, default=100.0, help="thermostat time constant, fs")
    npt.add_argument("--barostat-time", type=float, default=1000.0, help="barostat time constant, fs")
    npt.add_argument("--compressibility", type=float, default=0.01,
                     help="berendsen only: the material's compressibility, 1/GPa (1/bulk modulus)")
    parser.add_argument("--out", type=Path, default=Path("traj.extxyz"))
    parser.add_argument("--interval", type=int, default=10, help="write every N-th step")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="where the model runs: cpu | cuda | cuda:N | auto")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    group = parser.add_argument_group("flagging uncertain configurations (UQ models; docs/active_learning.md)")
    group.add_argument("--flag-uncertain", type=float, metavar="LEVEL",
                       help="append every step whose max force std is ≥ LEVEL (eV/Å) to the candidates file")
    group.add_argument("--candidates", type=Path, metavar="FILE",
                       help="extxyz file flagged steps are appended to (default: candidates.extxyz)")

    def run(args: argparse.Namespace, registry: Registry) -> int:
        from dataclasses import asdict

        import ase.io

        from ._errors import ConfigError
        from .analysis.md import run_md
        from .model.calculator import load_calculator

        if args.candidates is not None and args.flag_uncertain is None:
            raise ConfigError("--candidates needs --flag-uncertain LEVEL (the trust level, max force std in eV/Å)")
        candidates = (args.candidates or Path("candidates.extxyz")) if args.flag_uncertain is not None else None
        if not args.structure.exists():
            raise ConfigError(f"structure file {str(args.structure)!r} does not exist")
        calculator = load_calculator(args.model, registry=registry, flag_uncertain=args.flag_uncertain,
                                     candidates=candidates, device=args.device)
        atoms = ase.io.read(args.structure, index=-1)
        summary = run_md(atoms, calculator, steps=args.steps,
                         temperature=args.temperature, ensemble=args.ensemble,
                         timestep_fs=args.timestep, friction_per_fs=args.friction, pressure_GPa=args.pressure,
                         barostat=args.barostat, thermostat_time_fs=args.thermostat_time,
                         barostat_time_fs=args.barostat_time, compressibility_per_GPa=args.compressibility,
                         out=args.out, interval=args.interval, seed=args.seed, progress=not args.quiet)
        # only what means something for the ensemble: no energy drift under a thermostat, no volume without a cell
        report = {"trajectory": str(args.out), **{k: v for k, v in asdict(summary).items() if v is not None}}
        if candidates is not None:
            report["candidates"] = str(candidates)
            print(f"flagged {summary.flagged} of {summary.steps + 1} configurations (max force std ≥ "
                  f"{args.flag_uncertain:g} eV/Å); appended to {candidates}", file=sys.stderr)
        print(json.dumps(report, indent=2))
        return 0

    return run


def _plugins(parser: argparse.ArgumentParser) -> Runner:
    parser.add_argument("--json", action="store_true")

    def run(args: argparse.Namespace, registry: Registry) -> int:
        listing = {kind.value: [{"name": p.spec.name, "distribution": p.distribution, "plugin": p.plugin,
                                 "description": p.spec.description} for p in registry.entries(kind)]
                   for kind in PluginKind}
        listing[PluginKind.FIELD.value] = _fields(registry)
        if args.json:
            print(json.dumps({"plugins": listing, "failures": [f.__dict__ for f in registry.failures]}, indent=2))
            return 0
        print("\n".join(_plugin_table(listing)))
        for failure in registry.failures:
            print(f"FAILED plugin {failure.plugin!r} ({failure.distribution}): {failure.error}")
        return 0

    return run


def _plugin_table(listing: dict[str, list[dict[str, str]]]) -> list[str]:
    """``atomforge plugins`` as text: one section per kind, the name, ``[distribution]`` and
    description columns as wide as their longest entry over all sections (all rows line up)."""
    rows = {kind: [(item["name"], f"[{item['distribution']}]" if item["distribution"] else "", item["description"])
                   for item in items] or [("(none)", "", "")] for kind, items in listing.items()}
    name_width = max(len(name) for entries in rows.values() for name, _, _ in entries)
    dist_width = max(len(dist) for entries in rows.values() for _, dist, _ in entries)
    lines = []
    for kind, entries in rows.items():
        lines.append(f"{kind}:")
        lines.extend(f"  {name:<{name_width}}  {dist:<{dist_width}}  {text}".rstrip() for name, dist, text in entries)
    return lines


def _fields(registry: Registry) -> list[dict[str, str]]:
    """Every batch field (atomforge's own and the plugins'), with its kind and shape."""
    plugin_fields = {p.spec.name: p for p in registry.entries(PluginKind.FIELD)}
    rows = []
    for name, spec in registry.fields.items():
        provided = plugin_fields.get(name)
        shape = ",".join(map(str, spec.shape))
        rows.append({"name": name, "distribution": provided.distribution if provided else "atomforge",
                     "plugin": provided.plugin if provided else "atomforge (core)",
                     "description": f"per {spec.per.value}{f' [{shape}]' if shape else ''}, {spec.dtype}"
                                    f"{', label' if spec.label else ''}: {spec.description}"})
    return rows


def _demo(parser: argparse.ArgumentParser) -> Runner:
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder")
    parser.add_argument("--quick", action="store_true", help="tiny data and model (≈1 minute)")
    parser.add_argument("--tracking", default="mlflow", help="tracker plugin (mlflow | none)")

    def run(args: argparse.Namespace, registry: Registry) -> int:
        from .workflows.demo import run_demo

        run_demo(registry, args.out, quick=args.quick, tracking=args.tracking)
        return 0

    return run


def _import_model(parser: argparse.ArgumentParser) -> Runner:
    parser.add_argument("source", type=Path, help="another package's model file (e.g. a MACE .model)")
    parser.add_argument("out", type=Path, help="the atomforge model file to write (weights + JSON, no pickled code)")
    parser.add_argument("--backbone", required=True, help="the backbone plugin that reads it (e.g. mace)")

    def run(args: argparse.Namespace, registry: Registry) -> int:
        from .model.modelfile import import_model, read_model_file

        path = import_model(args.source, args.backbone, args.out, registry)
        config, metadata, _ = read_model_file(path)
        print(json.dumps({"model": str(path), "backbone": config["backbone"], "elements": config["elements"],
                          "cutoff": config["cutoff"], "dtype": config.get("dtype"),
                          **{k: v for k, v in metadata.items() if k != "imported_from"}}, indent=2))
        return 0

    return run


@hookimpl
def register_commands(register) -> None:  # noqa: ANN001
    register(CommandSpec("train", _train, "train a model from a YAML config", help="train from YAML"))
    register(CommandSpec("evaluate", _evaluate, "errors of a model on labelled data", help="evaluate a model"))
    register(CommandSpec("md", _md, "molecular dynamics with a model (ASE): NVE, NVT, NPT", help="run MD"))
    register(CommandSpec("relax", relax_command, "geometry optimisation with a model: positions and, with --cell, "
                         "the cell (ASE BFGS/LBFGS/FIRE)", help="relax structures (and cells)"))
    register(CommandSpec("distill", distill_command, "distil a teacher (model file or oracle) into a fast "
                         "student: sampling, teacher labels with Hessian rows, training", help="distil a model"))
    register(CommandSpec("stability", stability_command, "MD-stability suite of a model: stable time over temperatures "
                         "and starts, NVE drift, RDF vs reference MD (docs/stability.md)", help="MD stability of a model"))
    register(CommandSpec("import-model", _import_model, "translate another package's model file (MACE) into an "
                         "atomforge model file", help="import a MACE (or other) model file"))
    register(CommandSpec("export", export_command, "export a model file for deployment: metatomic (LAMMPS, ASE, "
                         "torch-sim) or TorchScript (docs/deploy.md)", help="export a model for LAMMPS / TorchScript"))
    register(CommandSpec("plugins", _plugins, "list registered plugins by kind", help="list plugins"))
    register(CommandSpec("demo", _demo, "main job: EMT-labelled Cu → train → evaluate → MD, tracked in MLflow",
                         help="run the end-to-end demo"))
    register(CommandSpec("sweep", sweep_command, "a grid of trainings (data size × model × budget × init × seed) "
                         "tracked under one MLflow run, resumable; scaling-law fits (docs/sweep.md)", help="scaling sweep"))
    register(CommandSpec("data", data_command, "structure stores: pack | info | split | sample | export "
                         "(docs/data.md)", help="pack data into a structure store, inspect, split, export"))
