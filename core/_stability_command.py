"""``atomforge stability MODEL CONFIG``: the MD-stability suite of one model (docs/stability.md);
the logic is :func:`atomforge.analysis.stability.run_stability_suite`. Prints the metrics as JSON.

Exit codes: 0 the model passed the config's criteria; 1 it did not; 2 an error."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

from .registry import Registry

__all__ = ["stability_command"]

Runner = Callable[[argparse.Namespace, Registry], int]
NOT_STABLE = 1  # the exit code when the model fails the config's pass criteria


def stability_command(parser: argparse.ArgumentParser) -> Runner:
    """Arguments of ``atomforge stability`` and its runner."""
    parser.add_argument("model", type=Path, help="model file (model.pt)")
    parser.add_argument("config", type=Path, help="stability YAML (docs/stability.md)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set temperatures=[300,900] (repeatable)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for stability.json, the plots and cached reference MD "
                             "(default: stability/ next to the model file)")
    parser.add_argument("--device", default="cpu", help="where the model runs: cpu | cuda | cuda:N | auto")
    parser.add_argument("--head", default=None, help="a multi-head model's head (name or index)")
    parser.add_argument("--tracking", default="mlflow", help="tracker plugin (mlflow | none; default mlflow)")
    parser.add_argument("--experiment", default="atomforge-stability", help="MLflow experiment")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return _run


def _run(args: argparse.Namespace, registry: Registry) -> int:
    from ._errors import ConfigError
    from ._specs import PluginKind
    from .analysis.stability import config_record, load_stability_config, run_stability_suite, stability_verdict
    from .tracking import flatten

    if not args.model.is_file():
        raise ConfigError(f"model file {str(args.model)!r} does not exist")
    config = load_stability_config(args.config, args.overrides)
    out = args.out or args.model.parent / "stability"
    name = args.model.resolve().parent.name if args.model.stem == "model" else args.model.stem  # runs/cu/model.pt: cu
    tracker = registry.get(PluginKind.TRACKER, args.tracking).factory(run_dir=out, experiment=args.experiment)
    tracker.start(run_name=f"stability-{name}")
    try:
        tracker.log_params(flatten({"model": str(args.model.resolve()), **config_record(config)}))
        say = None if args.quiet else (lambda message: print(message, file=sys.stderr))
        metrics = run_stability_suite(args.model, config, out_dir=out, tracker=tracker, registry=registry,
                                      head=args.head, device=args.device, progress=say)
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end("FINISHED")
    passed, verdict = stability_verdict(metrics, config)
    report = {**metrics, "verdict": verdict, "report": str(out / "stability.json")}
    print(json.dumps(report, indent=2, ensure_ascii=False))
    return 0 if passed else NOT_STABLE
