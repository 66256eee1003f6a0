"""The ``deepspeed`` engine: options, balanced sharding, and real 2-process ZeRO-2/ZeRO-3 runs on
CPU (gloo) compared with single-process training; kill + resume; the exported model file."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from ase.io import read, write

from atomforge import ConfigError, config_from_dict, evaluate, load_model, read_training_state
from atomforge.data.graph import GraphDataset
from atomforge.plugins.deepspeed_engine import (
    deepspeed_config,
    imbalance,
    parse_options,
    plan_epoch,
    shard_batch,
)
from atomforge.training.loop import TrainSettings
from atomforge.workflows.train import check_config, train

from conftest import cu_structures, tiny_config

# deepspeed is in the test extra: these tests must run, never skip silently
assert importlib.util.find_spec("deepspeed") is not None, "pip install -e '.[test]' installs deepspeed"


# -- options, config, sharding (no processes) ------------------------------------------------------
def test_options_are_validated_with_clear_errors():
    assert parse_options({"zero_stage": 3}).zero_stage == 3
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['stage'\].*valid keys"):
        parse_options({"stage": 2})
    with pytest.raises(ConfigError, match="zero_stage: expected 0, 1, 2 or 3"):
        parse_options({"zero_stage": 4})
    with pytest.raises(ConfigError, match="offload_param needs zero_stage: 3"):
        parse_options({"zero_stage": 2, "offload_param": "cpu"})
    with pytest.raises(ConfigError, match="precision"):
        parse_options({"precision": "fp8"})


def test_global_batch_must_split_over_ranks_and_accumulation():
    options = parse_options({"zero_stage": 2, "gradient_accumulation_steps": 2})
    config = deepspeed_config(options, TrainSettings(batch_size=8, grad_clip=5.0), world_size=2)
    assert (config["train_batch_size"], config["train_micro_batch_size_per_gpu"]) == (8, 2)
    assert config["gradient_clipping"] == 5.0 and config["zero_optimization"]["stage"] == 2
    merged = deepspeed_config(parse_options({"config": {"zero_optimization": {"reduce_bucket_size": 1000}}}),
                              TrainSettings(batch_size=4), world_size=2)
    assert merged["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 1000}
    with pytest.raises(ConfigError, match="multiple of processes"):
        deepspeed_config(options, TrainSettings(batch_size=6), world_size=2)


def test_balanced_sharding_evens_out_mixed_sizes():
    # twenty 108-atom cells (cost ~108 + 4000 edges) and sixty 9-atom molecules (cost ~9 + 72)
    costs = [4108.0] * 20 + [81.0] * 60
    rng = np.random.default_rng(0)
    ratios: dict[str, list[float]] = {"round_robin": [], "per_step": [], "window": []}
    for _ in range(10):
        order = [int(i) for i in rng.permutation(80)]
        for name, kwargs in (("round_robin", {"balance": False}), ("per_step", {"window": 1}), ("window", {})):
            steps = plan_epoch(order, costs, 8, 2, **kwargs)
            assert sorted(i for step in steps for shard in step for i in shard) == sorted(order)
            assert len(steps) == 10 and all(all(step) for step in steps)  # every rank busy every step
            ratios[name] += [imbalance(step, costs) for step in steps]
    mean = {name: float(np.mean(values)) for name, values in ratios.items()}
    assert mean["window"] < mean["per_step"] < mean["round_robin"]
    assert mean["window"] < 1.15 < 1.4 < mean["round_robin"]
    # equal sizes: the steps are exactly the single-process batches
    order = [int(i) for i in rng.permutation(16)]
    steps = plan_epoch(order, [10.0] * 16, 4, 2)
    assert [sorted(step[0] + step[1]) for step in steps] == [sorted(order[k:k + 4]) for k in range(0, 16, 4)]
    assert shard_batch([0, 1], costs, 2) in ([[0], [1]], [[1], [0]])
    with pytest.raises(ValueError, match="cannot feed 2 ranks"):
        shard_batch([0], costs, 2)


def test_deepspeed_block_is_checked_before_any_data_is_read(cu_files, tmp_path, registry):
    raw = tiny_config(cu_files, tmp_path / "run", engine="deepspeed")
    raw["deepspeed"] = {"zero_stage": 7}
    with pytest.raises(ConfigError, match="zero_stage"):
        check_config(registry, config_from_dict(raw))
    assert not (tmp_path / "run").exists()


def test_single_process_engine_refuses_a_multi_process_launch(cu_files, tmp_path, registry, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    config = config_from_dict(tiny_config(cu_files, tmp_path / "run"))
    with pytest.raises(ConfigError, match="single-process; set training.engine: deepspeed"):
        check_config(registry, config)


# -- real 2-process runs ---------------------------------------------------------------------------
EPOCHS = 8


@pytest.fixture(scope="module")
def ds_setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("ds")
    write(folder / "train.extxyz", cu_structures(40, seed=11))
    write(folder / "valid.extxyz", cu_structures(12, seed=12))
    raw = {
        "data": {"train": "train.extxyz", "valid": "valid.extxyz"},
        "model": {"backbone": "painn", "cutoff": 4.0, "hidden_channels": 16, "num_layers": 2, "num_rbf": 8},
        "loss": [{"name": "energy", "weight": 1.0}, {"name": "forces", "weight": 10.0}],
        "training": {"engine": "deepspeed", "max_epochs": EPOCHS, "batch_size": 4, "lr": 0.005, "seed": 3,
                     "scheduler": "none", "num_threads": 1},
        "deepspeed": {"zero_stage": 2},
        "tracking": "none",
    }
    (folder / "run.yaml").write_text(yaml.safe_dump(raw))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    return {"folder": folder, "raw": raw, "env": env}


def _launch(setup: dict, output: str, *extra: str, wait: bool = True) -> subprocess.Popen | subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "atomforge", "train", str(setup["folder"] / "run.yaml"), "--quiet",
               f"--set=output={output}", *extra]
    if not wait:
        return subprocess.Popen(command, env=setup["env"], cwd=setup["folder"], start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = subprocess.run(command, env=setup["env"], cwd=setup["folder"], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def _history(run_dir: Path) -> list[dict]:
    return read_training_state(run_dir)["history"]


@pytest.fixture(scope="module")
def single_run(ds_setup: dict) -> list[dict]:
    raw = {**ds_setup["raw"], "training": {**ds_setup["raw"]["training"], "engine": "torch"},
           "output": "single"}
    raw.pop("deepspeed")
    from atomforge import make_registry

    train(config_from_dict(raw, ds_setup["folder"]), make_registry(), verbose=False)
    return _history(ds_setup["folder"] / "single")


@pytest.mark.parametrize("stage, accumulation", [(2, 1), (3, 2)])
def test_two_process_zero_matches_single_process_and_exports_a_plain_model(ds_setup, single_run, stage,
                                                                           accumulation):
    output = f"zero{stage}"
    _launch(ds_setup, output, f"--set=deepspeed.zero_stage={stage}",
            f"--set=deepspeed.gradient_accumulation_steps={accumulation}")
    run_dir = ds_setup["folder"] / output
    history = _history(run_dir)
    assert len(history) == len(single_run) == EPOCHS
    for ours, reference in zip(history, single_run):
        assert ours["train_loss"] == pytest.approx(reference["train_loss"], rel=1e-3)
        assert ours["valid_loss"] == pytest.approx(reference["valid_loss"], rel=1e-3)
        assert 1.0 <= ours["train_metrics"]["load_imbalance"] < 1.05
    # the exported single-file model predicts what the sharded engine measured at its best epoch
    best = min(history, key=lambda r: r["valid_loss"])
    valid = GraphDataset(read(ds_setup["folder"] / "valid.extxyz", ":"), 4.0)
    check = subprocess.run(
        [sys.executable, "-c", (
            "import sys, json; sys.modules['deepspeed'] = None\n"  # loading must not need DeepSpeed
            "from atomforge import load_model, evaluate\nfrom atomforge.data.graph import GraphDataset\n"
            "from ase.io import read\n"
            f"m = load_model({str(run_dir / 'model.pt')!r})\n"
            f"v = GraphDataset(read({str(ds_setup['folder'] / 'valid.extxyz')!r}, ':'), 4.0)\n"
            "print(json.dumps(evaluate(m, v).metrics()))")],
        env=ds_setup["env"], capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stderr[-3000:]
    import json

    metrics = json.loads(check.stdout.strip().splitlines()[-1])
    assert metrics["forces_mae"] == pytest.approx(best["valid_metrics"]["forces_mae"], rel=1e-4)
    assert metrics["energy_mae"] == pytest.approx(best["valid_metrics"]["energy_mae"], rel=1e-3)
    assert evaluate(load_model(run_dir / "model.pt"), valid).metrics()["forces_mae"] == pytest.approx(
        metrics["forces_mae"], rel=1e-6)


def test_killed_zero2_run_resumes_to_the_uninterrupted_result(ds_setup, single_run):
    reference = ds_setup["folder"] / "zero2"
    if not (reference / "model.pt").exists():
        _launch(ds_setup, "zero2")
    job = _launch(ds_setup, "killed", wait=False)
    latest = ds_setup["folder"] / "killed" / "checkpoint" / "latest"
    deadline = time.time() + 300
    while time.time() < deadline:
        if latest.exists() and latest.read_text().strip() in {f"epoch{k}" for k in range(3, EPOCHS)}:
            break
        assert job.poll() is None, "training ended before it could be killed"
        time.sleep(0.02)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    killed_at = latest.read_text().strip()
    assert killed_at != f"epoch{EPOCHS}", "the run finished before the kill"
    with pytest.raises(subprocess.CalledProcessError):  # no --resume: refuses to overwrite
        subprocess.run([sys.executable, "-m", "atomforge", "train", str(ds_setup["folder"] / "run.yaml"),
                        "--set=output=killed"], env=ds_setup["env"], cwd=ds_setup["folder"],
                       check=True, capture_output=True)
    _launch(ds_setup, "killed", "--resume")
    resumed, uninterrupted = _history(ds_setup["folder"] / "killed"), _history(reference)
    assert [r["valid_loss"] for r in resumed] == pytest.approx([r["valid_loss"] for r in uninterrupted], rel=1e-6)
    a = torch.load(reference / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(ds_setup["folder"] / "killed" / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a)


def test_the_deepspeed_launchers_local_rank_argument_is_accepted(monkeypatch):
    from atomforge.cli import _strip_launcher_rank

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert _strip_launcher_rank(["--local_rank=1", "train", "c.yaml"]) == ["train", "c.yaml"]
    assert os.environ["LOCAL_RANK"] == "1"
    assert _strip_launcher_rank(["train", "--local-rank", "0", "c.yaml"]) == ["train", "c.yaml"]


def test_the_deepspeed_engine_passes_the_engine_kit(ds_setup) -> None:
    """check_engine in a world of one process, ZeRO 0, 2 and 3 (its own process: DeepSpeed joins a
    process group, which must not leak into the other tests)."""
    code = ("import atomforge\nfrom atomforge.testing import check_engine\nr = atomforge.make_registry()\n"
            "for stage in (0, 2, 3):\n"
            "    check_engine(r.get('engines', 'deepspeed'), options={'zero_stage': stage})\n"
            "print('kit passed')\n")
    done = subprocess.run([sys.executable, "-c", code], env=ds_setup["env"], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0 and "kit passed" in done.stdout, done.stderr[-3000:]
