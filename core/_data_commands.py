"""``atomforge data``: pack any data source into a structure store, describe, split, sample and
export it (the logic is in :mod:`atomforge.data.packing`; docs/data.md)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

from ._errors import ConfigError
from .registry import Registry

__all__ = ["data_command"]

Runner = Callable[[argparse.Namespace, Registry], int]


def _option(text: str) -> tuple[str, Any]:
    """``key=value``, the value read as YAML (``3``, ``[a.cif, b.cif]``), else kept as text."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE")
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        parsed = value
    return key.strip(), parsed if isinstance(parsed, (str, int, float, bool, list)) else value


def _add_pack(sub: Any) -> None:
    p = sub.add_parser("pack", help="pack data sources into a store (resumable, appendable)",
                       description="Read structures from files, globs, a data-source plugin or an active-learning "
                                   "campaign, validate them and append them to a structure store. Re-running the "
                                   "same command after a kill resumes; new files are appended.")
    p.add_argument("out", type=Path, metavar="OUT", help="the store (a folder; created if absent)")
    p.add_argument("sources", nargs="*", metavar="SOURCE",
                   help="files or globs: (ext)xyz (streamed), ASE db and anything ase.io.read reads; "
                        "vasprun.xml, CIF, POSCAR/CONTCAR through pymatgen")
    p.add_argument("--source", metavar="NAME", help="read with this data-source plugin (with SOURCE files: each file "
                   "as its 'path' option; without: one call with the --option values)")
    p.add_argument("--option", dest="options", action="append", type=_option, default=[], metavar="KEY=VALUE",
                   help="an option of the --source plugin (repeatable)")
    p.add_argument("--campaign", action="append", type=Path, default=[], metavar="DIR",
                   help="an active-learning campaign's data (initial.extxyz + labelled set; re-packing adds new labels)")
    keys = p.add_argument_group("label keys (MACE's energy_key, ...; docs/data.md)",
                                "where the labels of files read by ASE are: info[ENERGY_KEY], arrays[FORCES_KEY], "
                                "info[STRESS_KEY], info[VIRIALS_KEY] (stress = -virials/volume), or a calculator's "
                                "results of that name. Stored under atomforge's names.")
    for quantity, mace in (("energy", "REF_energy"), ("forces", "REF_forces"), ("stress", "REF_stress"),
                           ("virials", "REF_virials")):
        keys.add_argument(f"--{quantity}-key", default=quantity, metavar="KEY",
                          help=f"default {quantity!r}; MACE's files: {mace}")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="processes reading, validating and encoding whole files (same store for any N)")
    p.add_argument("--compress", action="store_true", help="zlib-compress each record")
    p.add_argument("--commit-every", type=int, default=2000, metavar="N",
                   help="structures per commit (a kill loses at most this many; default 2000)")
    p.add_argument("--skip-invalid", action="store_true",
                   help="skip structures that fail validation (counted and reported) instead of stopping")
    p.add_argument("--quiet", action="store_true", help="no progress bar or messages")


def _add_others(sub: Any) -> None:
    info = sub.add_parser("info", help="what a store holds", description="Counts, elements, label coverage, sizes, "
                          "config types, splits, bytes on disk and the sources ledger of a store.")
    info.add_argument("store", type=Path, metavar="STORE")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.add_argument("--full", action="store_true", help="also read every record: energy per atom, forces, "
                      "atoms per element")
    info.add_argument("--quiet", action="store_true", help="no progress bar")
    split = sub.add_parser("split", help="write train/valid/test splits into a store",
                           description="Write the named splits train, valid and test into the store (reproducible "
                                       "for a seed). --by group keeps every group whole in one split.")
    split.add_argument("store", type=Path, metavar="STORE")
    split.add_argument("--valid", type=float, default=0.05, help="fraction of structures (default 0.05)")
    split.add_argument("--test", type=float, default=0.05, help="fraction of structures (default 0.05)")
    split.add_argument("--by", choices=("group", "config_type", "none"), default="group",
                       help="keep each group (default) or config type whole in one split; none: structures")
    split.add_argument("--seed", type=int, default=0)
    split.add_argument("--force", action="store_true", help="replace existing splits")
    sample = sub.add_parser("sample", help="write N random structures to extxyz")
    sample.add_argument("store", type=Path, metavar="STORE")
    sample.add_argument("out", type=Path, metavar="OUT.extxyz")
    sample.add_argument("-n", type=int, required=True, help="how many structures")
    sample.add_argument("--split", metavar="NAME", help="draw from this split")
    sample.add_argument("--seed", type=int, default=0)
    export = sub.add_parser("export", help="write structures to extxyz")
    export.add_argument("store", type=Path, metavar="STORE")
    export.add_argument("out", type=Path, metavar="OUT.extxyz")
    export.add_argument("--split", metavar="NAME", help="only this split")
    export.add_argument("--indices", metavar="SLICE", help="positions (in the split, if given) as 0:100 or 3,5,9")


