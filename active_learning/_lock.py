"""The campaign directory lock: one driver per campaign directory, for the driver's whole life.

Two drivers writing one campaign would label the same structures twice and interleave their
journal lines, so every driver (``al run``, :func:`~._loop.run_campaign`, a
:class:`~._campaign.Campaign`) takes the lock before it reads or writes anything there; readers
(``al status``, ``al export``) take none and read only committed records.

**Kernel lock (normal case).** ``campaign.lock`` in the campaign directory is locked with
``fcntl.flock(LOCK_EX | LOCK_NB)``. The kernel releases the lock when the holder dies, however it
dies (SIGKILL, OOM killer), so a killed driver never blocks the next one. The holder writes its
identity (host, pid, start time, command) into the file, so a refused driver can name it, and
clears it on a clean release; a lock taken while the file still names a holder is a takeover of
a dead driver's lock, and is logged as such. On NFS, Linux implements ``flock`` with NFS byte-range
locks, which hold between hosts; if the *host* of a driver crashes, the server frees its locks
when its lease runs out (about 90 s on NFSv4).

**Fallback (file systems that refuse locks).** Where ``flock`` fails with ``ENOLCK``,
``EOPNOTSUPP``, ``ENOSYS`` … (some Lustre and old NFS mounts), the lock is the *exclusive creation*
of ``campaign.lock.owner`` holding the same identity, removed on a clean release. A stale one is
detected only when it names this host: the pid is gone, belongs to another process (start times
differ) or the host has rebooted since (boot id). A holder on another host cannot be checked:
the refusal says so and how to clear it (delete the file once you know that driver is gone).
The two cooperate where hosts mount one file system differently (locks on some, not on others):
a flock holder also refuses while a live (or unverifiable) ``campaign.lock.owner`` exists, and
a fallback holder while ``campaign.lock`` names one.
"""

from __future__ import annotations

import errno
import json
import os
import shlex
import socket
import sys
import threading
import time
import weakref
from pathlib import Path
from typing import Any

from atomforge import AtomforgeError

__all__ = ["CampaignLock", "CampaignLocked", "LOCK_FILE", "OWNER_FILE", "read_lock_holder", "describe_holder"]

LOCK_FILE = "campaign.lock"  # flock()ed; holds the holder's identity while held
OWNER_FILE = "campaign.lock.owner"  # fallback: created exclusively where the file system refuses locks
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS}  # "this file system has no locks"
# directories locked by this process: flock over NFS does not exclude two holders in one process, so
# this does; weak, so that a lock (a Campaign) dropped without release() is released when collected
_HELD: "weakref.WeakValueDictionary[str, CampaignLock]" = weakref.WeakValueDictionary()
_HELD_GUARD = threading.Lock()


class CampaignLocked(AtomforgeError):
    """Another driver holds the campaign directory (``holder``: its identity, when known)."""

    def __init__(self, message: str, holder: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.holder = holder


# -- who am I, and is that holder alive? ---------------------------------------------------------------
def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _process_start(pid: int) -> str | None:
    """The start time of ``pid`` in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2:].split()[19]  # field 22, counted after the command name


def identity(command: str | None = None) -> dict[str, Any]:
    """This process as a lock holder."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "started_unix": round(time.time(), 3), "command": command or shlex.join(sys.argv),
            "boot_id": _boot_id(), "pid_start": _process_start(pid)}


def holder_alive(holder: dict[str, Any]) -> bool | None:
    """Whether a holder still runs: True/False on this host, None (cannot tell) on another."""
    if holder.get("host") != socket.gethostname():
        return None
    boot = _boot_id()
    if boot and holder.get("boot_id") and boot != holder["boot_id"]:
        return False  # the host rebooted since
    pid = int(holder.get("pid", -1))
    if pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process of that pid
        pass
    start = _process_start(pid)
    return not (start and holder.get("pid_start") and start != holder["pid_start"])


def describe_holder(holder: dict[str, Any] | None) -> str:
    """One line naming a holder: host, pid, start time, command."""
    if not holder:
        return "an unknown driver (it has not written its identity yet)"
    return (f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}, "
            f"command: {holder.get('command')}")


