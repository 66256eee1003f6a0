"""The sevennet backbone: SevenNet's shipped pretrained models give SevenNet's own numbers through
atomforge's Potential and calculator, survive a model-file round trip, fine-tune through the normal
training workflow and carry a UQ head; an untrained SevenNet passes the conformance kit."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, molecule
from ase.io import write

pytest.importorskip("sevenn")

from conftest import cu_structures, tiny_config  # noqa: E402

import atomforge.plugins.sevennet as sevennet  # noqa: E402
from atomforge import ConfigError, ModelFileError, PluginKind, config_from_dict, make_registry, train  # noqa: E402
from atomforge.model import modelfile  # noqa: E402
from atomforge.model.calculator import AtomforgeCalculator  # noqa: E402
from atomforge.model.modelfile import (  # noqa: E402
    build_potential, load_model, read_model_file, read_or_import_model_file,
)
from atomforge.model.uncertainty import build_uq_head  # noqa: E402
from atomforge.testing import check_backbone  # noqa: E402

TINY = {"channel": 4, "lmax": 1, "num_convolution_layer": 2, "weight_nn_hidden_neurons": [8],
        "conv_denominator": 10.0}


@pytest.fixture(scope="module")
def registry():
    """The default registry plus this plugin (a no-op once it is in DEFAULT_PLUGINS)."""
    return make_registry(extra=[sevennet])


@pytest.fixture()
def default_registry_has_sevennet(registry, monkeypatch):
    """Code that builds its own registry (config parsing, the CLI) sees this plugin too."""
    import atomforge.cli

    monkeypatch.setattr(modelfile, "make_registry", lambda **_: registry)
    monkeypatch.setattr(atomforge.cli, "make_registry", lambda **_: registry)


@pytest.fixture(scope="module")
def pretrained(registry):
    """``pretrained(name)``: (config, metadata, Potential) as atomforge's model-file path builds a
    shipped model (``pretrained:NAME``), built once per module."""
    built = {}

    def get(name: str):
        if name not in built:
            config, metadata, state = read_or_import_model_file(f"pretrained:{name}", "sevennet", registry)
            potential = build_potential(config, registry)
            potential.load_state_dict(state)  # strict: every weight has its place
            built[name] = (config, metadata, potential.eval())
        return built[name]

    return get


@pytest.fixture(scope="module")
def zero_shot(pretrained):
    return pretrained("7net-0")


@pytest.fixture(scope="module")
def ours(zero_shot):
    return AtomforgeCalculator(zero_shot[2])


@pytest.fixture(scope="module")
def reference():
    from sevenn.calculator import SevenNetCalculator

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return SevenNetCalculator("7net-0", device="cpu")


def _structures() -> dict[str, Atoms]:
    copper = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 2))
    copper.rattle(0.05, seed=1)
    oxide = bulk("MgO", "rocksalt", a=4.21, cubic=True)
    oxide.set_cell(oxide.cell[:] @ (np.eye(3) + [[0.01, 0.02, 0], [0.02, -0.01, 0], [0, 0, 0.015]]), scale_atoms=True)
    oxide.rattle(0.05, seed=2)
    ethanol = molecule("CH3CH2OH")
    ethanol.rattle(0.05, seed=3)
    return {"Cu32": copper, "Mg4O4": oxide, "ethanol": ethanol}


def _evaluate(atoms: Atoms, calculator) -> tuple[float, np.ndarray, np.ndarray | None]:
    atoms = atoms.copy()
    atoms.calc = calculator
    stress = atoms.get_stress() if atoms.pbc.all() else None
    return atoms.get_potential_energy(), atoms.get_forces(), stress


# -- the pretrained model -----------------------------------------------------------------------
def test_the_pretrained_config_maps_sevennets_rescale_exactly(zero_shot) -> None:
    config, metadata, potential = zero_shot
    assert config["backbone"] == "sevennet" and config["cutoff"] == 5.0 and config["dtype"] == "float32"
    assert len(config["elements"]) == 89 and config["elements"] == sorted(config["elements"])
    assert config["scale"] == pytest.approx(1.73) and config["shift"] == 0.0
    assert "species_scale" not in config["options"]  # SevenNet-0's per-species scale is uniform
    assert metadata["pretrained"] == "7net-0" and metadata["checkpoint_sevenn_version"] == "0.9.1"
    assert "rescale_atomic_energy" not in potential.backbone.sevennet
    checkpoint = sevennet._read_checkpoint(str(sevennet._checkpoint_path("7net-0"))).config  # sevenn's reader
    for z in (1, 8, 29):  # SevenNet's per-species shift (indexed by Z) is the reference energy, as float32 stores it
        assert config["atomic_energies"][config["elements"].index(z)] == pytest.approx(checkpoint["shift"][z], abs=0)


@pytest.mark.parametrize("name", ["Cu32", "Mg4O4", "ethanol"])
def test_zero_shot_gives_sevennets_numbers(name, ours, reference) -> None:
    atoms = _structures()[name]
    energy, forces, stress = _evaluate(atoms, ours)
    e_ref, f_ref, s_ref = _evaluate(atoms, reference)
    # float32 both sides, same operations except the order of the final sums: ~1e-7 relative
    assert energy == pytest.approx(e_ref, rel=1e-6)
    np.testing.assert_allclose(forces, f_ref, atol=2e-5 * max(1.0, np.abs(f_ref).max()))
    if stress is not None:
        np.testing.assert_allclose(stress, s_ref, atol=1e-6)


class _OneHot64(torch.nn.Module):
    """SevenNet's one-hot embedding in float64 (its own casts to float32)."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes

    def forward(self, data):  # noqa: ANN001, ANN201 - SevenNet's data dict
        onehot = torch.nn.functional.one_hot(data["x"], self.num_classes).double()
        data["atom_type"], data["x"], data["node_attr"] = data["x"], onehot, onehot
        return data


