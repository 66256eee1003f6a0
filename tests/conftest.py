"""Shared fixtures: one torch thread, no MLflow telemetry, small EMT-labelled Cu data sets."""

from __future__ import annotations

import os

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from ase import Atoms  # noqa: E402
from ase.build import bulk  # noqa: E402
from ase.calculators.emt import EMT  # noqa: E402
from ase.io import write  # noqa: E402

from atomforge import Registry, attach_labels, make_registry  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def registry() -> Registry:
    """The registry as a user gets it (built-ins + installed entry points)."""
    return make_registry()


def emt_label(atoms: Atoms) -> Atoms:
    """A labelled copy (energy, forces, stress) computed with ASE's EMT."""
    work = atoms.copy()
    work.calc = EMT()
    stress = work.get_stress() if work.pbc.all() else None
    return attach_labels(atoms, energy=work.get_potential_energy(), forces=work.get_forces(), stress=stress)


def cu_structures(n: int, seed: int = 0, repeat: tuple[int, int, int] = (1, 1, 2)) -> list[Atoms]:
    """``n`` rattled and strained 8-atom Cu cells labelled with EMT."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(repeat)
        atoms.set_cell(atoms.cell[:] @ (np.eye(3) + np.diag(rng.uniform(-0.02, 0.02, 3))), scale_atoms=True)
        atoms.positions += rng.normal(0, 0.08, atoms.positions.shape)
        out.append(emt_label(atoms))
    return out


@pytest.fixture(scope="session")
def cu_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Train (24) and test (8) EMT Cu structures as extxyz files."""
    return write_cu_sets(tmp_path_factory.mktemp("cu"), {"train": (24, 1), "test": (8, 2)})


def write_cu_sets(folder: Path, sets: dict[str, tuple[int, int]]) -> dict[str, Path]:
    """``folder/<name>.extxyz`` with ``count`` EMT Cu structures (seed ``seed``) per ``name: (count, seed)``."""
    paths = {name: folder / f"{name}.extxyz" for name in sets}
    for name, (count, seed) in sets.items():
        write(paths[name], cu_structures(count, seed=seed))
    return paths


def tiny_config(cu_files: dict[str, Path], output: Path, **training: object) -> dict:
    """A small, fast training config (plain data, as read from YAML)."""
    return {
        "data": {"train": str(cu_files["train"]), "test": str(cu_files["test"]), "valid_fraction": 0.25},
        "model": {"backbone": "painn", "cutoff": 4.0, "hidden_channels": 16, "num_layers": 2, "num_rbf": 8},
        "loss": [{"name": "energy", "weight": 1.0}, {"name": "forces", "weight": 10.0}],
        "training": {"max_epochs": 3, "batch_size": 4, "lr": 0.005, "seed": 3, **training},
        "output": str(output),
        "tracking": "none",
    }


# -- active-learning campaigns (tests/test_active_learning.py, tests/test_al_deepspeed.py) ---------
@pytest.fixture(scope="module")
def al_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """10 initial and 4 test EMT Cu structures for mini campaigns."""
    return write_cu_sets(tmp_path_factory.mktemp("al"), {"initial": (10, 1), "test": (4, 2)})


def campaign_raw(files: dict[str, Path], output: Path, uq: dict | None = None, **extra: object) -> dict:
    """A mini EMT campaign (plain data, as read from YAML); ``extra`` replaces top-level keys."""
    uq = uq if uq is not None else {"name": "deep_ensemble", "num_members": 2}
    raw = {
        "initial_data": str(files["initial"]), "test": str(files["test"]),
        "oracle": {"name": "emt", "timeout": 30, "retries": 1},
        "train": {"model": {"backbone": "painn", "cutoff": 4.0, "hidden_channels": 8, "num_layers": 1, "num_rbf": 6},
                  "uq": uq, "training": {"max_epochs": 2, "batch_size": 4, "lr": 0.005}},
        "explorers": [{"name": "md", "temperatures": [800], "steps": 20, "interval": 5},
                      {"name": "perturb", "n_per_start": 3, "rattle_std": 0.1}],
        "selector": {"name": "trust_window", "lo": 0.0, "hi": 1000.0},
        "budget": {"per_iteration": 3, "total": 6}, "stop": {"max_iterations": 2},
        "starts_per_iteration": 2, "executor": {"kind": "serial"}, "tracking": "none", "output": str(output),
    }
    raw.update(extra)
    return raw


def journal_keys(directory: Path) -> list[str]:
    """The label journal's keys, in order."""
    import json

    return [json.loads(line)["key"] for line in (directory / "journal.jsonl").read_text().splitlines()]
