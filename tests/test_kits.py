"""Conformance kits for UQ heads, oracles, selectors and data sources: every built-in plugin
passes its kit, and a deliberately broken plugin of each kind is rejected with a
ConformanceError naming the check it fails."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, molecule
from ase.calculators.emt import EMT
from ase.io import read, write

from atomforge import (
    CalculatorOracle,
    ConfigError,
    ConformanceError,
    Selection,
    UQHead,
    attach_labels,
    scatter_sum,
)
from atomforge import keys as K
from atomforge.testing import CheckResult, check_data_source, check_oracle, check_selector, check_uq_head

from conftest import cu_structures


def _names(results: list[CheckResult]) -> list[str]:
    assert results and all(isinstance(r, CheckResult) and r.passed for r in results)
    return [r.name for r in results]


def _has(names: list[str], fragment: str) -> bool:
    return any(fragment in name for name in names)


# -- UQ heads ------------------------------------------------------------------------------------
UQ_CASES = [
    ("deep_ensemble", {"num_members": 2}),
    ("deep_ensemble", {"num_members": 2, "vectorize": False}),
    ("shallow_ensemble", {"num_heads": 4}),
    ("shallow_ensemble", {"num_heads": 4, "force_spread": "vector"}),
    ("mc_dropout", {"p": 0.2, "samples": 4}),
    ("latent_distance", {"neighbors": 3}),
    ("latent_distance", {"method": "gmm", "components": 2}),
]


@pytest.mark.parametrize(("name", "options"), UQ_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(UQ_CASES)])
def test_builtin_uq_heads_pass(registry, name: str, options: dict) -> None:
    names = _names(check_uq_head(registry.get("uq_heads", name), options=options))
    for expected in ("finite-difference mean forces (molecule)", "finite-difference mean forces (crystal)",
                     "rotation invariance of energy_std, forces_std (crystal)", "translation invariance of energy_std",
                     "stress on the periodic cell", "model-file round trip", "forces_std_max is the per-structure max"):
        assert _has(names, expected), expected
    stochastic = name == "mc_dropout"  # its samples depend on atom order and batch size
    assert _has(names, "permutation") is not stochastic
    assert _has(names, "batch vs single") is not stochastic
    assert _has(names, "fit(UQFitContext)") is (name in ("deep_ensemble", "latent_distance"))


def test_uq_kit_in_float32(registry) -> None:
    results = check_uq_head(registry.get("uq_heads", "deep_ensemble"), options={"num_members": 2}, dtype=torch.float32)
    rotation = [r for r in results if r.name.startswith("rotation invariance")]
    assert rotation and all(r.tolerance == 1e-4 for r in rotation)


def test_uq_kit_accepts_a_bare_factory_and_restores_torch_rng(registry) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    check_uq_head(registry.get("uq_heads", "deep_ensemble").factory, options={"num_members": 2})
    assert torch.equal(torch.rand(3), expected)


class BrokenHead(UQHead):
    """A UQ head with one deliberate flaw (``flaw``)."""

    def __init__(self, potential, *, flaw: str) -> None:  # noqa: ANN001
        super().__init__(potential)
        self.flaw = flaw
        self.offset = torch.tensor(0.0)  # NOT a buffer: lost in a state_dict round trip ("unsaved")

    def fit(self, context) -> None:  # noqa: ANN001
        if self.flaw == "unsaved":
            self.offset = torch.tensor(0.3)

    def predict(self, batch, *, compute_forces, compute_stress):  # noqa: ANN001, ANN201
        out = self.potential(batch, compute_forces=compute_forces, compute_stress=compute_stress)
        positions = batch[K.POSITIONS].detach()
        size = int(batch[K.N_ATOMS].shape[0])
        centroid = scatter_sum(positions, batch[K.BATCH], size) / batch[K.N_ATOMS].unsqueeze(-1)
        centred = positions - centroid[batch[K.BATCH]]
        spread = 0.1 + self.offset.to(positions.dtype) + 0.0 * centred[:, 0]
        if self.flaw == "negative":
            spread = -spread
        elif self.flaw == "rotation":  # translation invariant (for a molecule), not rotation invariant
            spread = spread + centred[:, 0] ** 2
        elif self.flaw == "forces":  # forces no longer the gradient of the energy
            out[K.FORCES] = out[K.FORCES] * 1.01
        out[K.FORCES_STD] = spread
        out[K.ENERGY_STD] = scatter_sum(spread.pow(2), batch[K.BATCH], size).sqrt()
        if self.flaw == "missing":
            del out[K.ENERGY_STD]
        return out


@pytest.mark.parametrize(("flaw", "failing", "passing"), [
    ("negative", ["stds non-negative"], ["finite-difference", "rotation", "round trip"]),
    ("rotation", ["rotation invariance of energy_std, forces_std (molecule)",
                  "rotation invariance of energy_std, forces_std (crystal)"],
     ["stds non-negative", "finite-difference", "translation invariance of energy_std, forces_std (molecule)"]),
    ("forces", ["finite-difference mean forces (molecule)", "finite-difference mean forces (crystal)"],
     ["rotation", "stds non-negative"]),
    ("missing", ["outputs contain energy, forces, energy_std, forces_std, forces_std_max (missing: ['energy_std'])"],
     []),
    ("unsaved", ["model-file round trip"], ["finite-difference", "rotation", "stds"]),
])
def test_uq_kit_rejects_broken_heads(flaw: str, failing: list[str], passing: list[str]) -> None:
    with pytest.raises(ConformanceError) as raised:
        check_uq_head(BrokenHead, options={"flaw": flaw})
    message = str(raised.value)
    for fragment in failing:
        assert fragment in message, message
    for fragment in passing:
        assert fragment not in message, message


def test_uq_kit_rejects_a_factory_that_returns_no_head() -> None:
    with pytest.raises(ConformanceError, match=r"factory returns an atomforge.UQHead \(found Potential\)"):
        check_uq_head(lambda potential: potential)
    with pytest.raises(ConformanceError, match=r"builds a head — raised TypeError"):
        check_uq_head(BrokenHead, options={"flaw": "negative", "typo": 1})


# -- oracles ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["emt", "lj"])
def test_builtin_metal_oracles_pass(registry, name: str) -> None:
    names = _names(check_oracle(registry.get("oracles", name)))
    for expected in ("factory and options pickle", "input left unchanged", "stress shape", "deterministic",
                     "central differences", "translation invariance of the energy"):
        assert _has(names, expected), expected


def test_lj_oracle_with_options_and_bare_factory(registry) -> None:
    factory = registry.get("oracles", "lj").factory
    _names(check_oracle(factory, options={"sigma": 2.3, "epsilon": 0.2}))


def test_xtb_oracle_passes_on_water(registry) -> None:
    pytest.importorskip("tblite.ase")
    names = _names(check_oracle(registry.get("oracles", "xtb"), structures=[molecule("H2O")], check_forces=True))
    assert _has(names, "central differences") and not _has(names, "stress shape")


class MutatingOracle:
    """Labels the input itself: attaches a calculator to it and returns it."""

    name = "mutating"

    def label(self, atoms: Atoms) -> Atoms:
        atoms.calc = EMT()
        atoms.get_potential_energy()
        return atoms


class FlatForcesOracle:
    """EMT labels with the forces flattened to (3N,)."""

    name = "flat"

    def label(self, atoms: Atoms) -> Atoms:
        work = atoms.copy()
        work.calc = EMT()
        return attach_labels(atoms, energy=work.get_potential_energy(), forces=work.get_forces().reshape(-1))


class WrongSignOracle:
    """EMT energies with the forces' sign flipped (a gradient, not a force)."""

    name = "wrong_sign"

    def label(self, atoms: Atoms) -> Atoms:
        work = atoms.copy()
        work.calc = EMT()
        return attach_labels(atoms, energy=work.get_potential_energy(), forces=-work.get_forces())


