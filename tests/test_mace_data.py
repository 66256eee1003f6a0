"""MACE-compatible data: label keys (REF_energy, ...), virials, per-config_type error tables,
user-given and isolated-atom E0s, and the PSTRESS enthalpy of vasprun.xml files."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.io import read, write
from ase.units import GPa
from torch import nn

from atomforge import (Backbone, BackboneSpec, ConfigError, DataValidationError, GraphDataset, LabelKeys,
                       PluginKind, build_potential, config_from_dict, get_labels, hookimpl, keys as K, load_model,
                       make_registry, read_model_file, read_training_state, relabel, save_model)
from atomforge.analysis.evaluate import evaluate
from atomforge.analysis.metrics import config_types_of
from atomforge.cli import main
from atomforge.workflows.train import train

from conftest import cu_structures, tiny_config

FIXTURE = Path(__file__).parent / "data" / "vasprun_pstress.xml"


def read_source(registry, options: dict, name: str = "ase", base: Path = Path(".")) -> list[Atoms]:  # noqa: ANN001
    return registry.get(PluginKind.DATA_SOURCE, name).factory(options, base)


def mace_style(structures: list[Atoms], *, virials: bool = False) -> list[Atoms]:
    """The same structures with their labels under MACE's keys (no calculator)."""
    out = []
    for atoms in structures:
        labels = get_labels(atoms)
        plain = Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
        plain.info["REF_energy"] = labels.energy
        plain.arrays["REF_forces"] = labels.forces
        if virials:
            plain.info["REF_virials"] = -labels.stress * atoms.get_volume()
        else:
            plain.info["REF_stress"] = labels.stress.reshape(-1)
        out.append(plain)
    return out


# -- label keys -------------------------------------------------------------------------------------
def test_mace_keys_give_the_labels_and_defaults_do_not(registry, tmp_path) -> None:
    reference = cu_structures(3, seed=5)
    path = tmp_path / "mace.extxyz"
    write(path, mace_style(reference))
    keyed = read_source(registry, {"path": str(path), "energy_key": "REF_energy", "forces_key": "REF_forces",
                                       "stress_key": "REF_stress"})
    for ours, ref in zip(keyed, reference, strict=True):
        a, b = get_labels(ours), get_labels(ref)
        assert a.energy == pytest.approx(b.energy, abs=1e-7)
        np.testing.assert_allclose(a.forces, b.forces, atol=1e-7)
        np.testing.assert_allclose(a.stress, b.stress, atol=1e-8)
        assert "REF_energy" not in ours.info and "REF_forces" not in ours.arrays  # now labels, not stray entries
    plain = read_source(registry, {"path": str(path)})  # default keys: REF_* are not labels
    assert all(get_labels(a).energy is None and get_labels(a).forces is None for a in plain)


def test_chosen_key_wins_over_the_files_calculator_energy(registry, tmp_path) -> None:
    """A frame with a cheap ``energy=`` (ASE puts it in a calculator) and ``REF_energy``: the key chosen wins."""
    atoms = cu_structures(1, seed=2)[0]
    atoms.info["REF_energy"] = -1.2345
    path = tmp_path / "both.extxyz"
    write(path, atoms)
    assert get_labels(read_source(registry, {"path": str(path)})[0]).energy == pytest.approx(
        get_labels(atoms).energy)
    keyed = read_source(registry, {"path": str(path), "energy_key": "REF_energy"})[0]
    assert get_labels(keyed).energy == pytest.approx(-1.2345)
    # forces_key is still "forces": read from the calculator ase.io.read made of the file's forces=
    np.testing.assert_allclose(get_labels(keyed).forces, get_labels(atoms).forces, atol=1e-7)
    with pytest.warns(UserWarning, match=r"forces_key 'REF_forces' is in none .*calculator results \['energy'"):
        keyed = read_source(registry, {"path": str(path), "energy_key": "REF_energy", "forces_key": "REF_forces"})[0]
    assert get_labels(keyed).forces is None and get_labels(keyed).stress is not None