def _parse(text: str) -> dict[str, Any] | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _read_holder(path: Path, wait: float = 2.0) -> dict[str, Any] | None:
    """The identity in a lock file; waits up to ``wait`` s for a holder that is still writing it."""
    deadline = time.monotonic() + wait
    while True:
        try:
            holder = _parse(path.read_text())
        except OSError:
            holder = None
        if holder is not None or time.monotonic() >= deadline:
            return holder
        time.sleep(0.05)


def read_lock_holder(directory: Path | str) -> dict[str, Any] | None:
    """The driver named by a campaign's lock file, with ``alive`` (True/False, None: unknown), or
    None if no driver has it. Takes no lock (``al status`` must never block a driver); a driver
    killed without releasing shows ``alive: false`` until the next driver takes over."""
    directory = Path(directory)
    with _HELD_GUARD:
        mine = _HELD.get(str(directory.resolve()))
    if mine is not None and mine.holder is not None:  # never open (and close) our own lock file
        return {**mine.holder, "alive": True, "lock": mine.mode}
    for name, mode in ((LOCK_FILE, "flock"), (OWNER_FILE, "exclusive-file")):
        path = directory / name
        if path.exists():
            holder = _read_holder(path, wait=0.0)
            if holder:
                return {**holder, "alive": holder_alive(holder), "lock": mode}
    return None