def _sevennet_float64(name: str):
    """SevenNet's own model (its checkpoint loader, its force/stress module) run in float64 the way
    its ASE calculator runs it, with its inputs kept in float64 (its calculator casts to float32)."""
    from sevenn.atom_graph_data import AtomGraphData
    from sevenn.train.dataload import unlabeled_atoms_to_graph
    with warnings.catch_warnings():  # SevenNet's loader, on the checkpoint the plugin has read already
        warnings.simplefilter("ignore")
        model = sevennet._read_checkpoint(str(sevennet._checkpoint_path(name))).build_model().double().eval()
    model.replace_module("onehot_idx_to_onehot", _OneHot64(model._modules["onehot_idx_to_onehot"].num_classes))
    model.set_is_batch_data(False)

    def evaluate(atoms: Atoms) -> tuple[float, np.ndarray, np.ndarray | None]:
        graph = unlabeled_atoms_to_graph(atoms, model.cutoff)
        data = {k: torch.as_tensor(v) if isinstance(v, (np.ndarray, int, float)) else v for k, v in graph.items()}
        out = model(AtomGraphData(**data))
        stress = -out["inferred_stress"].detach().numpy()[[0, 1, 2, 4, 5, 3]] if atoms.pbc.all() else None
        return float(out["inferred_total_energy"].detach()), out["inferred_force"].detach().numpy(), stress

    return evaluate


@pytest.mark.parametrize("name, structures", [("7net-0", ("Cu32", "Mg4O4", "ethanol")), ("7net-l3i5", ("Mg4O4",))])
def test_float64_gives_sevennets_float64_numbers_to_rounding(name, structures, pretrained) -> None:
    ours, theirs = AtomforgeCalculator(pretrained(name)[2], dtype=torch.float64), _sevennet_float64(name)
    for atoms in (_structures()[k] for k in structures):
        energy, forces, stress = _evaluate(atoms, ours)
        e_ref, f_ref, s_ref = theirs(atoms)
        assert energy == pytest.approx(e_ref, rel=1e-13)
        np.testing.assert_allclose(forces, f_ref, atol=1e-12)
        if stress is not None:
            np.testing.assert_allclose(stress, s_ref, atol=1e-11)


