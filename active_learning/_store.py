"""A campaign's records on disk: the label journal (keyed by ``structure_hash``, defined in
``atomforge.exploration.records`` and shared with explorers), the labelled data set and atomically
written JSON state.

Crash safety rests on two append-only files written in a fixed order. For every finished label
the labelled structure is first appended to ``labelled.extxyz`` (one write, flushed and fsynced,
carrying its key in ``info['al_key']``), then a line is appended to ``journal.jsonl``. A kill can
therefore leave (a) a half-written last frame or journal line — dropped on the next open, since
the label it belongs to was never committed — or (b) a frame whose journal line is missing —
the journal is repaired from the data set. Either way no completed label is lost and none is
requested again. Only the driver holding the campaign lock (``_lock.py``) writes or repairs these
files; readers (``al status``, ``al export``) open them with ``repair=False`` and see the complete
records only.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

from ase import Atoms
from ase.io import read, write

from atomforge import (  # structure_hash, write_json_atomic, read_json: re-exported here
    append_durably,
    complete_extxyz_length,
    read_json,
    structure_hash,
    write_json_atomic,
)

__all__ = ["structure_hash", "JournalEntry", "LabelJournal", "LabelledSet", "write_json_atomic", "read_json"]


@dataclass(frozen=True)
class JournalEntry:
    """One line of the label journal: the outcome of one label request."""

    key: str  # structure hash of the candidate
    status: str  # "ok" | "failed"
    iteration: int  # campaign iteration that requested it
    reason: str = ""  # why it failed (empty when ok)
    attempts: int = 1  # oracle calls made
    seconds: float = 0.0  # wall-clock time of the label call(s)
    time: float = 0.0  # UNIX time the entry was written


class LabelJournal:
    """Append-only JSONL of label outcomes, keyed by structure hash."""

    def __init__(self, path: Path, *, repair: bool = True) -> None:
        self.path = Path(path)
        self.entries: dict[str, JournalEntry] = {}
        self._load(repair)

    def _load(self, repair: bool) -> None:
        """Read the complete lines; ``repair`` (the lock holder only) also cuts a half-written last
        line off the file — a reader (``al status``) skips it, as the driver may be writing it."""
        if not self.path.exists():
            return
        text = self.path.read_text()
        complete = text if text.endswith("\n") or not text else text[: text.rfind("\n") + 1]
        if complete != text and repair:  # a kill during the last append: that label was never committed
            self.path.write_text(complete)
        for line in complete.splitlines():
            if line.strip():
                entry = JournalEntry(**json.loads(line))
                self.entries[entry.key] = entry

    def append(self, entry: JournalEntry) -> None:
        """Record an outcome durably (fsync) before anything else happens."""
        if not entry.time:
            entry = JournalEntry(**{**asdict(entry), "time": time.time()})
        append_durably(self.path, json.dumps(asdict(entry)) + "\n")
        self.entries[entry.key] = entry

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def with_status(self, status: str) -> list[JournalEntry]:
        """Entries with the given status, in journal order."""
        return [e for e in self.entries.values() if e.status == status]


class LabelledSet:
    """The campaign's append-only labelled data set (extxyz; ``info['al_key']`` on every frame)."""

    def __init__(self, path: Path, *, repair: bool = True) -> None:
        self.path = Path(path)
        self.repair = repair  # False for readers: never write, read complete frames only
        if repair:
            self._truncate_partial_frame()

    def _truncate_partial_frame(self) -> None:
        """Drop a last frame cut short by a kill (its label was never journalled)."""
        if not self.path.exists():
            return
        good = complete_extxyz_length(self.path.read_bytes())
        if good != self.path.stat().st_size:
            with open(self.path, "r+b") as handle:
                handle.truncate(good)

    def append(self, atoms: Atoms, key: str) -> None:
        """Append one labelled structure in a single durable write."""
        frame = atoms.copy()
        frame.calc = atoms.calc
        frame.info["al_key"] = key
        buffer = io.StringIO()
        write(buffer, frame, format="extxyz")
        append_durably(self.path, buffer.getvalue())

    def read(self) -> list[Atoms]:
        """All labelled structures so far."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return []
        if not self.repair:  # the driver may be appending: read the complete frames only
            data = self.path.read_bytes()
            data = data[: complete_extxyz_length(data)]
            return list(read(io.StringIO(data.decode()), index=":", format="extxyz")) if data else []
        return list(read(self.path, index=":", format="extxyz"))

    def keys(self) -> list[str]:
        """The keys of the stored structures, in order."""
        return [str(a.info.get("al_key", "")) for a in self.read()]


def repair_journal(journal: LabelJournal, labelled: LabelledSet, iteration: int) -> int:
    """Journal every stored structure whose journal line a kill prevented; returns how many."""
    missing = [key for key in labelled.keys() if key and key not in journal]
    for key in missing:
        journal.append(JournalEntry(key, "ok", iteration, reason="recovered from labelled.extxyz"))
    return len(missing)


def count_status(entries: Iterable[JournalEntry]) -> dict[str, int]:
    """``{"ok": n, "failed": m}`` over journal entries."""
    out = {"ok": 0, "failed": 0}
    for entry in entries:
        out[entry.status] = out.get(entry.status, 0) + 1
    return out
