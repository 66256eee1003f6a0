"""``atomforge distill CONFIG``: teacher labels (sampled, cached) → student training → report."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable

from .registry import Registry

Runner = Callable[[argparse.Namespace, Registry], int]


def distill_command(parser: argparse.ArgumentParser) -> Runner:
    """Arguments of ``atomforge distill`` and its runner."""
    parser.add_argument("config", type=Path, help="distill YAML (docs/distill.md)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set labels.hessian_rows=8 (repeatable)")
    parser.add_argument("--labels-only", action="store_true",
                        help="sample and label with the teacher, then stop (the labels are reused by later runs)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return _run


def _run(args: argparse.Namespace, registry: Registry) -> int:
    from .workflows.distill import distill, load_distill_config, teacher_labels

    config = load_distill_config(args.config, args.overrides)
    if args.labels_only:
        print(json.dumps({"labels": str(teacher_labels(config, registry))}, indent=2))
        return 0
    outcome = distill(config, registry, verbose=not args.quiet)
    print(json.dumps(outcome.report, indent=2, default=str))
    return 0