def test_energy_is_invariant_and_forces_are_its_gradient(zero_shot) -> None:
    calc = AtomforgeCalculator(zero_shot[2], dtype=torch.float64)
    rng = np.random.default_rng(0)
    rotation, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    for atoms in (_structures()["ethanol"], _structures()["Mg4O4"]):
        energy, forces, _ = _evaluate(atoms, calc)
        moved = atoms.copy()
        moved.positions = atoms.positions @ rotation.T + [0.3, -1.1, 2.0]
        moved.set_cell(atoms.cell[:] @ rotation.T)
        e_moved, f_moved, _ = _evaluate(moved, calc)
        assert e_moved == pytest.approx(energy, rel=1e-10)
        np.testing.assert_allclose(f_moved, forces @ rotation.T, atol=1e-8)
    ethanol = _structures()["ethanol"]
    _, forces, _ = _evaluate(ethanol, calc)
    h = 1e-4
    for atom, axis in ((0, 0), (2, 1), (8, 2)):
        plus, minus = ethanol.copy(), ethanol.copy()
        plus.positions[atom, axis] += h
        minus.positions[atom, axis] -= h
        numeric = -(_evaluate(plus, calc)[0] - _evaluate(minus, calc)[0]) / (2 * h)
        assert numeric == pytest.approx(forces[atom, axis], abs=1e-6)


def test_import_model_command_and_load_model_round_trip(zero_shot, ours, tmp_path, capsys,
                                                        default_registry_has_sevennet) -> None:
    from atomforge.cli import main

    out = tmp_path / "7net-0.pt"
    assert main(["import-model", "pretrained:7net-0", str(out), "--backbone", "sevennet"]) == 0
    assert '"pretrained": "7net-0"' in capsys.readouterr().out
    payload = torch.load(out, weights_only=True)  # weights and JSON only
    assert payload["format"] == "atomforge-model"
    config, metadata, _ = read_model_file(out)
    assert config["options"] == zero_shot[0]["options"] and metadata["checkpoint"] == "SevenNet_0__11Jul2024"
    loaded = AtomforgeCalculator(load_model(out))
    for atoms in (_structures()["Mg4O4"], _structures()["ethanol"]):
        a, b = _evaluate(atoms, loaded), _evaluate(atoms, ours)
        assert a[0] == b[0]
        np.testing.assert_array_equal(a[1], b[1])


def test_unknown_pretrained_names_list_the_shipped_ones(registry) -> None:
    with pytest.raises(ConfigError, match="7net-l3i5"):
        read_or_import_model_file("pretrained:7net-omat", "sevennet", registry)
    spec = registry.get(PluginKind.BACKBONE, "sevennet")
    assert {"7net-0", "7net-l3i5", "sevennet-0"} <= set(spec.pretrained_names)


