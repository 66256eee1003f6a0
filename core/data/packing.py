"""The logic of ``atomforge data``: pack any data source into a structure store (in parallel,
resumable, appendable), describe a store, split it, and write parts of it back to extxyz.

Packing is a pipeline with one writer. Each source — a file, one call of a data-source plugin, a
campaign's labelled set — is read, validated and encoded, in this process or in ``workers``
processes that each take whole sources, and the single :class:`~atomforge.data.store.StoreWriter`
of this process appends the encoded records in source order: the store is the same whatever the
number of workers. Every source is one entry of the store's ledger (``meta["sources"]``), written
in the same transaction as its records, so a pack that is killed resumes each source after its
last committed structure, a source already complete is skipped, and new sources are appended.
"""

from __future__ import annotations

import enum
import glob
import hashlib
import io
import json
import multiprocessing
import os
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

import numpy as np
from ase import Atoms
from ase.data import chemical_symbols

from .._errors import AtomforgeError, ConfigError, DataValidationError, StoreError
from .._specs import PluginKind
from .store import LABEL_BITS, StoreWriter, StructureStore, encode, is_store, summarize
from .structures import LabelKeys, get_labels, relabel

if TYPE_CHECKING:
    from ..registry import Registry

__all__ = ["SourceKind", "PackSource", "PackSettings", "PackReport", "file_sources", "plugin_source",
           "campaign_sources", "pack", "describe", "format_description", "make_splits", "parse_indices",
           "sample_indices", "write_extxyz"]

_EXTXYZ_SUFFIXES = (".xyz", ".extxyz")
_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz")
_PYMATGEN_NAMES = ("*vasprun*.xml*", "*.cif", "poscar*", "contcar*", "*.vasp")
_SHOWN_INVALID = 5  # reasons of skipped structures shown in the report


# -- sources -------------------------------------------------------------------------------------
class SourceKind(str, enum.Enum):
    """How a source is read."""

    EXTXYZ = "extxyz"  # an (ext)xyz file, streamed frame by frame
    PLUGIN = "plugin"  # a data-source plugin's structures (one file, or the plugin's options)
    CAMPAIGN = "campaign"  # an active-learning campaign's labelled set (append-only: re-packs add new labels)


@dataclass(frozen=True)
class PackSource:
    """One ledger entry of a pack: what to read and how it is named."""

    source_id: str  # the ledger key: resolved path@hash(size, mtime), "plugin:{options}" or "campaign:DIR"
    label: str  # how messages name it (a path, or the plugin and its options)
    kind: SourceKind
    spec: Mapping[str, Any]  # stored with the ledger entry (JSON)
    path: Path | None = None  # the file (EXTXYZ, file-based PLUGIN) or labelled set (CAMPAIGN)
    factory: Callable[..., Sequence[Atoms]] | None = None  # the plugin's reader, ``factory(options, base_dir)``
    options: Mapping[str, Any] = field(default_factory=dict)  # the plugin's options
    base_dir: Path = Path(".")  # where the plugin resolves relative paths
    keys: LabelKeys = LabelKeys()  # where an (ext)xyz file's labels are (MACE's energy_key, ...; docs/data.md)


def _is_extxyz(path: Path) -> bool:
    name = path.name.lower()
    for suffix in _COMPRESSION_SUFFIXES:
        name = name.removesuffix(suffix)
    return name.endswith(_EXTXYZ_SUFFIXES)


def _is_pymatgen(path: Path) -> bool:
    from fnmatch import fnmatch

    return any(fnmatch(path.name.lower(), pattern) for pattern in _PYMATGEN_NAMES)


def expand_paths(patterns: Sequence[str | Path]) -> list[Path]:
    """Files named by paths and globs (``data/*.extxyz``, ``runs/**/vasprun.xml``), resolved, in
    the order given (a glob's matches sorted), each once."""
    paths: list[Path] = []
    for pattern in map(str, patterns):
        if any(char in pattern for char in "*?["):
            found = [Path(p) for p in sorted(glob.glob(os.path.expanduser(pattern), recursive=True))]
            found = [p for p in found if p.is_file()]
            if not found:
                raise ConfigError(f"{pattern!r} matched no files")
            paths.extend(found)
            continue
        path = Path(pattern).expanduser()
        if path.is_dir():
            raise ConfigError(f"{path} is a folder; give its files, or a glob such as '{path}/*.extxyz'")
        if not path.exists():
            raise ConfigError(f"data file not found: {path}")
        paths.append(path)
    return list(dict.fromkeys(p.resolve() for p in paths))


