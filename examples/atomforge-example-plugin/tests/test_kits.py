"""Every plugin of the example package passes atomforge's conformance kit of its kind, exactly as
a third-party plugin author would run them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from ase import Atoms, units
from ase.build import molecule

from atomforge import ConfigError, get_labels, make_plugin_manager, make_registry
from atomforge.testing import check_data_source, check_oracle, check_selector, check_uq_head
from atomforge_example_plugin import plugin


def _spec(kind: str, name: str):
    return make_registry(make_plugin_manager(entry_points=False, builtins=(), extra=[plugin])).get(kind, name)


def _morse_dimers() -> list[Atoms]:
    return [Atoms("H2", positions=[[0, 0, 0], [0, 0, d]]) for d in (0.9, 1.1)] + [
        Atoms("H3", positions=[[0, 0, 0], [0, 0, 1.0], [0, 0.95, 0.3]])]


def test_example_morse_passes_the_oracle_kit() -> None:
    results = check_oracle(_spec("oracles", "example_morse"), options={"epsilon": 0.5, "r0": 1.0, "rho0": 5.0},
                           structures=_morse_dimers())
    assert any("finite" in r.name for r in results)


def test_example_energy_std_passes_the_selector_kit() -> None:
    check_selector(_spec("selectors", "example_energy_std"))


def test_example_bootstrap_readout_passes_the_uq_kit() -> None:
    results = check_uq_head(_spec("uq_heads", "example_bootstrap_readout"), options={"members": 4})
    assert any("rotation" in r.name for r in results)


def _write_md17(path: Path, frames: int = 6) -> None:
    rng = np.random.default_rng(0)
    water = molecule("H2O")
    np.savez(path, z=water.numbers, R=water.positions + rng.normal(0, 0.02, (frames, 3, 3)),
             E=rng.normal(-47_000, 1, (frames, 1)), F=rng.normal(0, 10, (frames, 3, 3)))


def test_example_md17_passes_the_data_source_kit(tmp_path: Path) -> None:
    _write_md17(tmp_path / "water.npz")
    check_data_source(_spec("data_sources", "example_md17"), options={"path": str(tmp_path / "water.npz")},
                      base_dir=tmp_path, require=("energy", "forces"))


def test_example_md17_converts_kcal_per_mol_to_ev(tmp_path: Path) -> None:
    _write_md17(tmp_path / "water.npz")
    raw = np.load(tmp_path / "water.npz")
    read = _spec("data_sources", "example_md17").factory
    frames = read({"path": "water.npz", "stride": 2}, tmp_path)
    assert len(frames) == 3
    labels = get_labels(frames[1])
    assert labels.energy == pytest.approx(float(raw["E"][2, 0]) * units.kcal / units.mol)
    assert labels.forces == pytest.approx(raw["F"][2] * units.kcal / units.mol)
    with pytest.raises(ConfigError, match="energy_unit"):
        read({"path": "water.npz", "energy_unit": "hartree"}, tmp_path)
