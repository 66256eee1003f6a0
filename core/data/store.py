"""The structure store: labelled structures on disk, read by many processes, appended atomically.

One store is one LMDB environment (a folder holding ``data.mdb`` and ``lock.mdb``). LMDB was
chosen over HDF5 (docs/data.md has the full comparison) because

- a commit is atomic and durable: a writer killed mid-pack leaves the store as it was at its last
  commit, readable, and the pack resumes from there (an HDF5 file being written when its writer
  dies can be left unreadable, unless SWMR mode is used, which forbids adding new datasets);
- any number of reader processes (data-loader workers, DeepSpeed ranks) read it at once through a
  shared memory map, with random access by key in O(log n) and no per-process cache to fill;
- appending is a write transaction, not a resize of chunked arrays; records of different sizes
  (9-atom molecules, 2000-atom cells) are stored as they are, without padding.

HDF5's strengths — columnar compression and n-dimensional slicing — matter little for
variable-size structures read one at a time. Records here may be zlib-compressed (``compress``).

Layout (format version :data:`FORMAT_VERSION`), all in one LMDB database::

    meta                     JSON: format, version, count, elements, config types, sources, splits
    s<index:8 bytes BE>      one structure (see :func:`encode`): crc32 + header + arrays + extra JSON
    c<chunk:8 BE>/<column>   per-commit columns: n_atoms, labels, fidelity, group, config_type, zmask
    split/<name>             int64 indices of a named split (``atomforge data split``)

The columns let a reader know every structure's size, labels and elements without reading the
structures (size-aware batching, ``data info``, element checks, splits by group).
"""

from __future__ import annotations

import fcntl
import json
import os
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.stress import full_3x3_to_voigt_6_stress

from .._errors import DataValidationError, StoreError
from .structures import _check_labels, check_geometry, get_labels

__all__ = ["FORMAT_VERSION", "StructureStore", "StoreWriter", "encode", "decode", "is_store", "COLUMNS", "summarize",
           "pack_structures", "close_readers"]

FORMAT_VERSION = 1
FORMAT_NAME = "atomforge-structure-store"
MAP_SIZE = 1 << 40  # 1 TiB of address space; the file grows only as data is written
_META = b"meta"
_RECORD = b"s"
_CHUNK = b"c"
_SPLIT = b"split/"
_HEAD = struct.Struct("<IIId")  # n_atoms, flags, extra JSON length, energy
_CRC = struct.Struct("<I")
# flag bits
_PBC = (1, 2, 4)
_CELL, _ENERGY, _FORCES, _STRESS, _ZLIB = 8, 16, 32, 64, 128
LABEL_BITS = {"energy": 1, "forces": 2, "stress": 4}
COLUMNS = {"n_atoms": np.int32, "labels": np.uint8, "fidelity": np.int32, "group": np.int64,
           "config_type": np.int32, "zmask": np.uint64}
_RESERVED_INFO = {"energy", "free_energy", "stress"}
_RESERVED_ARRAYS = {"numbers", "positions", "forces"}
_RESERVED_RESULTS = {"energy", "free_energy", "forces", "stress"}


# -- one record ----------------------------------------------------------------------------------
def _jsonable(value: Any) -> Any:
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple, np.ndarray)):
        return np.asarray(value).tolist()
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return None  # not storable (objects); dropped


def _extra(atoms: Atoms) -> tuple[dict[str, Any], list[np.ndarray]]:
    """Info entries, extra per-atom arrays and non-label calculator results of ``atoms``."""
    info = {k: v for k, v in ((k, _jsonable(v)) for k, v in atoms.info.items() if k not in _RESERVED_INFO)
            if v is not None}
    head: dict[str, Any] = {"info": info} if info else {}
    raw: list[np.ndarray] = []
    for group, items in (("arrays", atoms.arrays.items()), ("results", _results(atoms).items())):
        for name, value in items:
            if (group == "arrays" and name in _RESERVED_ARRAYS) or (group == "results" and name in _RESERVED_RESULTS):
                continue
            arr = np.ascontiguousarray(np.asarray(value))
            if arr.dtype.kind not in "biuf":
                continue
            head.setdefault(group, []).append([name, arr.dtype.str, list(arr.shape)])
            raw.append(arr)
    return head, raw


def _results(atoms: Atoms) -> dict[str, Any]:
    calc = atoms.calc
    return dict(getattr(calc, "results", {}) or {}) if calc is not None else {}


