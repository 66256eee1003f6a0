"""An iteration's training as a supervised distributed job (``torchrun … -m atomforge train``).

Used when the campaign's ``train.training.engine`` is ``deepspeed``: the campaign writes the
iteration's ``train.yaml``, starts the job in its own process group, records it in
``train.job.json`` and waits. The job's stdout and stderr go to ``train.log`` (appended across
attempts). A job that fails or is killed raises :class:`TrainingJobFailed` with the log's tail;
the campaign state stays at the iteration's ``train`` phase, so ``al run`` retries it with
``--resume`` (the DeepSpeed checkpoint continues). A job left running by a killed campaign is
stopped before a new one starts.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from atomforge import AtomforgeError

__all__ = ["TrainingJobFailed", "run_training_job", "stop_stale_job"]

JOB_FILE = "train.job.json"
LOG_FILE = "train.log"


class TrainingJobFailed(AtomforgeError):
    """The iteration's training job exited with an error or was killed."""


def _alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def stop_stale_job(folder: Path) -> bool:
    """Stop a training job recorded in ``folder`` whose campaign died; return whether one was."""
    record = folder / JOB_FILE
    if not record.exists():
        return False
    try:
        pgid = int(json.loads(record.read_text())["pgid"])
    except (ValueError, KeyError, json.JSONDecodeError):
        record.unlink(missing_ok=True)
        return False
    stopped = False
    if _alive(pgid):
        os.killpg(pgid, signal.SIGTERM)
        deadline = time.time() + 15
        while _alive(pgid) and time.time() < deadline:
            time.sleep(0.2)
        if _alive(pgid):
            os.killpg(pgid, signal.SIGKILL)
        stopped = True
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
    env = dict(os.environ)
    try:
        import torch

        if not torch.cuda.is_available():
            env.setdefault("DS_ACCELERATOR", "cpu")
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    with open(log, "a") as handle:
        handle.write(f"\n$ {' '.join(command)}\n")
        handle.flush()
        job = subprocess.Popen(command, cwd=cwd, env=env, stdout=handle, stderr=subprocess.STDOUT,
                               start_new_session=True)
    (folder / JOB_FILE).write_text(json.dumps({"pid": job.pid, "pgid": job.pid, "command": command,
                                               "started": time.time()}))
    try:
        code = job.wait()
    except BaseException:
        if _alive(job.pid):
            os.killpg(job.pid, signal.SIGKILL)
        job.wait()
        (folder / JOB_FILE).unlink(missing_ok=True)
        raise
    (folder / JOB_FILE).unlink(missing_ok=True)
    if code != 0:
        how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        raise TrainingJobFailed(
            f"the training job of {folder.name} failed ({how}); log: {log}\n--- last lines ---\n{_tail(log)}\n"
            "--- nothing labelled is lost: fix the cause and re-run `atomforge al run` to resume this iteration"
        )