class NoisyOracle:
    """EMT plus a little noise on every call (not deterministic)."""

    name = "noisy"

    def label(self, atoms: Atoms) -> Atoms:
        work = atoms.copy()
        work.calc = EMT()
        return attach_labels(atoms, energy=work.get_potential_energy() + random.gauss(0, 1e-3),
                             forces=work.get_forces())


@pytest.mark.parametrize(("oracle", "failing", "passing"), [
    (MutatingOracle, ["input left unchanged", "returns a new object"], ["forces shape", "central differences"]),
    (FlatForcesOracle, ["forces shape: expected (4, 3), found (12,)", "forces shape: expected (3, 3), found (9,)"],
     ["input left unchanged", "energy is a finite number"]),
    (WrongSignOracle, ["central differences, |error| in eV/Å (structure 0", "(structure 1: Cu3)"],
     ["forces shape", "deterministic"]),
    (NoisyOracle, ["deterministic: labelling twice"], ["input left unchanged", "forces shape"]),
])
def test_oracle_kit_rejects_broken_oracles(oracle: type, failing: list[str], passing: list[str]) -> None:
    with pytest.raises(ConformanceError) as raised:
        check_oracle(oracle)
    message = str(raised.value)
    for fragment in failing:
        assert fragment in message, message
    for fragment in passing:
        assert fragment not in message, message


