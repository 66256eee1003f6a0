"""Everyday command-line use (issue 21): --version, md ensembles (NPT; drift only for NVE),
relax (positions and cell), --quiet, an honest ETA, typed JSON and the plugins table."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from ase import Atoms, units
from ase.build import bulk, molecule
from ase.calculators.calculator import Calculator, all_changes
from ase.calculators.emt import EMT
from ase.io import read, write

from atomforge import ConfigError, RelaxResult, relax
from atomforge.analysis.md import run_md
from atomforge.cli import main, quiet_output
from atomforge.workflows.train import ProgressBar, training_eta
from conftest import tiny_config

HEAVY_OPTIONAL = {"sevenn", "chgnet", "deepspeed", "mlflow", "pymatgen", "e3nn", "mace", "matplotlib", "sklearn",
                  "pyscf", "tblite", "alembic", "sqlalchemy"}


def atomforge(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_LOGGING_LEVEL", None)
    return subprocess.run([sys.executable, "-m", "atomforge", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


@pytest.fixture(scope="module")
def quiet_training(cu_files, tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """A real ``atomforge train --quiet`` of a tiny model tracked in MLflow; its model serves the md/relax tests."""
    folder = tmp_path_factory.mktemp("quiet")
    raw = tiny_config(cu_files, folder / "run", max_epochs=2)
    raw["tracking"], raw["model"]["hidden_channels"] = "mlflow", 8
    (folder / "config.yaml").write_text(yaml.safe_dump(raw))
    return atomforge("train", str(folder / "config.yaml"), "--quiet", cwd=folder), folder


@pytest.fixture(scope="module")
def model(quiet_training) -> Path:
    done, folder = quiet_training
    assert done.returncode == 0, done.stderr
    return folder / "run" / "model.pt"


# -- --version ---------------------------------------------------------------------------------------
def test_version_is_the_installed_distribution_version() -> None:
    from atomforge import __version__

    done = atomforge("--version")
    assert done.returncode == 0, done.stderr
    installed = importlib.metadata.version("atomforge")
    assert done.stdout.startswith(f"atomforge {installed} (torch {importlib.metadata.version('torch')}, Python 3.")
    assert installed == __version__  # pyproject.toml and the package agree


# -- --quiet -----------------------------------------------------------------------------------------
def test_train_quiet_prints_no_info_lines_nor_progress(quiet_training) -> None:
    done, folder = quiet_training
    assert done.returncode == 0, done.stderr
    assert (folder / "run" / "mlflow.db").exists() or list(folder.rglob("mlflow.db"))  # MLflow did run
    assert "INFO" not in done.stderr and "training" not in done.stderr and "epoch" not in done.stderr, done.stderr
    assert json.loads(done.stdout)["model"].endswith("model.pt")  # the result is still printed


def test_quiet_output_drops_mlflow_and_alembic_info_and_restores(caplog, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_LOGGING_LEVEL", raising=False)
    before = {name: logging.getLogger(name).level for name in ("mlflow", "alembic")}
    with quiet_output(True):
        assert os.environ["MLFLOW_LOGGING_LEVEL"] == "WARNING"  # what a child process (al run's jobs) reads
        for name in ("mlflow.store.db.utils", "alembic.runtime.migration"):
            assert not logging.getLogger(name).isEnabledFor(logging.INFO)
            assert logging.getLogger(name).isEnabledFor(logging.WARNING)
    assert "MLFLOW_LOGGING_LEVEL" not in os.environ
    assert {name: logging.getLogger(name).level for name in ("mlflow", "alembic")} == before
    monkeypatch.setenv("MLFLOW_LOGGING_LEVEL", "ERROR")  # a stricter level the user chose wins
    with quiet_output(True):
        assert not logging.getLogger("mlflow").isEnabledFor(logging.WARNING)
    assert os.environ["MLFLOW_LOGGING_LEVEL"] == "ERROR"


# -- ETA -----------------------------------------------------------------------------------------------
def test_eta_is_the_sooner_of_max_epochs_and_max_time() -> None:
    assert training_eta(2, 100, 20.0, None) == (980.0, "max_epochs")  # 10 s/epoch, 98 epochs left
    assert training_eta(2, 100, 20.0, 60.0) == (40.0, "max_time")  # max_time stops it in 40 s
    assert training_eta(98, 100, 980.0, 5000.0) == (20.0, "max_epochs")  # the epochs end first
    assert training_eta(5, 100, 70.0, 60.0) == (0.0, "max_time")  # past the limit (the epoch in flight)
    assert training_eta(0, 10, 0.0, 60.0) == (0.0, "max_epochs")  # nothing measured yet


def test_progress_bar_shows_the_max_time_eta(capsys) -> None:
    from atomforge import EpochRecord

    bar = ProgressBar(max_epochs=1000, max_time=120.0)
    bar.on_epoch_end(None, EpochRecord(epoch=3, lr=0.01, train_loss=1.0, valid_loss=1.0, valid_metrics={},
                                       elapsed=30.0, steps=4))
    bar.bar.refresh()
    shown = capsys.readouterr().err
    bar.bar.close()
    assert "ETA 01:30 (max_time)" in shown and "3/1000" in shown  # 120 s - 30 s, not 997 × 10 s


# -- md ---------------------------------------------------------------------------------------------------
def test_md_reports_energy_drift_only_for_nve() -> None:
    cu = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(2)
    nve = run_md(cu, EMT(), steps=20, temperature=300, ensemble="nve", progress=False)
    nvt = run_md(cu, EMT(), steps=20, temperature=300, ensemble="nvt", progress=False)
    assert nve.energy_drift_meV_per_atom_per_ps is not None and nve.max_energy_deviation_meV_per_atom < 5
    assert nvt.energy_drift_meV_per_atom_per_ps is None and nvt.max_energy_deviation_meV_per_atom is None
    assert nvt.mean_volume_A3 == pytest.approx(cu.get_volume()) and nvt.mean_pressure_GPa is not None
    gas = run_md(molecule("H2O"), _NoStress(), steps=5, temperature=300, ensemble="nvt", progress=False)
    assert gas.mean_volume_A3 is None and gas.mean_pressure_GPa is None  # no cell: no volume, no pressure


@pytest.mark.parametrize("barostat", ["mtk", "berendsen"])
def test_npt_moves_a_stretched_cu_cell_toward_equilibrium(barostat: str) -> None:
    stretched = bulk("Cu", "fcc", a=3.70, cubic=True).repeat(2)  # EMT's Cu: a = 3.590 Å (11.57 Å³/atom)
    v0, v_eq = stretched.get_volume() / len(stretched), 11.57
    tension = run_md(stretched, EMT(), steps=1, temperature=1, ensemble="nvt", progress=False).mean_pressure_GPa
    assert tension < -5  # the stretched cell pulls inwards
    npt = run_md(stretched, EMT(), steps=100, temperature=300, ensemble="npt", timestep_fs=2.0, barostat=barostat,
                 thermostat_time_fs=50, barostat_time_fs=100, compressibility_per_GPa=0.007, progress=False)
    v = npt.final_volume_A3 / len(stretched)
    assert abs(v - v_eq) < 0.5 * abs(v0 - v_eq), (v0, v, v_eq)
    assert npt.energy_drift_meV_per_atom_per_ps is None and abs(npt.mean_pressure_GPa) < abs(tension)


def test_npt_needs_a_periodic_cell_and_stress() -> None:
    with pytest.raises(ConfigError, match="periodic in x, y and z"):
        run_md(molecule("H2O"), EMT(), steps=2, temperature=300, ensemble="npt", progress=False)
    with pytest.raises(ConfigError, match="needs the stress"):
        run_md(bulk("Cu", cubic=True), _NoStress(), steps=2, temperature=300, ensemble="npt", progress=False)


def test_md_command_npt_and_nvt_reports(model, cu_files, tmp_path, capsys) -> None:
    args = ["md", str(model), str(cu_files["test"]), "--steps", "6", "--temperature", "300", "--quiet",
            "--out", str(tmp_path / "md.extxyz"), "--interval", "3"]
    assert main([*args, "--ensemble", "npt", "--pressure", "1.5", "--barostat-time", "100"]) == 0
    npt = json.loads(capsys.readouterr().out)
    assert npt["ensemble"] == "npt" and {"mean_pressure_GPa", "mean_volume_A3", "final_volume_A3"} <= set(npt)
    assert "energy_drift_meV_per_atom_per_ps" not in npt and len(read(tmp_path / "md.extxyz", ":")) == 3
    assert main([*args, "--ensemble", "nvt"]) == 0
    out = capsys.readouterr()
    assert "energy_drift_meV_per_atom_per_ps" not in json.loads(out.out) and "MD NVT" not in out.err  # quiet
    assert main([*args, "--ensemble", "nve"]) == 0
    assert "energy_drift_meV_per_atom_per_ps" in json.loads(capsys.readouterr().out)
    write(tmp_path / "water.xyz", molecule("H2O"))
    assert main(["md", str(model), str(tmp_path / "water.xyz"), "--steps", "2", "--temperature", "300",
                 "--ensemble", "npt"]) == 2
    assert "NPT needs a structure periodic" in capsys.readouterr().err
    assert main([*args, "--device", "cuda:7"]) == 2
    assert "cuda" in capsys.readouterr().err


# -- relax --------------------------------------------------------------------------------------------------
def test_relax_positions_lowers_the_energy_to_fmax(tmp_path) -> None:
    rattled = bulk("Cu", "fcc", a=3.59, cubic=True).repeat(2)
    rattled.rattle(0.1, seed=3)
    result = relax(rattled, EMT(), fmax=0.01, trajectory=tmp_path / "t.extxyz")
    assert isinstance(result, RelaxResult) and result.converged and result.fmax < 0.01 < result.initial_fmax
    assert result.energy < result.initial_energy - 0.05 and result.volume == pytest.approx(result.initial_volume)
    assert np.abs(result.atoms.get_forces()).max() < 0.01 and rattled.calc is None  # the input is untouched
    frames = read(tmp_path / "t.extxyz", ":")
    assert len(frames) == result.steps + 1 and [f.info["relax_step"] for f in frames] == list(range(len(frames)))
    assert frames[0].get_potential_energy() == pytest.approx(result.initial_energy)
    assert frames[-1].get_potential_energy() == pytest.approx(result.energy) and frames[-1].get_stress().shape == (6,)


def test_cell_relax_finds_the_emt_lattice_constant_and_obeys_pressure() -> None:
    def energy(a: float) -> float:
        atoms = bulk("Cu", "fcc", a=a, cubic=True)
        atoms.calc = EMT()
        return atoms.get_potential_energy()

    grid = np.linspace(3.55, 3.63, 5)
    fit = np.polyfit(grid, [energy(a) for a in grid], 2)
    a_eq = -fit[1] / (2 * fit[0])  # independent of the optimiser: the minimum of E(a)
    strained = bulk("Cu", "fcc", a=3.75, cubic=True)
    result = relax(strained, EMT(), fmax=0.002, cell=True)
    assert result.converged and result.volume < result.initial_volume
    assert result.volume ** (1 / 3) == pytest.approx(a_eq, abs=2e-3)
    squeezed = relax(strained, EMT(), fmax=0.002, cell=True, pressure=5.0, optimizer="fire", steps=2000)
    pressure = -np.mean(squeezed.atoms.get_stress()[:3]) / units.GPa
    assert squeezed.converged and squeezed.volume < result.volume and pressure == pytest.approx(5.0, abs=0.1)


def test_relax_reports_not_converged_and_refuses_bad_settings() -> None:
    rattled = bulk("Cu", "fcc", a=3.59, cubic=True).repeat(2)
    rattled.rattle(0.1, seed=3)
    stopped = relax(rattled, EMT(), fmax=1e-4, steps=2)
    assert not stopped.converged and stopped.steps == 2 and stopped.atoms.info["relax_converged"] is False
    with pytest.raises(ConfigError, match="periodic in x, y and z"):
        relax(molecule("H2O"), EMT(), cell=True)
    with pytest.raises(ConfigError, match="needs the stress"):
        relax(bulk("Cu", cubic=True), _NoStress(), cell=True)
    with pytest.raises(ConfigError, match="pass cell=True"):
        relax(rattled, EMT(), pressure=1.0)
    with pytest.raises(ConfigError, match="BFGS, LBFGS, FIRE"):
        relax(rattled, EMT(), optimizer="newton")


def test_relax_command_relaxes_every_frame_and_exits_1_when_not_converged(model, tmp_path, capsys) -> None:
    cell = bulk("Cu", "fcc", a=3.70, cubic=True)
    rattled = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((1, 1, 2))
    rattled.rattle(0.05, seed=1)
    write(tmp_path / "in.extxyz", [cell, rattled])
    out, traj = tmp_path / "relaxed.extxyz", tmp_path / "traj.extxyz"
    assert main(["relax", str(model), str(tmp_path / "in.extxyz"), "--optimizer", "FIRE", "--fmax", "0.05",
                 "--steps", "300", "--out", str(out), "--trajectory", str(traj)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["converged"] is True and [s["structure"] for s in report["structures"]] == [0, 1]
    relaxed = read(out, ":")
    assert len(relaxed) == 2 and all(np.abs(a.get_forces()).max() < 0.05 for a in relaxed)
    assert all(s["energy"] <= s["initial_energy"] for s in report["structures"])
    assert relaxed[1].get_stress().shape == (6,) and relaxed[1].info["relax_converged"] is True
    steps = read(traj, ":")
    assert len(steps) == sum(s["steps"] + 1 for s in report["structures"])
    assert {f.info["structure"] for f in steps} == {0, 1}
    assert main(["relax", str(model), str(tmp_path / "in.extxyz"), "--cell", "--fmax", "1e-6", "--steps", "1",
                 "--out", str(out), "--quiet"]) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out)["converged"] is False and "did not reach fmax" in captured.err
    assert len(read(out, ":")) == 2  # the last configurations are written all the same


# -- typed JSON, plugins --------------------------------------------------------------------------------------
def test_al_export_json_has_numbers_and_booleans(tmp_path, capsys) -> None:
    campaign = tmp_path / "campaign"
    (campaign / "iterations" / "000" / "train").mkdir(parents=True)
    (campaign / "iterations" / "000" / "train" / "model.pt").write_bytes(b"weights")
    (campaign / "state.json").write_text(json.dumps({"phase": "done", "final_iteration": 0, "iteration": 1,
                                                     "history": []}))
    write(campaign / "initial.extxyz", [bulk("Cu", cubic=True)] * 3)
    assert main(["al", "export", str(campaign), "--out", str(tmp_path / "out")]) == 0
    exported = json.loads(capsys.readouterr().out)
    assert exported["structures"] == 3 and exported["final"] is True
    assert isinstance(exported["model"], str) and Path(exported["dataset"]).exists()


def test_plugins_table_columns_line_up(capsys) -> None:
    assert main(["plugins"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  ") and "[" in line]
    assert len(rows) > 20 and len({row.index("[") for row in rows}) == 1  # one distribution column
    assert any(row.strip().startswith("rotation_augmentation ") for row in rows)  # the longest name lines up too
    descriptions = {row.index("]", row.index("[")) for row in rows if "[atomforge]" in row}
    assert len(descriptions) == 1


def test_plugins_imports_no_heavy_optional_package() -> None:
    """``atomforge plugins`` (and every command's start) stays fast: plugins import their heavy
    optional packages inside their factories, never at module level."""
    code = ("import sys, io, contextlib\nfrom atomforge.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n    main(['plugins'])\n"
            "print(sorted({m.split('.')[0] for m in sys.modules}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    assert HEAVY_OPTIONAL.isdisjoint(ast.literal_eval(done.stdout.strip().splitlines()[-1])), done.stdout


class _NoStress(Calculator):
    """A calculator without stress (energy and forces of EMT's Cu are irrelevant: a harmonic well)."""

    implemented_properties = ["energy", "forces"]

    def calculate(self, atoms: Atoms | None = None, properties=("energy",), system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        displacement = self.atoms.positions - self.atoms.positions.mean(axis=0)
        self.results = {"energy": 0.5 * float((displacement**2).sum()), "forces": -displacement}
