"""Uncertainty flags in everyday use: a UQ calculator that appends uncertain configurations to a
candidates file (with the MD step), `atomforge md --flag-uncertain`, and the `candidates_file`
explorer through which a campaign labels what production flagged."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from ase.io import read, write

from atomforge import AtomforgeCalculator, ConfigError, Potential, config_from_dict, get_labels, load_calculator
from atomforge.active_learning import LabelJournal, campaign_from_dict, run_campaign
from atomforge.cli import main
from atomforge.exploration.records import structure_hash
from atomforge.exploration.flagging import UncertainConfigurationWarning, UncertaintyFlagger, read_candidates
from atomforge.analysis.md import run_md
from atomforge.workflows.train import train

from conftest import cu_structures

TINY = {"backbone": "painn", "cutoff": 4.0, "hidden_channels": 8, "num_layers": 1, "num_rbf": 6}


@pytest.fixture(scope="module")
def uq_model(cu_files, tmp_path_factory, registry) -> Path:
    """A tiny deep-ensemble Cu model file."""
    run = tmp_path_factory.mktemp("flag") / "run"
    raw = {"data": {"train": str(cu_files["train"]), "valid_fraction": 0.25}, "model": TINY,
           "uq": {"name": "deep_ensemble", "num_members": 2}, "output": str(run), "tracking": "none",
           "training": {"max_epochs": 2, "batch_size": 4, "lr": 0.005, "seed": 0}}
    return train(config_from_dict(raw), registry, verbose=False).model_path


def _md(model: Path, level: float, candidates: Path, trajectory: Path | None = None, steps: int = 12):
    calculator = load_calculator(model, flag_uncertain=level, candidates=candidates)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = run_md(cu_structures(1, seed=11)[0], calculator, steps=steps, temperature=600, out=trajectory,
                         interval=1, seed=0, progress=False)
    flags = [w for w in caught if issubclass(w.category, UncertainConfigurationWarning)]
    return summary, flags


def test_md_flags_each_uncertain_step_with_its_structure_and_std_and_warns_once(uq_model, tmp_path) -> None:
    everything, trajectory = tmp_path / "all.extxyz", tmp_path / "traj.extxyz"
    summary, flags = _md(uq_model, 0.0, everything, trajectory)  # level 0: every step is flagged
    frames, steps = read(everything, ":"), list(range(13))
    assert summary.flagged == len(frames) == 13 and [f.info["step"] for f in frames] == steps
    assert len(flags) == 1 and str(everything) in str(flags[0].message)
    for frame, md_frame in zip(frames, read(trajectory, ":")):  # the step's structure, not its neighbour's
        np.testing.assert_allclose(frame.positions, md_frame.positions, atol=1e-6)
        assert frame.calc is None and frame.info["source"] == str(uq_model.resolve())
        assert frame.arrays["forces_std"].shape == (len(frame),) and "model_energy" in frame.info
    check = load_calculator(uq_model)
    for frame in frames[::4]:  # the recorded std is the model's std of that structure
        frame.calc = check
        frame.get_forces()
        assert frame.info["forces_std_max"] == pytest.approx(check.results["forces_std_max"], rel=1e-5)

    sigmas = np.array([f.info["forces_std_max"] for f in frames])
    level = float(np.median(sigmas))
    some = tmp_path / "some.extxyz"
    summary, flags = _md(uq_model, level, some)  # the same seeded trajectory, a real trust level
    flagged = read(some, ":")
    assert [f.info["step"] for f in flagged] == [s for s, sigma in zip(steps, sigmas) if sigma >= level]
    assert 0 < summary.flagged == len(flagged) < 13 and len(flags) == 1
    assert all(f.info["forces_std_max"] >= level and f.info["trust_level"] == level for f in flagged)


def test_md_command_appends_flagged_steps_and_reports_how_many(uq_model, tmp_path, capsys) -> None:
    start, candidates = tmp_path / "start.extxyz", tmp_path / "prod" / "candidates.extxyz"
    write(start, cu_structures(1, seed=12)[0])
    args = ["md", str(uq_model), str(start), "--steps", "5", "--temperature", "300", "--out",
            str(tmp_path / "t.extxyz"), "--flag-uncertain", "0", "--candidates", str(candidates)]
    with pytest.warns(UncertainConfigurationWarning, match="candidates.extxyz"):
        assert main(args) == 0
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert report["flagged"] == 6 and report["candidates"] == str(candidates) and "flagged 6 of 6" in err
    with pytest.warns(UncertainConfigurationWarning):
        assert main(args) == 0  # append-only: a second run adds its frames
    capsys.readouterr()
    assert [a.info["step"] for a in read(candidates, ":")] == [0, 1, 2, 3, 4, 5] * 2
    assert main(["md", str(uq_model), str(start), "--steps", "5", "--temperature", "300",
                 "--candidates", str(candidates)]) == 2
    assert "--candidates needs --flag-uncertain" in capsys.readouterr().err


def test_flagging_without_a_uq_model_is_a_clear_error(registry, tmp_path) -> None:
    backbone = registry.get("backbones", "painn").factory(num_elements=1, cutoff=4.0, hidden_channels=8,
                                                          num_layers=1, num_rbf=6)
    plain = Potential(backbone, elements=[29], atomic_energies=[-3.0]).eval()
    with pytest.raises(ConfigError, match="needs a UQ model"):
        AtomforgeCalculator(plain, flag_uncertain=0.1, candidates=tmp_path / "c.extxyz")
    with pytest.raises(ConfigError, match="needs both flag_uncertain"):
        AtomforgeCalculator(plain, flag_uncertain=0.1)
    with pytest.raises(ConfigError, match="≥ 0"):
        UncertaintyFlagger(tmp_path / "c.extxyz", -1.0)
    assert AtomforgeCalculator(plain).flagger is None and not (tmp_path / "c.extxyz").exists()


def test_candidates_file_explorer_reads_once_each_and_names_bad_files(registry, tmp_path) -> None:
    flagger = UncertaintyFlagger(tmp_path / "c.extxyz", 0.2)
    structures = cu_structures(3, seed=13)
    with pytest.warns(UncertainConfigurationWarning) as caught:
        for atoms in (*structures, structures[1]):  # the last is a repeat
            flagger.observe(atoms, {"forces_std_max": 0.5, "energy": -1.0})
        flagger.observe(structures[0], {"forces_std_max": 0.1})  # below the trust level: not written
    assert len(caught) == 1
    with open(flagger.path, "a") as handle:  # a frame still being written
        handle.write("8\nLattice=\"3.6 0 0 0 3.6 0 0 0 7.2\" Properties=species:S:1:pos:R:3\nCu 0 0 0\n")
    assert flagger.flagged == 4 and flagger.calls == 5 and len(read_candidates(flagger.path)) == 4
    explorer = registry.get("explorers", "candidates_file").factory(paths=[str(flagger.path)] * 2)
    found = explorer.explore([], None, hi=None, seed=0)
    assert [structure_hash(a) for a in found] == [structure_hash(a) for a in structures]
    assert [a.info["step"] for a in found] == [0, 1, 2] and found[0].info["explorer"] == "candidates_file"
    assert found[0].info["flagged_std"] == 0.5 and found[0].calc is None

    missing = tmp_path / "nowhere.extxyz"
    with pytest.raises(ConfigError, match=f"{missing} does not exist.*--flag-uncertain"):
        registry.get("explorers", "candidates_file").factory(path=str(missing))
    empty = tmp_path / "empty.extxyz"
    empty.write_text("")
    with pytest.raises(ConfigError, match=f"{empty} holds no complete extxyz frame"):
        registry.get("explorers", "candidates_file").factory(path=str(empty)).explore([], None, hi=None, seed=0)
    with pytest.raises(ConfigError, match="give `path`"):
        registry.get("explorers", "candidates_file").factory()


def test_a_campaign_labels_configurations_flagged_in_production(uq_model, cu_files, tmp_path, registry) -> None:
    flagged = tmp_path / "production" / "candidates.extxyz"
    summary, _ = _md(uq_model, 0.0, flagged, steps=9)
    assert summary.flagged == 10
    initial = tmp_path / "initial.extxyz"
    write(initial, cu_structures(8, seed=1))
    raw = {  # paths relative to the campaign file's folder (tmp_path)
        "initial_data": "initial.extxyz", "oracle": {"name": "emt", "timeout": 30},
        "train": {"model": TINY, "uq": {"name": "deep_ensemble", "num_members": 2},
                  "training": {"max_epochs": 1, "batch_size": 4, "lr": 0.005}},
        "explorers": [{"name": "candidates_file", "path": "production/candidates.extxyz"}],
        "selector": {"name": "trust_window", "lo": 0.0, "hi": 1e6},
        "budget": {"per_iteration": 4, "total": 8}, "stop": {"max_iterations": 2},
        "executor": {"kind": "serial"}, "tracking": "none", "output": "campaign",
    }
    result = run_campaign(campaign_from_dict(raw, tmp_path), registry, verbose=False)
    journal = LabelJournal(result.directory / "journal.jsonl")
    keys = [e.key for e in journal.with_status("ok")]
    production = {structure_hash(a) for a in read(flagged, ":")}
    assert result.labels == len(keys) == len(set(keys)) == 8  # two iterations, nothing labelled twice
    assert set(keys) <= production
    labelled = read(result.directory / "labelled.extxyz", ":")
    assert all(np.isfinite(get_labels(a).energy) and get_labels(a).forces.shape == (8, 3) for a in labelled)

    with pytest.raises(ConfigError, match="gone.extxyz does not exist"):  # checked before any training
        run_campaign(campaign_from_dict({**raw, "output": "other", "explorers": [
            {"name": "candidates_file", "path": "gone.extxyz"}]}, tmp_path), registry, verbose=False)
    assert not (tmp_path / "other" / "iterations").exists()
