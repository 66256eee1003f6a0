"""``model.init_from``: a run starts from a model file's architecture, normalisation and weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import molecule
from ase.io import write

from atomforge import ConfigError, DataValidationError, ModelFileError, config_from_dict, load_model
from atomforge.workflows.train import train

from conftest import emt_label, tiny_config


@pytest.fixture(scope="module")
def base_model(registry, cu_files, tmp_path_factory):
    """A tiny trained Cu model (model.pt) and its config."""
    raw = tiny_config(cu_files, tmp_path_factory.mktemp("base") / "run", max_epochs=2)
    return train(config_from_dict(raw), registry, verbose=False).model_path, raw


def _finetune_raw(cu_files, output, path, **model):
    raw = tiny_config(cu_files, output, max_epochs=0)
    raw["model"] = {"init_from": str(path), **model}
    return raw


def test_zero_epochs_from_a_model_reproduces_it(registry, cu_files, base_model, tmp_path) -> None:
    path, _ = base_model
    outcome = train(config_from_dict(_finetune_raw(cu_files, tmp_path / "ft", path)), registry, verbose=False)
    before, after = load_model(path), load_model(outcome.model_path)
    for (name, a), b in zip(before.state_dict().items(), after.state_dict().values()):
        assert torch.equal(a, b), name
    config = config_from_dict(_finetune_raw(cu_files, tmp_path / "x", path))
    assert config.model.backbone == "painn" and config.model.cutoff == 4.0  # taken from the file
    assert config.model.options["hidden_channels"] == 16


def test_finetuning_continues_from_the_weights(registry, cu_files, base_model, tmp_path) -> None:
    path, raw = base_model
    start = train(config_from_dict(_finetune_raw(cu_files, tmp_path / "zero", path)), registry, verbose=False)
    ft = _finetune_raw(cu_files, tmp_path / "ft", path)
    ft["training"].update(max_epochs=3, lr=0.002)
    tuned = train(config_from_dict(ft), registry, verbose=False)
    assert tuned.test_metrics["test_forces_mae"] < start.test_metrics["test_forces_mae"]


def test_model_keys_that_contradict_the_file_are_refused(cu_files, base_model, tmp_path) -> None:
    path, _ = base_model
    with pytest.raises(ConfigError, match="hidden_channels: config 32 vs file 16"):
        config_from_dict(_finetune_raw(cu_files, tmp_path / "ft", path, hidden_channels=32))
    with pytest.raises(ConfigError, match="cutoff"):
        config_from_dict(_finetune_raw(cu_files, tmp_path / "ft", path, cutoff=5.0))
    config_from_dict(_finetune_raw(cu_files, tmp_path / "ft", path, cutoff=4, backbone="painn"))  # agree: fine
    with pytest.raises(ConfigError, match="does not exist"):
        config_from_dict(_finetune_raw(cu_files, tmp_path / "ft", tmp_path / "missing.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(ModelFileError, match="junk.pt is not a readable atomforge model file"):
        config_from_dict(_finetune_raw(cu_files, tmp_path / "ft", tmp_path / "junk.pt"))
    torch.save({"weights": torch.zeros(2)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(ModelFileError, match="legacy.pt is not a readable atomforge model file"):
        config_from_dict(_finetune_raw(cu_files, tmp_path / "ft", tmp_path / "legacy.pt"))


def test_new_elements_get_embedding_rows_and_reference_energies(registry, cu_files, base_model, tmp_path) -> None:
    """A Cu model fine-tuned on water: H and O rows are added (started at the mean known row),
    their reference energies fitted, Cu's weights and reference energy kept."""
    path, _ = base_model
    water = molecule("H2O")
    water.center(vacuum=3.0)
    data = tmp_path / "water.extxyz"
    frames = []
    for k in range(6):
        frame = water.copy()
        frame.positions += np.random.default_rng(k).normal(0, 0.03, frame.positions.shape)
        frames.append(emt_label(frame))
    write(data, frames)
    raw = _finetune_raw(cu_files, tmp_path / "ft", path)
    raw["data"] = {"train": str(data), "valid_fraction": 0.25}
    outcome = train(config_from_dict(raw), registry, verbose=False)
    before, after = load_model(path), load_model(outcome.model_path)
    assert after.elements == [1, 8, 29]
    embedding = after.backbone.embedding.weight
    assert torch.equal(embedding[2], before.backbone.embedding.weight[0])  # Cu's row kept
    assert torch.allclose(embedding[0], before.backbone.embedding.weight.mean(0))  # new: the mean row
    assert float(after.atomic_energies[0, 2]) == float(before.atomic_energies[0, 0])
    residual = [f.get_potential_energy() - _energy(after, f) for f in frames]
    assert abs(np.mean(residual)) < 0.1  # H and O reference energies fitted (on the training part)
    assert float(after.atomic_energies[0, 0]) != 0.0


def _energy(model, atoms):
    from atomforge import AtomforgeCalculator

    work = atoms.copy()
    work.calc = AtomforgeCalculator(model)
    return work.get_potential_energy()


def test_deep_ensemble_members_start_from_the_files_members(registry, cu_files, tmp_path) -> None:
    raw = tiny_config(cu_files, tmp_path / "ens", max_epochs=1)
    raw["uq"] = {"name": "deep_ensemble", "num_members": 2}
    ensemble = train(config_from_dict(raw), registry, verbose=False).model_path
    ft = _finetune_raw(cu_files, tmp_path / "ft", ensemble)
    ft["uq"] = {"name": "deep_ensemble", "num_members": 2}
    tuned = load_model(train(config_from_dict(ft), registry, verbose=False).model_path)
    source = load_model(ensemble)
    for a, b in zip(source.state_dict().items(), tuned.state_dict().items()):
        if not a[0].startswith("calibration."):
            assert a[0] == b[0] and torch.equal(a[1], b[1]), a[0]