# -- the lock ----------------------------------------------------------------------------------------
class CampaignLock:
    """Exclusive ownership of a campaign directory by one driver (see the module docstring).

    ``acquire()`` raises :class:`CampaignLocked` naming the holder; ``took_over`` is the identity of
    a dead driver whose lock was taken over (None otherwise); ``mode`` is ``flock`` or
    ``exclusive-file``.
    """

    def __init__(self, directory: Path | str, command: str | None = None) -> None:
        self.directory = Path(directory)
        self.command = command
        self.mode: str | None = None
        self.holder: dict[str, Any] | None = None
        self.took_over: dict[str, Any] | None = None
        self.note: str | None = None  # why the fallback was used
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self.mode is not None

    def __enter__(self) -> "CampaignLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def acquire(self) -> "CampaignLock":
        if self.held:
            return self
        self.directory.mkdir(parents=True, exist_ok=True)
        key = str(self.directory.resolve())
        with _HELD_GUARD:
            other = _HELD.get(key)
            if other is not None:
                raise CampaignLocked(self._refusal(other.holder, "this very process"), other.holder)
            _HELD[key] = self  # reserved while acquiring
        try:
            try:
                self._acquire_flock()
            except _FlockUnsupported as unsupported:
                self.note = str(unsupported)
                self._acquire_exclusive_file()
        except BaseException:
            with _HELD_GUARD:
                _HELD.pop(key, None)
            raise
        return self

    def release(self) -> None:
        """Clear the identity and release the lock (the kernel would release it at exit anyway)."""
        if not self.held:
            return
        try:
            if self.mode == "flock" and self._fd is not None:
                try:
                    os.ftruncate(self._fd, 0)  # a clean release: the next driver takes over nothing
                finally:
                    os.close(self._fd)  # releases the flock
            elif self.mode == "exclusive-file":
                path = self.directory / OWNER_FILE
                if _parse(path.read_text() if path.exists() else "") == self.holder:
                    path.unlink(missing_ok=True)
        finally:
            self._fd, self.mode = None, None
            with _HELD_GUARD:
                key = str(self.directory.resolve())
                if _HELD.get(key) is self:
                    del _HELD[key]

    # -- flock ----------------------------------------------------------------------------------------
    def _acquire_flock(self) -> None:
        try:
            import fcntl
        except ImportError as error:  # not a POSIX system
            raise _FlockUnsupported("fcntl is not available on this platform") from error
        path = self.directory / LOCK_FILE
        for _ in range(10):
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by exec'd children
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                os.close(fd)
                if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    holder = _read_holder(path)
                    raise CampaignLocked(self._refusal(holder, None), holder) from None
                if error.errno in _NO_LOCKS:
                    raise _FlockUnsupported(f"the file system refuses flock() on {path} "
                                            f"({errno.errorcode.get(error.errno, error.errno)})") from error
                raise
            try:  # the file we locked must still be the one at the path (never unlinked, but be sure)
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            owner = _read_holder(self.directory / OWNER_FILE, wait=0.0)
            if owner and holder_alive(owner) is not False:  # a driver on a host whose mount has no locks
                os.close(fd)
                raise CampaignLocked(self._refusal(owner, None, fallback=self.directory / OWNER_FILE,
                                                   alive=holder_alive(owner)), owner)
            previous = _parse(os.pread(fd, 1 << 16, 0).decode(errors="replace"))
            self.holder = identity(self.command)
            data = json.dumps(self.holder).encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
            os.fsync(fd)
            self._fd, self.mode = fd, "flock"
            self.took_over = previous  # the file still named a holder: it died without releasing
            return
        raise CampaignLocked(f"could not lock {path}: it keeps being replaced; is something deleting it?")

    # -- fallback: exclusive creation -----------------------------------------------------------------------
    def _acquire_exclusive_file(self) -> None:
        path = self.directory / OWNER_FILE
        for _ in range(10):
            self.holder = identity(self.command)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = _read_holder(path)
                alive = holder_alive(holder) if holder else None
                if alive is False and self._remove_stale(path, holder):
                    self.took_over = holder
                    continue
                raise CampaignLocked(self._refusal(holder, None, fallback=path, alive=alive), holder) from None
            try:
                os.write(fd, json.dumps(self.holder).encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            flocked = _read_holder(self.directory / LOCK_FILE, wait=0.0)
            if flocked and holder_alive(flocked) is not False:  # a driver on a host whose mount has locks
                path.unlink(missing_ok=True)
                alive = holder_alive(flocked)
                raise CampaignLocked(self._refusal(flocked, None) + (
                    f" It holds the flock on {self.directory / LOCK_FILE}, which this host's mount cannot take"
                    + (f"; if that driver is gone, delete {self.directory / LOCK_FILE}." if alive is None else ".")),
                    flocked)
            self.mode = "exclusive-file"
            return
        raise CampaignLocked(f"could not create {path}: other drivers keep taking it")

    @staticmethod
    def _remove_stale(path: Path, holder: dict[str, Any]) -> bool:
        """Move a dead holder's file aside; False if it was replaced by a live holder meanwhile."""
        aside = path.with_name(f"{path.name}.stale-{os.getpid()}-{time.time_ns()}")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return True  # another starter removed it: try creating again
        if _parse(aside.read_text()) == holder:
            aside.unlink(missing_ok=True)
            return True
        try:  # we moved a newer holder's file: put it back unless yet another one exists
            os.link(aside, path)
        except FileExistsError:
            pass
        aside.unlink(missing_ok=True)
        return False

    # -- messages ------------------------------------------------------------------------------------------
    def _refusal(self, holder: dict[str, Any] | None, who: str | None, *, fallback: Path | None = None,
                 alive: bool | None = None) -> str:
        text = (f"the campaign directory {self.directory} is in use by another driver: "
                f"{who + ' (' + describe_holder(holder) + ')' if who else describe_holder(holder)}. "
                "Only one `atomforge al run` may drive a campaign at a time; wait for it to finish, or stop it")
        if holder and holder.get("host") and holder.get("pid"):
            text += f" (`kill {holder['pid']}` on {holder['host']})"
        text += ", then re-run: the campaign resumes where it stopped."
        if fallback is None and holder and holder_alive(holder) is False and who is None:
            text += (f" (pid {holder.get('pid')} is gone, yet the lock is held: a process it started still has "
                     f"{self.directory / LOCK_FILE} open; find it with `fuser {self.directory / LOCK_FILE}`.)")
        if fallback is not None:
            text += (f" Where the file system refuses file locks, the lock is the file {fallback}; "
                     + ("its holder runs on another host and cannot be checked from here: if you are sure that "
                        f"driver is gone, delete {fallback} and re-run." if alive is None else
                        "its holder is still running on this host."))
        return text


class _FlockUnsupported(Exception):
    """flock() is not available for the campaign directory's file system."""