def test_oracle_kit_rejects_unpicklable_options() -> None:
    def make(*, calculator) -> CalculatorOracle:  # noqa: ANN001 - a local function: not picklable either
        return CalculatorOracle("local", calculator)

    with pytest.raises(ConformanceError, match="factory and options pickle .* raised"):
        check_oracle(make, options={"calculator": lambda: EMT()})


# -- selectors ----------------------------------------------------------------------------------------
SELECTOR_CASES = [
    ("trust_window", {"lo": 0.05, "hi": 0.5}),
    ("trust_window", {"lo": 0.5, "hi": 5.0, "adaptive": True}),
    ("top_k", {"hi": 1.0}),
    ("top_k", {"density": 1.0}),
    ("diversity", {"lo": 0.05, "hi": 1.0}),
    ("diversity", {"method": "kmeans", "window": False}),
    ("random", {}),
]


@pytest.mark.parametrize(("name", "options"), SELECTOR_CASES,
                         ids=[f"{n}-{i}" for i, (n, _) in enumerate(SELECTOR_CASES)])
def test_builtin_selectors_pass(registry, name: str, options: dict) -> None:
    names = _names(check_selector(registry.get("selectors", name), options=options))
    for budget in (0, 1, 5, 40, 100):
        assert _has(names, f"budget={budget}, calibration=0.1")
    for expected in ("not mutated", "no candidates (budget 5)", "same seed", "without uncertainties"):
        assert _has(names, expected), expected


class DuplicatingSelector:
    def select(self, candidates, budget, *, calibration=None, seed=0):  # noqa: ANN001, ANN201
        return Selection(tuple([0] * (budget + 1)) if candidates else ())


class MutatingSelector:
    def select(self, candidates, budget, *, calibration=None, seed=0):  # noqa: ANN001, ANN201
        for c in candidates:
            c.atoms.info["seen"] = True
        return Selection(tuple(range(min(budget, len(candidates)))))


class UnseededSelector:
    def select(self, candidates, budget, *, calibration=None, seed=0):  # noqa: ANN001, ANN201
        return Selection(tuple(int(i) for i in np.random.permutation(len(candidates))[:budget]))


class FragileSelector:
    """Chokes on missing uncertainties with a bare TypeError."""

    def select(self, candidates, budget, *, calibration=None, seed=0):  # noqa: ANN001, ANN201
        order = sorted(range(len(candidates)), key=lambda i: -candidates[i].max_force_std)
        return Selection(tuple(order[:budget]))


class ListSelector:
    def select(self, candidates, budget, *, calibration=None, seed=0):  # noqa: ANN001, ANN201
        return list(range(min(budget, len(candidates))))


@pytest.mark.parametrize(("selector", "failing", "passing"), [
    (DuplicatingSelector, ["budget=5, calibration=0.1): a Selection of ≤ budget distinct indices in range "
                           "(problems: duplicate indices [0]; 6 indices for a budget of 5)"], ["not mutated"]),
    (MutatingSelector, ["candidates list, their Atoms (positions, numbers, info) and features not mutated"],
     ["problems: duplicate"]),
    (UnseededSelector, ["same seed gives the same selection"], ["problems: duplicate", "not mutated"]),
    (FragileSelector, ["without uncertainties (max_force_std=None): handled or an AtomforgeError: expected an "
                       "AtomforgeError — raised TypeError"], ["same seed", "budget=5, calibration=0.1"]),
    (ListSelector, ["returned list, not an atomforge.Selection", "no candidates (budget 0) gives an empty Selection "
                    "(found list)"], []),
])
def test_selector_kit_rejects_broken_selectors(selector: type, failing: list[str], passing: list[str]) -> None:
    with pytest.raises(ConformanceError) as raised:
        check_selector(selector)
    message = str(raised.value)
    for fragment in failing:
        assert fragment in message, message
    for fragment in passing:
        assert fragment not in message, message


def test_selector_kit_leaves_global_random_state_alone(registry) -> None:
    np.random.seed(7)
    expected = np.random.rand()
    np.random.seed(7)
    check_selector(registry.get("selectors", "random"))
    assert np.random.rand() == expected


