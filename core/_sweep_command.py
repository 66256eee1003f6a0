"""``atomforge sweep CONFIG``: a grid of trainings (data size × model × budget × init × seed),
tracked as child runs of one parent, resumable, then scaling-law fits (docs/sweep.md)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Callable

from .registry import Registry

Runner = Callable[[argparse.Namespace, Registry], int]


def sweep_command(parser: argparse.ArgumentParser) -> Runner:
    """Arguments of ``atomforge sweep`` and its runner."""
    parser.add_argument("config", type=Path, help="sweep YAML (docs/sweep.md)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set seeds=[0,1,2] (repeatable)")
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="run N points at a time (a local process pool unless executor.kind is dask)")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: fit and plot from the tracker's store (MLflow) alone")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return _run


def _run(args: argparse.Namespace, registry: Registry) -> int:
    from .workflows.sweep import load_sweep_config, run_sweep, sweep_report_only

    config = load_sweep_config(args.config, args.overrides)
    if args.workers is not None:
        kind = config.executor.kind if config.executor.kind != "serial" or args.workers == 1 else "process"
        config = dataclasses.replace(config, executor=dataclasses.replace(config.executor, kind=kind,
                                                                          workers=max(1, args.workers)))
    if args.report_only:
        report = sweep_report_only(config, registry)
        failed: dict[str, str] = {}
    else:
        outcome = run_sweep(config, registry, verbose=not args.quiet)
        report, failed = outcome.report, outcome.failed
    print(json.dumps({"report": str(config.output / "report"), "metric": report["metric"],
                      "points": report["points"], "source": report["source"],
                      "exponents": {f"{r['scaling']}/{r['group']}": {"alpha": r["alpha"], "alpha_ci": r["alpha_ci"]}
                                    for r in report["fits"]},
                      **({"failed": failed} if failed else {})}, indent=2))
    return 1 if failed else 0
