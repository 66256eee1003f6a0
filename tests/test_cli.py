"""The command line as a user runs it: plugins, train, evaluate, md; errors without tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml
from ase.io import read

from conftest import tiny_config


def atomforge(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    return subprocess.run([sys.executable, "-m", "atomforge", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


def test_plugins_lists_every_kind_with_its_distribution() -> None:
    done = atomforge("plugins")
    assert done.returncode == 0, done.stderr
    for kind in ("backbones", "losses", "data_sources", "uq_heads", "oracles", "explorers", "selectors",
                 "trackers", "engines", "commands", "fields"):
        assert f"{kind}:" in done.stdout
    assert "painn" in done.stdout and "[atomforge]" in done.stdout
    assert "per atom [3], float, label: reference forces" in done.stdout  # batch fields with their kind
    listing = json.loads(atomforge("plugins", "--json").stdout)
    assert {p["name"] for p in listing["plugins"]["backbones"]} >= {"painn"}
    assert {"positions", "charge", "energy", "energy_mask"} <= {f["name"] for f in listing["plugins"]["fields"]}


def test_train_evaluate_md_from_the_command_line(cu_files, tmp_path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_config(cu_files, tmp_path / "run", max_epochs=1)))
    done = atomforge("train", str(config), "--set", "training.max_epochs=2", "--set", "model.hidden_channels=8")
    assert done.returncode == 0, done.stderr
    assert "training" in done.stderr  # the progress bar
    result = json.loads(done.stdout)
    model = Path(result["model"])
    assert model.exists() and result["test_forces_mae"] > 0
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["training"]["max_epochs"] == 2 and saved["model"]["hidden_channels"] == 8

    done = atomforge("evaluate", str(model), str(cu_files["test"]), "--json")
    assert done.returncode == 0, done.stderr
    metrics = json.loads(done.stdout)[str(cu_files["test"])]
    assert metrics["n_structures"] == 8
    assert metrics["forces_mae"] == result["test_forces_mae"]
    assert {"energy_mae", "energy_rmse", "forces_rmse", "stress_mae"} <= set(metrics)
    table = atomforge("evaluate", str(model), str(cu_files["test"])).stdout
    assert "meV/Å" in table and "meV/atom" in table

    traj = tmp_path / "md.extxyz"
    done = atomforge("md", str(model), str(cu_files["test"]), "--steps", "20", "--temperature", "300",
                     "--ensemble", "nve", "--out", str(traj), "--interval", "5")
    assert done.returncode == 0, done.stderr
    frames = read(traj, ":")
    assert len(frames) == 5  # steps 0, 5, 10, 15, 20
    summary = json.loads(done.stdout)
    assert summary["steps"] == 20 and summary["max_energy_deviation_meV_per_atom"] < 50


def test_bad_input_gives_a_message_not_a_traceback(cu_files, tmp_path) -> None:
    done = atomforge("train", str(tmp_path / "missing.yaml"))
    assert done.returncode == 2 and "does not exist" in done.stderr and "Traceback" not in done.stderr
    config = tmp_path / "c.yaml"
    raw = tiny_config(cu_files, tmp_path / "run")
    raw["model"]["backbone"] = "paiNN"
    config.write_text(yaml.safe_dump(raw))
    done = atomforge("train", str(config))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "unknown backbone 'paiNN'; valid names: " in done.stderr and "painn, " in done.stderr
    done = atomforge("evaluate", str(tmp_path / "nope.pt"), str(cu_files["test"]))
    assert done.returncode == 2 and "does not exist" in done.stderr and "Traceback" not in done.stderr


def test_version_prints_the_versions(capsys) -> None:
    import atomforge
    from atomforge.cli import main

    assert main(["--version"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"atomforge {atomforge.__version__} (torch ") and "Python 3." in out
