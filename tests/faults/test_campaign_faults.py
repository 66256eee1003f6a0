"""Fault injection for active-learning campaigns: two drivers on one directory, a stale lock left
by a SIGKILLed driver, kills in every phase (no labelling worker may outlive its driver, and the
journal alone decides each structure's fate), and faulty oracles — raising, NaN, forces of the
wrong shape, hanging, killing their worker process, not importable, failing on every structure.

Tiny EMT Cu campaigns; the oracle is ``ase_calculator`` with ``al_fault_oracles:FaultyEMT``,
which logs every call to a file (``calls.log``) so that oracle calls can be counted per structure.
Drivers that must be killed are real processes (``al_fault_driver.py`` = ``atomforge al run``
with an optional pause at a phase); the others run ``atomforge.cli.main`` in this process.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Callable

import pytest
import yaml
from ase.build import bulk
from ase.io import read, write

from al_fault_oracles import calls, victims
from atomforge import has_checkpoint
from atomforge.active_learning import (
    CampaignLock, CampaignLocked, LabelJournal, OracleCall, WorkerPool, label_all, make_executor, read_lock_holder,
    structure_hash,
)
from atomforge.cli import main as atomforge_main
from conftest import cu_structures

FAULTS = Path(__file__).resolve().parent
TESTS = FAULTS.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
       "PYTHONPATH": os.pathsep.join([str(FAULTS), str(TESTS), os.environ.get("PYTHONPATH", "")])}
GRACE = 10.0  # seconds a killed driver's workers get to disappear


# -- helpers -------------------------------------------------------------------------------------------------
def _campaign(tmp_path: Path, *, mode: str = "ok", victims: int = 1, sleep: float = 0.0, executor: str = "serial",
              timeout: float = 20, retries: int = 1, iterations: int = 1, per_iteration: int = 3, epochs: int = 2,
              calculator: str = "al_fault_oracles:FaultyEMT") -> Path:
    """A tiny campaign file in ``tmp_path`` (directory ``tmp_path/c``; oracle state ``tmp_path/oracle``)."""
    (tmp_path / "oracle").mkdir(exist_ok=True)
    write(tmp_path / "initial.extxyz", cu_structures(8, seed=11))
    write(tmp_path / "test.extxyz", cu_structures(2, seed=12))
    raw = {
        "output": "c", "initial_data": "initial.extxyz", "test": "test.extxyz",
        "oracle": {"name": "ase_calculator", "calculator": calculator, "mode": mode, "state": str(tmp_path / "oracle"),
                   "victims": victims, "sleep": sleep, "timeout": timeout, "retries": retries},
        "train": {"model": {"backbone": "painn", "cutoff": 4.0, "hidden_channels": 8, "num_layers": 1, "num_rbf": 6},
                  "uq": {"name": "latent_distance"}, "training": {"max_epochs": epochs, "batch_size": 4, "lr": 0.005}},
        "explorers": [{"name": "perturb", "n_per_start": 3, "rattle_std": 0.1}],
        "selector": {"name": "trust_window", "lo": 0.0, "hi": 1.0e9},
        "budget": {"per_iteration": per_iteration, "total": 100}, "stop": {"max_iterations": iterations},
        "starts_per_iteration": 2, "executor": {"kind": executor, "max_workers": 2}, "tracking": "none",
    }
    path = tmp_path / "campaign.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _run(config: Path, *args: str) -> int:
    """``atomforge al run CONFIG`` in this process; its exit code."""
    return atomforge_main(["al", "run", str(config), "--quiet", *args])


def _journal(directory: Path) -> list[dict]:
    path = directory / "journal.jsonl"
    text = path.read_text() if path.exists() else ""
    return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines() if line.strip()]


def _labels(state: Path) -> list[str]:
    """Keys of the oracle's label calls (the start-up probe excluded), in call order."""
    return [key for key, kind in calls(state) if kind == "label"]


def _start(config: Path, env: dict[str, str], log: Path, **pause: str) -> subprocess.Popen:
    """A driver process (``atomforge al run``, optionally pausing at ``AL_FAULT_PAUSE_AT``)."""
    with open(log, "a") as out:
        command = [sys.executable, str(FAULTS / "al_fault_driver.py"), "al", "run", str(config), "--quiet"]
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env={**env, **pause}, cwd=config.parent)


