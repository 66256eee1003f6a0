"""Explorers: MD stopped at the upper trust level, perturbations, normal modes."""

from __future__ import annotations

import numpy as np
import pytest
from ase.build import bulk, molecule
from ase.calculators.calculator import Calculator, all_changes
from ase.calculators.emt import EMT


class DriftingUQ(Calculator):
    """EMT plus a fake force std that grows with the distance travelled from the first call."""

    implemented_properties = ["energy", "forces", "stress"]

    def __init__(self, rate: float = 1.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.rate, self.origin, self.seen = rate, None, []

    def calculate(self, atoms=None, properties=None, system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        emt = EMT()
        emt.calculate(self.atoms, ["energy", "forces", "stress"], all_changes)
        self.results = dict(emt.results)
        if self.origin is None:
            self.origin = self.atoms.positions.copy()
        moved = np.linalg.norm(self.atoms.positions - self.origin, axis=1)
        self.results["forces_std"] = self.rate * moved
        self.seen.append(float(moved.max() * self.rate))


def _cu():
    return bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 1, 1))


def test_md_stops_when_the_force_std_reaches_hi(registry) -> None:
    explorer = registry.get("explorers", "md").factory(temperatures=[600], steps=400, interval=5)
    calc = DriftingUQ(rate=1.0)
    frames = explorer.explore([_cu()], calc, hi=0.2, seed=0)
    assert calc.seen[-1] >= 0.2 and all(s < 0.2 for s in calc.seen[:-1])  # stopped at the first crossing
    assert len(calc.seen) < 400 and frames and frames[-1].info["explorer"] == "md"
    assert all(f.calc is None for f in frames)


def test_md_without_uncertainty_runs_to_the_end_at_each_temperature(registry) -> None:
    explorer = registry.get("explorers", "md").factory(temperatures=[300, 900], steps=20, interval=10)
    frames = explorer.explore([_cu()], EMT(), hi=0.2, seed=0)
    assert [(f.info["temperature"], f.info["step"]) for f in frames] == [(300, 10), (300, 20), (900, 10), (900, 20)]


class Refusing(EMT):
    """EMT that refuses (like the model's graph check on overlapping atoms) from call ``after`` on."""

    def __init__(self, after: int) -> None:
        super().__init__()
        self.after, self.calls = after, 0

    def calculate(self, atoms=None, properties=None, system_changes=all_changes) -> None:
        self.calls += 1
        if self.calls > self.after:
            from atomforge import DataValidationError

            raise DataValidationError("structure: atoms 0 and 1 are 0.02 Å apart")
        super().calculate(atoms, properties, system_changes)


def test_a_trajectory_the_calculator_refuses_ends_without_failing_the_others(registry, caplog) -> None:
    explorer = registry.get("explorers", "md").factory(temperatures=[300, 900], steps=20, interval=5)
    frames = explorer.explore([_cu()], Refusing(after=12), hi=None, seed=0)
    # the 300 K run stops at its 12th step (frames at 5, 10); the 900 K run gets refused at once
    assert [(f.info["temperature"], f.info["step"]) for f in frames] == [(300, 5), (300, 10)]
    assert "stopped at step" in caplog.text and "0.02 Å apart" in caplog.text


def test_npt_md_changes_the_cell(registry) -> None:
    explorer = registry.get("explorers", "md").factory(temperatures=[300], steps=20, interval=20,
                                                       ensemble="npt", pressure_gpa=5.0, taup_fs=50)
    start = _cu()
    frames = explorer.explore([start], EMT(), hi=None, seed=0)
    assert frames[-1].get_volume() < start.get_volume()


def test_perturb_rattles_and_strains(registry) -> None:
    explorer = registry.get("explorers", "perturb").factory(n_per_start=4, rattle_std=0.05, strain=0.03)
    start = _cu()
    frames = explorer.explore([start], EMT(), hi=None, seed=1)
    assert len(frames) == 4 and len({round(f.get_volume(), 6) for f in frames}) == 4
    assert all(0 < np.abs(f.positions - start.positions).max() < 0.5 for f in frames)


def test_normal_mode_sampling_keeps_the_molecule_bonded(registry) -> None:
    from ase.calculators.emt import EMT as Emt

    explorer = registry.get("explorers", "normal_modes").factory(temperature=300, n_per_start=5)
    start = molecule("CH4")
    start.center(vacuum=3.0)
    frames = explorer.explore([start], Emt(), hi=None, seed=0)
    assert len(frames) == 5
    for frame in frames:
        shift = frame.positions - start.positions
        assert 1e-4 < np.abs(shift).max() < 0.5
        assert np.abs(shift.T @ frame.get_masses()).max() < 1e-6  # no centre-of-mass motion


def test_normal_modes_reject_periodic_structures(registry) -> None:
    from atomforge import ConfigError

    with pytest.raises(ConfigError, match="molecules"):
        registry.get("explorers", "normal_modes").factory().explore([_cu()], EMT(), hi=None, seed=0)


def test_exploded_frames_are_recognised_through_periodic_images() -> None:
    from ase.build import bulk, molecule

    from atomforge.exploration.records import min_distance_ratio, unphysical_reason

    cell = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(2)
    assert 0.9 < min_distance_ratio(cell) < 1.0  # 2.55 Å / (2 × 1.32 Å)
    assert min_distance_ratio(bulk("Cu", "fcc", a=3.61)) == pytest.approx(min_distance_ratio(cell))  # 1 atom: images
    assert unphysical_reason(molecule("CH3CH2OH"), 0.5) is None
    crushed = cell.copy()
    crushed.positions[1] = crushed.positions[0] + [0.5, 0.0, 0.0]
    assert "atoms overlap" in unphysical_reason(crushed, 0.5)
    across = cell.copy()  # the clash is with a periodic image of atom 0
    across.positions[1] = across.positions[0] + across.cell[0] - [0.4, 0.0, 0.0]
    assert "atoms overlap" in unphysical_reason(across, 0.5)
    assert unphysical_reason(crushed, None) is None
    crushed.positions[2] = float("nan")
    assert unphysical_reason(crushed, None) == "non-finite positions"
