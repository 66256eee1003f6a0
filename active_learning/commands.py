"""The ``atomforge al`` command: ``al run CAMPAIGN.yaml`` (resumes an existing campaign
directory), ``al status DIR`` and ``al export DIR --out OUT``. Registered through the
``register_commands`` hook (this module is listed in ``atomforge.registry.DEFAULT_PLUGINS``).

``al run`` is the campaign's driver and holds the campaign lock for its whole life; ``al status``
and ``al export`` are readers: they take no lock (they never block or disturb a running driver),
write nothing in the campaign directory and read only committed records (``state.json`` and
model files are replaced atomically; of the append-only journal and labelled set they read the
complete lines and frames)."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any, Callable

from ase.io import read, write

from atomforge import CommandSpec, ConfigError, Registry, hookimpl

from ._lock import read_lock_holder
from ._store import LabelJournal, LabelledSet, read_json

Runner = Callable[[argparse.Namespace, Registry], int]


def campaign_status(directory: Path) -> dict[str, Any]:
    """Iteration, phase, labels used, last errors and uncertainty summary of a campaign directory."""
    directory = Path(directory)
    state = read_json(directory / "state.json")
    if state is None:
        raise ConfigError(f"{directory} is not a campaign directory (no state.json); start one with `al run`")
    journal = LabelJournal(directory / "journal.jsonl", repair=False)
    failed = journal.with_status("failed")
    explored = [h for h in state["history"] if h.get("explored")]
    last = explored[-1] if explored else {}
    return {
        "directory": str(directory), "iteration": state["iteration"], "phase": state["phase"],
        "stopped_because": state.get("stopped_because"),
        "labels": len(journal.with_status("ok")), "label_failures": len(failed),
        "last_failures": [{"key": e.key, "reason": e.reason} for e in failed[-5:]],
        "last_errors": {k: v for k, v in (state.get("metrics") or {}).items() if k.endswith(("_mae", "_rmse"))},
        "uncertainty": {k: last[k] for k in last if k.startswith(("std_", "explored", "lo", "hi", "calibration"))},
        "halted_because": state.get("halted"),
        "driver": _driver(directory),
    }


def _driver(directory: Path) -> dict[str, Any] | None:
    """The driver named by the campaign lock: host, pid, started, command, alive (None: another host)."""
    holder = read_lock_holder(directory)
    if holder is None:
        return None
    return {k: holder.get(k) for k in ("host", "pid", "started", "command", "alive", "lock")}


def final_model_path(directory: Path | str) -> Path:
    """The campaign's final model file, or its latest one while the campaign is unfinished."""
    directory = Path(directory)
    state = read_json(directory / "state.json")
    if state is None:
        raise ConfigError(f"{directory} is not a campaign directory (no state.json)")
    models = sorted(directory.glob("iterations/*/train/model.pt"))
    final = state.get("final_iteration")
    model = directory / "iterations" / f"{final:03d}" / "train" / "model.pt" if final is not None else None
    model = model if model is not None and model.exists() else (models[-1] if models else None)
    if model is None:
        raise ConfigError(f"{directory} holds no trained model yet")
    return model


def export_campaign(directory: Path, out: Path) -> dict[str, Any]:
    """Copy the final (or latest) model and write the whole labelled data set to ``out``; returns
    the paths (str), the number of structures (int) and whether the campaign is done (bool), typed
    as such so that ``al export``'s JSON has numbers and booleans, not strings."""
    directory, out = Path(directory), Path(out)
    model = final_model_path(directory)
    state = read_json(directory / "state.json")
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy2(model, out / "model.pt")
    structures = list(read(directory / "initial.extxyz", index=":"))
    structures += LabelledSet(directory / "labelled.extxyz", repair=False).read()  # complete frames only
    write(out / "dataset.extxyz", structures, format="extxyz")
    return {"model": str(out / "model.pt"), "dataset": str(out / "dataset.extxyz"),
            "structures": len(structures), "final": state.get("phase") == "done"}


def _al(parser: argparse.ArgumentParser) -> Runner:
    sub = parser.add_subparsers(dest="al_command", metavar="{run,status,export}", required=True)
    run = sub.add_parser("run", help="run or resume a campaign")
    run.add_argument("campaign", type=Path, help="campaign YAML (docs/active_learning.md)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    run.add_argument("--quiet", action="store_true")
    status = sub.add_parser("status", help="where a campaign stands")
    status.add_argument("directory", type=Path)
    export = sub.add_parser("export", help="final model + labelled data set")
    export.add_argument("directory", type=Path)
    export.add_argument("--out", type=Path, default=None, help="default: DIRECTORY/export")

    def runner(args: argparse.Namespace, registry: Registry) -> int:
        if args.al_command == "run":
            from ._config import load_campaign
            from ._loop import run_campaign

            result = run_campaign(load_campaign(args.campaign, tuple(args.overrides)), registry, verbose=not args.quiet)
            print(json.dumps({"directory": str(result.directory), "iterations": result.iterations,
                              "labels": result.labels, "stopped_because": result.stopped_because,
                              "final_model": str(result.final_model)}, indent=2))
        elif args.al_command == "status":
            print(json.dumps(campaign_status(args.directory), indent=2))
        else:
            print(json.dumps(export_campaign(args.directory, args.out or args.directory / "export"), indent=2))
        return 0

    return runner


@hookimpl
def register_commands(register) -> None:  # noqa: ANN001
    register(CommandSpec("al", _al, "active learning: al run CAMPAIGN.yaml | al status DIR | al export DIR",
                         help="active-learning campaigns"))
