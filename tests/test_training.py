"""Training behaviour: learning, stopping, checkpoints, resume after a kill, bad config."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from atomforge import ConfigError, config_from_dict, has_checkpoint, load_config, read_model_file, read_training_state
from atomforge.workflows.train import train

from conftest import tiny_config


def test_training_reduces_the_error(registry, cu_files, tmp_path) -> None:
    outcome = train(config_from_dict(tiny_config(cu_files, tmp_path / "run", max_epochs=8)), registry,
                    verbose=False)
    history = read_training_state(tmp_path / "run")["history"]
    assert len(history) == 8
    assert history[-1]["valid_metrics"]["forces_mae"] < 0.7 * history[0]["valid_metrics"]["forces_mae"]
    assert outcome.test_metrics["test_forces_mae"] < 1.5 * history[-1]["valid_metrics"]["forces_mae"]
    assert outcome.model_path.exists() and (tmp_path / "run" / "parity_test.png").exists()


def test_max_time_stops_training(registry, cu_files, tmp_path) -> None:
    outcome = train(config_from_dict(tiny_config(cu_files, tmp_path / "run", max_epochs=10_000, max_time=2)),
                    registry, verbose=False)
    assert outcome.stopped_because == "max_time"
    assert outcome.epochs < 10_000


def test_early_stopping(registry, cu_files, tmp_path) -> None:
    cfg = tiny_config(cu_files, tmp_path / "run", max_epochs=200, patience=1, lr=1e-9, ema_decay=None)
    outcome = train(config_from_dict(cfg), registry, verbose=False)
    assert outcome.stopped_because == "early_stopping"
    assert outcome.epochs < 10


def test_existing_run_is_not_overwritten_without_resume(registry, cu_files, tmp_path) -> None:
    cfg = config_from_dict(tiny_config(cu_files, tmp_path / "run", max_epochs=1))
    train(cfg, registry, verbose=False)
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match="--resume"):
        train(cfg, registry, verbose=False)
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == before


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return read_model_file(path)[2]


def test_resume_after_kill_gives_the_same_model(registry, cu_files, tmp_path) -> None:
    """Kill a training process mid-run (SIGKILL), resume it, compare with an uninterrupted run."""
    epochs = 20  # long enough that a slow, loaded machine still kills it mid-run
    reference = train(config_from_dict(tiny_config(cu_files, tmp_path / "ref", max_epochs=epochs)), registry,
                      verbose=False)
    config = tmp_path / "killed.yaml"
    config.write_text(yaml.safe_dump(tiny_config(cu_files, tmp_path / "killed", max_epochs=epochs)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "atomforge", "train", str(config), "--quiet"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = tmp_path / "killed"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not has_checkpoint(run):
        time.sleep(0.02)  # kill as soon as the first checkpoint is on disk
    assert proc.poll() is None, "training finished before it could be killed; make it longer"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = read_training_state(run)["epoch"]
    assert 1 <= killed_at < epochs and not (tmp_path / "killed" / "model.pt").exists()
    done = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    history = read_training_state(run)["history"]
    assert [h["epoch"] for h in history] == list(range(1, epochs + 1))
    resumed, ref = _weights(tmp_path / "killed" / "model.pt"), _weights(reference.model_path)
    for name in ref:
        torch.testing.assert_close(resumed[name], ref[name], rtol=1e-5, atol=1e-6, msg=name)


def test_config_overrides_and_relative_paths(cu_files, tmp_path) -> None:
    raw = tiny_config(cu_files, tmp_path / "unused")
    raw["data"]["train"] = "train.extxyz"
    raw["output"] = "out"
    (cu_files["train"].parent / "c.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_config(cu_files["train"].parent / "c.yaml",
                      ["training.lr=0.01", "model.hidden_channels=8", "training.max_time=15m"])
    assert cfg.training.lr == 0.01 and cfg.training.max_time == 900
    assert cfg.model.options["hidden_channels"] == 8
    assert cfg.data.train.options["path"] == str(cu_files["train"])
    assert cfg.output == cu_files["train"].parent / "out"


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda c: c["training"].update(learning_rate=1), r"training: unknown key\(s\) \['learning_rate'\]"),
        (lambda c: c.update(optimiser=3), r"unknown key\(s\) \['optimiser'\]; valid keys"),
        (lambda c: c["training"].update(max_time="fifteen minutes"), "max_time: expected seconds"),
        (lambda c: c["model"].update(dtype="float16"), "float32 or float64"),
        (lambda c: c.pop("data"), "data.train is required"),
        (lambda c: c["training"].update(lr="abc"), r"training.lr: expected float, got 'abc'"),
        (lambda c: c["training"].update(batch_size=2.5), r"training.batch_size: expected int, got 2.5"),
        (lambda c: c["training"].update(scheduler="warmup"), r"unknown scheduler 'warmup'; valid: plateau"),
        (lambda c: c["loss"][0].update(weight="heavy"), r"loss\[0\].weight: expected float"),
    ],
)
def test_bad_config_gives_a_clear_error(cu_files, tmp_path, mutate, message) -> None:
    raw = tiny_config(cu_files, tmp_path / "run")
    mutate(raw)
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw)


def test_set_overrides_reach_into_lists(cu_files, tmp_path) -> None:
    from atomforge.config import apply_overrides

    raw = apply_overrides(tiny_config(cu_files, tmp_path / "run"), ["loss.1.weight=50", "loss.0.kind=huber"])
    config = config_from_dict(raw)
    assert config.loss[1].weight == 50.0 and config.loss[0].options == {"kind": "huber"}
    with pytest.raises(ConfigError, match="not an index"):
        apply_overrides(raw, ["loss.7.weight=1"])


def test_unknown_names_fail_before_anything_is_written(registry, cu_files, tmp_path) -> None:
    from atomforge import UnknownPluginError

    raw = tiny_config(cu_files, tmp_path / "run")
    raw["loss"].append({"name": "virial"})
    with pytest.raises(UnknownPluginError, match="unknown loss 'virial'"):
        train(config_from_dict(raw), registry, verbose=False)
    assert not (tmp_path / "run").exists()


def test_unknown_backbone_option_is_a_clear_error(registry, cu_files, tmp_path) -> None:
    from atomforge import PluginError

    raw = tiny_config(cu_files, tmp_path / "run")
    raw["model"]["hidden"] = 3
    with pytest.raises(PluginError, match=r"backbone 'painn' rejected its options.*hidden"):
        train(config_from_dict(raw), registry, verbose=False)
    raw = tiny_config(cu_files, tmp_path / "run2")
    raw["model"]["activation"] = "relu"
    with pytest.raises(ConfigError, match=r"activation 'relu' is not one of \['silu', 'tanh'\]"):
        train(config_from_dict(raw), registry, verbose=False)


def test_float64_training(registry, cu_files, tmp_path) -> None:
    raw = tiny_config(cu_files, tmp_path / "run", max_epochs=1)
    raw["model"]["dtype"] = "float64"
    outcome = train(config_from_dict(raw), registry, verbose=False)
    config, _, state = read_model_file(outcome.model_path)
    assert config["dtype"] == "float64"
    assert state["backbone.embedding.weight"].dtype == torch.float64
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["test_forces_mae"] > 0


def test_cosine_time_schedule_decays_to_min_lr_over_the_budget(registry, cu_files, tmp_path) -> None:
    cfg = tiny_config(cu_files, tmp_path / "run", max_epochs=10_000, max_time=3, lr=0.01,
                      scheduler={"name": "cosine_time", "min_lr": 1e-5})
    train(config_from_dict(cfg), registry, verbose=False)
    history = read_training_state(tmp_path / "run")["history"]
    lrs = [h["lr"] for h in history]
    assert lrs == sorted(lrs, reverse=True) and lrs[0] < 0.01 and lrs[-1] < 0.002
    with pytest.raises(ConfigError, match="set max_time"):
        config_from_dict(tiny_config(cu_files, tmp_path / "x", scheduler="cosine_time"))


def test_engine_options_blocks_and_devices_are_checked_before_data_is_read(registry, cu_files, tmp_path) -> None:
    from atomforge import check_config

    raw = tiny_config(cu_files, tmp_path / "run")
    raw["deepspeed"] = {"zero_stage": 3}  # another engine's block may stay: switching engines is one line
    config = config_from_dict(raw)
    assert config.engine_options is None and config.to_dict()["deepspeed"] == {"zero_stage": 3}
    check_config(registry, config)
    assert config_from_dict(config.to_dict(), tmp_path).engine_blocks == config.engine_blocks  # round trip
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['optimiser'\].*engines: deepspeed"):
        check_config(registry, config_from_dict({**raw, "optimiser": {"name": "sgd"}}))
    with pytest.raises(ConfigError, match="engine torch has no options block.*training.device"):
        check_config(registry, config_from_dict({**raw, "torch": {"device": "cpu"}}))
    with pytest.raises(ConfigError, match="training.precision: expected one of fp32, bf16"):
        config_from_dict(tiny_config(cu_files, tmp_path / "run", precision="fp16"))
    with pytest.raises(ConfigError, match="training.device: expected auto, cpu, cuda or cuda:N"):
        config_from_dict(tiny_config(cu_files, tmp_path / "run", device="gpu0"))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="sees no CUDA device; use device: cpu"):
            check_config(registry, config_from_dict(tiny_config(cu_files, tmp_path / "run", device="cuda")))
    assert not (tmp_path / "run").exists()  # nothing written by any of the refused configs


def test_bf16_autocast_trains_on_the_cpu_with_fp32_weights(registry, cu_files, tmp_path) -> None:
    """precision: bf16 runs the forward under autocast; weights, optimiser and model file stay fp32,
    and the model still learns (the error falls)."""
    outcome = train(config_from_dict(tiny_config(cu_files, tmp_path / "run", max_epochs=6, precision="bf16",
                                                 device="cpu")), registry, verbose=False)
    history = read_training_state(tmp_path / "run")["history"]
    assert all(torch.isfinite(torch.tensor([h["train_loss"], h["valid_loss"]])).all() for h in history)
    assert history[-1]["valid_metrics"]["forces_mae"] < 0.8 * history[0]["valid_metrics"]["forces_mae"]
    state = read_model_file(outcome.model_path)[2]
    assert {v.dtype for v in state.values() if v.is_floating_point()} <= {torch.float32, torch.float64}


def test_the_torch_engine_passes_the_engine_kit(registry) -> None:
    from atomforge.testing import check_engine

    results = check_engine(registry.get("engines", "torch"))
    assert any(r.name.startswith("resumes") for r in results) and all(r.passed for r in results)
