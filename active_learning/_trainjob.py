"""An iteration's training as a supervised distributed job (``torchrun … -m atomforge train``).

Used when the campaign's ``train.training.engine`` is a distributed engine (``deepspeed``): the campaign writes the
iteration's ``train.yaml``, starts the job in its own process group, records it in
``train.job.json`` and waits. The job's stdout and stderr go to ``train.log`` (appended across
attempts). A job that fails or is killed raises :class:`TrainingJobFailed` with the log's tail;
the campaign state stays at the iteration's ``train`` phase, so ``al run`` retries it with
``--resume`` (the DeepSpeed checkpoint continues). A job left running by a killed campaign is
stopped before a new one starts. torchrun starts each worker in its own session, so the job's
processes are found by a token in their environment, not by process group: a killed torchrun's
orphaned workers are stopped too, instead of writing on into the checkpoint of the next attempt.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from atomforge import AtomforgeError

__all__ = ["TrainingJobFailed", "run_training_job", "stop_stale_job"]

JOB_FILE = "train.job.json"
LOG_FILE = "train.log"


class TrainingJobFailed(AtomforgeError):
    """The iteration's training job exited with an error or was killed."""


TOKEN_VARIABLE = "ATOMFORGE_TRAIN_JOB"  # marks every process of one job (torchrun starts its workers in new sessions)


def _alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _job_processes(token: str) -> list[int]:
    """PIDs whose environment carries the job's token (Linux ``/proc``; empty elsewhere). torchrun
    starts each worker in its own session, so a killed torchrun leaves workers that its process
    group no longer reaches; the token finds them."""
    marker = f"{TOKEN_VARIABLE}={token}".encode()
    found = []
    proc = Path("/proc")
    if not proc.is_dir():
        return found
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _signal(pids: list[int], pgid: int | None, sig: int) -> None:
    if pgid is not None and _alive(pgid):
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _kill_job(pgid: int | None, token: str | None, grace: float = 15.0) -> bool:
    """Stop torchrun's process group and every worker of the job: SIGTERM, then SIGKILL after
    ``grace`` seconds. Returns whether anything was running."""
    running = lambda: _job_processes(token) if token else []  # noqa: E731
    if not (running() or (pgid is not None and _alive(pgid))):
        return False
    _signal(running(), pgid, signal.SIGTERM)
    deadline = time.time() + grace
    while (running() or (pgid is not None and _alive(pgid))) and time.time() < deadline:
        time.sleep(0.2)
    _signal(running(), pgid, signal.SIGKILL)
    deadline = time.time() + 10
    while running() and time.time() < deadline:  # reaped by init; wait until they are gone
        time.sleep(0.1)
    return True


def stop_stale_job(folder: Path) -> bool:
    """Stop a training job recorded in ``folder`` whose campaign died; return whether one was."""
    record = folder / JOB_FILE
    if not record.exists():
        return False
    try:
        data = json.loads(record.read_text())
        pgid, token = int(data["pgid"]), data.get("token")
    except (ValueError, KeyError, json.JSONDecodeError):
        record.unlink(missing_ok=True)
        return False
    stopped = _kill_job(pgid, token)
    record.unlink(missing_ok=True)
    return stopped


def _tail(path: Path, lines: int = 25) -> str:
    if not path.exists():
        return "(no log)"
    text = path.read_text(errors="replace").splitlines()
    useful = [line for line in text if "Warning" not in line and not line.strip().startswith("warnings.warn")]
    return "\n".join(useful[-lines:])


def run_training_job(config: Path, folder: Path, *, processes: int, resume: bool, cwd: Path) -> None:
    """Run ``atomforge train config`` on ``processes`` local processes under ``torchrun``; block
    until it ends; raise :class:`TrainingJobFailed` (naming the log) if it did not succeed."""
    stop_stale_job(folder)
    log = folder / LOG_FILE
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "atomforge", "train", str(config), "--quiet", *(["--resume"] if resume else [])]
    token = uuid.uuid4().hex
    env = {**os.environ, TOKEN_VARIABLE: token}
    with open(log, "a") as handle:
        handle.write(f"\n$ {' '.join(command)}\n")
        handle.flush()
        job = subprocess.Popen(command, cwd=cwd, env=env, stdout=handle, stderr=subprocess.STDOUT,
                               start_new_session=True)
    (folder / JOB_FILE).write_text(json.dumps({"pid": job.pid, "pgid": job.pid, "token": token,
                                               "command": command, "started": time.time()}))
    try:
        code = job.wait()
    except BaseException:
        _kill_job(job.pid, token)
        job.wait()
        (folder / JOB_FILE).unlink(missing_ok=True)
        raise
    _kill_job(None, token, grace=5.0)  # workers orphaned by a killed torchrun must not go on writing
    (folder / JOB_FILE).unlink(missing_ok=True)
    if code != 0:
        how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        raise TrainingJobFailed(
            f"the training job of {folder.name} failed ({how}); log: {log}\n--- last lines ---\n{_tail(log)}\n"
            "--- nothing labelled is lost: fix the cause and re-run `atomforge al run` to resume this iteration"
        )