def test_virials_become_stress_with_maces_sign(registry, tmp_path) -> None:
    """virials = −stress·V (MACE): the stress read back equals EMT's stress (ASE sign)."""
    reference = cu_structures(2, seed=7)
    path = tmp_path / "virials.extxyz"
    write(path, mace_style(reference, virials=True))
    keyed = read_source(registry, {"path": str(path), "energy_key": "REF_energy", "forces_key": "REF_forces",
                                       "virials_key": "REF_virials"})
    for ours, ref in zip(keyed, reference, strict=True):
        emt = ref.copy()
        emt.calc = EMT()
        np.testing.assert_allclose(get_labels(ours).stress, emt.get_stress(voigt=False), atol=1e-8)
    # a stress given as Voigt 6 is read too, and wins over virials
    atoms = reference[0].copy()
    atoms.info.update(REF_stress=np.arange(6.0), REF_virials=np.ones((3, 3)))
    stress = get_labels(relabel(atoms, LabelKeys(stress="REF_stress", virials="REF_virials"))).stress
    np.testing.assert_allclose(stress, [[0, 5, 4], [5, 1, 3], [4, 3, 2]])


def test_virials_of_a_molecule_are_a_clear_error() -> None:
    molecule = Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]])
    molecule.info["REF_virials"] = np.eye(3)
    with pytest.raises(DataValidationError, match="periodic cell"):
        relabel(molecule, LabelKeys(virials="REF_virials"))


def test_a_frame_without_the_key_is_unlabelled_not_an_error(registry, tmp_path) -> None:
    frames = mace_style(cu_structures(3, seed=4))
    del frames[1].info["REF_energy"]
    del frames[2].arrays["REF_forces"]
    path = tmp_path / "partial.extxyz"
    write(path, frames)
    keyed = read_source(registry, {"path": str(path), "energy_key": "REF_energy", "forces_key": "REF_forces"})
    assert [get_labels(a).has("energy") for a in keyed] == [True, False, True]
    assert [get_labels(a).has("forces") for a in keyed] == [True, True, False]
    with pytest.raises(DataValidationError, match="structure 1: the loss needs a 'energy' label"):
        GraphDataset(keyed, 4.0, require=("energy",))  # only where the loss needs it


def test_a_key_in_no_frame_warns_and_options_are_checked(registry, tmp_path) -> None:
    path = tmp_path / "plain.extxyz"
    write(path, cu_structures(2, seed=1))
    with pytest.warns(UserWarning, match="energy_key 'REF_energy' is in none of the 2 structures"):
        read_source(registry, {"path": str(path), "energy_key": "REF_energy"})
    with pytest.raises(ConfigError, match="energy_key, forces_key, stress_key, virials_key"):
        read_source(registry, {"path": str(path), "energy_kye": "REF_energy"})
    with pytest.raises(ConfigError, match="energy_key must name"):
        read_source(registry, {"path": str(path), "energy_key": 3})


def test_pack_takes_the_same_keys(registry, tmp_path, capsys) -> None:
    reference = cu_structures(3, seed=6)
    path = tmp_path / "mace.extxyz"
    write(path, mace_style(reference, virials=True))
    store = tmp_path / "store"
    assert main(["data", "pack", str(store), str(path), "--energy-key", "REF_energy", "--forces-key", "REF_forces",
                 "--virials-key", "REF_virials", "--quiet"]) == 0
    from atomforge import StructureStore

    packed = StructureStore(store)
    for k, ref in enumerate(reference):
        a, b = get_labels(packed[k]), get_labels(ref)
        assert a.energy == pytest.approx(b.energy)
        np.testing.assert_allclose(a.forces, b.forces, atol=1e-7)
        np.testing.assert_allclose(a.stress, b.stress, atol=1e-8)
    with pytest.raises(ConfigError, match="pack with them instead"):
        read_source(registry, {"path": str(store), "energy_key": "REF_energy"}, "store")


# -- per-config_type error tables -------------------------------------------------------------------
def typed_structures() -> list[Atoms]:
    structures = cu_structures(6, seed=8)
    for k, atoms in enumerate(structures):
        if k % 3:
            atoms.info["config_type"] = "bulk" if k % 3 == 1 else "rattled"
    return structures  # 0 and 3: no config_type (MACE's "Default")


@pytest.fixture(scope="module")
def small_model(registry):
    spec = {"backbone": "painn", "cutoff": 4.0, "dtype": "float64", "elements": [29],
            "options": {"hidden_channels": 8, "num_layers": 1, "num_rbf": 4},
            "atomic_energies": [0.3], "scale": 0.5, "shift": 0.0}
    torch.manual_seed(0)
    return build_potential(spec, registry), spec