def _wait_for(condition: Callable[[], bool], proc: subprocess.Popen, what: str, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the driver exited (rc {proc.returncode}) before {what}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{log.read_text()[-3000:]}"
        time.sleep(0.01)


def _processes_with(token: str) -> list[tuple[int, str]]:
    """Live (non-zombie) processes whose environment carries ``AL_FAULT_TOKEN=token``: (pid, command)."""
    marker = f"AL_FAULT_TOKEN={token}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if state not in ("Z", "X"):
            found.append((int(entry.name), command))
    return found


def _workers(token: str, driver: int) -> list[int]:
    return [pid for pid, command in _processes_with(token) if pid != driver and "spawn_main" in command]


def _kill_and_check_orphans(proc: subprocess.Popen, token: str, oracle: Path, *, expect_workers: bool = True) -> None:
    """SIGKILL the driver; within GRACE seconds none of its processes may be left, nor call the oracle."""
    workers = _workers(token, proc.pid)
    if expect_workers:
        assert workers, "the driver should have labelling workers alive at this point (the test would prove nothing)"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.monotonic() + GRACE
    while _processes_with(token) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _processes_with(token) == [], f"orphans of the killed driver: {_processes_with(token)}"
    before = len(calls(oracle))
    time.sleep(0.5)
    assert len(calls(oracle)) == before, "the oracle is still being called after the driver was killed"


# -- the lock ------------------------------------------------------------------------------------------------
def test_the_lock_refuses_a_second_holder_and_falls_back_to_an_exclusive_file(tmp_path, monkeypatch) -> None:
    first = CampaignLock(tmp_path, command="first").acquire()
    assert first.mode == "flock" and first.took_over is None
    with pytest.raises(CampaignLocked, match=rf"in use by another driver.*pid {os.getpid()}.*command: first"):
        CampaignLock(tmp_path).acquire()
    assert read_lock_holder(tmp_path)["pid"] == os.getpid()
    first.release()
    assert (tmp_path / "campaign.lock").read_text() == "" and read_lock_holder(tmp_path) is None  # a clean release
    with CampaignLock(tmp_path) as again:
        assert again.took_over is None

    import atomforge.active_learning._lock as lock_module

    def no_locks(fd, operation):  # noqa: ANN001
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr("fcntl.flock", no_locks)
    held = CampaignLock(tmp_path / "f", command="holder").acquire()
    assert held.mode == "exclusive-file" and "refuses flock" in held.note
    owner = tmp_path / "f" / "campaign.lock.owner"
    assert json.loads(owner.read_text())["command"] == "holder"
    held.release()
    assert not owner.exists()

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = {**lock_module.identity("killed"), "pid": dead.pid, "pid_start": "1"}
    owner.write_text(json.dumps(stale))
    with CampaignLock(tmp_path / "f") as taken:  # same host, holder gone: taken over
        assert taken.took_over["command"] == "killed"
    owner.write_text(json.dumps({**stale, "host": "elsewhere.example", "command": "remote"}))
    with pytest.raises(CampaignLocked, match="on another host and cannot be checked.*delete .*campaign.lock.owner"):
        CampaignLock(tmp_path / "f").acquire()
    alive = {**lock_module.identity("alive"), "pid": os.getppid(), "pid_start": None}
    owner.write_text(json.dumps(alive))
    with pytest.raises(CampaignLocked, match="still running on this host"):
        CampaignLock(tmp_path / "f").acquire()
    owner.unlink()
    (tmp_path / "f" / "campaign.lock").write_text(json.dumps(alive))  # a flock holder on a host with locks
    with pytest.raises(CampaignLocked, match="holds the flock on .*which this host's mount cannot take"):
        CampaignLock(tmp_path / "f").acquire()
    assert not owner.exists()

    monkeypatch.undo()  # locks work again, but a driver without them holds the directory
    (tmp_path / "f" / "campaign.lock").write_text("")
    owner.write_text(json.dumps(alive))
    with pytest.raises(CampaignLocked, match="refuses file locks, the lock is the file .*still running"):
        CampaignLock(tmp_path / "f").acquire()


@pytest.mark.slow
def test_two_drivers_the_second_refuses_and_every_structure_is_labelled_once(tmp_path) -> None:
    config = _campaign(tmp_path, iterations=2, per_iteration=3)
    directory, oracle, out = tmp_path / "c", tmp_path / "oracle", tmp_path / "first.log"
    mark, resume = tmp_path / "paused", tmp_path / "resume"
    first = _start(config, ENV, out, AL_FAULT_PAUSE_AT="0:label", AL_FAULT_MARK=str(mark), AL_FAULT_RESUME=str(resume))
    _wait_for(mark.exists, first, "the first driver to reach its first labelling", out)
    second = subprocess.run([sys.executable, "-m", "atomforge", "al", "run", str(config), "--quiet"], env=ENV,
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert second.returncode == 2 and "in use by another driver" in second.stderr
    assert f"pid {first.pid} on host {socket.gethostname()}" in second.stderr and "al run" in second.stderr
    status = subprocess.run([sys.executable, "-m", "atomforge", "al", "status", str(directory)], env=ENV,
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 0 and json.loads(status.stdout)["driver"]["pid"] == first.pid  # readers need no lock
    resume.touch()
    assert first.wait(timeout=240) == 0, out.read_text()[-3000:]

    journal = [e["key"] for e in _journal(directory)]
    stored = [a.info["al_key"] for a in read(directory / "labelled.extxyz", index=":")]
    assert len(journal) == len(set(journal)) == 6 and sorted(stored) == sorted(journal)
    assert sorted(_labels(oracle)) == sorted(journal)  # the oracle labelled each structure exactly once
    assert [kind for _, kind in calls(oracle)].count("probe") == 1
    log = (directory / "campaign.log").read_text()
    assert set(re.findall(r"^\S+ \S+ \[(\d+)\]", log, re.M)) == {str(first.pid)}  # the refused driver wrote nothing
    assert (directory / "campaign.lock").read_text() == ""  # released cleanly
    assert _run(config) == 0 and "took over" not in (directory / "campaign.log").read_text()
    assert json.loads(subprocess.run([sys.executable, "-m", "atomforge", "al", "status", str(directory)], env=ENV,
                                     capture_output=True, text=True, timeout=120).stdout)["driver"] is None


def test_readers_need_no_lock_and_skip_what_a_driver_is_still_writing(tmp_path) -> None:
    from atomforge.active_learning import JournalEntry, LabelledSet, campaign_status, export_campaign

    directory = tmp_path / "c"
    with CampaignLock(directory, command="atomforge al run campaign.yaml"):  # a driver is running
        a, b = cu_structures(2, seed=3)
        write(directory / "initial.extxyz", [a])
        LabelledSet(directory / "labelled.extxyz").append(b, "b")
        journal = LabelJournal(directory / "journal.jsonl")
        journal.append(JournalEntry("b", "ok", 0))
        (directory / "state.json").write_text(json.dumps({"iteration": 0, "phase": "label", "history": []}))
        (directory / "iterations" / "000" / "train").mkdir(parents=True)
        (directory / "iterations" / "000" / "train" / "model.pt").write_bytes(b"model")
        with open(directory / "labelled.extxyz", "a") as handle:  # the driver is appending a frame ...
            handle.write("8\nLattice=\"3.6 0 0 0 3.6 0 0 0 7.2\" Properties=species:S:1:pos:R:3\nCu 0 0 0\n")
        with open(directory / "journal.jsonl", "a") as handle:  # ... and a journal line
            handle.write('{"key": "c", "sta')
        before = {name: (directory / name).read_bytes() for name in ("labelled.extxyz", "journal.jsonl")}
        status = campaign_status(directory)
        exported = export_campaign(directory, tmp_path / "out")
        assert status["labels"] == 1 and status["driver"]["command"] == "atomforge al run campaign.yaml"
        assert status["driver"]["alive"] is True and exported["structures"] == 2
        assert {name: (directory / name).read_bytes() for name in before} == before  # readers wrote nothing


def test_the_probe_warns_when_the_oracle_disagrees_with_the_initial_labels(tmp_path, registry, capsys) -> None:
    from atomforge.active_learning import Campaign, campaign_from_dict

    raw = yaml.safe_load(_campaign(tmp_path).read_text())
    raw["oracle"] = {"name": "lj", "timeout": 20}  # the initial data are EMT labels
    campaign = Campaign(campaign_from_dict(raw, tmp_path), registry, verbose=False)
    try:
        campaign.prepare()
        campaign.probe_oracle()
    finally:
        campaign.close()
    error = capsys.readouterr().err
    assert "[al] warning: oracle probe: the oracle's label of the first initial structure differs" in error
    assert json.loads((tmp_path / "c" / "state.json").read_text())["oracle_probe"]["ok"] is True


# -- kills in every phase --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_kills_in_every_phase_leave_no_workers_and_the_journal_decides(tmp_path) -> None:
    """SIGKILL the driver while training, exploring, selecting and labelling (process pool of two
    workers, alive since the start-up probe); after each kill no process of that driver survives
    and the oracle is no longer called; the next driver takes over the stale lock and says so; the
    last one finishes with every structure labelled once, except one in flight at the kill."""
    config = _campaign(tmp_path, executor="process", sleep=0.4, per_iteration=4, epochs=6)
    directory, oracle, out = tmp_path / "c", tmp_path / "oracle", tmp_path / "driver.log"
    killed: list[int] = []
    completed_at_kill: list[set[str]] = []  # journalled keys at each kill
    calls_at_kill: list[int] = []  # label calls made before each kill

    def driver(**pause: str) -> tuple[subprocess.Popen, str]:
        token = uuid.uuid4().hex
        return _start(config, {**ENV, "AL_FAULT_TOKEN": token}, out, **pause), token

    def kill(proc: subprocess.Popen, token: str) -> None:
        _kill_and_check_orphans(proc, token, oracle)
        killed.append(proc.pid)
        completed_at_kill.append({e["key"] for e in _journal(directory)})
        calls_at_kill.append(len(_labels(oracle)))
        if len(killed) > 1:  # the driver after a killed one took its stale lock over and said so
            assert f"took over the campaign lock of a driver that is gone (pid {killed[-2]} " in \
                (directory / "campaign.log").read_text()

    # 1. training model 0: a checkpoint exists, the metrics do not
    proc, token = driver()
    _wait_for(lambda: has_checkpoint(directory / "iterations" / "000" / "train"), proc, "a checkpoint", out)
    _wait_for(lambda: bool(_workers(token, proc.pid)), proc, "the probe's worker", out)
    kill(proc, token)
    assert not (directory / "iterations" / "000" / "train" / "metrics.json").exists()
    # 2., 3. exploring and selecting (paused at the phase's start, after state.json says so)
    mark = tmp_path / "paused"
    for phase in ("explore", "select"):
        mark.unlink(missing_ok=True)
        proc, token = driver(AL_FAULT_PAUSE_AT=f"0:{phase}", AL_FAULT_MARK=str(mark))
        _wait_for(mark.exists, proc, f"the {phase} phase", out)
        assert json.loads((directory / "state.json").read_text())["phase"] == phase
        kill(proc, token)
    # 4. labelling: one label journalled, others in flight in the workers
    proc, token = driver()

    def in_flight() -> bool:
        journalled = {e["key"] for e in _journal(directory)}
        return bool(journalled) and bool(set(_labels(oracle)) - journalled)

    _wait_for(in_flight, proc, "a label in flight", out)
    kill(proc, token)
    assert 0 < len(completed_at_kill[-1]) < 4
    # 5. labelling again, both workers inside a 60 s calculation: they must die with the driver, not finish it
    proc, token = driver(AL_FAULT_LABEL_SLEEP="60")
    _wait_for(lambda: len(_labels(oracle)) >= calls_at_kill[-1] + 1, proc, "a slow label in flight", out)
    kill(proc, token)

    done = subprocess.run([sys.executable, "-m", "atomforge", "al", "run", str(config), "--quiet"], env=ENV,
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["labels"] == 4
    entries = _journal(directory)
    assert len(entries) == len({e["key"] for e in entries}) == 4 and all(e["status"] == "ok" for e in entries)
    requested = _labels(oracle)
    for before, n_calls in zip(completed_at_kill, calls_at_kill):  # completed before a kill: never asked again
        assert not before & set(requested[n_calls:])
    assert [kind for _, kind in calls(oracle)].count("probe") == 1  # resumes rebuild the oracle, not re-probe it


# -- faulty oracles ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode, reason, attempts", [
    ("raise", "RuntimeError: the SCF exploded (injected fault)", 2),
    ("nan", "OracleFailure: the oracle returned non-finite forces (NaN or inf)", 2),
    ("shape", "OracleFailure: the oracle returned forces of shape (7, 3); expected (8, 3)", 2),
    ("hang", "OracleTimeout: no result within 2 s", 1),
])
def test_a_faulty_label_is_journalled_failed_and_the_campaign_finishes(tmp_path, mode, reason, attempts) -> None:
    config = _campaign(tmp_path, mode=mode, timeout=2, retries=1, per_iteration=3)
    assert _run(config) == 0
    directory, oracle = tmp_path / "c", tmp_path / "oracle"
    journal = {e["key"]: e for e in _journal(directory)}
    [victim] = victims(oracle)
    assert journal[victim]["status"] == "failed" and journal[victim]["reason"] == reason
    assert journal[victim]["attempts"] == attempts == _labels(oracle).count(victim)
    ok = sorted(k for k, e in journal.items() if e["status"] == "ok")
    assert len(ok) == 2 and sorted(a.info["al_key"] for a in read(directory / "labelled.extxyz", index=":")) == ok
    assert all(_labels(oracle).count(k) == 1 for k in ok)


@pytest.mark.slow
def test_a_worker_killed_by_its_label_charges_only_that_structure(tmp_path) -> None:
    config = _campaign(tmp_path, mode="die", executor="process", retries=1, per_iteration=4)
    assert _run(config) == 0
    directory, oracle = tmp_path / "c", tmp_path / "oracle"
    journal = {e["key"]: e for e in _journal(directory)}
    [victim] = victims(oracle)
    assert journal[victim] == {**journal[victim], "status": "failed", "attempts": 2,
                               "reason": "the oracle's worker process died (exit code 3)"}
    assert _labels(oracle).count(victim) == 2  # killed its worker twice: 1 + retries
    innocent = [k for k in journal if k != victim]
    assert len(innocent) == 3 and all(journal[k]["status"] == "ok" and _labels(oracle).count(k) == 1 for k in innocent)
    assert "worker process died (exit code 3); requesting it again (1 of 1 retries)" in \
        (directory / "campaign.log").read_text()


def _items(n: int) -> list[tuple[str, object]]:
    structures = [bulk("Cu", cubic=True).repeat((1, 1, 2)) for _ in range(n)]
    for k, atoms in enumerate(structures):
        atoms.positions[0, 0] += 0.01 * k
        atoms.info["al_key"] = structure_hash(atoms)
    return [(a.info["al_key"], a) for a in structures]


def _fault_call(state: Path, mode: str, retries: int = 1) -> OracleCall:
    from atomforge import make_registry

    factory = make_registry().get("oracles", "ase_calculator").factory
    return OracleCall(factory, {"calculator": "al_fault_oracles:FaultyEMT", "mode": mode, "state": str(state)},
                      timeout=20, retries=retries)


@pytest.mark.slow
def test_a_foreign_process_pool_that_breaks_is_replaced_and_no_innocent_is_charged(tmp_path) -> None:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    pool = ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn"))
    recorded = []
    try:
        results = label_all(pool, _fault_call(tmp_path, "die"), _items(4), recorded.append)
    finally:
        pool.shutdown()
    [victim] = victims(tmp_path)
    by_key = {r.key: r for r in results}
    assert len(recorded) == len(results) == 4 and not by_key[victim].ok
    assert "worker process died (exit code 3)" in by_key[victim].error and by_key[victim].attempts == 2
    assert all(r.ok for k, r in by_key.items() if k != victim)


@pytest.mark.parametrize("kind", ["thread", "serial", "process"])
def test_every_executor_records_a_bad_label_and_labels_the_rest(tmp_path, kind) -> None:
    executor = make_executor(kind, max_workers=2)
    try:
        results = label_all(executor, _fault_call(tmp_path, "shape", retries=0), _items(3), lambda r: None)
    finally:
        executor.shutdown()
    [victim] = victims(tmp_path)
    assert sorted(r.ok for r in results) == [False, True, True]
    assert next(r for r in results if r.key == victim).error.startswith("OracleFailure: the oracle returned forces")


def test_an_oracle_that_cannot_be_imported_stops_the_campaign_before_anything_is_spent(tmp_path, capsys) -> None:
    config = _campaign(tmp_path, calculator="ase.calculators.emt:EMTX")
    assert _run(config) == 2
    error = capsys.readouterr().err
    assert "failed its start-up probe" in error and "EMTX" in error and "no budget was spent" in error
    directory = tmp_path / "c"
    assert _journal(directory) == [] and not (directory / "labelled.extxyz").exists()
    assert not (directory / "iterations").exists()  # not even trained
    assert "oracle probe" in (directory / "campaign.log").read_text()
    assert (directory / "campaign.lock").read_text() == ""  # the lock was released


@pytest.mark.slow
def test_an_iteration_whose_every_label_fails_halts_the_campaign(tmp_path, capsys) -> None:
    config = _campaign(tmp_path, mode="raise", victims=-1, retries=0, per_iteration=3, iterations=2)
    assert _run(config) == 2
    error = capsys.readouterr().err
    assert "every label requested in iteration 0 failed (3 of 3): 3 × RuntimeError: the SCF exploded" in error
    directory = tmp_path / "c"
    assert [e["status"] for e in _journal(directory)] == ["failed"] * 3
    from atomforge.active_learning import campaign_status

    assert campaign_status(directory)["halted_because"].startswith("every label requested in iteration 0 failed")
    assert _run(config, "--set", "oracle.mode=ok") == 0  # fixed: probed again, then on to the next iteration
    journal = LabelJournal(directory / "journal.jsonl")
    assert len(journal.with_status("failed")) == 3 and len(journal.with_status("ok")) == 3
    assert [kind for _, kind in calls(tmp_path / "oracle")].count("probe") == 2
    assert campaign_status(directory)["halted_because"] is None


# -- workers die with their driver -----------------------------------------------------------------------------
def test_the_watchdog_ends_a_worker_whose_parent_died() -> None:
    """The portable half (PR_SET_PDEATHSIG is the other): a process re-parented exits by itself."""
    child = ("import os, sys, time; from atomforge.active_learning._workers import start_parent_watchdog; "
             "start_parent_watchdog(os.getppid(), 0.1); print(os.getpid(), flush=True); time.sleep(120)")
    middle = subprocess.Popen([sys.executable, "-c", f"import subprocess, sys, time; subprocess.Popen([sys.executable, "
                               f"'-c', {child!r}]); time.sleep(120)"], stdout=subprocess.PIPE, env=ENV, text=True)
    grandchild = int(middle.stdout.readline())
    middle.kill()
    middle.wait()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _alive(grandchild):
        time.sleep(0.05)
    assert not _alive(grandchild)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def test_worker_pool_delivers_results_and_reports_deaths_with_the_exit_code() -> None:
    pool = WorkerPool(max_workers=2)
    try:
        futures = [pool.submit(os._exit, 7), pool.submit(pow, 2, 5), pool.submit(pow, 3, 2)]
        assert futures[1].result(timeout=60) == 32 and futures[2].result(timeout=60) == 9
        error = futures[0].exception(timeout=60)
        assert type(error).__name__ == "WorkerDied" and error.exitcode == 7 and "exit code 7" in str(error)
        assert pool.submit(pow, 2, 2).result(timeout=60) == 4  # a fresh worker replaced the dead one
        assert pool.deaths == 1
    finally:
        pool.shutdown()
