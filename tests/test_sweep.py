"""Scaling sweeps (docs/sweep.md): a grid of trainings tracked as child runs of one MLflow parent,
nested and recorded data subsets, kill and resume without redoing finished points, a process pool,
scaling-law fits with bootstrap intervals, a report regenerated from the MLflow store alone, the
fine-tune-vs-scratch axis and the per-point stability suite through the CLI, and clear config errors."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import yaml
from ase.io import read

from atomforge import (ConfigError, PowerLawFit, compute_frontier, fit_power_law, run_sweep, sweep_config_from_dict,
                       sweep_report_only)
from atomforge.cli import main
from atomforge.workflows import sweep as sweep_module
from atomforge.workflows._sweep_report import _stability
from atomforge.workflows.sweep import draw_subsets

from conftest import write_cu_sets

TINY = {"backbone": "painn", "cutoff": 4.0, "hidden_channels": 8, "num_layers": 1, "num_rbf": 6}


@pytest.fixture(scope="module")
def sweep_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sweep")
    (folder / "mlflow.db").touch()  # this folder is the project: its MLflow store
    return folder, write_cu_sets(folder, {"pool": (40, 1), "test": (8, 2)})


def sweep_raw(folder, files, **extra) -> dict:
    """2 sizes × 2 widths × 1 seed of a tiny PaiNN on EMT Cu (plain data, as read from YAML); two
    x values fit a pure power law (no offset)."""
    raw = {
        "output": str(folder / "sweep"),
        "base": {"model": TINY, "training": {"max_epochs": 3, "batch_size": 4, "lr": 0.005}},
        "data": {"train": str(files["pool"]), "sizes": [8, 16], "valid_size": 6, "test": {"cu": str(files["test"])}},
        "models": [{"name": "w8", "hidden_channels": 8}, {"name": "w16", "hidden_channels": 16}],
        "fits": {"bootstrap": 50, "irreducible": False}, "device": "cpu",
    }
    raw.update(extra)
    return raw


@pytest.fixture(scope="module")
def resumed(sweep_files, registry):
    """A sweep killed during its 2nd point (after one checkpointed epoch), then run again on a
    process pool of 2 workers."""
    folder, files = sweep_files
    config = sweep_config_from_dict(sweep_raw(folder, files))
    real_train, calls = sweep_module.train, []

    def killed_on_the_second_point(run_config, reg, **kwargs):
        calls.append(run_config.output)
        if len(calls) == 2:  # an epoch is checkpointed and tracked, then the process dies
            short = dataclasses.replace(run_config, training=dataclasses.replace(run_config.training, max_epochs=1))
            real_train(short, reg, **kwargs)
            raise KeyboardInterrupt
        return real_train(run_config, reg, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sweep_module, "train", killed_on_the_second_point)
        with pytest.raises(KeyboardInterrupt):
            run_sweep(config, registry, verbose=False)
    points = config.output / "points"
    first, killed = (points / path.parent.name for path in calls)
    before = {"first": (first / "result.json").read_bytes(), "killed_run": json.loads(
        (killed / "train" / "tracking.json").read_text())["run_id"], "killed_has_result": (killed / "result.json").exists()}
    parallel = dataclasses.replace(config, executor=dataclasses.replace(config.executor, kind="process", workers=2))
    outcome = run_sweep(parallel, registry, verbose=False)
    return {"config": config, "outcome": outcome, "first": first, "killed": killed, "before": before}


def _client(config):
    from mlflow.tracking import MlflowClient

    state = json.loads((config.output / "sweep.json").read_text())
    return MlflowClient(state["tracking_uri"]), state["parent_run_id"]


def test_every_point_is_a_child_run_of_one_parent(resumed) -> None:
    config, outcome = resumed["config"], resumed["outcome"]
    assert outcome.failed == {} and len(outcome.results) == 4
    client, parent = _client(config)
    assert client.get_run(parent).data.tags["atomforge.sweep"] == "sweep"
    children = client.search_runs([client.get_run(parent).info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    keys = sorted(run.data.tags["sweep.key"] for run in children)
    assert keys == sorted(outcome.results) and len(set(keys)) == 4  # one run per point, the killed one reused
    run = next(r for r in children if r.data.tags["sweep.key"] == "n16-w16-base-scratch-s0")
    assert run.data.tags["sweep.model"] == "w16" and run.data.metrics["sweep_n_train"] == 16
    assert run.data.metrics["sweep_params"] > 0 and "test_cu_forces_mae" in run.data.metrics
    assert "valid_loss" in run.data.metrics  # the training itself logged into the same run
    parent_files = {a.path for a in client.list_artifacts(parent, "report")}
    assert {"report/scaling_data.png", "report/exponents.md", "report/points.csv"} <= parent_files


def test_a_killed_sweep_resumes_without_redoing_finished_points(resumed) -> None:
    before, results = resumed["before"], resumed["outcome"].results
    assert (resumed["first"] / "result.json").read_bytes() == before["first"]  # done: not run again
    assert not before["killed_has_result"]
    killed = results[resumed["killed"].name]
    assert killed["resumed"] and killed["epochs"] == 3  # continued from its epoch-1 checkpoint …
    assert killed["run_id"] == before["killed_run"]  # … in the same MLflow run
    assert sum(r["resumed"] for r in results.values()) == 1


def test_a_done_point_whose_config_changed_is_refused(resumed, sweep_files, registry) -> None:
    folder, files = sweep_files
    raw = sweep_raw(folder, files)
    raw["base"]["training"]["lr"] = 0.001  # every done point would now mean something else
    with pytest.raises(ConfigError, match="is done, but was trained with another config"):
        run_sweep(sweep_config_from_dict(raw), registry, verbose=False)


def test_subsets_are_nested_recorded_and_disjoint_from_validation(resumed, sweep_files) -> None:
    config = resumed["config"]
    plan = json.loads((config.output / "subsets" / "plan.json").read_text())
    assert plan == {**plan, **draw_subsets(40, [0], valid_size=6, data_seed=0)}  # reproducible from the config
    subsets = {n: json.loads((config.output / "points" / f"n{n}-w8-base-scratch-s0" / "subset.json").read_text())
               ["positions"] for n in (8, 16)}
    assert subsets[8] == subsets[16][:8] and len(set(subsets[16])) == 16  # nested
    assert not set(subsets[16]) & set(plan["valid"]) and len(plan["valid"]) == 6
    pool = read(sweep_files[1]["pool"], ":")
    written = read(config.output / "subsets" / "seed0" / "n16.extxyz", ":")
    assert [a.positions.tolist() for a in written] == [pool[i].positions.tolist() for i in subsets[16]]
    other_seed = draw_subsets(40, [0, 1], valid_size=6, data_seed=0)
    assert other_seed["orders"]["0"] != other_seed["orders"]["1"] and other_seed["valid"] == plan["valid"]


def test_the_report_is_regenerated_from_the_mlflow_store_alone(resumed, registry) -> None:
    config, report = resumed["config"], resumed["outcome"].report
    assert report["source"] == "mlflow" and report["metric"] == "test_cu_forces_mae"
    fitted = {(r["scaling"], r["group"]) for r in report["fits"]}
    assert {("data", "w8/base/scratch"), ("data", "w16/base/scratch"), ("params", "painn/8/base/scratch")} <= fitted
    elsewhere = dataclasses.replace(config, output=config.output.parent / "empty")  # none of the sweep's files:
    again = sweep_report_only(elsewhere, registry)  # the parent run is found by its tag in the project's store
    assert again["source"] == "mlflow" and again["points"] == 4
    assert [r["alpha"] for r in again["fits"]] == [r["alpha"] for r in report["fits"]]
    assert {"scaling_data.png", "scaling_params.png", "compute_frontier.png", "exponents.md"} <= {
        p.name for p in (elsewhere.output / "report").iterdir()}
    assert (elsewhere.output / "report" / "points.csv").read_text() == (config.output / "report" / "points.csv").read_text()


def test_fit_power_law_recovers_a_known_law_within_its_interval() -> None:
    rng = np.random.default_rng(7)
    a, alpha, c = 3.0, 0.6, 0.04
    x = np.repeat(2.0 ** np.arange(4, 13), 3)  # 9 sizes over 2.4 decades, 3 seeds each
    y = (a * x ** -alpha + c) * np.exp(rng.normal(0.0, 0.03, x.size))
    fit = fit_power_law(x, y, bootstrap=300, rng=0)
    assert isinstance(fit, PowerLawFit) and fit.method == "seeds" and fit.n_x == 9
    assert fit.alpha == pytest.approx(alpha, rel=0.08) and fit.c == pytest.approx(c, rel=0.25)
    for value, (lo, hi) in ((a, fit.a_ci), (alpha, fit.alpha_ci), (c, fit.c_ci)):
        assert lo < value < hi
    low, high = fit.band([100.0])
    assert low[0] < a * 100 ** -alpha + c < high[0]
    single = fit_power_law(x[::3], y[::3], bootstrap=100, irreducible=False)  # one seed: residual bootstrap, c = 0
    assert single.method == "residuals" and single.c == 0.0 and 0.4 < single.alpha < 0.7
    with pytest.raises(ValueError, match="≥ 3 distinct x"):
        fit_power_law([1, 2, 1, 2], [3, 2, 3, 2])  # an offset needs a third x
    with pytest.raises(ValueError, match="> 0"):
        fit_power_law([1, 2, 3], [1.0, -1.0, 0.5])


def test_compute_frontier_keeps_the_points_no_cheaper_point_beats() -> None:
    assert compute_frontier([1, 2, 3, 4, 5], [5.0, 6.0, 3.0, 3.0, 1.0]).tolist() == [0, 2, 4]
    points = [{"metrics": {"f": e, "stability_stable_time_ps_mean": t}} for e, t in ((1, 9), (2, 7), (3, 8), (4, 1))]
    assert _stability(points, "f")["spearman_rho"] == pytest.approx(-0.8)


def test_the_cli_runs_a_fine_tune_versus_scratch_axis_with_stability(resumed, sweep_files, tmp_path, capsys) -> None:
    folder, files = sweep_files
    pretrained = resumed["outcome"].results["n16-w8-base-scratch-s0"]["model_file"]
    raw = sweep_raw(folder, files, output=str(tmp_path / "ft"), tracking="none",
                    models=[{"name": "w8", "hidden_channels": 8}],
                    init=["scratch", {"name": "ft", "init_from": pretrained, "finetune": {"freeze": ["embedding"]}}],
                    stability={"n_starts": 1, "steps": 10, "check_every": 5, "nve": None})
    raw["data"]["sizes"] = [8]
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["sweep", str(path), "--quiet", "--set", "base.training.max_epochs=2"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["points"] == 2 and printed["source"] == "files"
    trained = yaml.safe_load((tmp_path / "ft/points/n8-w8-base-ft-s0/train/config.yaml").read_text())
    assert trained["model"]["init_from"] == pretrained and trained["finetune"]["freeze"] == ["embedding"]
    result = json.loads((tmp_path / "ft/points/n8-w8-base-ft-s0/result.json").read_text())
    assert 0.0 <= result["metrics"]["stability_stable_fraction"] <= 1.0
    assert "| 8 | w8 | base | ft |" in (tmp_path / "ft/report/finetune.md").read_text()


@pytest.mark.parametrize("change, message", [
    ({"colour": 1}, "unknown key"),
    ({"base": {"data": {"train": "x.extxyz"}}}, "set by the sweep"),
    ({"models": [{"name": "a"}, {"name": "a"}]}, "used twice"),
    ({"models": [{"name": "a-b"}]}, "no '-'"),
    ({"executor": {"kind": "slurm"}}, "serial, process, dask"),
    ({"seeds": [0, 0]}, "distinct"),
    ({"init": [{"name": "ft", "init_from": "missing.pt"}]}, "does not exist"),
])
def test_bad_configs_say_what_to_change(sweep_files, change, message) -> None:
    folder, files = sweep_files
    with pytest.raises(ConfigError, match=message):
        sweep_config_from_dict(sweep_raw(folder, files, **change))


def test_sizes_beyond_the_pool_and_bad_model_options_fail_before_training(sweep_files, registry, tmp_path) -> None:
    folder, files = sweep_files
    raw = sweep_raw(folder, files, output=str(tmp_path / "big"), tracking="none")
    raw["data"]["sizes"] = {"base": 2, "from": 3, "to": 6}  # 64 > 40 structures
    with pytest.raises(ConfigError, match="exceed the 40 structures"):
        run_sweep(sweep_config_from_dict(raw), registry, verbose=False)
    raw = sweep_raw(folder, files, output=str(tmp_path / "typo"), tracking="none",
                    models=[{"name": "w8"}, {"name": "bad", "overrides": {"model": {"backbone": "nope"}}}])
    with pytest.raises(ConfigError, match="sweep point .*bad"):
        run_sweep(sweep_config_from_dict(raw), registry, verbose=False)
    assert not (tmp_path / "typo" / "points").exists()  # nothing trained