def encode(atoms: Atoms, *, compress: bool = False, where: str = "structure") -> bytes:
    """One structure as bytes: positions, numbers, cell, pbc, labels (validated: a label of the
    wrong shape is an error naming ``where``), info, extra arrays and calculator results."""
    check_geometry(atoms, where)
    labels = get_labels(atoms)
    _check_labels(atoms, labels, (), where)
    n = len(atoms)
    if n == 0:
        raise DataValidationError(f"{where}: a structure with no atoms cannot be stored")
    if int(atoms.numbers.max()) > 255 or int(atoms.numbers.min()) < 1:
        raise DataValidationError(f"{where}: atomic numbers must be 1-255; got {sorted(set(atoms.numbers.tolist()))}")
    flags = sum(bit for bit, p in zip(_PBC, atoms.pbc) if p)
    parts = [atoms.numbers.astype(np.uint8).tobytes(), b"\0" * (-n % 8),
             np.ascontiguousarray(atoms.positions, dtype="<f8").tobytes()]
    cell = np.asarray(atoms.cell[:], dtype="<f8")
    if np.any(cell != 0):
        flags |= _CELL
        parts.append(cell.tobytes())
    if labels.forces is not None:
        flags |= _FORCES
        parts.append(np.ascontiguousarray(labels.forces, dtype="<f8").tobytes())
    if labels.stress is not None:
        flags |= _STRESS
        parts.append(np.ascontiguousarray(labels.stress, dtype="<f8").tobytes())
    if labels.energy is not None:
        flags |= _ENERGY
    head, raw = _extra(atoms)
    extra = json.dumps(head, separators=(",", ":")).encode() if head else b""
    parts.append(extra)
    parts.extend(a.tobytes() for a in raw)
    body = b"".join(parts)
    if compress:
        flags |= _ZLIB
        body = zlib.compress(body, 1)
    payload = _HEAD.pack(n, flags, len(extra), labels.energy if labels.energy is not None else 0.0) + body
    return _CRC.pack(zlib.crc32(payload)) + payload


def decode(record: bytes, where: str = "record") -> Atoms:
    """The ``ase.Atoms`` of one record, labels in a ``SinglePointCalculator`` (as ``ase.io.read``
    gives them), info and extra arrays restored; a damaged record is a :class:`StoreError`."""
    if len(record) < _CRC.size + _HEAD.size or _CRC.unpack_from(record)[0] != zlib.crc32(record[_CRC.size:]):
        raise StoreError(f"{where} is damaged (checksum mismatch or truncated record). The store is corrupted: "
                         "re-pack it from its sources (atomforge data pack).")
    n, flags, extra_len, energy = _HEAD.unpack_from(record, _CRC.size)
    body = record[_CRC.size + _HEAD.size:]
    if flags & _ZLIB:
        body = zlib.decompress(body)
    at = n + (-n % 8)
    numbers = np.frombuffer(body, np.uint8, n).astype(np.int64)
    positions = np.frombuffer(body, "<f8", 3 * n, at).reshape(n, 3)
    at += 24 * n
    cell = np.zeros((3, 3))
    if flags & _CELL:
        cell = np.frombuffer(body, "<f8", 9, at).reshape(3, 3)
        at += 72
    atoms = Atoms(numbers=numbers, positions=positions, cell=cell, pbc=[bool(flags & b) for b in _PBC])
    results: dict[str, Any] = {}
    if flags & _FORCES:
        results["forces"] = np.frombuffer(body, "<f8", 3 * n, at).reshape(n, 3).copy()
        at += 24 * n
    if flags & _STRESS:
        results["stress"] = full_3x3_to_voigt_6_stress(np.frombuffer(body, "<f8", 9, at).reshape(3, 3))
        at += 72
    if flags & _ENERGY:
        results["energy"] = results["free_energy"] = float(energy)
    if extra_len:
        head = json.loads(body[at : at + extra_len])
        at += extra_len
        atoms.info.update(head.get("info", {}))
        for group in ("arrays", "results"):
            for name, dtype, shape in head.get(group, []):
                count = int(np.prod(shape)) if shape else 1
                arr = np.frombuffer(body, dtype, count, at).reshape(shape).copy()
                at += arr.nbytes
                if group == "arrays":
                    atoms.arrays[name] = arr
                else:
                    results[name] = arr
    if results:
        atoms.calc = SinglePointCalculator(atoms, **results)
    return atoms