def _file_id(path: Path) -> tuple[str, dict[str, Any]]:
    stat = path.stat()
    digest = hashlib.sha256(f"{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return f"{path}@{digest}", {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def file_sources(registry: Registry | None, patterns: Sequence[str | Path], *, plugin: str | None = None,
                 options: Mapping[str, Any] | None = None, keys: LabelKeys = LabelKeys()) -> list[PackSource]:
    """One source per file: (ext)xyz streamed; vasprun.xml, CIF, POSCAR/CONTCAR through the
    ``pymatgen`` data source; anything else through ``ase``; or every file through ``plugin``
    (with ``options`` and ``path`` set to the file). ``keys`` (MACE's ``energy_key``, ...) apply
    to the files read by ASE (extxyz and the ``ase`` source, or ``plugin`` as options); VASP
    files carry their own labels."""
    sources = []
    for path in expand_paths(patterns):
        source_id, spec = _file_id(path)
        if plugin is None and _is_extxyz(path):
            named = {"keys": keys.as_options()} if not keys.is_default else {}
            sources.append(PackSource(source_id, str(path), SourceKind.EXTXYZ, {**spec, "reader": "extxyz", **named},
                                      path, keys=keys))
            continue
        name = plugin or ("pymatgen" if _is_pymatgen(path) else "ase")
        factory = registry.get(PluginKind.DATA_SOURCE, name).factory
        extra = {**(keys.as_options() if name != "pymatgen" else {}), **dict(options or {})}
        sources.append(PackSource(source_id, str(path), SourceKind.PLUGIN, {**spec, "reader": name, "options": extra},
                                  path, factory, {**extra, "path": str(path)}, Path.cwd()))
    return sources


def plugin_source(registry: Registry, name: str, options: Mapping[str, Any]) -> PackSource:
    """A data-source plugin called once with ``options`` (``--source NAME --option k=v``)."""
    factory = registry.get(PluginKind.DATA_SOURCE, name).factory
    text = json.dumps(dict(options), sort_keys=True, default=str)
    return PackSource(f"{name}:{text}", f"{name} {text}", SourceKind.PLUGIN, {"reader": name, "options": dict(options)},
                      None, factory, dict(options), Path.cwd())


def campaign_sources(directory: Path | str) -> list[PackSource]:
    """An active-learning campaign's training data: ``initial.extxyz`` (a file source) and the
    labelled set ``labelled.extxyz`` (append-only, so a later pack adds the labels made since)."""
    folder = Path(directory).expanduser().resolve()
    initial, labelled = folder / "initial.extxyz", folder / "labelled.extxyz"
    if not folder.is_dir() or not (initial.exists() or labelled.exists()):
        raise ConfigError(f"{folder} is not an active-learning campaign folder (expected initial.extxyz and "
                          "labelled.extxyz, as written by `atomforge al run`)")
    sources = file_sources(None, [initial]) if initial.exists() else []
    first = next((item for _, item in _extxyz_items(labelled, 0, limit=1)), None) if labelled.exists() else None
    first_key = str(first.info.get("al_key", "")) if isinstance(first, Atoms) else None
    sources.append(PackSource(f"campaign:{folder}", f"{labelled}", SourceKind.CAMPAIGN,
                              {"campaign": str(folder), "first_key": first_key}, labelled))
    return sources


# -- reading and encoding (in this process or a worker) ------------------------------------------
Item = tuple[int, "Atoms | DataValidationError"]
Encoded = tuple[int, "tuple[bytes, dict[str, Any]] | DataValidationError"]


