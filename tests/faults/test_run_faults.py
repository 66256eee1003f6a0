"""Fault injection for training runs, evaluation and model files: partial labels scored per
structure, corrupted and damaged model files refused, NaN outputs never passed on as numbers,
configs out of range or with duplicate keys refused, ``--resume`` that checks the config first,
no epoch logged twice after a resume, temporary files of killed writers cleaned up, a diverging
run stopped with its last checkpoint kept."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from ase.io import read, write

from atomforge import (
    ConfigError,
    LossSpec,
    ModelFileError,
    ModelOutputError,
    TrainingDivergedError,
    config_from_dict,
    evaluate,
    get_labels,
    has_checkpoint,
    hookimpl,
    load_calculator,
    load_config,
    load_model,
    make_plugin_manager,
    make_registry,
    read_model_file,
    read_training_state,
    save_model,
    train,
)
from atomforge import keys as K
from conftest import cu_structures, tiny_config

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "atomforge", *args], env=ENV, capture_output=True, text=True,
                          cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, registry) -> Path:
    """A small trained Cu model file."""
    folder = tmp_path_factory.mktemp("trained")
    files = {"train": folder / "train.extxyz", "test": folder / "test.extxyz"}
    write(files["train"], cu_structures(16, seed=1))
    write(files["test"], cu_structures(4, seed=2))
    return train(config_from_dict(tiny_config(files, folder / "run", max_epochs=2)), registry,
                 verbose=False).model_path


# -- partial labels -------------------------------------------------------------------------------------------
def test_a_label_missing_on_some_structures_is_scored_where_it_exists(trained, tmp_path, registry) -> None:
    frames = cu_structures(40, seed=5)
    for k in (3, 17):  # two of forty frames lack an energy
        frames[k].calc.results.pop("energy")
        frames[k].calc.results.pop("free_energy")
    write(tmp_path / "partial.extxyz", frames)
    partial = read(tmp_path / "partial.extxyz", ":")
    assert [get_labels(a).energy is None for a in partial].count(True) == 2
    model = load_model(trained, registry=registry)
    acc = evaluate(model, partial, batch_size=8)
    assert acc.counts == {"energy": 38, "forces": 40, "stress": 40}
    # the truth over the 38 labelled frames, one structure at a time
    errors = []
    for atoms in partial:
        if get_labels(atoms).energy is not None:
            single = evaluate(model, [atoms]).arrays("energy_per_atom")
            errors.append(abs(single[0][0] - single[1][0]) * 1000)
    assert acc.metrics()["energy_mae"] == pytest.approx(float(np.mean(errors)), rel=1e-6)
    done = _cli("evaluate", str(trained), str(tmp_path / "partial.extxyz"), "--batch-size", "8")
    assert done.returncode == 0, done.stderr
    assert "(40 structures)" in done.stdout and "(38 of 40 structures)" in done.stdout
    report = json.loads(_cli("evaluate", str(trained), str(tmp_path / "partial.extxyz"), "--json").stdout)
    entry = report[str(tmp_path / "partial.extxyz")]
    assert (entry["energy_count"], entry["forces_count"], entry["n_structures"]) == (38, 40, 40)


def test_losses_ignore_the_structures_a_label_is_missing_from(registry) -> None:
    from atomforge import GraphDataset, collate

    frames = cu_structures(4, seed=6)
    full = collate(GraphDataset(frames, 4.0).graphs)
    frames[1].calc.results.pop("energy")
    partial = collate(GraphDataset(frames, 4.0).graphs)
    assert partial[K.ENERGY + "_mask"].tolist() == [True, False, True, True]
    term = registry.get("losses", "energy").factory()
    outputs = {K.ENERGY: full[K.ENERGY] + torch.tensor([0.1, 5.0, 0.2, 0.3], dtype=full[K.ENERGY].dtype)}
    expected = float(((torch.tensor([0.1, 0.2, 0.3]) / 8) ** 2).mean())
    assert float(term(partial, outputs, None)) == pytest.approx(expected, rel=1e-5)  # the 5 eV outlier is masked
    none = {**partial, K.ENERGY + "_mask": torch.zeros(4, dtype=torch.bool)}
    assert float(term(none, outputs, None)) == 0.0  # a batch without any energy contributes nothing, not NaN


# -- model files ----------------------------------------------------------------------------------------------
def _weight_offset(path: Path, tensor: torch.Tensor) -> int:
    """Byte offset of ``tensor``'s data inside the saved file (found by its bytes)."""
    data = path.read_bytes()
    needle = tensor.contiguous().numpy().tobytes()[:64]
    offset = data.find(needle)
    assert offset > 0
    return offset