def _key(index: int) -> bytes:
    return _RECORD + int(index).to_bytes(8, "big")


def _chunk_key(chunk: int, column: str) -> bytes:
    return _CHUNK + int(chunk).to_bytes(8, "big") + b"/" + column.encode()


def is_store(path: Path | str) -> bool:
    """Whether ``path`` is a folder holding an LMDB environment (a store, or a damaged one)."""
    return (Path(path) / "data.mdb").exists()


def _lmdb() -> Any:
    import lmdb

    return lmdb


# LMDB allows one handle per environment and process (py-lmdb refuses a second open), and a handle
# must not cross a fork: every StructureStore/StoreWriter of one path shares this process's handle,
# and read-only handles are closed before loader workers fork (:func:`close_readers`).
_ENVS: dict[str, tuple[int, Any, bool]] = {}  # real path -> (pid, environment, writable)


_LMDB_MAGIC = 0xBEEFC0DE
_PAGE_HEADER = 16  # pgno (8), pad (2), flags (2), lower (2), upper (2)


def check_lmdb_file(path: Path) -> None:
    """Refuse a truncated ``data.mdb`` before it is memory-mapped: LMDB would read past the end
    of the file and the process would die of SIGBUS instead of raising. The newer of the two
    meta pages says how many pages the file must hold."""
    data = Path(path) / "data.mdb"
    size = data.stat().st_size
    with open(data, "rb") as handle:
        first = handle.read(_PAGE_HEADER + 136)
        if len(first) < _PAGE_HEADER + 136 or struct.unpack_from("<I", first, _PAGE_HEADER)[0] != _LMDB_MAGIC:
            raise StoreError(f"{path}: data.mdb is not an LMDB file or its header is damaged ({size} bytes). "
                             "Re-pack the store from its sources (atomforge data pack).")
        page_size = struct.unpack_from("<I", first, _PAGE_HEADER + 24)[0]
        handle.seek(page_size)
        second = handle.read(_PAGE_HEADER + 136)
    metas = [m for m in (first, second) if len(m) == _PAGE_HEADER + 136
             and struct.unpack_from("<I", m, _PAGE_HEADER)[0] == _LMDB_MAGIC]
    last_page, _ = max((struct.unpack_from("<QQ", m, _PAGE_HEADER + 120) for m in metas), key=lambda t: t[1])
    need = (last_page + 1) * page_size
    if size < need:
        raise StoreError(f"{path} is truncated: data.mdb has {size} bytes, its last commit needs {need}. "
                         "Re-pack the store from its sources (atomforge data pack), or restore the copy.")


def _environment(path: Path, *, write: bool = False) -> Any:
    key, pid = os.path.realpath(path), os.getpid()
    entry = _ENVS.get(key)
    if entry is not None and entry[0] == pid:
        if entry[2] or not write:
            return entry[1]
        entry[1].close()  # a reader's handle becomes the writer's
    lmdb = _lmdb()
    if (Path(path) / "data.mdb").exists():
        check_lmdb_file(Path(path))
    try:
        env = lmdb.open(key, readonly=not write, lock=True, readahead=False, subdir=True, max_readers=2048,
                        map_size=MAP_SIZE)
    except lmdb.Error as error:
        _ENVS.pop(key, None)
        raise StoreError(f"{path} cannot be opened as a structure store (truncated or corrupted?): {error}. "
                         "Re-pack it from its sources (atomforge data pack).") from error
    _ENVS[key] = (pid, env, write)
    return env


def _close_environment(path: Path, *, writer: bool) -> None:
    key = os.path.realpath(path)
    entry = _ENVS.get(key)
    if entry is not None and entry[0] == os.getpid() and entry[2] == writer:
        entry[1].close()
        del _ENVS[key]


def close_readers() -> None:
    """Close this process's read-only store handles (they reopen on the next read); called
    before forking loader workers, which must open their own."""
    for key, (pid, env, writable) in list(_ENVS.items()):
        if pid == os.getpid() and not writable:
            env.close()
            del _ENVS[key]


