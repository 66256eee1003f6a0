"""Label oracles: the built-ins, and the failure handling every label call goes through."""

from __future__ import annotations

import time

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, molecule
from ase.calculators.calculator import Calculator, all_changes
from ase.calculators.emt import EMT

from atomforge import ConfigError, LabelResult, get_labels, label_safely


class FakeCalc(Calculator):
    """EMT, except for a chosen misbehaviour: raise, NaN forces, or sleep."""

    implemented_properties = ["energy", "forces"]

    def __init__(self, mode: str = "ok", **kwargs) -> None:
        super().__init__(**kwargs)
        self.mode = mode

    def calculate(self, atoms=None, properties=None, system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        if self.mode == "raise":
            raise RuntimeError("the calculation exploded")
        if self.mode == "sleep":
            time.sleep(5)
        emt = EMT()
        emt.calculate(self.atoms, ["energy", "forces"], all_changes)
        self.results = dict(emt.results)
        if self.mode == "nan":
            self.results["forces"] = self.results["forces"] * np.nan


class Flaky:
    """Fails on the first ``failures`` calls, then labels with EMT."""

    name = "flaky"

    def __init__(self, failures: int) -> None:
        self.failures, self.calls = failures, 0

    def label(self, atoms: Atoms) -> Atoms:
        self.calls += 1
        if self.calls <= self.failures:
            raise ConnectionError("cluster node went away")
        from atomforge import CalculatorOracle

        return CalculatorOracle("emt", EMT).label(atoms)


def _cu() -> Atoms:
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.positions[0] += 0.1
    return atoms


def _oracle(registry, mode: str):
    return registry.get("oracles", "ase_calculator").factory(calculator="test_oracles:FakeCalc", mode=mode)


def test_every_builtin_oracle_is_registered(registry) -> None:
    assert {"emt", "lj", "xtb", "pyscf", "chgnet", "sevenn", "ase_calculator"} <= set(registry.names("oracles"))


def test_a_good_label_is_returned_with_its_key(registry) -> None:
    result = label_safely(_oracle(registry, "ok"), _cu(), key="abc", timeout=30, retries=2)
    assert isinstance(result, LabelResult) and result.ok and result.key == "abc" and result.attempts == 1
    assert get_labels(result.atoms).forces.shape == (4, 3)


@pytest.mark.parametrize("mode, reason", [("raise", "RuntimeError: the calculation exploded"),
                                          ("nan", "non-finite forces")])
def test_failures_are_recorded_with_their_reason_after_retries(registry, mode, reason) -> None:
    result = label_safely(_oracle(registry, mode), _cu(), key="k", retries=2)
    assert not result.ok and result.atoms is None and reason in result.error
    assert result.attempts == 3


def test_a_hung_calculation_times_out_and_is_not_retried(registry) -> None:
    started = time.perf_counter()
    result = label_safely(_oracle(registry, "sleep"), _cu(), timeout=0.3, retries=3)
    assert not result.ok and result.error.startswith("OracleTimeout") and result.attempts == 1
    assert time.perf_counter() - started < 2.0


def test_a_hung_calculation_also_times_out_in_a_thread_pool(registry) -> None:
    """Off the main thread (thread pools, dask workers) no signal can interrupt the call: the
    attempt is abandoned instead, and the worker is free again."""
    from concurrent.futures import ThreadPoolExecutor

    started = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(label_safely, _oracle(registry, mode), _cu(), timeout=0.3, retries=2)
                   for mode in ("sleep", "ok")]
        hung, fine = (f.result(timeout=10) for f in futures)
    assert not hung.ok and hung.error.startswith("OracleTimeout") and "abandoned" in hung.error
    assert hung.attempts == 1 and fine.ok
    assert time.perf_counter() - started < 3.0


def test_a_transient_failure_is_retried() -> None:
    flaky = Flaky(failures=1)
    result = label_safely(flaky, _cu(), retries=1)
    assert result.ok and result.attempts == 2 and flaky.calls == 2
    assert not label_safely(Flaky(failures=2), _cu(), retries=1).ok


def test_a_missing_extra_names_what_to_install(registry, monkeypatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_pyscf(name, *args, **kwargs):
        if name.startswith("pyscf"):
            raise ImportError("No module named 'pyscf'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pyscf)
    with pytest.raises(ConfigError, match=r"atomforge\[dft\]"):
        registry.get("oracles", "pyscf").factory()


def test_pyscf_dft_forces_match_finite_differences(registry) -> None:
    pytest.importorskip("pyscf", reason="pyscf not installed: pip install 'atomforge[dft]'")
    oracle = registry.get("oracles", "pyscf").factory(xc="PBE", basis="sto-3g")
    water = molecule("H2O")
    labels = get_labels(oracle.label(water))
    delta, energies = 1e-3, []
    for sign in (1, -1):
        moved = water.copy()
        moved.positions[0, 2] += sign * delta
        energies.append(get_labels(oracle.label(moved)).energy)
    assert labels.forces[0, 2] == pytest.approx(-(energies[0] - energies[1]) / (2 * delta), abs=2e-3)
    assert abs(labels.forces.sum(0)).max() < 1e-3 and labels.stress is None


def test_pyscf_unconverged_scf_is_a_recorded_failure(registry) -> None:
    pytest.importorskip("pyscf", reason="pyscf not installed: pip install 'atomforge[dft]'")
    oracle = registry.get("oracles", "pyscf").factory(xc="PBE", basis="sto-3g", max_cycle=1)
    result = label_safely(oracle, molecule("H2O"), retries=0)
    assert not result.ok and "SCF not converged" in result.error


@pytest.mark.parametrize("name", ["chgnet", "sevenn"])
def test_pretrained_universal_potentials_label_copper(registry, name) -> None:
    pytest.importorskip(name, reason=f"{name} not installed: pip install 'atomforge[{name}]'")
    oracle = registry.get("oracles", name).factory()
    labelled = [get_labels(oracle.label(_cu())) for _ in range(2)]  # the calculator is reused
    energy_per_atom = labelled[0].energy / 4
    assert -5.0 < energy_per_atom < -3.0  # Cu cohesive energy ≈ 3.5-4.1 eV/atom in these models
    assert labelled[0].forces.shape == (4, 3) and labelled[0].stress.shape == (3, 3)
    assert labelled[1].energy == pytest.approx(labelled[0].energy, abs=1e-5)
