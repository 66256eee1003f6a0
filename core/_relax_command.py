"""``atomforge relax``: relax every structure of a file with a model (positions, optionally the
cell); the logic is :func:`atomforge.workflows.relax.relax` (docs/cli.md).

Exit codes: 0 every structure converged; 1 some did not (their last configurations are written
all the same, with ``info['relax_converged'] = False``, and a warning names them); 2 an error."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

from .registry import Registry

__all__ = ["relax_command"]

Runner = Callable[[argparse.Namespace, Registry], int]
NOT_CONVERGED = 1  # the exit code when a structure did not reach --fmax within --steps


def relax_command(parser: argparse.ArgumentParser) -> Runner:
    """Arguments of ``atomforge relax`` and its runner."""
    parser.add_argument("model", type=Path, help="model file (model.pt)")
    parser.add_argument("structures", type=Path, help="structure file; every frame is relaxed (any ase.io format)")
    parser.add_argument("--out", type=Path, default=Path("relaxed.extxyz"),
                        help="relaxed structures with energy, forces, stress (extxyz; default relaxed.extxyz)")
    parser.add_argument("--trajectory", type=Path, default=None,
                        help="every optimiser step of every structure (extxyz; info: structure, relax_step)")
    parser.add_argument("--fmax", type=float, default=0.05, help="converged when every force is below this, eV/Å")
    parser.add_argument("--steps", type=int, default=500, help="most optimiser steps per structure")
    parser.add_argument("--optimizer", default="BFGS", help="BFGS | LBFGS | FIRE")
    parser.add_argument("--cell", action="store_true", help="relax the cell too (ASE FrechetCellFilter; 3D-periodic)")
    parser.add_argument("--pressure", type=float, default=0.0, help="external pressure for --cell, GPa")
    parser.add_argument("--hydrostatic", action="store_true", help="with --cell: scale the cell, keep its shape")
    parser.add_argument("--device", default="cpu", help="where the model runs: cpu | cuda | cuda:N | auto")
    parser.add_argument("--dtype", choices=("float32", "float64"), default=None,
                        help="evaluate the model in this precision (default: the model's); float64 for tight --fmax")
    parser.add_argument("--head", default=None, help="a multi-head model's head (name or index)")
    parser.add_argument("--quiet", action="store_true", help="no per-structure lines on stderr")
    return _run


def _run(args: argparse.Namespace, registry: Registry) -> int:
    import ase.io
    import torch

    from ._errors import ConfigError
    from .model.calculator import load_calculator
    from .workflows.relax import Optimizer, relax

    optimizer = Optimizer.parse(args.optimizer)  # a bad name fails before the model loads
    if not args.structures.exists():
        raise ConfigError(f"structure file {str(args.structures)!r} does not exist")
    structures = ase.io.read(args.structures, index=":")
    head = int(args.head) if args.head is not None and args.head.isdigit() else args.head
    calculator = load_calculator(args.model, registry=registry, device=args.device, head=head,
                                 dtype=getattr(torch, args.dtype) if args.dtype else None)
    for path in (args.out, args.trajectory):
        if path is not None and path.exists():
            path.unlink()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    reports, failed = [], []
    for index, atoms in enumerate(structures):
        atoms.info["structure"] = index
        result = relax(atoms, calculator, fmax=args.fmax, cell=args.cell, pressure=args.pressure,
                       hydrostatic=args.hydrostatic, optimizer=optimizer, steps=args.steps, trajectory=args.trajectory)
        ase.io.write(args.out, result.atoms, format="extxyz", append=True)
        reports.append({"structure": index, "formula": atoms.get_chemical_formula(), **result.summary()})
        if not result.converged:
            failed.append(index)
        if not args.quiet:
            print(_line(reports[-1], args.fmax), file=sys.stderr)
    _print_report(args, reports, failed)
    return NOT_CONVERGED if failed else 0


def _line(report: dict[str, Any], fmax: float) -> str:
    """One human line per structure: energy change, final fmax and the verdict."""
    verdict = "converged" if report["converged"] else f"NOT converged (fmax {report['fmax']:.3g} > {fmax:g} eV/Å)"
    volume = (f", volume {report['initial_volume']:.2f} → {report['volume']:.2f} Å³"
              if report["volume"] is not None else "")
    return (f"structure {report['structure']} ({report['formula']}): {report['steps']} steps, energy "
            f"{report['initial_energy']:.4f} → {report['energy']:.4f} eV{volume}: {verdict}")


def _print_report(args: argparse.Namespace, reports: list[dict[str, Any]], failed: list[int]) -> None:
    """The JSON report on stdout; a warning on stderr naming the structures that did not converge."""
    print(json.dumps({"out": str(args.out), "trajectory": str(args.trajectory) if args.trajectory else None,
                      "converged": not failed, "structures": reports}, indent=2))
    if failed:
        print(f"atomforge relax: warning: {len(failed)} of {len(reports)} structures did not reach fmax "
              f"{args.fmax:g} eV/Å within {args.steps} steps (structures {', '.join(map(str, failed))}); their last "
              f"configurations are in {args.out} with relax_converged=False. Raise --steps or try --optimizer FIRE",
              file=sys.stderr)