def test_a_model_file_with_flipped_bytes_is_refused(trained, tmp_path) -> None:
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(trained.read_bytes())
    _, _, state = read_model_file(trained)
    name = max(state, key=lambda k: state[k].numel())
    offset = _weight_offset(damaged, state[name])
    data = bytearray(damaged.read_bytes())
    data[offset : offset + 64] = bytes(b ^ 0xFF for b in data[offset : offset + 64])
    damaged.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="is corrupted: its content hash"):
        load_model(damaged)
    done = _cli("evaluate", str(damaged), str(trained.parent.parent / "test.extxyz"))
    assert done.returncode == 2 and "corrupted" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("change, message", [
    (lambda payload: payload.update(config="{not json"), "not valid JSON"),
    (lambda payload: payload.update(config=json.dumps({**json.loads(payload["config"]), "cutoff": -4.0})),
     "cutoff must be a positive number"),
    (lambda payload: payload.update(config=json.dumps({**json.loads(payload["config"]), "elements": []})),
     "elements must be a non-empty list"),
    (lambda payload: payload["state_dict"].pop(next(iter(payload["state_dict"]))), "weights do not fit|corrupted"),
])
def test_a_damaged_model_config_is_a_model_file_error(trained, tmp_path, change, message) -> None:
    payload = torch.load(trained, weights_only=True)
    change(payload)
    payload.pop("sha256")  # as if written without a hash: the config checks must still catch it
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(ModelFileError, match=message):
        load_model(tmp_path / "bad.pt")


def test_nan_outputs_are_errors_in_the_calculator_evaluate_and_md(trained, tmp_path, registry) -> None:
    model = load_model(trained, registry=registry)
    config, metadata, _ = read_model_file(trained)
    with torch.no_grad():
        next(p for p in model.parameters() if p.ndim == 2).fill_(float("nan"))
    nan_file = save_model(model, tmp_path / "nan.pt", config=config, metadata=metadata)  # a valid, NaN-making file
    atoms = cu_structures(1, seed=9)[0]
    atoms.calc = load_calculator(nan_file)
    with pytest.raises(ModelOutputError, match="the model returned NaN/inf.*energy of structure"):
        atoms.get_potential_energy()
    write(tmp_path / "start.extxyz", atoms)
    test_file = trained.parent.parent / "test.extxyz"
    for args in (("evaluate", str(nan_file), str(test_file)),
                 ("md", str(nan_file), str(tmp_path / "start.extxyz"), "--steps", "5", "--temperature", "300",
                  "--out", str(tmp_path / "md.extxyz"))):
        done = _cli(*args)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert "NaN/inf" in done.stderr and "Traceback" not in done.stderr


# -- configs --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mutate, message", [
    (lambda c: c["training"].update(max_time=-5), r"training.max_time = -5.0 \(expected > 0 s"),
    (lambda c: c["training"].update(max_time=0), r"training.max_time = 0.0"),
    (lambda c: c["loss"][1].update(weight=-1.0), r"loss\[1\].weight \(forces\) = -1.0 \(expected ≥ 0"),
    (lambda c: c["model"].update(cutoff=-4), r"model.cutoff = -4.0 \(expected > 0 Å\)"),
    (lambda c: c["training"].update(lr=float("nan")), r"training.lr = nan"),
    (lambda c: c["training"].update(ema_decay=1.5), r"training.ema_decay = 1.5 \(expected in \(0, 1\)"),
    (lambda c: c["training"].update(grad_clip=0), r"training.grad_clip = 0.0"),
])
def test_values_out_of_range_are_refused_before_anything_runs(cu_files, tmp_path, mutate, message) -> None:
    raw = tiny_config(cu_files, tmp_path / "run")
    mutate(raw)
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw)
    assert not (tmp_path / "run").exists()


def test_a_key_given_twice_in_yaml_names_both_lines(cu_files, tmp_path) -> None:
    text = yaml.safe_dump(tiny_config(cu_files, tmp_path / "run"), sort_keys=False)
    text += "training:\n  lr: 0.1\n"  # a second training block: YAML would silently keep this one
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError, match=r"line \d+: key 'training' is given twice \(first on line \d+\)"):
        load_config(tmp_path / "c.yaml")
    done = _cli("train", str(tmp_path / "c.yaml"))
    assert done.returncode == 2 and "given twice" in done.stderr