# -- reading -------------------------------------------------------------------------------------
class StructureStore:
    """A store opened for reading; safe to use from many processes (each opens its own handle:
    the environment is reopened after a fork).

    ``store[i]`` is structure ``i`` as ``ase.Atoms``; :meth:`column` gives per-structure
    summaries without reading structures; :meth:`split` the indices of a named split.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        if not self.path.is_dir() or not is_store(self.path):
            raise StoreError(f"{self.path} is not a structure store (expected a folder holding data.mdb, as written "
                             "by `atomforge data pack`)")
        try:
            self.meta = self._read_meta()
        except StoreError:
            self.close()  # no handle left open on a store that cannot be used
            raise
        self._columns: dict[str, np.ndarray] = {}

    @property
    def env(self) -> Any:
        """This process's LMDB handle of the store (opened on first use, shared per path)."""
        return _environment(self.path)

    def __getstate__(self) -> dict[str, Any]:  # picklable for worker processes; no columns travel
        return {**self.__dict__, "_columns": {}}

    def _get(self, key: bytes) -> bytes | None:
        lmdb = _lmdb()
        try:
            with self.env.begin(buffers=False) as txn:
                return txn.get(key)
        except lmdb.Error as error:
            raise StoreError(f"{self.path}: reading {key[:40]!r} failed ({error}); the store is damaged. Re-pack it "
                             "from its sources (atomforge data pack).") from error

    def _read_meta(self) -> dict[str, Any]:
        raw = self._get(_META)
        if raw is None:
            raise StoreError(f"{self.path} holds no store header (an empty or foreign LMDB environment, or a pack "
                             "killed before its first commit: run `atomforge data pack` again)")
        meta = json.loads(raw)
        if meta.get("format") != FORMAT_NAME:
            raise StoreError(f"{self.path} is an LMDB environment but not an atomforge structure store")
        if int(meta.get("version", 0)) > FORMAT_VERSION:
            raise StoreError(f"{self.path} was written in store format version {meta['version']} (by a newer "
                             f"atomforge); this atomforge reads versions ≤ {FORMAT_VERSION}. Upgrade atomforge.")
        return meta

    def reload(self) -> None:
        """Re-read the header (after another process appended)."""
        self.meta = self._read_meta()
        self._columns = {}

    def __len__(self) -> int:
        return int(self.meta["count"])

    def __getitem__(self, index: int) -> Atoms:
        return self.get(index)

    def __iter__(self) -> Iterator[Atoms]:
        return self.iter_range(0, len(self))

    def get(self, index: int) -> Atoms:
        """Structure ``index`` (0 ≤ index < len)."""
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"structure {index} of {self.path}: the store holds {len(self)} structures")
        raw = self._get(_key(index))
        if raw is None:
            raise StoreError(f"structure {index} of {self.path} is missing although the header counts {len(self)}; "
                             "the store is damaged. Re-pack it.")
        return decode(raw, f"structure {index} of {self.path}")

    def iter_range(self, start: int, stop: int) -> Iterator[Atoms]:
        """Structures ``start`` … ``stop - 1`` in order, read in one transaction per 1024."""
        lmdb = _lmdb()
        for lo in range(start, stop, 1024):
            hi = min(stop, lo + 1024)
            try:
                with self.env.begin(buffers=False) as txn:
                    raws = [txn.get(_key(i)) for i in range(lo, hi)]
            except lmdb.Error as error:
                raise StoreError(f"{self.path}: reading structures {lo}-{hi - 1} failed ({error}); re-pack it") from error
            for i, raw in zip(range(lo, hi), raws):
                if raw is None:
                    raise StoreError(f"structure {i} of {self.path} is missing; the store is damaged. Re-pack it.")
                yield decode(raw, f"structure {i} of {self.path}")

    def column(self, name: str) -> np.ndarray:
        """One per-structure summary over the whole store (see :data:`COLUMNS`); ``zmask`` is
        ``[n, 2]`` uint64 bits of the elements present (bit z-1 of word (z-1)//64)."""
        if name not in COLUMNS:
            raise KeyError(f"unknown store column {name!r}; columns: {sorted(COLUMNS)}")
        if name not in self._columns:
            parts = []
            with self.env.begin(buffers=False) as txn:
                for chunk in range(int(self.meta["chunks"])):
                    raw = txn.get(_chunk_key(chunk, name))
                    if raw is None:
                        raise StoreError(f"{self.path}: column {name!r} of commit {chunk} is missing; re-pack the store")
                    parts.append(np.frombuffer(raw, COLUMNS[name]))
            data = np.concatenate(parts) if parts else np.zeros(0, COLUMNS[name])
            self._columns[name] = data.reshape(-1, 2) if name == "zmask" else data
        return self._columns[name]

    @property
    def elements(self) -> list[int]:
        """Atomic numbers present anywhere in the store, sorted."""
        return list(self.meta["elements"])

    @property
    def config_types(self) -> list[str]:
        """The config-type names; the ``config_type`` column indexes this list (-1: none)."""
        return list(self.meta["config_types"])

    def elements_of(self, indices: Sequence[int] | np.ndarray) -> list[int]:
        """Atomic numbers present in the given structures (from the ``zmask`` column)."""
        mask = np.bitwise_or.reduce(self.column("zmask")[np.asarray(indices, dtype=np.int64)], axis=0)
        return [64 * w + b + 1 for w in range(2) for b in range(64) if int(mask[w]) >> b & 1]

    def splits(self) -> dict[str, dict[str, Any]]:
        """Named splits: ``{name: {"count": …, "seed": …, "by": …}}``."""
        return dict(self.meta.get("splits", {}))

    def split(self, name: str) -> np.ndarray:
        """The indices of split ``name`` (int64, sorted)."""
        if name not in self.meta.get("splits", {}):
            raise StoreError(f"{self.path} has no split {name!r}; splits: {sorted(self.splits()) or 'none'} "
                             "(make them with `atomforge data split`)")
        raw = self._get(_SPLIT + name.encode())
        if raw is None:
            raise StoreError(f"{self.path}: split {name!r} is listed but missing; make it again")
        return np.frombuffer(raw, np.int64).copy()

    def close(self) -> None:
        """Close this process's read-only handle of the store (reopened if read again)."""
        _close_environment(self.path, writer=False)


