"""Kill-and-resume of a real `atomforge al run` process: SIGKILL during labelling (between labels
and with a label in flight) and during training, then run it to completion and check that no
completed label was lost, none was requested twice, the data set holds no duplicate structure and
the campaign ran the requested number of iterations."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import yaml
from ase.io import read, write

from atomforge import has_checkpoint
from atomforge.active_learning import structure_hash
from conftest import cu_structures

TESTS = Path(__file__).resolve().parent
ITERATIONS, PER_ITERATION = 3, 5


def _campaign_file(tmp_path: Path) -> Path:
    write(tmp_path / "initial.extxyz", cu_structures(8, seed=11))
    write(tmp_path / "test.extxyz", cu_structures(2, seed=12))
    raw = {
        "output": "c", "initial_data": "initial.extxyz", "test": "test.extxyz",
        "oracle": {"name": "ase_calculator", "calculator": "al_kill_calculator:CountingEMT", "timeout": 60,
                   "retries": 0},
        "train": {"model": {"backbone": "painn", "cutoff": 4.0, "hidden_channels": 8, "num_layers": 1, "num_rbf": 6},
                  "uq": {"name": "latent_distance"}, "training": {"max_epochs": 12, "batch_size": 4, "lr": 0.005}},
        "explorers": [{"name": "perturb", "n_per_start": 4, "rattle_std": 0.1}],
        "selector": {"name": "trust_window", "lo": 0.0, "hi": 1.0e9},
        "budget": {"per_iteration": PER_ITERATION, "total": 100}, "stop": {"max_iterations": ITERATIONS},
        "starts_per_iteration": 2, "executor": {"kind": "serial"}, "tracking": "none",
    }
    path = tmp_path / "campaign.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _journal(directory: Path) -> list[dict]:
    """Complete journal lines (a line being written when we look is skipped)."""
    path = directory / "journal.jsonl"
    text = path.read_text() if path.exists() else ""
    return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines() if line.strip()]


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def _start(config: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "a") as out:
        return subprocess.Popen([sys.executable, "-m", "atomforge", "al", "run", str(config), "--quiet"],
                                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=config.parent)


def _kill_when(proc: subprocess.Popen, condition: Callable[[], bool], what: str, log: Path,
               timeout: float = 60.0) -> None:
    """SIGKILL ``proc`` as soon as ``condition()`` holds; fail if it exits or times out first."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"campaign exited (rc {proc.returncode}) before {what}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def test_sigkilled_campaign_resumes_without_losing_or_repeating_labels(tmp_path) -> None:
    config, calls, out = _campaign_file(tmp_path), tmp_path / "oracle_calls.log", tmp_path / "al.log"
    directory = tmp_path / "c"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "AL_KILL_ORACLE_LOG": str(calls), "AL_KILL_ORACLE_SLEEP": "0.15"}
    completed_at_kill: list[set[str]] = []  # journalled keys at each kill
    calls_at_kill: list[int] = []  # oracle calls made before each kill
    in_flight: set[str] = set()  # requested but not journalled at a kill: may be requested again

    def kill(condition: Callable[[], bool], what: str) -> None:
        _kill_when(_start(config, env, out), condition, what, out)
        journalled = {e["key"] for e in _journal(directory)}
        completed_at_kill.append(journalled)
        calls_at_kill.append(len(_lines(calls)))
        in_flight.update(set(_lines(calls)) - journalled)

    # 1. between labels of iteration 0: two of its five labels are journalled
    kill(lambda: sum(e["iteration"] == 0 for e in _journal(directory)) >= 2, "two labels of iteration 0")
    assert 2 <= len(completed_at_kill[-1]) < PER_ITERATION

    # 2. while training model 1: its first epoch checkpoint exists, its metrics do not yet
    train_dir = directory / "iterations" / "001" / "train"
    kill(lambda: has_checkpoint(train_dir), "a checkpoint of model 1")
    state = json.loads((directory / "state.json").read_text())
    assert (state["iteration"], state["phase"]) == (1, "train") and not (train_dir / "metrics.json").exists()
    assert len(completed_at_kill[-1]) == PER_ITERATION  # iteration 0's labelling finished on resume

    # 3. with a label of iteration 1 in flight: the oracle was called, its result is not journalled
    def label_in_flight() -> bool:
        journalled = {e["key"] for e in _journal(directory)}
        return any(k not in journalled for k in _lines(calls)) and len(journalled) > PER_ITERATION

    kill(label_in_flight, "a label of iteration 1 in flight")
    assert in_flight, "the third kill should have caught a label in flight"

    done = subprocess.run([sys.executable, "-m", "atomforge", "al", "run", str(config), "--quiet"], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)

    # finished with the requested number of iterations, every label of every iteration
    assert result["iterations"] == ITERATIONS and result["stopped_because"].startswith("max_iterations")
    assert result["labels"] == ITERATIONS * PER_ITERATION
    for i in range(ITERATIONS + 1):
        assert (directory / "iterations" / f"{i:03d}" / "train" / "model.pt").exists()

    # no completed label lost: every key journalled before a kill is in the final data set
    frames = list(read(directory / "labelled.extxyz", index=":"))
    stored = [f.info["al_key"] for f in frames]
    final_journal = [e["key"] for e in _journal(directory)]
    for before in completed_at_kill:
        assert before <= set(stored) and before <= set(final_journal)

    # none requested twice: a key the oracle saw more than once was in flight (not completed) at a kill
    repeated = {key for key, n in Counter(_lines(calls)).items() if n > 1}
    assert repeated <= in_flight and len(repeated) <= len(completed_at_kill)
    for before, n_calls in zip(completed_at_kill, calls_at_kill):  # completed before a kill: never asked again
        assert not before & set(_lines(calls)[n_calls:])
    probes = 1  # the oracle probe of the first start labels the first initial structure; resumes only build the oracle
    assert len(_lines(calls)) == ITERATIONS * PER_ITERATION + sum(Counter(_lines(calls))[k] - 1 for k in repeated) + probes

    # no duplicate structures: journal, stored keys and recomputed hashes (initial data included)
    assert len(final_journal) == len(set(final_journal)) == ITERATIONS * PER_ITERATION
    assert sorted(stored) == sorted(final_journal)
    hashes = [structure_hash(f) for f in frames] + [structure_hash(f) for f in read(tmp_path / "initial.extxyz", ":")]
    assert hashes[: len(stored)] == stored and len(hashes) == len(set(hashes))
