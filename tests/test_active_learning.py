"""Active-learning campaigns: on-disk records, labelling through executors, the loop, resume, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.io import read

from atomforge import (
    CalculatorOracle, ConfigError, OracleSpec, get_labels, hookimpl, make_plugin_manager, make_registry,
)
from atomforge.active_learning import (
    JournalEntry, LabelJournal, LabelledSet, OracleCall, campaign_from_dict, campaign_status,
    export_campaign, label_all, make_executor, run_campaign, structure_hash,
)
from conftest import campaign_raw, cu_structures, emt_label, journal_keys

LOG = Path(os.environ.get("AL_TEST_ORACLE_LOG", "/nonexistent"))


# -- records on disk ---------------------------------------------------------------------------------
def test_structure_hash_is_stable_and_sensitive() -> None:
    atoms = bulk("Cu", cubic=True)
    moved = atoms.copy()
    moved.positions[0, 0] += 1e-3
    tiny = atoms.copy()
    tiny.positions[0, 0] += 1e-8
    assert structure_hash(atoms) == structure_hash(atoms.copy()) == structure_hash(tiny)
    assert structure_hash(atoms) != structure_hash(moved)


def test_a_half_written_journal_line_and_frame_are_dropped_and_the_journal_repaired(tmp_path) -> None:
    journal = LabelJournal(tmp_path / "journal.jsonl")
    labelled = LabelledSet(tmp_path / "labelled.extxyz")
    a, b, c = cu_structures(3, seed=4)
    labelled.append(a, "a")
    journal.append(JournalEntry("a", "ok", 0))
    labelled.append(b, "b")  # killed before its journal line: the label must not be lost
    with open(labelled.path, "a") as handle:  # killed while writing a third frame
        handle.write("4\nLattice=\"3.6 0 0 0 3.6 0 0 0 3.6\" Properties=species:S:1:pos:R:3\nCu 0 0 0\n")
    with open(journal.path, "a") as handle:
        handle.write('{"key": "zz", "sta')  # killed while writing a journal line
    journal, labelled = LabelJournal(journal.path), LabelledSet(labelled.path)
    assert labelled.keys() == ["a", "b"] and "zz" not in journal
    from atomforge.active_learning._store import repair_journal

    assert repair_journal(journal, labelled, 0) == 1
    assert sorted(LabelJournal(journal.path).entries) == ["a", "b"]
    assert get_labels(labelled.read()[1]).forces == pytest.approx(get_labels(b).forces)


# -- labelling through executors ---------------------------------------------------------------------
def _items(n: int) -> list[tuple[str, object]]:
    structures = [s.copy() for s in cu_structures(n, seed=5)]
    return [(structure_hash(s), s) for s in structures]


def _emt_factory() -> CalculatorOracle:
    return CalculatorOracle("emt", EMT)


@pytest.mark.parametrize("kind", ["process", "dask"])
def test_labels_come_back_through_a_pool_and_are_recorded_one_by_one(kind) -> None:
    if kind == "dask":
        pytest.importorskip("distributed", reason="dask.distributed not installed: pip install 'atomforge[dask]'")
    executor = make_executor(kind, max_workers=1)
    recorded = []
    try:
        results = label_all(executor, OracleCall(_emt_factory, timeout=60), _items(2), recorded.append)
    finally:
        executor.shutdown() if hasattr(executor, "shutdown") else None
    assert [r.key for r in results] == [r.key for r in recorded] and all(r.ok for r in results)
    reference = emt_label(_items(2)[0][1])
    first = next(r for r in results if r.key == _items(2)[0][0])
    assert get_labels(first.atoms).energy == pytest.approx(get_labels(reference).energy)


# -- campaigns ---------------------------------------------------------------------------------------
class MisbehavingOracle:
    """EMT, except: raises for the 2nd request, NaN for the 3rd, hangs on the 4th; logs each request."""

    name = "misbehaving"

    def __init__(self, *, log: str, interrupt_after: int | None = None) -> None:
        self.log, self.interrupt_after = Path(log), interrupt_after

    def label(self, atoms):
        key = structure_hash(atoms)
        with open(self.log, "a") as handle:
            handle.write(key + "\n")
        calls = len(self.log.read_text().splitlines())
        if self.interrupt_after is not None and calls > self.interrupt_after:
            raise KeyboardInterrupt("simulated kill during labelling")
        labelled = CalculatorOracle("emt", EMT).label(atoms)
        if calls == 2:
            raise RuntimeError("SCF exploded")
        if calls == 3:
            labelled.calc.results["forces"] = labelled.calc.results["forces"] * np.nan
        if calls == 4:
            time.sleep(10)
        return labelled


plugin = types.ModuleType("test_al_oracles")


@hookimpl
def _register_oracles(register) -> None:
    register(OracleSpec("misbehaving", MisbehavingOracle, "test oracle"))


plugin.register_oracles = _register_oracles


def test_end_to_end_campaign_with_a_deep_ensemble_tracked_in_mlflow(al_files, tmp_path, registry) -> None:
    raw = campaign_raw(al_files, tmp_path / "c", tracking={"name": "mlflow", "experiment": "al-test"})
    result = run_campaign(campaign_from_dict(raw), registry, verbose=False)
    assert result.stopped_because.startswith("max_iterations") and result.labels == 6
    keys = journal_keys(result.directory)
    assert len(keys) == len(set(keys)) == 6
    for i in range(3):  # every iteration's model is kept
        assert (result.directory / "iterations" / f"{i:03d}" / "train" / "model.pt").exists()
    status = campaign_status(result.directory)
    assert status["phase"] == "done" and status["labels"] == 6 and "test_forces_mae" in status["last_errors"]
    assert status["uncertainty"]["std_max"] > 0
    exported = export_campaign(result.directory, tmp_path / "out")
    assert int(exported["structures"]) == 16 and Path(exported["model"]).exists()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")  # the project's store: the folder holding c/
    experiment = client.get_experiment_by_name("al-test").experiment_id
    runs = client.search_runs([experiment])
    parent = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id]
    assert len(parent) == 1 and len(children) == 3
    first = next(r for r in children if r.info.run_name == "iteration-000")
    assert {"labels", "selected", "explored_candidate", "test_forces_mae", "std_max"} <= set(first.data.metrics)
    assert "data_hash" in first.data.params and first.data.params["hi"] == "1000.0"
    artifacts = {a.path for a in client.list_artifacts(parent[0].info.run_id, "plots")}
    assert "plots/learning_curve.png" in artifacts
    # each iteration's run is its training's run: per-epoch curves, the model, parity and uncertainty plots
    curve = client.get_metric_history(first.info.run_id, "valid_loss_forces")
    assert [m.step for m in curve] == [1, 2]
    assert "dataset.train.sha256" in first.data.params and "model.pt" in {
        a.path for a in client.list_artifacts(first.info.run_id)}
    plots = {a.path for a in client.list_artifacts(first.info.run_id, "plots")}
    assert {"plots/parity_valid.png", "plots/parity_test.png", "plots/learning_curve.png", "plots/uncertainty.png"} <= plots
    models = {m.source_run_id for m in client.search_logged_models([experiment])}
    assert {r.info.run_id for r in children} <= models


def test_a_campaign_with_a_single_pass_uq_head_runs(al_files, tmp_path, registry, caplog) -> None:
    raw = campaign_raw(al_files, tmp_path / "c", uq={"name": "latent_distance"},
                       selector={"name": "diversity", "method": "farthest_point", "lo": 0.0, "hi": 1e6},
                       budget={"per_iteration": 2, "total": 2, "stratify": "explorer"})
    result = run_campaign(campaign_from_dict(raw), registry, verbose=False)
    assert result.labels == 2 and result.stopped_because.startswith("label budget")
    selection = json.loads((result.directory / "iterations" / "000" / "selection.json").read_text())
    assert selection["groups"] == {"explorer=md": 1, "explorer=perturb": 1}  # one label per explorer

    raw = campaign_raw(al_files, tmp_path / "typo", uq={"name": "latent_distance"}, selector={"name": "random"},
                       budget={"per_iteration": 2, "total": 2, "stratify": "temprature"}, explorers=[
                           {"name": "perturb", "n_per_start": 2, "rattle_std": 0.05}], train={
                           **campaign_raw(al_files, tmp_path)["train"], "uq": {"name": "latent_distance"}})
    with caplog.at_level("WARNING", logger="atomforge.active_learning"):
        run_campaign(campaign_from_dict(raw), registry, verbose=False)
    assert "budget.stratify key(s) ['temprature'] are set on no candidate" in caplog.text


def test_the_validation_split_is_stable_as_labels_are_added() -> None:
    from atomforge.active_learning._campaign import stable_split

    for fraction in (0.1, 0.2, 0.33):
        previous: set[int] = set()
        for count in range(1, 200):
            train, valid = stable_split(count, fraction)
            assert sorted(train + valid) == list(range(count)) and not set(train) & set(valid)
            assert len(valid) == int(count * fraction + 0.5)  # round half up
            assert previous <= set(valid)  # once held out, always held out
            previous = set(valid)


def test_warm_started_iterations_start_from_the_previous_model(al_files, tmp_path, registry) -> None:
    import yaml

    from atomforge import load_model

    raw = campaign_raw(al_files, tmp_path / "c", uq={"name": "latent_distance"},
                       selector={"name": "random"}, budget={"per_iteration": 2, "total": 4})
    raw["train"]["warm_start"] = {"training": {"max_epochs": 0}}  # 0 epochs: exactly the previous weights
    result = run_campaign(campaign_from_dict(raw), registry, verbose=False)
    iterations = result.directory / "iterations"
    first = yaml.safe_load((iterations / "000" / "train.yaml").read_text())
    second = yaml.safe_load((iterations / "001" / "train.yaml").read_text())
    assert "init_from" not in first["model"] and first["training"]["max_epochs"] == 2
    assert second["model"]["init_from"] == str(iterations / "000" / "train" / "model.pt")
    assert second["training"]["max_epochs"] == 0
    before, after = (load_model(iterations / f"{i:03d}" / "train" / "model.pt") for i in (0, 2))
    for name, value in before.potential.state_dict().items():
        assert torch.equal(value, after.potential.state_dict()[name]), name
    valid = [len(read(iterations / f"{i:03d}" / "data" / "valid.extxyz", index=":")) for i in range(3)]
    assert valid == [2, 2, 3]  # round(0.2 × 10, 12, 14)
    with pytest.raises(ConfigError, match="train.warm_start"):
        campaign_from_dict({**raw, "train": {**raw["train"], "warm_start": {"lr": 1}}})


def test_configurations_the_model_cannot_evaluate_are_rejected_not_fatal(al_files, tmp_path, registry) -> None:
    from ase.io import write

    good = cu_structures(3, seed=21)
    bad = good[0].copy()
    bad.positions[1] = bad.positions[0] + [0.02, 0.0, 0.0]  # an exploded frame: two atoms 0.02 Å apart
    offered = tmp_path / "offered.extxyz"
    write(offered, [*good, bad])
    raw = campaign_raw(al_files, tmp_path / "c", uq={"name": "latent_distance"}, min_distance_ratio=None,
                       explorers=[{"name": "candidates_file", "path": str(offered)}],
                       selector={"name": "random"}, budget={"per_iteration": 4, "total": 4},
                       stop={"max_iterations": 1})
    result = run_campaign(campaign_from_dict(raw), registry, verbose=False)
    rejected = read(result.directory / "iterations" / "000" / "rejected.extxyz", index=":")
    assert len(rejected) == 1 and "the model cannot evaluate it" in rejected[0].info["rejected"]
    assert result.labels == 3


def test_failing_labels_are_recorded_and_skipped(al_files, tmp_path) -> None:
    registry = make_registry(make_plugin_manager(extra=[plugin]))
    log = tmp_path / "requests.log"
    raw = campaign_raw(al_files, tmp_path / "c", oracle={"name": "misbehaving", "log": str(log), "timeout": 3,
                                                         "retries": 0},
                       budget={"per_iteration": 5, "total": 5}, stop={"max_iterations": 1})
    result = run_campaign(campaign_from_dict(raw), registry, verbose=False)
    journal = LabelJournal(result.directory / "journal.jsonl")
    reasons = sorted(e.reason.split(":")[0] for e in journal.with_status("failed"))
    assert reasons == ["OracleFailure", "OracleTimeout", "RuntimeError"]
    assert len(journal.with_status("ok")) == result.labels == 2
    assert campaign_status(result.directory)["label_failures"] == 3


def test_killed_during_labelling_resumes_without_losing_or_repeating_labels(al_files, tmp_path) -> None:
    registry = make_registry(make_plugin_manager(extra=[plugin]))
    log = tmp_path / "requests.log"
    log.write_text("x\nx\nx\nx\n")  # skip the misbehaving calls 1-4: every label succeeds
    raw = campaign_raw(al_files, tmp_path / "c", oracle={"name": "misbehaving", "log": str(log),
                                                         "interrupt_after": 7})  # call 5: the oracle probe
    with pytest.raises(KeyboardInterrupt):  # the 3rd label of iteration 0 is in flight when "killed"
        run_campaign(campaign_from_dict(raw), registry, verbose=False)
    first = journal_keys(tmp_path / "c")
    assert len(first) == 2 and json.loads((tmp_path / "c" / "state.json").read_text())["phase"] == "label"
    raw["oracle"]["interrupt_after"] = None
    result = run_campaign(campaign_from_dict(raw), registry, verbose=False)
    keys = journal_keys(result.directory)
    requested = log.read_text().splitlines()[5:]
    assert keys[:2] == first and len(keys) == len(set(keys)) == 6  # nothing lost, nothing twice
    assert result.labels == len(LabelledSet(result.directory / "labelled.extxyz").keys()) == 6
    completed_before = set(first)
    assert not completed_before & set(requested[3:])  # completed labels were never requested again


def test_al_cli_run_status_export(al_files, tmp_path) -> None:
    import yaml

    config = tmp_path / "campaign.yaml"
    raw = campaign_raw(al_files, tmp_path / "c", budget={"per_iteration": 2, "total": 2}, stop={"max_iterations": 1},
                       explorers=[{"name": "perturb", "n_per_start": 2}])
    config.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}

    def al(*args):
        return subprocess.run([sys.executable, "-m", "atomforge", "al", *args], capture_output=True, text=True,
                              env=env, timeout=300)

    done = al("run", str(config), "--quiet")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["labels"] == 2
    again = al("run", str(config), "--quiet")  # re-running a finished campaign resumes: nothing to do
    assert again.returncode == 0 and json.loads(again.stdout)["labels"] == 2
    status = json.loads(al("status", str(tmp_path / "c")).stdout)
    assert status["phase"] == "done" and status["labels"] == 2
    exported = json.loads(al("export", str(tmp_path / "c"), "--out", str(tmp_path / "x")).stdout)
    assert Path(exported["dataset"]).exists()
    bad = al("status", str(tmp_path))
    assert bad.returncode == 2 and "not a campaign directory" in bad.stderr