# -- writing -------------------------------------------------------------------------------------
def _new_meta() -> dict[str, Any]:
    return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "count": 0, "chunks": 0, "elements": [], "config_types": [], "sources": {}, "splits": {},
            "compress": False, "bytes": 0}


@dataclass
class _Pending:
    records: list[bytes]
    columns: dict[str, list[Any]]


class StoreWriter:
    """Appends structures to a store (creating it); one writer at a time, enforced by a lock
    file (a second writer gets a :class:`StoreError` at once, not a wait).

    ``append`` buffers; :meth:`commit` writes the buffer, the columns and the header in one
    transaction (atomic: a kill loses at most the uncommitted buffer). ``progress`` records how
    far a named source was packed, in the same transaction, so a killed pack resumes exactly.
    Use as a context manager; leaving it commits.
    """

    def __init__(self, path: Path | str, *, compress: bool | None = None, create: bool = True) -> None:
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise StoreError(f"{self.path} exists and is not a folder; a store is a folder (choose a new path)")
        if not create and not is_store(self.path):
            raise StoreError(f"{self.path} is not a structure store")
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = self._take_lock()
        try:
            self.env = _environment(self.path, write=True)
            with self.env.begin() as txn:
                raw = txn.get(_META)
            self.meta = _new_meta() if raw is None else StructureStore(self.path).meta
        except BaseException:
            self.close()
            raise
        if raw is None:
            self.meta["compress"] = bool(compress)
        self.compress = bool(self.meta["compress"] if compress is None else compress)
        self._pending = _Pending([], {name: [] for name in COLUMNS})

    def _take_lock(self) -> Any:
        handle = open(self.path / "writer.lock", "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise StoreError(f"{self.path} is being written by {holder}; two writers at once would interleave. "
                             "Wait for it to finish (or stop it), then run again.") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {os.uname().nodename}")
        handle.flush()
        return handle

    def _release(self) -> None:
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, kind: Any, error: Any, trace: Any) -> None:
        if kind is None:
            self.commit()
        self.close()

    def __len__(self) -> int:
        """Structures committed plus those buffered."""
        return int(self.meta["count"]) + len(self._pending.records)

    def append(self, atoms: Atoms, *, where: str = "structure") -> int:
        """Buffer one structure (validated and encoded here); returns its index in the store."""
        return self.append_encoded(encode(atoms, compress=self.compress, where=where), summarize(atoms))

    def append_encoded(self, record: bytes, summary: Mapping[str, Any]) -> int:
        """Buffer an already encoded record with its :func:`summarize` row (parallel packing)."""
        index = len(self)
        self._pending.records.append(record)
        for name in COLUMNS:
            value = summary[name]
            self._pending.columns[name].append(self.config_type_code(value) if name == "config_type" else value)
        for z in summary.get("_elements", ()):
            if z not in self.meta["elements"]:
                self.meta["elements"] = sorted([*self.meta["elements"], int(z)])
        return index

    def config_type_code(self, name: str | None) -> int:
        """The code of a config type (added to the table if new; -1 for none)."""
        return _config_type_code(self.meta, name)

    def progress(self, source_id: str, *, spec: Any = None, done: int, complete: bool = False) -> None:
        """Record (at the next commit) that ``done`` items of source ``source_id`` are packed."""
        entry = self.meta["sources"].setdefault(source_id, {"spec": spec, "done": 0, "complete": False,
                                                            "first": len(self)})
        entry["done"], entry["complete"] = int(done), bool(complete)

    def commit(self) -> None:
        """Write the buffered structures, their columns and the header in one transaction."""
        pending = self._pending
        start, chunk = int(self.meta["count"]), int(self.meta["chunks"])
        meta = dict(self.meta)
        with self.env.begin(write=True) as txn:
            for offset, record in enumerate(pending.records):
                # Appending (MDB_APPEND) fills leaf pages instead of splitting them in half: half the
                # bytes on disk for 1-2 KB records. It fails (False) once split/ keys sort after the
                # records; a plain put then.
                key = _key(start + offset)
                txn.put(key, record, append=True) or txn.put(key, record, overwrite=True)
                meta["bytes"] = int(meta.get("bytes", 0)) + len(record)
            if pending.records:
                for name, values in pending.columns.items():
                    txn.put(_chunk_key(chunk, name), np.asarray(values, dtype=COLUMNS[name]).tobytes())
                meta["chunks"] = chunk + 1
            meta["count"] = start + len(pending.records)
            txn.put(_META, json.dumps(meta).encode())
        self.meta = meta
        self._pending = _Pending([], {name: [] for name in COLUMNS})

    def write_split(self, name: str, indices: np.ndarray, **info: Any) -> None:
        """Store a named split (indices into this store) and commit."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise StoreError(f"split {name!r}: indices out of range for {len(self)} structures")
        with self.env.begin(write=True) as txn:
            txn.put(_SPLIT + name.encode(), np.sort(indices).tobytes())
            self.meta.setdefault("splits", {})[name] = {"count": int(indices.size), **info}
            txn.put(_META, json.dumps(self.meta).encode())

    def close(self) -> None:
        if getattr(self, "env", None) is not None:
            _close_environment(self.path, writer=True)
            self.env = None
        self._release()


def _config_type_code(meta: dict[str, Any], name: Any) -> int:
    if name is None:
        return -1
    table = meta["config_types"]
    if str(name) not in table:
        table.append(str(name))
    return table.index(str(name))


def summarize(atoms: Atoms) -> dict[str, Any]:
    """The column row of one structure (``config_type`` by name: the writer codes it)."""
    labels = get_labels(atoms)
    bits = sum(bit for key, bit in LABEL_BITS.items() if labels.has(key))
    zs = np.unique(atoms.numbers)
    mask = [0, 0]
    for z in zs.tolist():
        mask[(z - 1) // 64] |= 1 << ((z - 1) % 64)
    group = atoms.info.get("group", -1)
    return {"n_atoms": len(atoms), "labels": bits, "fidelity": int(atoms.info.get("fidelity", 0) or 0),
            "group": int(group) if isinstance(group, (int, np.integer)) else _stable_hash(group),
            "config_type": None if atoms.info.get("config_type") is None else str(atoms.info["config_type"]),
            "zmask": mask, "_elements": zs.tolist()}


def _stable_hash(value: Any) -> int:
    """A stable 63-bit id of a non-integer group label (e.g. a molecule name)."""
    return zlib.crc32(str(value).encode()) if value is not None else -1


def pack_structures(writer: StoreWriter, structures: Iterable[Atoms], *, source_id: str, spec: Any = None,
                    skip: int = 0, commit_every: int = 2000, where: str = "source") -> int:
    """Append ``structures`` (after the first ``skip``, already packed) to ``writer``, committing
    every ``commit_every`` with the source's progress; returns how many items the source had."""
    done = skip
    for position, atoms in enumerate(structures):
        if position < skip:
            continue
        writer.append(atoms, where=f"structure {position} of {where}")
        done = position + 1
        if (done - skip) % commit_every == 0:
            writer.progress(source_id, spec=spec, done=done)
            writer.commit()
    writer.progress(source_id, spec=spec, done=done, complete=True)
    writer.commit()
    return done
