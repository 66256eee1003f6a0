"""``atomforge export MODEL --format torchscript|metatomic``: the CLI of :mod:`atomforge.model.export`."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Callable

from .registry import Registry

__all__ = ["export_command"]


def export_command(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace, Registry], int]:
    """Add the arguments of ``export`` to ``parser``; return its runner."""
    from .model.export import ExportFormat

    parser.add_argument("model", type=Path, help="an atomforge model file")
    parser.add_argument("--format", default=ExportFormat.METATOMIC.value, choices=[f.value for f in ExportFormat],
                        help="metatomic (default): LAMMPS, ASE, torch-sim, i-PI; torchscript: any libtorch host, "
                             "own neighbour list; aot: not available with this torch (docs/deploy.md)")
    parser.add_argument("--out", type=Path, help="the file to write (default: MODEL's stem + .<format>.pt)")
    parser.add_argument("--head", help="the head to export (required for a multi-head model)")
    parser.add_argument("--dtype", choices=("float32", "float64"), help="default: the model's")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip comparing the exported file with the eager model on probe structures")

    def run(args: argparse.Namespace, registry: Registry) -> int:
        from .model.export import export_model

        report = export_model(args.model, args.out, format=args.format, head=args.head, dtype=args.dtype,
                              registry=registry, verify=not args.no_verify)
        deviation = None if math.isnan(report.max_deviation) else report.max_deviation
        print(json.dumps({"exported": str(report.path), "format": report.format.value, "head": report.head,
                          "seconds": round(report.seconds, 3), "max_relative_deviation": deviation,
                          **({"note": report.note} if report.note else {})}, indent=2))
        return 0

    return run