def _extxyz_frames(path: Path) -> Iterator[tuple[int, str]]:
    """The text of each frame of an (ext)xyz file, read line by line (memory does not grow with
    the file); a frame cut short ends the file with a :class:`DataValidationError` item."""
    from ase.io.formats import open_with_compression

    with open_with_compression(str(path), "r") as handle:
        line, number, position = handle.readline(), 1, 0
        while line:
            if not line.strip():
                line, number = handle.readline(), number + 1
                continue
            try:
                count = int(line)
            except ValueError:
                raise DataValidationError(
                    f"structure {position} of {path} (line {number}): expected the atom count, found "
                    f"{line.strip()[:60]!r}; the file is damaged here and the structures after it cannot be found. "
                    "Repair or drop the file.") from None
            lines = [line] + [handle.readline() for _ in range(count + 1)]
            number += count + 2
            line = handle.readline()
            while line.startswith("VEC"):  # lattice vectors of a plain xyz frame
                lines.append(line)
                line, number = handle.readline(), number + 1
            yield position, "".join(lines)
            if not lines[-1].endswith("\n") and not line:
                break
            position += 1


def _extxyz_items(path: Path, skip: int, *, limit: int | None = None) -> Iterator[Item]:
    """Frames ``skip``… of an (ext)xyz file, each parsed on its own by ASE's extxyz reader (the
    frames before ``skip`` are only counted); a frame ASE cannot parse is an error item."""
    import ase.io

    for position, text in _extxyz_frames(path):
        if limit is not None and position >= limit:
            return
        if position < skip:
            continue
        try:
            yield position, ase.io.read(io.StringIO(text), format="extxyz")
        except Exception as error:  # noqa: BLE001 - ASE's parse errors vary
            reason = "is cut short (a truncated file?)" if text.count("\n") < int(text.split(None, 1)[0]) + 2 \
                else f"could not be read by ase.io.read (extxyz): {error}"
            yield position, DataValidationError(f"structure {position} of {path} {reason}")


def _load(source: PackSource) -> Sequence[Atoms]:
    if source.kind is SourceKind.CAMPAIGN:
        from ..active_learning._store import LabelledSet

        return LabelledSet(source.path, repair=False).read()  # complete frames only: a driver may be appending
    structures = source.factory(dict(source.options), source.base_dir)
    return structures if isinstance(structures, Sequence) else list(structures)


def _items(source: PackSource, skip: int) -> Iterator[Item]:
    if source.kind is SourceKind.EXTXYZ:
        for position, item in _extxyz_items(source.path, skip):
            yield position, _keyed(item, source.keys, f"structure {position} of {source.label}")
        return
    structures = _load(source)
    for position in range(skip, len(structures)):
        yield position, structures[position]


def _keyed(item: Any, keys: LabelKeys, where: str) -> Any:
    """An extxyz frame with its labels read from ``keys`` (or the error of a bad one)."""
    if not isinstance(item, Atoms) or (keys.is_default and keys.virials not in item.info):
        return item
    try:
        return relabel(item, keys, where=where)
    except DataValidationError as error:
        return error


def _encode(atoms: Atoms, position: int, label: str, compress: bool) -> tuple[bytes, dict[str, Any]]:
    """Validate and encode one structure; its errors name the source and the structure's index."""
    where = f"structure {position} of {label}"
    try:
        return encode(atoms, compress=compress, where=where), summarize(atoms)
    except (DataValidationError, ValueError, TypeError) as error:
        message = str(error)
        raise DataValidationError(message if message.startswith(where) else f"{where}: {message}") from None


def encoded_items(source: PackSource, skip: int, compress: bool) -> Iterator[Encoded]:
    """``(position, (record, summary))`` for structures ``skip``… of ``source``, or
    ``(position, error)`` for one that cannot be read or stored."""
    for position, item in _items(source, skip):
        if isinstance(item, Atoms):
            try:
                item = _encode(item, position, source.label, compress)
            except DataValidationError as error:
                item = error
        yield position, item


def _encode_source(source: PackSource, skip: int, compress: bool, skip_invalid: bool) -> list[Encoded]:
    """A worker's task: one whole source, read and encoded (up to its first error, unless skipped)."""
    out = []
    for position, item in encoded_items(source, skip, compress):
        out.append((position, item))
        if isinstance(item, DataValidationError) and not skip_invalid:
            break
    return out


