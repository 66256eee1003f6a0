"""Atomic writes: a temporary file beside the target, flushed and fsynced, then renamed over it,
so a reader (or a process killed mid-write) sees the old file or the new one, never half of one.
The one helper every state file, checkpoint and model file goes through; and
:func:`append_durably` for the append-only logs (label journal, labelled set, flagged frames)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import IO, Any, Callable

import torch

__all__ = ["atomic_write", "atomic_save", "write_json_atomic", "write_text_atomic", "read_json", "append_durably",
           "remove_stale_temporaries"]


def atomic_write(path: Path | str, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(handle)`` on a temporary file (binary), fsync it and rename it to ``path``;
    the temporary file is removed if ``write`` fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_save(obj: Any, path: Path | str) -> Path:
    """``torch.save(obj)`` to ``path`` atomically."""
    return atomic_write(path, lambda handle: torch.save(obj, handle))


def write_text_atomic(path: Path | str, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda handle: handle.write(text.encode()))


def write_json_atomic(path: Path | str, data: Any) -> Path:
    """Write JSON to ``path`` atomically (indented, readable)."""
    return write_text_atomic(path, json.dumps(data, indent=2))


def read_json(path: Path | str, default: Any = None) -> Any:
    """The JSON in ``path``, or ``default`` if the file does not exist."""
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else default


def append_durably(path: Path | str, text: str) -> None:
    """Append ``text`` to ``path`` in one write, flushed and fsynced before returning (a kill
    afterwards loses nothing; a kill during it leaves at most a partial last record, which the
    readers of these logs drop)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


_TEMPORARY = re.compile(r"^\..+\.tmp(\d+)$")


def remove_stale_temporaries(folder: Path | str) -> list[Path]:
    """Delete the temporary files of :func:`atomic_write` under ``folder`` that a killed process
    left behind (``.<name>.tmp<pid>`` whose pid is no longer alive); returns what was removed."""
    removed = []
    for path in Path(folder).rglob(".*.tmp*"):
        match = _TEMPORARY.match(path.name)
        if match and path.is_file() and not _alive(int(match.group(1))):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