# -- data sources ----------------------------------------------------------------------------------------
@pytest.fixture()
def cu_file(tmp_path: Path) -> Path:
    structures = cu_structures(3, seed=5)
    structures[0].info.update({"charge": 0.0, "spin": 1.0, "fidelity": 1, "weight": 2.0})
    path = tmp_path / "cu.extxyz"
    write(path, structures)
    return path


def test_ase_source_passes(registry, cu_file: Path, tmp_path: Path) -> None:
    spec = registry.get("data_sources", "ase")
    names = _names(check_data_source(spec, options={"path": str(cu_file)}, base_dir=tmp_path,
                                     require=("energy", "forces", "stress")))
    for expected in ("non-empty list of structures (found 3)", "validate_structure", "metadata",
                     "unknown option", "missing file", "a relative path ('cu.extxyz') resolves against base_dir"):
        assert _has(names, expected), expected
    assert read(cu_file, index="0").info["fidelity"] == 1  # the metadata check did see typed metadata
    _names(check_data_source(spec.factory, options={"path": "cu.extxyz", "index": "1:"}, base_dir=tmp_path))


def test_ase_source_without_required_labels_is_rejected(registry, tmp_path: Path) -> None:
    write(tmp_path / "bare.xyz", [bulk("Cu", "fcc", a=3.6, cubic=True)])
    with pytest.raises(ConformanceError, match="validate_structure.*needs a 'energy' label"):
        check_data_source(registry.get("data_sources", "ase"), options={"path": "bare.xyz"}, base_dir=tmp_path,
                          require=("energy",))


@pytest.mark.parametrize(("filename", "fmt"), [("POSCAR", "vasp"), ("cu.cif", "cif")])
def test_pymatgen_source_passes_on_unlabelled_structures(registry, tmp_path: Path, filename: str, fmt: str) -> None:
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True)
    atoms.positions += np.random.default_rng(0).normal(0, 0.02, atoms.positions.shape)
    write(tmp_path / filename, atoms, format=fmt)
    names = _names(check_data_source(registry.get("data_sources", "pymatgen"),
                                     options={"path": str(tmp_path / filename)}, base_dir=tmp_path))
    assert _has(names, "resolves against base_dir") and _has(names, "missing file")


def sloppy_source(options: dict, base_dir: Path) -> list[Atoms]:
    """Ignores unknown options, resolves against the working directory, lets OSError through."""
    path = Path(options["path"])
    if not path.exists():
        raise FileNotFoundError(path)
    return read(path, index=":")


def bad_metadata_source(options: dict, base_dir: Path) -> list[Atoms]:
    options = dict(options)
    path = Path(base_dir) / options.pop("path")
    if options:
        raise ConfigError(f"unknown options {sorted(options)}")
    if not path.exists():
        raise ConfigError(f"no such file: {path}")
    structures = read(path, index=":")
    structures[0].info["fidelity"] = "high"
    structures[1].info["charge"] = float("nan")
    return structures


def test_data_source_kit_rejects_broken_sources(cu_file: Path, tmp_path: Path) -> None:
    with pytest.raises(ConformanceError) as raised:
        check_data_source(sloppy_source, options={"path": str(cu_file)}, base_dir=tmp_path)
    message = str(raised.value)
    assert "an unknown option ('__not_an_option__') raises ConfigError (it was accepted silently)" in message
    assert "a missing file raises an AtomforgeError (ConfigError or DataValidationError), not OSError — " \
           "raised FileNotFoundError" in message
    assert "a relative path ('cu.extxyz') resolves against base_dir" in message
    assert "validate_structure" not in message and "metadata" not in message

    with pytest.raises(ConformanceError) as raised:
        check_data_source(bad_metadata_source, options={"path": "cu.extxyz"}, base_dir=tmp_path)
    message = str(raised.value)
    assert "metadata in info has the right types" in message
    assert "info['fidelity'] = 'high' is not an integer" in message and "info['charge'] = nan" in message
    assert "unknown option" not in message and "missing file" not in message and "relative path" not in message


def test_data_source_kit_rejects_an_empty_result(tmp_path: Path) -> None:
    def nothing(options: dict, base_dir: Path) -> list[Atoms]:
        if options:
            raise ConfigError("no options")
        return []

    with pytest.raises(ConformanceError, match=r"returns a non-empty list of structures \(found 0\)"):
        check_data_source(nothing, options={}, base_dir=tmp_path)