def test_config_type_table_is_the_error_of_each_subset(small_model) -> None:
    model, _ = small_model
    structures = typed_structures()
    assert config_types_of(structures) == ["Default", "bulk", "rattled", "Default", "bulk", "rattled"]
    table = evaluate(model, structures, batch_size=4).config_type_table()  # batches cut across the types
    assert list(table) == ["Default", "bulk", "rattled"]
    for name, row in table.items():
        subset = [a for a, t in zip(structures, config_types_of(structures)) if t == name]
        alone = evaluate(model, subset).metrics()
        assert row["count"] == 2
        for key, value in alone.items():
            assert row[key] == pytest.approx(value, rel=1e-12)
    assert evaluate(model, cu_structures(2)).config_type_table() == {}  # no config types: no table


def test_evaluate_command_prints_and_writes_the_table(small_model, tmp_path, capsys) -> None:
    model, spec = small_model
    model_path = save_model(model, tmp_path / "model.pt", config=spec)
    data = tmp_path / "typed.extxyz"
    mace = mace_style(typed_structures())
    for atoms, typed in zip(mace, typed_structures()):
        atoms.info.update({k: v for k, v in typed.info.items() if k == "config_type"})
    write(data, mace)
    assert main(["evaluate", str(model_path), str(data), "--option", "energy_key=REF_energy",
                 "--option", "forces_key=REF_forces", "--option", "stress_key=REF_stress", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)[str(data)]
    assert report["energy_count"] == 6
    assert set(report["config_types"]) == {"Default", "bulk", "rattled"}
    assert report["config_types"]["bulk"]["count"] == 2 and "forces_mae" in report["config_types"]["bulk"]
    assert main(["evaluate", str(model_path), str(data), "--option", "energy_key=REF_energy",
                 "--option", "forces_key=REF_forces"]) == 0
    printed = capsys.readouterr().out
    assert "config_type" in printed and "rattled" in printed and "meV/atom" in printed


def test_training_logs_validation_errors_per_config_type(registry, tmp_path) -> None:
    typed = tmp_path / "typed.extxyz"
    write(typed, typed_structures())
    cfg = tiny_config({"train": typed, "test": typed}, tmp_path / "run", max_epochs=1)
    cfg["data"]["valid"] = str(typed)
    outcome = train(config_from_dict(cfg), registry, verbose=False)
    epoch = read_training_state(tmp_path / "run")["history"][0]["valid_metrics"]
    assert {"forces_mae/bulk", "energy_rmse/rattled", "forces_mae/Default"} <= set(epoch)
    assert {k: v for k, v in epoch.items() if k.startswith("count/")} == {"count/Default": 2, "count/bulk": 2,
                                                                          "count/rattled": 2}
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["test_count/bulk"] == 2 and "best_valid_forces_mae/rattled" in metrics
    assert outcome.test_metrics["test_forces_mae/Default"] == metrics["test_forces_mae/Default"]


# -- E0s ------------------------------------------------------------------------------------------
class PairBackbone(Backbone):
    """Σ over neighbours of a per-element-pair radial function: zero for an isolated atom (as in MACE)."""

    vmap_safe = False

    def __init__(self, *, num_elements: int, cutoff: float) -> None:
        super().__init__(num_elements=num_elements, cutoff=cutoff)
        self.weight = nn.Parameter(0.1 * torch.ones(num_elements, num_elements, 4))
        self.register_buffer("centers", torch.linspace(1.5, cutoff, 4))

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        i, j = batch[K.EDGE_INDEX]
        r, z = batch[K.EDGE_LENGTHS], batch[K.ELEMENT_INDEX]
        envelope = 0.5 * (torch.cos(torch.pi * r / self.cutoff) + 1)
        basis = torch.exp(-((r[:, None] - self.centers.to(r.dtype)) ** 2)) * envelope[:, None]
        pair = (self.weight.to(r.dtype)[z[i], z[j]] * basis).sum(-1)
        return {K.NODE_ENERGY: torch.zeros(len(z), dtype=r.dtype, device=r.device).index_add(0, i, pair)}


class PairPlugin:
    @hookimpl
    def register_backbones(self, register) -> None:  # noqa: ANN001
        register(BackboneSpec("pair_test", PairBackbone, "test: zero energy for isolated atoms"))


def cuag_data(tmp_path: Path, isolated: bool) -> Path:
    """Rattled Cu-Au cells (EMT) and, optionally, one isolated atom of each element (config_type IsolatedAtom)."""
    rng = np.random.default_rng(0)
    frames = []
    for _ in range(12):
        atoms = bulk("Cu", "fcc", a=3.7, cubic=True)
        atoms.numbers[rng.choice(4, 2, replace=False)] = 79
        atoms.positions += rng.normal(0, 0.05, atoms.positions.shape)
        atoms.calc = EMT()
        atoms.get_potential_energy()
        frames.append(atoms)
    if isolated:
        for symbol in ("Cu", "Au"):
            atom = Atoms(symbol, positions=[[0, 0, 0]])
            atom.calc = EMT()
            atom.get_potential_energy()
            atom.info["config_type"] = "IsolatedAtom"
            frames.append(atom)
    path = tmp_path / ("with_isolated.extxyz" if isolated else "cuag.extxyz")
    write(path, frames)
    return path


def e0_config(data: Path, output: Path, E0s, backbone: str = "pair_test") -> dict:  # noqa: ANN001, N803
    options = {} if backbone == "pair_test" else {"hidden_channels": 8, "num_layers": 1, "num_rbf": 4}
    return {"data": {"train": str(data), "valid_fraction": 0.25},
            "model": {"backbone": backbone, "cutoff": 4.0, "dtype": "float64", "E0s": E0s, **options},
            "training": {"max_epochs": 2, "batch_size": 4, "lr": 0.01, "seed": 0},
            "output": str(output), "tracking": "none"}


def isolated_energy(model_path: Path, symbol: str, registry) -> float:
    atom = Atoms(symbol, positions=[[0, 0, 0]])
    return float(load_model(model_path, registry=registry)(
        _graph(atom), compute_forces=False)[K.ENERGY][0].detach())


def _graph(atoms: Atoms) -> dict[str, torch.Tensor]:
    from atomforge import atoms_to_graph

    graph = atoms_to_graph(atoms, 4.0, dtype=torch.float64)
    graph[K.BATCH] = torch.zeros(len(atoms), dtype=torch.long)
    return graph


def test_user_e0s_are_the_trained_models_isolated_atom_energies(tmp_path) -> None:
    registry = make_registry(extra=[PairPlugin()])
    given = {"Cu": -0.7123, "Au": -1.2345}
    outcome = train(config_from_dict(e0_config(cuag_data(tmp_path, False), tmp_path / "run", given)), registry,
                    verbose=False)
    config, _, _ = read_model_file(outcome.model_path)
    assert dict(zip(config["elements"], config["atomic_energies"])) == {29: -0.7123, 79: -1.2345}
    assert config["shift"] == 0.0
    for symbol, e0 in given.items():  # trained weights, yet an isolated atom has exactly its E0
        assert isolated_energy(outcome.model_path, symbol, registry) == pytest.approx(e0, abs=1e-12)


def test_isolated_atoms_give_the_e0s_and_leave_the_batches(tmp_path) -> None:
    registry = make_registry(extra=[PairPlugin()])
    data = cuag_data(tmp_path, True)
    emt = {}
    for atoms in read(data, ":")[-2:]:
        emt[atoms.get_chemical_symbols()[0]] = atoms.get_potential_energy()
    outcome = train(config_from_dict(e0_config(data, tmp_path / "run", "isolated")), registry, verbose=False)
    for symbol, e0 in emt.items():
        assert isolated_energy(outcome.model_path, symbol, registry) == pytest.approx(e0, abs=1e-12)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["best_valid_energy_count"] == 3  # 25 % of the 12 cells; the 2 isolated atoms are in no set


def test_isolated_atoms_of_a_store_give_the_e0s(tmp_path) -> None:
    """The same from a structure store: found from its columns, left out of the streamed batches."""
    registry = make_registry(extra=[PairPlugin()])
    data = cuag_data(tmp_path, True)
    emt = {a.get_chemical_symbols()[0]: a.get_potential_energy() for a in read(data, ":")[-2:]}
    assert main(["data", "pack", str(tmp_path / "store"), str(data), "--quiet"]) == 0
    cfg = e0_config(data, tmp_path / "run", "isolated")
    cfg["data"]["train"] = {"source": "store", "path": str(tmp_path / "store")}
    outcome = train(config_from_dict(cfg), registry, verbose=False)
    for symbol, e0 in emt.items():
        assert isolated_energy(outcome.model_path, symbol, registry) == pytest.approx(e0, abs=1e-12)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["best_valid_energy_count"] == 3


def test_e0s_must_cover_every_element(tmp_path, registry) -> None:
    data = cuag_data(tmp_path, False)
    with pytest.raises(ConfigError, match=r"no E0 for Au .*add them to model.E0s"):
        train(config_from_dict(e0_config(data, tmp_path / "a", {"Cu": -1.0}, "painn")), registry, verbose=False)
    with pytest.raises(ConfigError, match=r"isolated has no E0 for Cu, Au .*IsolatedAtom"):
        train(config_from_dict(e0_config(data, tmp_path / "b", "isolated", "painn")), registry, verbose=False)
    with pytest.raises(ConfigError, match="model.E0s: expected one of fit, average, isolated"):
        config_from_dict(e0_config(data, tmp_path / "c", "mean", "painn"))
    assert config_from_dict(e0_config(data, tmp_path / "d", "average", "painn")).model.E0s == "fit"
    assert "E0s" not in config_from_dict(e0_config(data, tmp_path / "d", "fit", "painn")).to_dict()["model"]


def test_e0s_are_refused_with_init_from(small_model, tmp_path) -> None:
    model, spec = small_model
    path = save_model(model, tmp_path / "start.pt", config=spec)
    cfg = tiny_config({"train": tmp_path / "x.extxyz", "test": tmp_path / "x.extxyz"}, tmp_path / "run")
    cfg["model"] = {"init_from": str(path), "E0s": {"Cu": -1.0}}
    with pytest.raises(ConfigError, match="finetune.reference_energies"):
        config_from_dict(cfg)


def test_user_e0s_land_in_a_painn_models_reference_energies(tmp_path, registry) -> None:
    """Any backbone: the table is the model's; PaiNN's own isolated-atom contribution comes on top."""
    outcome = train(config_from_dict(e0_config(cuag_data(tmp_path, False), tmp_path / "run",
                                               {"Cu": -0.5, 79: -0.25}, "painn")), registry, verbose=False)
    config, _, state = read_model_file(outcome.model_path)
    assert config["atomic_energies"] == [-0.5, -0.25] and config["shift"] == 0.0
    np.testing.assert_array_equal(state["atomic_energies"].numpy(), [[-0.5, -0.25]])


def test_user_e0s_are_every_heads_table(tmp_path, registry) -> None:
    """Multi-head from scratch: the given table replaces the per-head least-squares refit."""
    cfg = e0_config(cuag_data(tmp_path, False), tmp_path / "run", {"Cu": -0.5, "Au": -0.25}, "painn")
    cfg["model"]["heads"] = ["pbe", "r2scan"]
    cfg["data"]["train"] = {"path": cfg["data"]["train"], "head": "pbe"}
    outcome = train(config_from_dict(cfg), registry, verbose=False)
    config, _, _ = read_model_file(outcome.model_path)
    assert config["atomic_energies"] == [[-0.5, -0.25], [-0.5, -0.25]] and config["shift"] == [0.0, 0.0]


# -- PSTRESS ---------------------------------------------------------------------------------------
def test_pstress_fixture_is_a_vasprun_pymatgen_and_ase_read() -> None:
    from pymatgen.io.vasp import Vasprun

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run = Vasprun(str(FIXTURE), parse_dos=False, parse_eigen=False, parse_potcar_file=False)
    assert run.converged and run.parameters["PSTRESS"] == 100.0 and len(run.ionic_steps) == 2
    assert len(read(FIXTURE, ":")) == 2


def test_pymatgen_source_energy_has_no_pv_term(registry) -> None:
    from pymatgen.io.vasp import Vasprun

    ours = read_source(registry, {"path": str(FIXTURE)}, "pymatgen")
    theirs = read(FIXTURE, ":")
    raw = Vasprun(str(FIXTURE), parse_dos=False, parse_eigen=False, parse_potcar_file=False).ionic_steps
    pressure = 100.0 * 0.1 * GPa  # 100 kBar in eV/Å³
    for atoms, ase_atoms, step in zip(ours, theirs, raw, strict=True):
        energy = get_labels(atoms).energy
        pv = pressure * atoms.get_volume()
        assert pv > 1.3  # ~0.7 eV per atom: what training on the enthalpy would have been off by
        assert energy == pytest.approx(step["e_fr_energy"] - pv, abs=1e-9)
        assert energy == pytest.approx(ase_atoms.get_potential_energy(force_consistent=True), abs=1e-5)
    # step 0 has no smearing correction: also ASE's default energy; step 1 has (free energy is used)
    assert get_labels(ours[0]).energy == pytest.approx(theirs[0].get_potential_energy(), abs=1e-5)
    assert get_labels(ours[1]).energy - theirs[1].get_potential_energy() == pytest.approx(1.5e-3, abs=1e-5)