# -- packing -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PackSettings:
    """How ``atomforge data pack`` packs."""

    workers: int = 1  # processes reading, validating and encoding whole sources (1: this process)
    compress: bool | None = None  # zlib per record; None: the store's setting (off for a new store)
    commit_every: int = 2000  # structures per transaction (a kill loses at most this many)
    skip_invalid: bool = False  # skip (and count) structures that fail validation instead of stopping
    progress: bool = True  # messages and a progress bar (only when a terminal) on stderr


@dataclass
class PackReport:
    """What a pack did."""

    store: str
    structures: int = 0  # in the store afterwards
    added: int = 0  # by this run
    sources_packed: int = 0  # read (wholly or from where a previous run stopped)
    sources_resumed: int = 0  # of which continued after a previous run
    sources_skipped: int = 0  # already complete
    invalid: int = 0  # structures skipped by --skip-invalid
    invalid_examples: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        rate = self.added / self.seconds if self.seconds > 0 else 0.0
        return {**asdict(self), "seconds": round(self.seconds, 3), "structures_per_second": round(rate, 1)}


class _Packer:
    """The main process's side: appends encoded records in source order, keeps the ledger, commits."""

    def __init__(self, writer: StoreWriter, settings: PackSettings, report: PackReport, bar: Any) -> None:
        self.writer, self.settings, self.report, self.bar = writer, settings, report, bar
        self.source: PackSource | None = None
        self.done = 0
        self.skipped = 0

    def say(self, message: str) -> None:
        if self.settings.progress:
            self.bar.write(f"atomforge data pack: {message}", file=sys.stderr)

    def skip_of(self, source: PackSource) -> int | None:
        """Where ``source`` starts (after what a previous run committed), or None: already complete."""
        sources = self.writer.meta["sources"]
        self._check_unchanged(source, sources)
        entry = sources.get(source.source_id)
        if entry is None:
            return 0
        if source.kind is SourceKind.CAMPAIGN:
            if entry.get("spec", {}).get("first_key") not in (None, source.spec.get("first_key")):
                raise StoreError(f"{source.label} no longer starts with the labels packed before (another campaign in "
                                 "the same folder?); pack it into a new store")
            self.say(f"{source.label}: {entry['done']} labelled structures packed before; adding the labels made since")
            return int(entry["done"])
        if entry["complete"]:
            self.say(f"{source.label}: already packed ({entry['done']} structures), skipped")
            self.report.sources_skipped += 1
            return None
        self.say(f"{source.label}: resuming after structure {int(entry['done']) - 1}")
        self.report.sources_resumed += 1
        return int(entry["done"])

    def _check_unchanged(self, source: PackSource, sources: Mapping[str, Any]) -> None:
        path = source.spec.get("path")
        for other, entry in sources.items():
            if path is not None and other != source.source_id and (entry.get("spec") or {}).get("path") == path:
                state = "complete" if entry["complete"] else f"{entry['done']} structures, incomplete"
                raise StoreError(f"{path} changed (size or modification time) since it was packed into "
                                 f"{self.writer.path} ({state}); packing it again would duplicate structures. "
                                 "Restore the file, or pack into a new store.")

    def start(self, source: PackSource, skip: int) -> None:
        entry = self.writer.meta["sources"].get(source.source_id) or {}
        self.source, self.done, self.skipped = source, skip, int(entry.get("skipped", 0))
        self._progress(complete=False)  # a new entry records its first index before anything is appended
        self.report.sources_packed += 1

    def add(self, position: int, item: Any) -> None:
        if isinstance(item, DataValidationError):
            if not self.settings.skip_invalid:
                self.save(complete=False)  # the structures before it stay packed
                raise item
            self.skipped += 1
            self.report.invalid += 1
            if len(self.report.invalid_examples) < _SHOWN_INVALID:
                self.report.invalid_examples.append(str(item))
        else:
            self.writer.append_encoded(*item)
            self.report.added += 1
            self.bar.update(1)
        self.done = position + 1
        if len(self.writer) - int(self.writer.meta["count"]) >= self.settings.commit_every:
            self.save(complete=False)

    def finish(self) -> None:
        self._progress(complete=True)
        self.source = None

    def _progress(self, *, complete: bool) -> None:
        if self.source is not None:
            self.writer.progress(self.source.source_id, spec=dict(self.source.spec), done=self.done, complete=complete)
            self.writer.meta["sources"][self.source.source_id]["skipped"] = self.skipped

    def save(self, *, complete: bool) -> None:
        """Commit the buffered records with the ledger (the current source's progress included)."""
        self._progress(complete=complete)
        self.writer.commit()


