"""Multi-head models (one readout per level of theory), adding a head at fine-tune time, freezing
and per-group learning rates."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.io import write

from atomforge import AtomforgeCalculator, ConfigError, ModelOutputError, attach_labels, config_from_dict, load_model
from atomforge import keys as K
from atomforge.analysis.evaluate import evaluate
from atomforge.workflows.train import train

from conftest import cu_structures, tiny_config

OFFSET = 0.5  # eV per atom between the two "levels of theory"


def _shifted(structures, offset=OFFSET, fidelity=1):
    """A second level of theory: EMT plus ``offset`` eV per atom (same forces)."""
    out = []
    for atoms in structures:
        copy = atoms.copy()
        copy = attach_labels(copy, energy=atoms.get_potential_energy() + offset * len(atoms),
                             forces=atoms.get_forces(), stress=atoms.get_stress())
        copy.info["fidelity"] = fidelity
        out.append(copy)
    return out


@pytest.fixture(scope="module")
def two_levels(tmp_path_factory):
    folder = tmp_path_factory.mktemp("levels")
    low, high = cu_structures(16, seed=5), _shifted(cu_structures(16, seed=6))
    write(folder / "low.extxyz", low)
    write(folder / "high.extxyz", high)
    write(folder / "high_test.extxyz", _shifted(cu_structures(4, seed=7)))
    return folder


def _energy(model, atoms, **kwargs):
    work = atoms.copy()
    work.calc = AtomforgeCalculator(model, **kwargs)
    return work.get_potential_energy()


def test_two_heads_from_scratch_fit_their_own_reference_energies(registry, cu_files, two_levels, tmp_path) -> None:
    raw = tiny_config(cu_files, tmp_path / "run", max_epochs=10)
    raw["model"]["heads"] = ["low", "high"]
    raw["data"] = {"train": [{"path": str(two_levels / "low.extxyz"), "head": "low", "ratio": 0.5},
                             {"path": str(two_levels / "high.extxyz"), "head": "high", "ratio": 0.5}]}
    model = load_model(train(config_from_dict(raw), registry, verbose=False).model_path)
    assert model.heads == ["low", "high"] and model.atomic_energies.shape == (2, 1)
    atoms = cu_structures(1, seed=9)[0]
    gap = _energy(model, atoms, head="high") - _energy(model, atoms, head="low")
    assert gap == pytest.approx(OFFSET * len(atoms), abs=0.5)
    high = evaluate(model, list(_shifted(cu_structures(4, seed=7))), head="high").metrics()
    low = evaluate(model, list(_shifted(cu_structures(4, seed=7))), head="low").metrics()
    assert high["energy_mae"] < low["energy_mae"]  # meV/atom: the right head knows the offset
    with pytest.raises(ConfigError, match="heads are"):
        AtomforgeCalculator(model, head="dft")


def test_fidelity_outside_the_heads_is_a_clear_error(registry, cu_files, two_levels, tmp_path) -> None:
    raw = tiny_config(cu_files, tmp_path / "run", max_epochs=1)
    raw["model"]["heads"] = ["low", "high"]
    model = load_model(train(config_from_dict(raw), registry, verbose=False).model_path)
    atoms = cu_structures(1)[0]
    atoms.info["fidelity"] = 4
    atoms.calc = AtomforgeCalculator(model)
    with pytest.raises(ModelOutputError, match=r"fidelity \[4\]"):
        atoms.get_potential_energy()
    with pytest.raises(ConfigError, match="not one of model.heads"):
        raw["data"]["train"] = {"path": str(two_levels / "low.extxyz"), "head": "dft"}
        config_from_dict(raw)
    with pytest.raises(ConfigError, match="model.heads"):
        raw["model"]["heads"] = ["a", "a"]
        config_from_dict(raw)


def test_a_new_head_starts_as_a_copy_with_refitted_reference_energies(registry, cu_files, two_levels, tmp_path) -> None:
    """Fine-tuning a one-head model with heads [default, high]: the old head is unchanged, the
    new one predicts the old energies plus the per-atom offset it was refitted to."""
    base = train(config_from_dict(tiny_config(cu_files, tmp_path / "base", max_epochs=12)), registry, verbose=False)
    raw = tiny_config(cu_files, tmp_path / "ft", max_epochs=0)
    raw["model"] = {"init_from": str(base.model_path), "heads": ["default", "high"]}
    raw["data"] = {"train": {"path": str(two_levels / "high.extxyz"), "head": "high"}, "valid_fraction": 0.25}
    tuned = load_model(train(config_from_dict(raw), registry, verbose=False).model_path)
    old = load_model(base.model_path)
    atoms = cu_structures(1, seed=11)[0]
    assert _energy(tuned, atoms, head="default") == pytest.approx(_energy(old, atoms), abs=1e-5)
    shift = _energy(tuned, atoms, head="high") - _energy(old, atoms)
    assert shift == pytest.approx(OFFSET * len(atoms), abs=0.1 * len(atoms))  # offset + the base model's mean error
    readout = tuned.backbone.readout[2].weight
    assert torch.equal(readout[0], readout[1]) and torch.equal(readout[0], old.backbone.readout[2].weight[0])


def test_reference_energies_can_be_kept_or_given(registry, cu_files, two_levels, tmp_path) -> None:
    base = train(config_from_dict(tiny_config(cu_files, tmp_path / "base", max_epochs=1)), registry, verbose=False)
    old = load_model(base.model_path)
    for setting, expected in (("keep", float(old.atomic_energies[0, 0])), ({"Cu": -1.25}, -1.25)):
        raw = tiny_config(cu_files, tmp_path / f"ft-{expected}", max_epochs=0)
        raw["model"] = {"init_from": str(base.model_path), "heads": ["high"]}
        raw["finetune"] = {"reference_energies": setting}
        raw["data"] = {"train": {"path": str(two_levels / "high.extxyz"), "head": "high"}, "valid_fraction": 0.25}
        tuned = load_model(train(config_from_dict(raw), registry, verbose=False).model_path)
        assert float(tuned.atomic_energies[0, 0]) == pytest.approx(expected)
    raw["finetune"] = {"reference_energies": {"H": -13.6}}
    raw["output"] = str(tmp_path / "bad")
    with pytest.raises(ConfigError, match=r"no value for \['Cu'\]"):
        train(config_from_dict(raw), registry, verbose=False)


def test_freezing_and_per_group_learning_rates(registry, cu_files, tmp_path) -> None:
    base = train(config_from_dict(tiny_config(cu_files, tmp_path / "base", max_epochs=1)), registry, verbose=False)
    raw = tiny_config(cu_files, tmp_path / "ft", max_epochs=1)
    raw["model"] = {"init_from": str(base.model_path)}
    raw["finetune"] = {"freeze": ["embedding", "interaction.0"], "lr": {"readout": 0.01, "backbone.filters.*": 1e-4}}
    tuned = load_model(train(config_from_dict(raw), registry, verbose=False).model_path)
    old = load_model(base.model_path)
    for name in ("backbone.embedding.weight", "backbone.layers.0.update.0.weight"):
        assert torch.equal(tuned.state_dict()[name], old.state_dict()[name]), name
    for name in ("backbone.layers.1.update.0.weight", "backbone.readout.0.weight", "backbone.filters.weight"):
        assert not torch.equal(tuned.state_dict()[name], old.state_dict()[name]), name

    from atomforge.model.finetune import parameter_lrs
    from atomforge.training.optim import make_optimizer

    model = load_model(base.model_path)
    lrs = parameter_lrs(model, ["all_but_readout"], {"readout": 0.01})
    assert set(lrs) == {n for n, _ in model.named_parameters() if n.startswith("backbone.readout")}
    optimizer = make_optimizer(model, lr=0.001, lrs=lrs)
    assert sorted({g["lr"] for g in optimizer.param_groups}) == [0.01]
    with pytest.raises(ConfigError, match="neither a parameter group"):
        parameter_lrs(load_model(base.model_path), ["embeddings"], {})
    with pytest.raises(ConfigError, match="no parameter to train"):
        parameter_lrs(load_model(base.model_path), ["backbone.*"], {})
    with pytest.raises(ConfigError, match="finetune.lr"):
        config_from_dict({**raw, "finetune": {"lr": {"readout": -1}}})


def test_model_files_from_before_heads_still_load(registry, cu_files, tmp_path) -> None:
    """Old files hold [elements] reference energies and scalar scale/shift: read as head 0."""
    from atomforge import build_potential, read_model_file

    path = train(config_from_dict(tiny_config(cu_files, tmp_path / "run", max_epochs=1)), registry,
                 verbose=False).model_path
    config, _, state = read_model_file(path)
    old_state = {**state, "atomic_energies": state["atomic_energies"][0], "scale": state["scale"][0],
                 "shift": state["shift"][0]}
    potential = build_potential(config, registry)
    potential.load_state_dict(old_state)
    atoms = cu_structures(1)[0]
    assert _energy(potential, atoms) == pytest.approx(_energy(load_model(path), atoms), abs=1e-6)
    assert potential.atomic_energies.shape == (1, 1) and potential.scale.shape == (1,)  # upgraded to head 0


def test_a_campaign_fine_tunes_a_pretrained_model_with_replay_on_its_own_head(al_files, cu_files, two_levels,
                                                                             registry, tmp_path) -> None:
    """Active learning from a foundation model: iteration 0 fine-tunes the pre-trained file (a new
    head for the oracle's labels), later iterations warm-start from the previous one, and every
    iteration replays the pre-training data on the old head."""
    import yaml

    from atomforge.active_learning import campaign_from_dict, run_campaign
    from conftest import campaign_raw

    pretrained = train(config_from_dict(tiny_config(cu_files, tmp_path / "pre", max_epochs=2)), registry,
                       verbose=False).model_path
    raw = campaign_raw(al_files, tmp_path / "c", uq={"name": "latent_distance"}, selector={"name": "random"},
                       budget={"per_iteration": 2, "total": 4})
    raw["train"]["model"] = {"init_from": str(pretrained), "heads": ["default", "emt"]}
    raw["train"].update(head="emt", warm_start={"training": {"max_epochs": 1}},
                        replay={"path": str(two_levels / "low.extxyz"), "ratio": 0.3, "head": "default"})
    result = run_campaign(campaign_from_dict(raw), registry, verbose=False)
    iterations = result.directory / "iterations"
    first = yaml.safe_load((iterations / "000" / "train.yaml").read_text())
    second = yaml.safe_load((iterations / "001" / "train.yaml").read_text())
    assert first["model"]["init_from"] == str(pretrained)
    assert second["model"]["init_from"] == str(iterations / "000" / "train" / "model.pt")
    for config in (first, second):
        own, replayed = config["data"]["train"]
        assert own["head"] == "emt" and own["ratio"] == pytest.approx(0.7) and config["data"]["valid"]["head"] == "emt"
        assert replayed["head"] == "default" and replayed["ratio"] == 0.3
    model = load_model(iterations / "001" / "train" / "model.pt")
    assert model.potential.heads == ["default", "emt"]
    from atomforge import load_calculator
    assert load_calculator(iterations / "001" / "train" / "model.pt", head="emt").head == "emt"
    with pytest.raises(ConfigError, match="ratios add up"):
        campaign_from_dict({**raw, "train": {**raw["train"], "replay": [{"path": "a", "ratio": 0.6},
                                                                          {"path": "b", "ratio": 0.5}]}})


def test_tensornet_has_heads_and_groups_too(registry, cu_files, two_levels, tmp_path) -> None:
    raw = tiny_config(cu_files, tmp_path / "run", max_epochs=1)
    raw["model"] = {"backbone": "tensornet", "cutoff": 4.0, "hidden_channels": 8, "num_layers": 1, "heads": ["low", "high"]}
    raw["data"] = {"train": [{"path": str(two_levels / "low.extxyz"), "head": "low", "ratio": 0.5},
                             {"path": str(two_levels / "high.extxyz"), "head": "high", "ratio": 0.5}]}
    raw["finetune"] = {"freeze": ["embedding"]}
    model = load_model(train(config_from_dict(raw), registry, verbose=False).model_path)
    atoms = cu_structures(1, seed=9)[0]
    assert _energy(model, atoms, head="high") - _energy(model, atoms, head="low") > 1.0
    with pytest.raises(ConfigError, match="no per-head readouts"):
        raw["model"] = {"backbone": "transformer", "cutoff": 4.0, "hidden_channels": 8, "num_layers": 1,
                        "num_heads": 2, "heads": ["low", "high"]}
        raw["output"] = str(tmp_path / "t")
        train(config_from_dict(raw), registry, verbose=False)


def test_a_file_that_never_saw_energies_gets_its_reference_energies_fitted(registry, cu_files, tmp_path) -> None:
    """Denoising-only pre-training leaves an all-zero table; fine-tuning (auto) fits it instead of keeping it."""
    from atomforge.model.finetune import read_initial_model, reference_energy_plan

    path = train(config_from_dict(tiny_config(cu_files, tmp_path / "base", max_epochs=1)), registry,
                 verbose=False).model_path
    initial = read_initial_model(path, registry)
    assert reference_energy_plan("auto", initial, ["default"], [29]) == {0: "keep"}
    initial.spec["energies_fitted"] = False  # what a denoising-only run writes (no energies in its data)
    assert reference_energy_plan("auto", initial, ["default"], [29]) == {0: "refit"}
    assert reference_energy_plan("keep", initial, ["default"], [29]) == {0: "keep"}


def test_fine_tuning_a_denoising_only_model_fits_its_reference_energies(registry, cu_files, tmp_path) -> None:
    from ase.io import read

    from atomforge import read_model_file

    bare = [a.copy() for a in read(cu_files["train"], ":")]  # positions only: no labels
    write(tmp_path / "bare.extxyz", bare)
    raw = tiny_config(cu_files, tmp_path / "pre", max_epochs=1)
    raw["data"] = {"train": str(tmp_path / "bare.extxyz")}
    raw["loss"] = [{"name": "denoising"}]
    pre = train(config_from_dict(raw), registry, verbose=False).model_path
    assert read_model_file(pre)[0]["energies_fitted"] is False
    ft = tiny_config(cu_files, tmp_path / "ft", max_epochs=0)
    ft["model"] = {"init_from": str(pre)}
    tuned = train(config_from_dict(ft), registry, verbose=False).model_path
    config = read_model_file(tuned)[0]
    assert "energies_fitted" not in config and abs(config["atomic_energies"][0]) > 0.01
    structures = read(cu_files["test"], ":")
    residual = [a.get_potential_energy() - _energy(load_model(tuned), a) for a in structures]
    assert abs(np.mean(residual)) / len(structures[0]) < 0.05  # eV/atom: the offsets are fitted


def test_a_loss_term_can_score_one_head_only(registry, cu_files, two_levels, tmp_path) -> None:
    from atomforge import read_training_state

    raw = tiny_config(cu_files, tmp_path / "run", max_epochs=1)
    raw["model"]["heads"] = ["low", "high"]
    raw["data"] = {"train": [{"path": str(two_levels / "low.extxyz"), "head": "low", "ratio": 0.5},
                             {"path": str(two_levels / "high.extxyz"), "head": "high", "ratio": 0.5}]}
    raw["loss"] = [{"name": "energy", "weight": 1.0, "head": "high"}, {"name": "forces", "weight": 10.0}]
    config = config_from_dict(raw)
    assert config.to_dict()["loss"][0]["head"] == "high" and "head" not in config.to_dict()["loss"][1]
    train(config, registry, verbose=False)
    assert read_training_state(tmp_path / "run")["history"][0]["steps"] > 0
    from atomforge.workflows.train import build_loss

    loss = build_loss(registry, config)
    batch = {K.WEIGHT: torch.ones(2), K.FIDELITY: torch.tensor([0, 1]), K.ENERGY: torch.tensor([1.0, 1.0]),
             K.N_ATOMS: torch.tensor([1, 1]), K.FORCES: torch.zeros(2, 3), K.BATCH: torch.tensor([0, 1])}
    outputs = {K.ENERGY: torch.tensor([2.0, 1.0]), K.FORCES: torch.zeros(2, 3)}
    total, logs = loss(batch, outputs, None)
    assert logs["energy[high]"] == 0.0  # the low-head structure's error (1 eV) does not count
    with pytest.raises(ConfigError, match=r"loss\[0\] \(energy\).head 'dft'"):
        raw["loss"][0]["head"] = "dft"
        config_from_dict(raw)