def test_a_sevennet_checkpoint_file_imports_like_the_pretrained_model(zero_shot, registry, tmp_path) -> None:
    from sevenn._const import SEVENNET_0_11Jul2024

    config, metadata, state = read_or_import_model_file(SEVENNET_0_11Jul2024, "sevennet", registry)
    assert config == {**zero_shot[0], "provider": config["provider"]} and metadata["checkpoint"] == SEVENNET_0_11Jul2024
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelFileError, match="neither an atomforge model file nor a readable SevenNet checkpoint"):
        read_or_import_model_file(tmp_path / "garbage.pth", "sevennet", registry)
    torch.save({"weights": torch.zeros(2), "note": object.__name__}, tmp_path / "other.pth")  # a pickle, no model
    with pytest.raises(ModelFileError, match="holds no SevenNet model config"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        read_or_import_model_file(tmp_path / "other.pth", "sevennet", registry)


def test_l3i5_maps_its_architecture(pretrained) -> None:
    config = pretrained("7net-l3i5")[0]
    assert config["options"]["lmax"] == 3 and config["scale"] == pytest.approx(0.808, abs=1e-3)
    assert config["options"]["cutoff_function"]["cutoff_function_name"] == "poly_cut"
    assert config["options"]["irreps_manual"][1] == "128x0e+64x1e+32x2e+32x3e"


def test_parameter_groups_cover_every_parameter_once(zero_shot) -> None:
    backbone = zero_shot[2].backbone
    groups = backbone.parameter_groups()
    assert list(groups) == ["embedding", *(f"interaction.{k}" for k in range(5)), "readout"]
    for name, _ in backbone.named_parameters():
        owners = [g for g, prefixes in groups.items() if any(name.startswith(p + ".") for p in prefixes)]
        assert len(owners) == 1, (name, owners)
    assert groups["readout"] == ["sevennet.reduce_input_to_hidden", "sevennet.reduce_hidden_to_energy"]


def test_a_shallow_ensemble_works_on_sevennet_features(zero_shot, registry) -> None:
    from atomforge import atoms_to_graph
    from atomforge.data.fields import collate

    head = build_uq_head(zero_shot[2], {"name": "shallow_ensemble", "options": {"num_heads": 3}}, registry).eval()
    batch = collate([atoms_to_graph(_structures()["ethanol"], 5.0)])
    out = {k: v.detach() for k, v in head(batch, compute_forces=True).items()}
    assert out["energy"].shape == (1,) and out["forces"].shape == (9, 3) and out["forces_std"].shape == (9,)
    assert float(out["energy_std"][0]) > 0 and bool(torch.isfinite(out["forces_std"]).all())


# -- fine-tuning and training -------------------------------------------------------------------
def test_fine_tuning_sevennet_0_runs_through_the_training_workflow(tmp_path, registry, zero_shot,
                                                                   default_registry_has_sevennet) -> None:
    write(tmp_path / "train.extxyz", cu_structures(10, seed=4))
    raw = {"data": {"train": str(tmp_path / "train.extxyz"), "valid_fraction": 0.2},
           "model": {"backbone": "sevennet", "pretrained": "7net-0"},
           "finetune": {"freeze": ["embedding", "interaction.0"], "lr": {"readout": 1e-3}},
           "loss": [{"name": "energy", "weight": 1.0}, {"name": "forces", "weight": 10.0}],
           "training": {"max_epochs": 1, "batch_size": 2, "lr": 1e-4, "seed": 0, "scheduler": "none"},
           "output": str(tmp_path / "tuned"), "tracking": "none"}
    outcome = train(config_from_dict(raw), registry, verbose=False)
    assert outcome.epochs == 1
    from atomforge import read_training_state

    history = read_training_state(tmp_path / "tuned")["history"]
    assert np.isfinite(history[-1]["train_loss"]) and np.isfinite(history[-1]["valid_loss"])
    config, _, _ = read_model_file(outcome.model_path)
    assert config["backbone"] == "sevennet" and len(config["elements"]) == 89
    tuned = load_model(outcome.model_path)  # the exported copy has exactly the built model's weights
    before, after = zero_shot[2].state_dict(), tuned.state_dict()
    for frozen in ("onehot_to_feature_x.linear.weight", "0_convolution.weight_nn.layer0.weight"):
        torch.testing.assert_close(after[f"backbone.sevennet.{frozen}"], before[f"backbone.sevennet.{frozen}"])
    trained = "backbone.sevennet.reduce_hidden_to_energy.linear.weight"
    assert not torch.equal(after[trained], before[trained])
    assert np.isfinite(_evaluate(cu_structures(1, seed=5)[0], AtomforgeCalculator(tuned))[0])


def test_training_from_scratch_fits_the_options(cu_files, tmp_path, registry) -> None:
    raw = tiny_config(cu_files, tmp_path / "scratch", max_epochs=1)
    raw["model"] = {"backbone": "sevennet", "cutoff": 4.0, **TINY, "conv_denominator": "avg_num_neigh"}
    outcome = train(config_from_dict(raw), registry, verbose=False)
    config, _, _ = read_model_file(outcome.model_path)
    options = config["options"]
    assert options["atomic_numbers"] == [29] and options["conv_denominator"] > 10  # fcc Cu within 4 Å
    assert set(sevennet.ARCHITECTURE_KEYS) <= set(options)  # self-contained: no sevenn defaults needed
    assert np.isfinite(outcome.test_metrics["test_forces_mae"])
    layer = load_model(outcome.model_path, registry=registry).backbone.sevennet["0_convolution"]
    assert layer.denominator.item() == pytest.approx(options["conv_denominator"])


def test_a_copy_has_the_same_weights_and_numbers(zero_shot) -> None:
    """e3nn deep-copies its generated code by pickling it, which (torch 2.13) turns the Wigner-3j
    buffers into extra ``_tensor_constant*`` buffers; the plugin copies plainly instead."""
    import copy

    potential = zero_shot[2]
    twin = copy.deepcopy(potential)
    assert list(twin.state_dict()) == list(potential.state_dict())
    assert [n for n, _ in twin.named_buffers()] == [n for n, _ in potential.named_buffers()]
    atoms = _structures()["Mg4O4"]
    assert _evaluate(atoms, AtomforgeCalculator(twin))[0] == _evaluate(atoms, AtomforgeCalculator(potential))[0]


def test_an_untrained_sevennet_passes_the_conformance_kit(registry) -> None:
    check_backbone(registry.get(PluginKind.BACKBONE, "sevennet"), options=TINY)


def test_options_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['channels'\]"):
        sevennet.SevenNetBackbone(num_elements=1, cutoff=4.0, channels=8)
    with pytest.raises(ConfigError, match="fitted to the training data"):
        sevennet.SevenNetBackbone(num_elements=1, cutoff=4.0, **{**TINY, "conv_denominator": "avg_num_neigh"})
    with pytest.raises(ConfigError, match="must list the model's 2 elements"):
        sevennet.SevenNetBackbone(num_elements=2, cutoff=4.0, atomic_numbers=[29], **TINY)
    with pytest.raises(ConfigError, match="neither a pretrained model shipped"):
        sevennet.SevenNetBackbone(num_elements=1, cutoff=4.0, checkpoint="7net-nope")


def test_a_non_uniform_species_scale_stays_in_the_backbone() -> None:
    rescale = torch.nn.Module()
    rescale.shift = torch.nn.Parameter(torch.tensor([-1.0, -2.0]))
    rescale.scale = torch.nn.Parameter(torch.tensor([1.5, 1.5]))
    assert sevennet._rescale(rescale, 2) == ([-1.0, -2.0], 1.5, None)
    rescale.scale = torch.nn.Parameter(torch.tensor([1.5, 0.5]))
    assert sevennet._rescale(rescale, 2) == ([-1.0, -2.0], 1.0, [1.5, 0.5])
    torch.manual_seed(0)
    plain = sevennet.SevenNetBackbone(num_elements=2, cutoff=4.0, atomic_numbers=[8, 1], **TINY).double()
    scaled = sevennet.SevenNetBackbone(num_elements=2, cutoff=4.0, atomic_numbers=[8, 1],
                                       species_scale=[1.5, 0.5], **TINY).double()
    scaled.load_state_dict(plain.state_dict(), strict=False)
    from atomforge import Potential, atoms_to_graph
    from atomforge.data.fields import collate

    batch = collate([atoms_to_graph(molecule("H2O"), 4.0, dtype=torch.float64)])
    raw = [Potential(b, elements=[1, 8], atomic_energies=[0.0, 0.0]).double().energy_outputs(
        batch, batch["positions"], None)["node_energy"] for b in (plain, scaled)]
    torch.testing.assert_close(raw[1], raw[0] * torch.tensor([1.5, 0.5, 0.5], dtype=torch.float64))


def test_sevennet_0_fine_tunes_under_deepspeed_with_two_processes(tmp_path, zero_shot) -> None:
    """Foundation model + DeepSpeed engine: ZeRO-2 over 2 processes, the embedding frozen (its
    weights stay SevenNet-0's on every rank), the readout trained at its own LR."""
    import os
    import subprocess
    import sys

    import yaml

    write(tmp_path / "cu.extxyz", cu_structures(8, seed=3))
    raw = {"data": {"train": "cu.extxyz", "valid_fraction": 0.25},
           "model": {"backbone": "sevennet", "pretrained": "7net-0"},
           "finetune": {"freeze": ["embedding"], "lr": {"readout": 1.0e-3}},
           "training": {"engine": "deepspeed", "max_epochs": 1, "batch_size": 4, "lr": 1.0e-4, "num_threads": 1},
           "deepspeed": {"zero_stage": 2}, "output": "run", "tracking": "none"}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    done = subprocess.run([sys.executable, "-m", "atomforge", "train", "run.yaml", "--nproc", "2", "--quiet"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    before, after = zero_shot[2].state_dict(), load_model(tmp_path / "run" / "model.pt").state_dict()
    frozen = "backbone.sevennet.onehot_to_feature_x.linear.weight"
    torch.testing.assert_close(after[frozen], before[frozen])
    trained = "backbone.sevennet.reduce_hidden_to_energy.linear.weight"
    assert not torch.equal(after[trained], before[trained])