def _pack(args: argparse.Namespace, registry: Registry) -> int:
    from .data import packing
    from .data.structures import LabelKeys

    if args.options and args.source is None:
        raise ConfigError("--option needs --source NAME (the data-source plugin the options are for)")
    if not (args.sources or args.source or args.campaign):
        raise ConfigError("nothing to pack: give SOURCE files or globs, --source NAME, or --campaign DIR")
    options = dict(args.options)
    keys = LabelKeys(energy=args.energy_key, forces=args.forces_key, stress=args.stress_key, virials=args.virials_key)
    sources = []
    if args.source is not None and not args.sources:
        sources.append(packing.plugin_source(registry, args.source, {**keys.as_options(), **options}))
    elif args.sources:
        sources.extend(packing.file_sources(registry, args.sources, plugin=args.source, options=options, keys=keys))
    for campaign in args.campaign:
        sources.extend(packing.campaign_sources(campaign))
    settings = packing.PackSettings(workers=args.workers, compress=True if args.compress else None,
                                    commit_every=args.commit_every, skip_invalid=args.skip_invalid,
                                    progress=not args.quiet)
    report = packing.pack(args.out, sources, settings)
    if not args.quiet:
        rate = report.as_dict()["structures_per_second"]
        print(f"atomforge data pack: {report.structures} structures in {args.out} ({report.added} added from "
              f"{report.sources_packed} source(s), {report.sources_skipped} already packed; {rate:g} structures/s)",
              file=sys.stderr)
    if report.invalid:
        print(f"atomforge data pack: skipped {report.invalid} invalid structure(s); the first:", file=sys.stderr)
        for reason in report.invalid_examples:
            print(f"  {reason}", file=sys.stderr)
    print(json.dumps(report.as_dict(), indent=2))
    return 0


def _info(args: argparse.Namespace, registry: Registry) -> int:
    from .data import packing
    from .data.store import StructureStore

    info = packing.describe(StructureStore(args.store), full=args.full, progress=not args.quiet)
    print(json.dumps(info, indent=2) if args.json else packing.format_description(info))
    return 0


def _split(args: argparse.Namespace, registry: Registry) -> int:
    from .data import packing

    counts = packing.make_splits(args.store, valid=args.valid, test=args.test, by=args.by, seed=args.seed,
                                 force=args.force)
    total = sum(counts.values())
    print("  ".join(f"{name} {k} ({100 * k / total:.1f}%)" for name, k in counts.items())
          + f"   by {args.by}, seed {args.seed}")
    return 0


def _sample(args: argparse.Namespace, registry: Registry) -> int:
    from .data import packing
    from .data.store import StructureStore

    store = StructureStore(args.store)
    written = packing.write_extxyz(store, packing.sample_indices(store, args.n, split=args.split, seed=args.seed),
                                   args.out)
    print(f"wrote {written} structures to {args.out}")
    return 0


def _export(args: argparse.Namespace, registry: Registry) -> int:
    from .data import packing
    from .data.store import StructureStore

    store = StructureStore(args.store)
    chosen = packing.selection(store, args.split)
    if args.indices is not None:
        chosen = chosen[packing.parse_indices(args.indices, chosen.size)]
    print(f"wrote {packing.write_extxyz(store, chosen, args.out)} structures to {args.out}")
    return 0


_RUNNERS: dict[str, Runner] = {"pack": _pack, "info": _info, "split": _split, "sample": _sample, "export": _export}


def data_command(parser: argparse.ArgumentParser) -> Runner:
    """The factory of the ``data`` command (a :class:`~atomforge.CommandSpec` factory)."""
    sub = parser.add_subparsers(dest="data_command", metavar="{pack,info,split,sample,export}", required=True)
    _add_pack(sub)
    _add_others(sub)

    def run(args: argparse.Namespace, registry: Registry) -> int:
        return _RUNNERS[args.data_command](args, registry)

    return run
