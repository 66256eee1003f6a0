"""Campaigns that retrain each iteration as a 2-process DeepSpeed (ZeRO-2, gloo) job on CPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from ase.io import read

from atomforge import AtomforgeError, has_checkpoint, load_calculator
from atomforge.active_learning import Campaign, campaign_from_dict, run_campaign

from conftest import campaign_raw, journal_keys


def raw_campaign(files: dict[str, Path], output: Path, **extra: object) -> dict:
    """The mini campaign of conftest, retrained by 2-process ZeRO-2 jobs, one explore-label round."""
    raw = campaign_raw(files, output, explorers=[{"name": "perturb", "n_per_start": 3, "rattle_std": 0.1}],
                       stop={"max_iterations": 1}, **extra)
    raw["train"]["training"] = {"engine": "deepspeed", "max_epochs": 3, "batch_size": 4, "lr": 0.005}
    raw["train"].update(deepspeed={"zero_stage": 2}, processes=2)
    return raw


def _processes_running(needle: str) -> list[int]:
    """PIDs whose command line mentions ``needle`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if needle.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def test_processes_need_a_distributed_engine(al_files, tmp_path, registry) -> None:
    raw = raw_campaign(al_files, tmp_path / "c")
    raw["train"]["training"]["engine"] = "torch"
    raw["train"].pop("deepspeed")
    with pytest.raises(AtomforgeError, match="processes=2 needs a distributed engine.*'torch' engine runs one"):
        Campaign(campaign_from_dict(raw), registry, verbose=False)


def test_campaign_retrains_with_a_two_process_zero2_job(al_files, tmp_path, registry) -> None:
    raw = raw_campaign(al_files, tmp_path / "c", tracking={"name": "mlflow", "experiment": "al-ds"})
    result = run_campaign(campaign_from_dict(raw), registry, verbose=False)
    assert result.stopped_because.startswith("max_iterations") and result.labels == 3
    for i in (0, 1):
        folder = result.directory / "iterations" / f"{i:03d}"
        assert "nproc_per_node=2" in (folder / "train.log").read_text()
        assert has_checkpoint(folder / "train")
        assert has_checkpoint(folder / "train" / "member1")  # the member was trained in the job
        assert not (folder / "train.job.json").exists()
    atoms = read(al_files["test"], 0)
    atoms.calc = load_calculator(result.final_model)
    atoms.get_potential_energy()
    assert atoms.calc.results["forces_std"].shape == (len(atoms),)
    state = json.loads((result.directory / "state.json").read_text())
    first = state["history"][0]
    assert first["time_train_s"] > 0 and first["time_label_s"] > 0 and "test_forces_mae" in first

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{result.directory.parent / 'mlflow.db'}")  # the project's store
    runs = client.search_runs([client.get_experiment_by_name("al-ds").experiment_id])
    child = next(r for r in runs if r.info.run_name == "iteration-000")
    assert {"test_forces_mae", "best_valid_forces_mae", "time_train_s"} <= set(child.data.metrics)
    # the 2-process job logged into the iteration's run itself (rank 0): per-epoch curves, the model
    assert [m.step for m in client.get_metric_history(child.info.run_id, "valid_loss")] == [1, 2, 3]
    assert "model.pt" in {a.path for a in client.list_artifacts(child.info.run_id)}
    assert {a.path for a in client.list_artifacts(child.info.run_id, "training")} >= {
        "training/train.log", "training/metrics.json"}


def test_killed_training_job_is_reported_and_the_campaign_resumes(al_files, tmp_path) -> None:
    raw = raw_campaign(al_files, tmp_path / "c")
    raw["train"]["training"]["max_epochs"] = 150  # long enough to be killed mid-training
    raw["train"]["uq"] = {"name": "latent_distance"}
    campaign_file = tmp_path / "campaign.yaml"
    campaign_file.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    run = [sys.executable, "-m", "atomforge", "al", "run", str(campaign_file)]
    campaign = subprocess.Popen(run, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    folder = tmp_path / "c" / "iterations" / "001"
    job_file, latest = folder / "train.job.json", folder / "train" / "checkpoint" / "latest"
    deadline = time.time() + 400
    while not (job_file.exists() and latest.exists()):  # iteration 1's job has checkpointed an epoch
        assert campaign.poll() is None, campaign.communicate()[1][-3000:]
        assert time.time() < deadline, "iteration 1 never started training"
        time.sleep(0.05)
    labels_before = journal_keys(tmp_path / "c")
    os.killpg(json.loads(job_file.read_text())["pgid"], signal.SIGKILL)
    _, stderr = campaign.communicate(timeout=120)
    assert campaign.returncode != 0
    assert "training job of 001 failed" in stderr and "train.log" in stderr and "al run" in stderr
    assert json.loads((tmp_path / "c" / "state.json").read_text())["phase"] == "train"
    assert not _processes_running(str(folder / "train.yaml"))  # torchrun's orphaned workers were stopped too

    done = subprocess.run(run, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    keys = journal_keys(tmp_path / "c")
    assert keys == labels_before and len(keys) == len(set(keys)) == 3  # nothing lost, nothing relabelled
    log = (folder / "train.log").read_text()
    assert log.count("$ ") == 2 and "--resume" in log.split("$ ")[-1].splitlines()[0]
    assert (folder / "train" / "model.pt").exists()


def test_the_example_campaigns_are_valid_and_differ_only_in_the_engine() -> None:
    from atomforge.active_learning import load_campaign

    folder = Path(__file__).resolve().parents[1] / "examples" / "al-cu-deepspeed"
    ds, plain = load_campaign(folder / "campaign-deepspeed.yaml"), load_campaign(folder / "campaign-plain.yaml")
    assert ds.train["training"]["engine"] == "deepspeed" and ds.train["processes"] == 2
    assert ds.train["deepspeed"] == {"zero_stage": 2} and ds.train["uq"]["name"] == "deep_ensemble"
    assert plain.train["training"]["engine"] == "torch" and "deepspeed" not in plain.train
    same = {k: v for k, v in ds.train["training"].items() if k != "engine"}
    assert same == {k: v for k, v in plain.train["training"].items() if k != "engine"}
    assert (ds.explorers, ds.selector, ds.budget, ds.stop) == (plain.explorers, plain.selector, plain.budget, plain.stop)
