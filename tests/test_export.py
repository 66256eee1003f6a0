"""``atomforge export``: exported files give the eager model's energy, forces and stress."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, molecule

from atomforge import (
    AtomforgeCalculator,
    BackboneSpec,
    ConfigError,
    ExportError,
    ModelFileError,
    UnseenElementError,
    export_model,
    hookimpl,
    load_calculator,
    load_exported,
    make_plugin_manager,
    make_registry,
    read_export_info,
    save_model,
)
from atomforge.cli import main
from atomforge.model.export import ExportedPotential, relative_deviation
from atomforge.model.modelfile import build_model

pytest.importorskip("vesin_torch")  # the torchscript format's neighbour list (atomforge[deploy])

ELEMENTS = [1, 6, 8, 29]
OPTIONS = {
    "painn": {"hidden_channels": 16, "num_layers": 2, "num_rbf": 8},
    "tensornet": {"hidden_channels": 8, "num_layers": 2, "num_rbf": 8},
    "transformer": {"hidden_channels": 16, "num_layers": 2, "num_heads": 2, "num_rbf": 8},
}
TOLERANCE = 1e-5  # relative, as asked of every format


def model_file(tmp_path, backbone: str, *, dtype: str = "float32", heads: list[str] | None = None,
               uq: dict | None = None, registry=None, seed: int = 0, **options):
    """A randomly initialised model file (weights nudged so that every part of the model matters)."""
    torch.manual_seed(seed)
    config = {"backbone": backbone.split(":")[0], "cutoff": 3.5, "elements": ELEMENTS, "dtype": dtype,
              "atomic_energies": ([[-1.0, -5.0, -4.0, -3.0], [-1.5, -5.5, -4.5, -3.5]] if heads
                                  else [-1.0, -5.0, -4.0, -3.0]),
              "scale": [1.3, 0.7] if heads else 1.3, "shift": [0.1, -0.2] if heads else 0.1,
              "options": {**OPTIONS[config_name(backbone)], **options}, **({"heads": heads} if heads else {}),
              **({"uq": uq} if uq else {})}
    model = build_model(config, registry or make_registry())
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    path = tmp_path / f"{backbone.replace(':', '-')}-{dtype}-{seed}.pt"
    return save_model(model, path, config=config)


def config_name(backbone: str) -> str:
    return backbone.split(":")[0]


def structures() -> list[Atoms]:
    """A molecule, and a small triclinic cell (shorter than the cutoff: several images are neighbours)."""
    ethanol = molecule("CH3CH2OH")
    cell = bulk("Cu", "fcc", a=3.6).repeat((2, 2, 2))
    cell.numbers[[1, 5]] = [8, 1]
    for atoms in (ethanol, cell):
        atoms.rattle(0.05, seed=3)
    return [ethanol, cell]


def assert_same(exported, eager, atoms: Atoms, tolerance: float = TOLERANCE) -> None:
    keys = ("energy", "forces", "stress") if atoms.pbc.all() else ("energy", "forces")
    for key in keys:
        actual, expected = np.asarray(exported.get_property(key, atoms)), np.asarray(eager.get_property(key, atoms))
        assert np.abs(expected).max() > 1e-4, key  # a property that vanished could not catch an error
        assert relative_deviation(actual, expected) < tolerance, (key, actual, expected)


@pytest.mark.parametrize("backbone", sorted(OPTIONS))
def test_torchscript_export_equals_the_eager_model(tmp_path, backbone) -> None:
    path = model_file(tmp_path, backbone)
    report = export_model(path, format="torchscript")
    assert report.path == tmp_path / f"{path.stem}.torchscript.pt" and report.max_deviation < 1e-4
    exported, eager = load_exported(report.path), load_calculator(path)
    for atoms in structures():
        assert_same(exported, eager, atoms)
    scripted = torch.jit.load(str(report.path))  # plain TorchScript: no atomforge code needed
    ethanol = structures()[0]
    out = scripted(torch.tensor(ethanol.positions, dtype=torch.float32), torch.tensor(ethanol.numbers),
                   torch.zeros(3, 3), torch.zeros(3, dtype=torch.bool))
    assert abs(float(out["energy"][0]) - eager.get_potential_energy(ethanol)) < 1e-5 * abs(float(out["energy"][0]))
    assert torch.allclose(out["energies"].sum(), out["energy"][0])


@pytest.mark.parametrize("backbone", sorted(OPTIONS))
def test_metatomic_export_equals_the_eager_model_in_metatomics_calculator(tmp_path, backbone) -> None:
    pytest.importorskip("metatomic.torch")
    pytest.importorskip("metatomic_ase")
    path = model_file(tmp_path, backbone, dtype="float64")
    report = export_model(path, format="metatomic", out=tmp_path / "lmp" / "model.pt")
    info = read_export_info(report.path)
    assert info["format"] == "metatomic" and json.loads(info["elements"]) == ELEMENTS
    exported = load_exported(report.path)
    assert type(exported).__name__ == "MetatomicCalculator"  # metatomic's own, as other hosts run it
    eager = load_calculator(path)
    for atoms in structures():
        assert_same(exported, eager, atoms)


def test_metatomic_selected_atoms_sum_only_the_domains_atoms(tmp_path) -> None:
    """LAMMPS passes ghost atoms as neighbours and selects its own atoms: the energy is theirs only."""
    metatomic = pytest.importorskip("metatomic.torch")
    from metatensor.torch import Labels
    from vesin.metatomic import NeighborList

    path = model_file(tmp_path, "painn", dtype="float64")
    model = metatomic.load_atomistic_model(str(export_model(path, format="metatomic").path))
    ethanol = structures()[0]
    system = metatomic.systems_to_torch(ethanol, dtype=torch.float64)
    for options in model.requested_neighbor_lists():
        system.add_neighbor_list(options, NeighborList(options, "angstrom").compute(system))
    outputs = {"energy": metatomic.ModelOutput(unit="eV", sample_kind="atom")}
    options = metatomic.ModelEvaluationOptions(length_unit="angstrom", outputs=outputs)
    per_atom = model([system], options, check_consistency=True)["energy"].block().values[:, 0]
    chosen = Labels(["system", "atom"], torch.tensor([[0, 0], [0, 3], [0, 4]], dtype=torch.int32))
    options = metatomic.ModelEvaluationOptions(length_unit="angstrom", outputs={
        "energy": metatomic.ModelOutput(unit="eV", sample_kind="system")}, selected_atoms=chosen)
    total = model([system], options, check_consistency=True)["energy"].block().values[0, 0]
    assert torch.allclose(total, per_atom[[0, 3, 4]].sum())
    assert torch.allclose(per_atom.sum(), torch.tensor(load_calculator(path).get_potential_energy(ethanol),
                                                       dtype=torch.float64))


def test_one_head_of_a_multi_head_model_is_exported(tmp_path) -> None:
    path = model_file(tmp_path, "painn", heads=["dft", "ccsd"])
    with pytest.raises(ConfigError, match=r"2 heads \['dft', 'ccsd'\].*--head"):
        export_model(path, format="torchscript")
    report = export_model(path, format="torchscript", head="ccsd")
    assert report.head == "ccsd" and read_export_info(report.path)["head"] == "ccsd"
    exported = load_exported(report.path)
    atoms = structures()[1]
    assert_same(exported, load_calculator(path, head="ccsd"), atoms)
    other = load_calculator(path, head="dft").get_potential_energy(atoms)
    assert abs(exported.get_potential_energy(atoms) - other) > 0.1  # the head matters
    with pytest.raises(ConfigError, match="heads are"):
        export_model(path, format="torchscript", head="mp2")


def test_direct_forces_go_to_torchscript_not_to_metatomic(tmp_path) -> None:
    path = model_file(tmp_path, "transformer", forces="direct")
    exported = load_exported(export_model(path, format="torchscript").path)
    for atoms in structures():
        assert_same(exported, load_calculator(path), atoms)
    with pytest.raises(ExportError, match="predicts forces directly.*--format torchscript"):
        export_model(path, format="metatomic")


def test_a_deep_ensemble_exports_its_mean(tmp_path) -> None:
    uq = {"name": "deep_ensemble", "options": {"num_members": 2, "vectorize": False}}
    path = model_file(tmp_path, "painn", uq=uq)
    report = export_model(path, format="torchscript")
    assert "mean of its 2 members" in report.note
    ensemble, exported = load_calculator(path), load_exported(report.path)
    atoms = structures()[1]
    assert_same(exported, ensemble, atoms)
    members = [AtomforgeCalculator(m).get_potential_energy(atoms) for m in ensemble.model.members]
    assert abs(members[0] - members[1]) > 1e-3  # the mean is not just member 0


def test_a_shallow_ensemble_exports_its_mean_readout(tmp_path) -> None:
    path = model_file(tmp_path, "tensornet", uq={"name": "shallow_ensemble", "options": {"num_heads": 3}})
    report = export_model(path, format="metatomic" if _has_metatomic() else "torchscript")
    assert "mean readout" in report.note
    ensemble, atoms = load_calculator(path), structures()[1]
    assert_same(load_exported(report.path), ensemble, atoms)
    plain = AtomforgeCalculator(ensemble.model.potential).get_potential_energy(atoms)
    assert abs(plain - ensemble.get_potential_energy(atoms)) > 1e-3  # the readout heads matter


def _has_metatomic() -> bool:
    try:
        import metatomic_ase  # noqa: F401
    except ImportError:
        return False
    return True


def test_float64_export_of_a_float32_model(tmp_path) -> None:
    path = model_file(tmp_path, "tensornet")
    report = export_model(path, format="torchscript", dtype="float64")
    assert read_export_info(report.path)["dtype"] == "float64"
    assert_same(load_exported(report.path), load_calculator(path, dtype=torch.float64), structures()[1], 1e-10)


def _scalar_backbone_plugin() -> types.SimpleNamespace:
    """A backbone whose forward is plain Python that TorchScript cannot compile."""
    from atomforge import Backbone, keys as K

    class Numpyish(Backbone):
        def __init__(self, *, num_elements: int, cutoff: float) -> None:
            super().__init__(num_elements=num_elements, cutoff=cutoff)
            self.weight = torch.nn.Parameter(torch.ones(()))

        def forward(self, batch):  # noqa: ANN001, ANN201 - untyped on purpose
            lengths = batch[K.EDGE_LENGTHS]
            energy = torch.zeros_like(batch[K.POSITIONS][:, 0]).index_add(0, batch[K.EDGE_INDEX][0], lengths ** -6)
            return {K.NODE_ENERGY: self.weight * energy * float(np.pi)}

    @hookimpl
    def register_backbones(register):  # noqa: ANN001, ANN202
        register(BackboneSpec(name="numpyish", factory=Numpyish, description="not scriptable"))

    return types.SimpleNamespace(__name__="numpyish_plugin", register_backbones=register_backbones)


def test_bad_input_gives_clear_errors(tmp_path) -> None:
    with pytest.raises(ModelFileError, match="does not exist"):
        export_model(tmp_path / "missing.pt", format="torchscript")
    path = model_file(tmp_path, "painn")
    with pytest.raises(ConfigError, match=r"export format 'onnx' is not one of \['torchscript', 'aot', 'metatomic'\]"):
        export_model(path, format="onnx")
    with pytest.raises(ExportError, match="aot is not available.*--format torchscript"):
        export_model(path, format="aot")
    registry = make_registry(make_plugin_manager(entry_points=False, extra=[_scalar_backbone_plugin()]))
    OPTIONS["numpyish"] = {}
    try:
        odd = model_file(tmp_path, "numpyish", registry=registry)
    finally:
        del OPTIONS["numpyish"]
    with pytest.raises(ExportError, match="backbone 'numpyish' cannot be compiled by TorchScript.*load_calculator"):
        export_model(odd, format="torchscript", registry=registry)
    with pytest.raises(ModelFileError, match="not an exported atomforge model"):
        load_exported(path)  # a model file, not an export
    exported = load_exported(export_model(path, format="torchscript").path)
    with pytest.raises(UnseenElementError, match=r"Z=\[26\]"):
        exported.get_potential_energy(Atoms("FeH", positions=[[0, 0, 0], [0, 0, 1.5]]))


def test_the_cli_exports_and_reports(tmp_path, capsys) -> None:
    path = model_file(tmp_path, "painn")
    out = tmp_path / "deploy" / "model.pt"
    assert main(["export", str(path), "--format", "torchscript", "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["exported"] == str(out) and report["format"] == "torchscript"
    assert report["max_relative_deviation"] < 1e-4
    assert main(["export", str(tmp_path / "nope.pt"), "--format", "torchscript"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_the_exported_core_is_the_potentials_energy(tmp_path) -> None:
    """ExportedPotential's virial (from position and cell gradients) equals the strain derivative."""
    from atomforge import atoms_to_graph, collate, keys as K, load_model

    potential = load_model(model_file(tmp_path, "painn", dtype="float64"))
    atoms = structures()[1]
    graph = atoms_to_graph(atoms, potential.cutoff, dtype=torch.float64)
    eager = potential(collate([graph]), compute_forces=True, compute_stress=True)
    core = ExportedPotential([potential], 0)
    out = core(graph[K.POSITIONS], graph[K.NUMBERS], graph[K.CELL][0], graph[K.PBC][0], graph[K.EDGE_INDEX],
               graph[K.SHIFTS], True)
    assert torch.allclose(out["virial"], eager[K.VIRIAL][0], atol=1e-12)
    assert torch.allclose(out["forces"], eager[K.FORCES], atol=1e-12)
