"""torch-sim adapter: torch-sim's own conformance check, batched = one-by-one ASE, MD and
relaxation through torch-sim, the batched ``md`` explorer, clear errors.

torch-sim (the ``torchsim`` extra) is part of the ``test`` extra on Python ≥ 3.11; elsewhere
these tests are skipped.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms, units
from ase.build import bulk, molecule
from ase.calculators.emt import EMT
from ase.geometry import find_mic

ts = pytest.importorskip("torch_sim")

from torch_sim.models.interface import ModelInterface, validate_model_outputs  # noqa: E402

from atomforge import (  # noqa: E402
    ConfigError,
    DataValidationError,
    ModelFileError,
    load_calculator,
    save_model,
    torchsim_model,
    uncertainty_of,
)
from atomforge.model.modelfile import build_model  # noqa: E402

CPU = torch.device("cpu")
ELEMENTS = [1, 6, 8, 14, 26, 29]  # molecules, Cu, and the Si/Fe of torch-sim's validator


def _config(**extra: object) -> dict:
    n = len(ELEMENTS)
    return {"backbone": "painn", "cutoff": 4.0, "elements": ELEMENTS, "dtype": "float64",
            "atomic_energies": [-0.5 * (k + 1) for k in range(n)], "scale": 0.4, "shift": 0.0,
            "options": {"hidden_channels": 16, "num_layers": 2, "num_rbf": 8}, **extra}


def _write(path: Path, config: dict, seed: int, registry) -> Path:  # noqa: ANN001
    torch.manual_seed(seed)
    return save_model(build_model(config, registry), path, config=config)


@pytest.fixture(scope="module")
def models(tmp_path_factory, registry) -> dict[str, Path]:
    """Untrained float64 PaiNN model files: plain, a 3-member deep ensemble, two heads."""
    folder = tmp_path_factory.mktemp("torchsim")
    n = len(ELEMENTS)
    return {
        "plain": _write(folder / "plain.pt", _config(), 0, registry),
        "uq": _write(folder / "uq.pt", _config(uq={"name": "deep_ensemble", "options": {"num_members": 3}}), 1,
                     registry),
        "heads": _write(folder / "heads.pt", _config(heads=["low", "high"], scale=[0.4, 0.3], shift=[0.0, 0.1],
                                                      atomic_energies=[[-1.0] * n, [-2.0] * n]), 2, registry),
    }


def _molecules() -> list[Atoms]:
    out = [molecule("CH3CH2OH"), molecule("H2O"), molecule("CH4"), molecule("CH3CH2OH")]
    for k, atoms in enumerate(out):
        atoms.rattle(0.05, seed=k)
    return out


def _cells() -> list[Atoms]:
    """Cu cells of different sizes and shapes; the primitive one is smaller than the cutoff."""
    out = [bulk("Cu", "fcc", a=3.6), bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 1, 1)),
           bulk("Cu", "fcc", a=3.7, cubic=True)]
    out[2].set_cell(out[2].cell[:] @ np.array([[1, 0.05, 0], [0, 1, 0], [0, 0, 0.98]]), scale_atoms=True)
    for k, atoms in enumerate(out):
        atoms.rattle(0.05, seed=10 + k)
    return out


def test_torch_sims_own_validator_passes(models) -> None:
    for name in ("plain", "uq", "heads"):
        for dtype in (torch.float64, torch.float32):  # a float64 model, states of either dtype
            model = torchsim_model(models[name])
            assert isinstance(model, ModelInterface) and model.dtype == torch.float64
            validate_model_outputs(model, CPU, dtype)
    validate_model_outputs(torchsim_model(models["plain"], dtype=torch.float32), CPU, torch.float32)


@pytest.mark.parametrize("systems", [_molecules, _cells], ids=["molecules", "periodic"])
def test_one_batched_call_equals_the_ase_calculator_one_by_one(models, systems) -> None:
    structures = systems()
    model = torchsim_model(models["plain"])
    state = ts.io.atoms_to_state(structures, CPU, torch.float64)
    out = model(state)
    calc = load_calculator(models["plain"])
    for k, atoms in enumerate(structures):
        atoms.calc = calc
        mine = state.system_idx == k
        assert out["energy"][k].item() == pytest.approx(atoms.get_potential_energy(), abs=1e-10)
        np.testing.assert_allclose(out["forces"][mine].numpy(), atoms.get_forces(), atol=1e-10)
        if atoms.pbc.all():
            voigt = out["stress"][k].numpy()[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]]
            np.testing.assert_allclose(voigt, atoms.get_stress(), atol=1e-10)
    assert ("stress" in out) == bool(structures[0].pbc.all())  # no stress for open systems
    assert np.abs(out["forces"].numpy()).max() > 1e-3  # not trivially zero


def test_state_dtype_and_device_are_respected(models) -> None:
    structures = _cells()
    model = torchsim_model(models["plain"])
    wide = model(ts.io.atoms_to_state(structures, CPU, torch.float64))
    narrow = model(ts.io.atoms_to_state(structures, CPU, torch.float32))
    assert narrow["energy"].dtype == narrow["forces"].dtype == torch.float32
    np.testing.assert_allclose(narrow["forces"].double().numpy(), wide["forces"].numpy(), atol=1e-4)
    state = ts.io.atoms_to_state(structures, CPU, torch.float64)  # torch-sim's StateDict form too
    plain = model({"positions": state.positions, "cell": state.cell, "atomic_numbers": state.atomic_numbers,
                   "system_idx": state.system_idx, "pbc": True})
    torch.testing.assert_close(plain["stress"], wide["stress"], rtol=0, atol=1e-12)


def test_heads_and_uncertainty_match_the_calculator(models) -> None:
    structures = _cells()
    state = ts.io.atoms_to_state(structures, CPU, torch.float64)
    low, high = (torchsim_model(models["heads"], head=h)(state)["energy"] for h in ("low", "high"))
    for k, atoms in enumerate(structures):
        atoms.calc = load_calculator(models["heads"], head="high")
        assert high[k].item() == pytest.approx(atoms.get_potential_energy(), abs=1e-10)
    assert not torch.allclose(low, high)
    assert torchsim_model(models["uq"]).uncertainty and not torchsim_model(models["heads"]).uncertainty
    out = torchsim_model(models["uq"])(state)
    calc = load_calculator(models["uq"])
    for k, atoms in enumerate(structures):
        atoms.calc = calc
        assert out["energy"][k].item() == pytest.approx(atoms.get_potential_energy(), abs=1e-10)  # the mean
        assert out["forces_std_max"][k].item() == pytest.approx(uncertainty_of(calc.results)[0], abs=1e-10)
    assert (out["forces_std_max"][1:] > 0).all()  # (a one-atom cell has zero forces by symmetry)


def test_nve_through_torch_sim_conserves_energy(models) -> None:
    model = torchsim_model(models["plain"], compute_stress=False)
    state = ts.io.atoms_to_state(_cells()[1:], CPU, torch.float64)
    kT = torch.tensor(300 * units.kB, dtype=torch.float64)
    init, update = ts.nve(model=model, dt=torch.tensor(0.5 * units.fs, dtype=torch.float64), kT=kT)
    state = init(state, kT=kT, seed=0)
    totals, potentials = [], []
    for _ in range(200):
        state = update(state)
        kinetic = ts.calc_kinetic_energy(momenta=state.momenta, masses=state.masses, system_idx=state.system_idx)
        totals.append((state.energy + kinetic).numpy())
        potentials.append(state.energy.numpy())
    totals, potentials = np.array(totals), np.array(potentials)
    assert (totals.std(0) < 1e-3 * potentials.std(0)).all(), (totals.std(0), potentials.std(0))


def test_batched_relaxation_lowers_every_energy(models) -> None:
    from torch_sim.optimizers import fire

    model = torchsim_model(models["plain"])
    structures = _molecules()
    start = model(ts.io.atoms_to_state(structures, CPU, torch.float64))
    final = ts.optimize(structures, model, optimizer=fire, max_steps=60,
                        convergence_fn=ts.generate_force_convergence_fn(force_tol=0.05, include_cell_forces=False))
    end = model(final)
    assert (end["energy"] < start["energy"] - 1e-4).all()
    for k in range(len(structures)):
        mine = final.system_idx == k
        assert end["forces"][mine].norm(dim=1).max() < start["forces"][final.system_idx == k].norm(dim=1).max()


# -- errors ---------------------------------------------------------------------------------------
def test_bad_inputs_are_refused_clearly(registry, models, tmp_path, monkeypatch) -> None:
    with pytest.raises(ModelFileError, match="does not exist"):
        torchsim_model(tmp_path / "missing.pt")
    with pytest.raises(ConfigError, match="heads are"):
        torchsim_model(models["heads"], head="medium")
    with pytest.raises(ConfigError, match="wraps an atomforge Potential"):
        torchsim_model(torch.nn.Linear(2, 2))
    crowded = bulk("Cu", "fcc", a=3.6, cubic=True)
    crowded.positions[1] = crowded.positions[0] + 0.05
    with pytest.raises(DataValidationError, match="system 1: two atoms are 0.0866 Å apart"):
        torchsim_model(models["plain"])(ts.io.atoms_to_state([_cells()[1], crowded], CPU, torch.float64))
    monkeypatch.setitem(sys.modules, "torch_sim", None)  # as if torch-sim were not installed
    monkeypatch.delitem(sys.modules, "atomforge.model._torchsim")
    with pytest.raises(ConfigError, match=r"atomforge\[torchsim\]"):
        torchsim_model(models["plain"])
    with pytest.raises(ConfigError, match=r"atomforge\[torchsim\]"):
        _md(registry, engine="torch_sim")


# -- the md explorer's torch_sim engine ----------------------------------------------------------------
def _md(registry, **options: object):  # noqa: ANN001, ANN202
    return registry.get("explorers", "md").factory(**options)


def test_batched_explorer_keeps_the_recording_rule_of_the_ase_path(registry, models) -> None:
    explorer = _md(registry, temperatures=[300, 900], steps=20, interval=10, engine="torch_sim")
    frames = explorer.explore([_cells()[1], _molecules()[0]], load_calculator(models["plain"]), hi=None, seed=0)
    again = explorer.explore([_cells()[1], _molecules()[0]], load_calculator(models["plain"]), hi=None, seed=0)
    assert all(np.array_equal(f.positions, g.positions) for f, g in zip(frames, again))  # a resumed campaign repeats it
    assert [(f.get_chemical_formula(), f.info["temperature"], f.info["step"]) for f in frames] == [
        (formula, t, s) for formula in ("Cu8", "C2H6O") for t in (300.0, 900.0) for s in (10, 20)]
    assert all(f.calc is None and f.info["explorer"] == "md" for f in frames)
    assert frames[0].pbc.all() and not frames[-1].pbc.any()
    moved, _ = find_mic(frames[1].positions - frames[0].positions, frames[0].cell, pbc=True)
    assert 0.01 < np.abs(moved).max() < 1.0  # it moved (positions are wrapped into the cell), and did not blow up


def test_batched_explorer_stops_each_trajectory_at_the_first_sigma_above_hi(registry, models) -> None:
    calc = load_calculator(models["uq"])
    explorer = _md(registry, temperatures=[300, 900], steps=60, interval=10, engine="torch_sim")
    pilot = explorer.explore([_cells()[1]], calc, hi=None, seed=0)
    sigmas = []
    for frame in pilot:
        frame.calc = calc
        frame.get_forces()
        sigmas.append(uncertainty_of(calc.results)[0])
    hi = float(np.quantile(sigmas, 0.6))  # some trajectory crosses it part-way
    frames = explorer.explore([_cells()[1]], calc, hi=hi, seed=0)
    stopped = 0
    for temperature in (300.0, 900.0):
        run = [f for f in frames if f.info["temperature"] == temperature]
        levels = []
        for frame in run:
            frame.calc = calc
            frame.get_forces()
            levels.append(uncertainty_of(calc.results)[0])
        if run and run[-1].info["step"] < 60:
            stopped += 1
            assert levels[-1] >= hi  # the frame that crossed is kept
        assert all(level < hi for level in levels[:-1])  # nothing before it crossed
    assert stopped >= 1 and len(frames) < len(pilot)


def test_batched_explorer_drops_a_refused_trajectory_and_runs_the_others(registry, models, caplog) -> None:
    crowded = _cells()[1]
    crowded.positions[1] = crowded.positions[0] + 0.03
    explorer = _md(registry, temperatures=[300], steps=10, interval=5, engine="torch_sim")
    with caplog.at_level(logging.WARNING, logger="atomforge.explorers"):
        frames = explorer.explore([crowded, _cells()[1]], load_calculator(models["plain"]), hi=None, seed=0)
    assert [f.info["step"] for f in frames] == [5, 10]
    assert "stopped at step 0" in caplog.text and "Å apart" in caplog.text


def test_batched_explorer_refuses_what_it_cannot_run(registry, models) -> None:
    with pytest.raises(ConfigError, match="engine must be one of ase, torch_sim"):
        _md(registry, engine="lammps")
    with pytest.raises(ConfigError, match="NVT"):
        _md(registry, engine="torch_sim", ensemble="npt")
    with pytest.raises(ConfigError, match="needs an atomforge calculator"):
        _md(registry, engine="torch_sim").explore([_cells()[0]], EMT(), hi=None, seed=0)
    slab = _cells()[1]
    slab.pbc = [True, True, False]
    with pytest.raises(ConfigError, match="molecules or 3D-periodic"):
        _md(registry, engine="torch_sim").explore([slab], load_calculator(models["plain"]), hi=None, seed=0)