def _progress_bar(enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(desc="packing", unit=" structures", file=sys.stderr, dynamic_ncols=True,
                disable=not (enabled and sys.stderr.isatty()))


def _check_out(out: Path) -> None:
    if out.is_dir() and not is_store(out) and any(p.name != "writer.lock" for p in out.iterdir()):
        raise ConfigError(f"{out} is a folder that is not a structure store; choose a new folder for the store")


def pack(out: Path | str, sources: Sequence[PackSource], settings: PackSettings = PackSettings()) -> PackReport:
    """Pack ``sources`` into the store ``out`` (created, resumed or appended to)."""
    out = Path(out)
    if settings.commit_every < 1 or settings.workers < 1:
        raise ConfigError("--commit-every and --workers must be ≥ 1")
    _check_out(out)
    report, started = PackReport(str(out)), time.perf_counter()
    pool = None
    if min(settings.workers, len(sources)) > 1:  # forked before the writer opens LMDB and takes its lock
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        pool = context.Pool(min(settings.workers, len(sources)))  # children hold neither
    try:
        with StoreWriter(out, compress=settings.compress) as writer, _progress_bar(settings.progress) as bar:
            packer = _Packer(writer, settings, report, bar)
            try:
                plan = [(s, skip) for s in sources if (skip := packer.skip_of(s)) is not None]
                if pool is None:
                    _pack_here(packer, plan, writer.compress)
                else:
                    _pack_in_pool(packer, plan, writer.compress, pool)
            except AtomforgeError:
                packer.save(complete=False)  # what was read before the error stays packed
                raise
            report.structures = len(writer)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    report.seconds = time.perf_counter() - started
    return report


def _pack_here(packer: _Packer, plan: list[tuple[PackSource, int]], compress: bool) -> None:
    for source, skip in plan:
        packer.start(source, skip)
        for position, item in encoded_items(source, skip, compress):
            packer.add(position, item)
        packer.finish()


def _pack_in_pool(packer: _Packer, plan: list[tuple[PackSource, int]], compress: bool, pool: Any) -> None:
    """Workers encode whole sources; at most two per worker are in flight (memory stays bounded)
    and results are appended in plan order."""
    todo, running = deque(plan), deque()
    args = (compress, packer.settings.skip_invalid)
    while todo or running:
        while todo and len(running) < 2 * packer.settings.workers:
            source, skip = todo.popleft()
            running.append((source, skip, pool.apply_async(_encode_source, (source, skip, *args))))
        source, skip, result = running.popleft()
        packer.start(source, skip)
        for position, item in result.get():
            packer.add(position, item)
        packer.finish()


# -- describing ----------------------------------------------------------------------------------
def _sizes(sizes: np.ndarray) -> dict[str, Any]:
    """Min/median/mean/max atoms per structure and a histogram in bins of powers of two."""
    if sizes.size == 0:
        return {"min": None, "median": None, "mean": None, "max": None, "histogram": []}
    bins = np.bincount(np.floor(np.log2(np.maximum(sizes, 1))).astype(np.int64))
    return {"min": int(sizes.min()), "median": float(np.median(sizes)), "mean": float(sizes.mean()),
            "max": int(sizes.max()),
            "histogram": [{"from": 1 << k, "to": (2 << k) - 1, "count": int(c)} for k, c in enumerate(bins) if c]}


def _counts(codes: np.ndarray) -> dict[int, int]:
    values, counts = np.unique(codes, return_counts=True)
    return {int(v): int(c) for v, c in zip(values, counts)}


def _bytes(store: StructureStore) -> dict[str, Any]:
    """Bytes of ``data.mdb`` and of the records themselves, in all and per structure."""
    n, disk, records = len(store), (store.path / "data.mdb").stat().st_size, int(store.meta.get("bytes", 0))
    return {"data_mdb": disk, "per_structure": disk / n if n else None, "records": records,
            "records_per_structure": records / n if n else None}


def describe(store: StructureStore, *, full: bool = False, progress: bool = False) -> dict[str, Any]:
    """Everything ``atomforge data info`` reports, as typed JSON-ready data (from the columns;
    ``full`` adds one streaming pass over the records for label statistics)."""
    sizes, labels, groups = store.column("n_atoms").astype(np.int64), store.column("labels"), store.column("group")
    names, meta = store.config_types, store.meta
    info: dict[str, Any] = {
        "path": str(store.path), "format": meta["format"], "version": int(meta["version"]),
        "created": meta.get("created"), "compress": bool(meta.get("compress", False)),
        "structures": len(store), "atoms": int(sizes.sum()), "elements": [chemical_symbols[z] for z in store.elements],
        "labels": {key: int(np.count_nonzero(labels & bit)) for key, bit in LABEL_BITS.items()},
        "atoms_per_structure": _sizes(sizes),
        "config_types": {(names[c] if c >= 0 else "(none)"): k for c, k in _counts(store.column("config_type")).items()},
        "fidelities": {str(f): k for f, k in _counts(store.column("fidelity")).items()},
        "groups": {"count": int(np.unique(groups[groups != -1]).size), "ungrouped": int(np.count_nonzero(groups == -1))},
        "splits": store.splits(), "bytes": _bytes(store),
        "sources": [{"id": key, **entry} for key, entry in meta.get("sources", {}).items()],
    }
    if full:
        info["full"] = _label_statistics(store, progress)
    return info


def _stats(values: np.ndarray) -> dict[str, Any]:
    if values.size == 0:
        return {"count": 0}
    return {"count": int(values.size), "mean": float(values.mean()), "std": float(values.std()),
            "min": float(values.min()), "max": float(values.max())}


def _label_statistics(store: StructureStore, progress: bool) -> dict[str, Any]:
    """One pass over the records: energy per atom, force components, atoms per element."""
    from tqdm import tqdm

    per_atom: list[float] = []
    square_sum, components, max_force, with_forces = 0.0, 0, 0.0, 0
    elements = np.zeros(256, dtype=np.int64)
    for atoms in tqdm(store, total=len(store), desc="reading", unit=" structures", file=sys.stderr,
                      disable=not (progress and sys.stderr.isatty())):
        elements += np.bincount(atoms.numbers, minlength=256)
        labels = get_labels(atoms)
        if labels.energy is not None:
            per_atom.append(labels.energy / len(atoms))
        if labels.forces is not None:
            square_sum += float(np.square(labels.forces).sum())
            components += labels.forces.size
            max_force = max(max_force, float(np.linalg.norm(labels.forces, axis=1).max()))
            with_forces += 1
    forces = {"structures": with_forces, "rms_component": (square_sum / components) ** 0.5 if components else None,
              "max_norm": max_force if components else None}
    return {"energy_per_atom": _stats(np.asarray(per_atom)), "forces": forces,
            "element_counts": {chemical_symbols[z]: int(k) for z, k in enumerate(elements) if k}}


def format_description(info: Mapping[str, Any]) -> str:
    """The human-readable form of :func:`describe`."""
    n, labels = info["structures"], info["labels"]
    share = (lambda k: f"{k} ({100 * k / n:.1f}%)" if n else str(k))
    rows = [f"store        {info['path']}",
            f"format       {info['format']} v{info['version']}, created {info['created']}, "
            f"zlib records {'on' if info['compress'] else 'off'}",
            f"structures   {n}   atoms {info['atoms']}",
            f"elements     {' '.join(info['elements']) or '(none)'}",
            "labels       " + "   ".join(f"{key} {share(k)}" for key, k in labels.items()),
            *_format_sizes(info["atoms_per_structure"]),
            "config types " + (", ".join(f"{k} {v}" for k, v in info["config_types"].items()) or "(none)"),
            "fidelities   " + (", ".join(f"{k}: {v}" for k, v in info["fidelities"].items()) or "(none)"),
            f"groups       {info['groups']['count']} ({info['groups']['ungrouped']} structures without a group)",
            "splits       " + (", ".join(_format_split(k, v) for k, v in info["splits"].items()) or "(none)")]
    b = info["bytes"]
    rows.append(f"on disk      {b['data_mdb']} bytes (data.mdb)" + (
        f", {b['per_structure']:.0f} bytes/structure; records {b['records_per_structure']:.0f} bytes/structure"
        if n else ""))
    rows.extend(_format_sources(info["sources"]))
    if "full" in info:
        rows.extend(_format_full(info["full"]))
    return "\n".join(rows)


def _format_sizes(sizes: Mapping[str, Any]) -> list[str]:
    if not sizes["histogram"]:
        return []
    rows = [f"atoms/struct min {sizes['min']}  median {sizes['median']:g}  mean {sizes['mean']:.2f}  max {sizes['max']}"]
    top = max(b["count"] for b in sizes["histogram"])
    for b in sizes["histogram"]:
        span = f"{b['from']}" if b["from"] == b["to"] else f"{b['from']}-{b['to']}"
        rows.append(f"  {span:>11}  {'#' * max(1, round(30 * b['count'] / top)):<30} {b['count']}")
    return rows


def _format_split(name: str, split: Mapping[str, Any]) -> str:
    return f"{name} {split['count']}" + (f" (seed {split['seed']}, by {split['by']})" if "seed" in split else "")


def _format_sources(sources: Sequence[Mapping[str, Any]]) -> list[str]:
    complete = sum(1 for s in sources if s.get("complete"))
    rows = [f"sources      {len(sources)} ({complete} complete)"]
    for s in sources:
        skipped = f", {s['skipped']} invalid skipped" if s.get("skipped") else ""
        rows.append(f"  {s['id']}: {s['done']} read{skipped}, {'complete' if s['complete'] else 'INCOMPLETE'}")
    return rows


def _format_full(full: Mapping[str, Any]) -> list[str]:
    e, f = full["energy_per_atom"], full["forces"]
    energy = (f"mean {e['mean']:.6g}  std {e['std']:.4g}  min {e['min']:.6g}  max {e['max']:.6g} eV "
              f"({e['count']} structures)") if e["count"] else "(no energies)"
    forces = (f"RMS component {f['rms_component']:.4g} eV/Å  max |F| {f['max_norm']:.4g} eV/Å "
              f"({f['structures']} structures)") if f["structures"] else "(no forces)"
    return [f"energy/atom  {energy}", f"forces       {forces}",
            "atoms of     " + ", ".join(f"{k} {v}" for k, v in full["element_counts"].items())]


# -- splits --------------------------------------------------------------------------------------
SPLIT_NAMES = ("train", "valid", "test")
SPLIT_BY = ("group", "config_type", "none")


def _units(store: StructureStore, by: str) -> np.ndarray:
    """The unit every structure belongs to; a split never divides a unit. Structures without a
    group are units of their own."""
    n = len(store)
    if by == "none":
        return np.arange(n, dtype=np.int64)
    if by == "config_type":
        return store.column("config_type").astype(np.int64)
    groups = store.column("group").astype(np.int64)
    alone = groups == -1
    top = int(groups.max()) + 1 if n else 0
    return np.where(alone, top + np.arange(n, dtype=np.int64), groups)


def split_indices(units: np.ndarray, *, valid: float, test: float, seed: int) -> dict[str, np.ndarray]:
    """Draw whole units in a seeded random order into ``test`` until it holds ``test`` of the
    structures (stopping short when the next unit would overshoot by more than it fills), then
    into ``valid``; the rest is ``train``. A non-zero fraction gets at least one unit."""
    keys, inverse, counts = np.unique(units, return_inverse=True, return_counts=True)
    order = np.random.default_rng(seed).permutation(keys.size)
    assigned = np.zeros(keys.size, dtype=np.int8)  # 0 train, 1 valid, 2 test
    at = 0
    for code, fraction in ((2, test), (1, valid)):
        goal, got = fraction * units.size, 0
        while fraction > 0 and got < goal and at < order.size:
            size = int(counts[order[at]])
            if got and got + size - goal > goal - got:
                break
            assigned[order[at]] = code
            got, at = got + size, at + 1
    if keys.size and not np.any(assigned == 0):
        raise ConfigError(f"only {keys.size} units (groups or config types) to keep whole: none would be left for "
                          "train. Split --by none (or --by group), or set --valid or --test to 0")
    of = assigned[inverse.reshape(-1)]
    return {name: np.flatnonzero(of == code) for code, name in enumerate(SPLIT_NAMES)}


def make_splits(path: Path | str, *, valid: float, test: float, by: str = "group", seed: int = 0,
                force: bool = False) -> dict[str, int]:
    """Write the splits ``train``, ``valid`` and ``test`` into the store; returns their sizes."""
    if not (0 <= valid < 1 and 0 <= test < 1 and valid + test < 1):
        raise ConfigError(f"--valid {valid} and --test {test}: expected fractions ≥ 0 with valid + test < 1")
    if by not in SPLIT_BY:
        raise ConfigError(f"--by {by!r}: expected one of {', '.join(SPLIT_BY)}")
    store = StructureStore(path)
    existing = sorted(set(store.splits()) & set(SPLIT_NAMES))
    if existing and not force:
        raise StoreError(f"{store.path} already has the split(s) {', '.join(existing)}; pass --force to replace them")
    if len(store) == 0:
        raise StoreError(f"{store.path} holds no structures to split")
    parts = split_indices(_units(store, by), valid=valid, test=test, seed=seed)
    with StoreWriter(store.path, create=False) as writer:
        for name, indices in parts.items():
            writer.write_split(name, indices, seed=seed, by=by,
                               fraction={"valid": valid, "test": test}.get(name, 1 - valid - test))
    return {name: int(indices.size) for name, indices in parts.items()}


# -- writing extxyz ------------------------------------------------------------------------------
def parse_indices(text: str, count: int) -> np.ndarray:
    """``"start:stop[:step]"`` (Python slice) or ``"3,5,9"`` positions among ``count``."""
    try:
        if ":" in text:
            parts = [int(p) if p.strip() else None for p in text.split(":")]
            return np.arange(count, dtype=np.int64)[slice(*parts)]
        chosen = np.asarray([int(p) for p in text.split(",") if p.strip()], dtype=np.int64)
    except (TypeError, ValueError):
        raise ConfigError(f"--indices {text!r}: expected a slice like 0:100 or a list like 3,5,9") from None
    if chosen.size and (chosen.min() < -count or chosen.max() >= count):
        raise ConfigError(f"--indices {text!r}: out of range for {count} structures")
    return np.where(chosen < 0, chosen + count, chosen)


def selection(store: StructureStore, split: str | None) -> np.ndarray:
    """The store indices of a named split, or of every structure."""
    return store.split(split) if split is not None else np.arange(len(store), dtype=np.int64)


def sample_indices(store: StructureStore, n: int, *, split: str | None = None, seed: int = 0) -> np.ndarray:
    """``n`` distinct store indices drawn (seeded) from a split or the whole store, sorted."""
    pool = selection(store, split)
    if not 0 < n <= pool.size:
        raise ConfigError(f"-n {n}: expected 1 ≤ n ≤ {pool.size} (the structures in "
                          f"{'split ' + repr(split) if split else 'the store'})")
    return np.sort(np.random.default_rng(seed).choice(pool, size=n, replace=False))


def write_extxyz(store: StructureStore, indices: np.ndarray, out: Path | str) -> int:
    """Write structures to extxyz with their labels, info and extra arrays (written to a
    temporary file, renamed when complete)."""
    import ase.io

    out = Path(out)
    tmp = out.with_name(out.name + ".part")
    with open(tmp, "w") as handle:
        for index in indices:
            ase.io.write(handle, store[int(index)], format="extxyz")
    os.replace(tmp, out)
    return int(len(indices))