# -- resume -------------------------------------------------------------------------------------------------
def test_resume_refuses_an_incompatible_config_and_writes_nothing(registry, cu_files, tmp_path) -> None:
    raw = tiny_config(cu_files, tmp_path / "run", max_epochs=2)
    train(config_from_dict(raw), registry, verbose=False)
    run = tmp_path / "run"
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    for key, value, shown in (("model", {**raw["model"], "hidden_channels": 32}, "model.hidden_channels: 16 → 32"),
                              ("training", {**raw["training"], "seed": 4}, "training.seed: 3 → 4"),
                              ("data", {**raw["data"], "train": str(cu_files["test"])}, "data.train.path")):
        changed = {**raw, key: value, "training": {**(value if key == "training" else raw["training"]), "max_epochs": 4}}
        with pytest.raises(ConfigError, match="would not continue the same run") as caught:
            train(config_from_dict(changed), registry, resume=True, verbose=False)
        assert shown in str(caught.value)
        assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # nothing written
    # stopping limits may change
    train(config_from_dict({**raw, "training": {**raw["training"], "max_epochs": 3}}), registry, resume=True,
          verbose=False)
    assert read_training_state(run)["epoch"] == 3


def test_a_resumed_run_logs_every_epoch_once(registry, cu_files, tmp_path, monkeypatch) -> None:
    """A kill after an epoch was logged but before its checkpoint: the resumed run re-runs that
    epoch and must not log it a second time."""
    from mlflow.tracking import MlflowClient

    from atomforge import Trainer

    raw = tiny_config(cu_files, tmp_path / "run", max_epochs=4)
    raw["tracking"] = {"name": "mlflow", "experiment": "resume-once"}
    original = Trainer.save_checkpoint

    def killed_at_epoch_3(self):  # noqa: ANN001
        if self.epoch == 3:
            raise KeyboardInterrupt  # the epoch's metrics are already logged
        original(self)

    monkeypatch.setattr(Trainer, "save_checkpoint", killed_at_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        train(config_from_dict(raw), registry, verbose=False)
    monkeypatch.setattr(Trainer, "save_checkpoint", original)
    assert read_training_state(tmp_path / "run")["epoch"] == 2
    train(config_from_dict(raw), registry, resume=True, verbose=False)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")  # the project's store
    run_id = json.loads((tmp_path / "run" / "tracking.json").read_text())["run_id"]
    steps = [m.step for m in client.get_metric_history(run_id, "valid_loss")]
    assert sorted(steps) == [1, 2, 3, 4]


def test_temporary_files_of_a_killed_writer_are_removed_on_resume(registry, cu_files, tmp_path) -> None:
    raw = tiny_config(cu_files, tmp_path / "run", max_epochs=1)
    train(config_from_dict(raw), registry, verbose=False)
    folder = tmp_path / "run" / "checkpoint" / "epoch1"
    stale = folder / ".trainer.pt.tmp999999999"  # no such process
    live = folder / f".trainer.pt.tmp{os.getppid()}"  # a process that is alive: not ours to touch
    stale.write_bytes(b"half")
    live.write_bytes(b"busy")
    train(config_from_dict({**raw, "training": {**raw["training"], "max_epochs": 2}}), registry, resume=True,
          verbose=False)
    assert not stale.exists() and live.exists()


def test_a_diverging_run_stops_with_a_clear_error_and_keeps_its_checkpoint(cu_files, tmp_path) -> None:
    class NaNAfterFirstEpoch:
        requires: tuple[str, ...] = ()
        outputs: tuple[str, ...] = ()
        calls = 0

        def __call__(self, batch, outputs, model):  # noqa: ANN001, ANN204
            if model.training:
                NaNAfterFirstEpoch.calls += 1
            bad = model.training and NaNAfterFirstEpoch.calls > 5  # the first epoch has 5 steps
            return outputs[K.ENERGY].sum() * (float("nan") if bad else 0.0)

    @hookimpl
    def register_losses(register):
        register(LossSpec("nan_later", NaNAfterFirstEpoch))

    import types

    plugin = types.SimpleNamespace(__name__="nan_plugin", register_losses=register_losses)
    registry = make_registry(make_plugin_manager(entry_points=False, extra=[plugin]))
    raw = tiny_config(cu_files, tmp_path / "run", max_epochs=3)
    raw["loss"].append({"name": "nan_later"})
    with pytest.raises(TrainingDivergedError, match="training loss became nan at epoch 2, step 1"):
        train(config_from_dict(raw), registry, verbose=False)
    assert has_checkpoint(tmp_path / "run") and read_training_state(tmp_path / "run")["epoch"] == 1


def test_a_campaigns_training_block_is_range_checked_when_it_is_read(al_files, tmp_path) -> None:
    from atomforge.active_learning import campaign_from_dict
    from conftest import campaign_raw

    raw = campaign_raw(al_files, tmp_path / "c")
    raw["train"]["warm_start"] = {"training": {"lr": -0.1}}
    with pytest.raises(ConfigError, match=r"train: training: .*lr > 0; got .*lr=-0.1"):
        campaign_from_dict(raw)
    raw = campaign_raw(al_files, tmp_path / "c", starts_per_iteration=0)
    with pytest.raises(ConfigError, match="starts_per_iteration must be ≥ 1"):
        campaign_from_dict(raw)
    assert not (tmp_path / "c").exists()
