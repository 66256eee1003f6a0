"""The MD-stability suite (docs/stability.md): EMT against its own reference MD, broken force
fields, the RDF's normalisation, the CLI on a tiny PaiNN, config errors, and the campaign gate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from ase import Atoms
from ase.build import bulk, molecule
from ase.calculators.calculator import Calculator, all_changes
from ase.calculators.emt import EMT
from ase.calculators.lj import LennardJones

from atomforge import ConfigError, config_from_dict, run_stability_suite, stability_config_from_dict, train
from atomforge.active_learning import campaign_from_dict, run_campaign
from atomforge.analysis.stability import RDFConfig, radial_distribution
from atomforge.cli import main
from conftest import campaign_raw, journal_keys, tiny_config

KEYS = {"stable_fraction", "stable_time_ps_mean", "stable_time_ps_min", "nve_drift_meV_per_atom_ps", "passed"}


class WildForces(Calculator):
    """A broken force field: zero energy, forces drawn at random (σ = 20 eV/Å) at every call."""

    implemented_properties = ["energy", "forces"]

    def __init__(self) -> None:
        super().__init__()
        self.rng = np.random.default_rng(0)

    def calculate(self, atoms: Atoms | None = None, properties=("energy",), system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        self.results = {"energy": 0.0, "forces": self.rng.normal(0.0, 20.0, (len(self.atoms), 3))}


def _cu(repeat: tuple[int, int, int] = (2, 2, 2)) -> Atoms:
    return bulk("Cu", "fcc", a=3.61, cubic=True).repeat(repeat)


def test_emt_is_md_stable_and_matches_its_own_reference_md(tmp_path: Path) -> None:
    config = stability_config_from_dict({
        "starts": [_cu()], "temperatures": [300, 900], "n_starts": 2, "steps": 100, "timestep_fs": 2.0,
        "reference": {"oracle": {"name": "emt"}}, "rdf": {"r_max": 5.0, "bins": 50}, "max_rdf_error": 0.2})
    metrics = run_stability_suite(EMT(), config, out_dir=tmp_path / "emt")
    assert KEYS | {"stable_time_ps/300K", "stable_time_ps/900K", "rdf_error"} <= set(metrics)
    assert metrics["stable_fraction"] == 1.0 and metrics["passed"] == 1.0
    assert metrics["stable_time_ps_min"] == metrics["stable_time_ps/900K"] == pytest.approx(0.2)
    assert abs(metrics["nve_drift_meV_per_atom_ps"]) < 1.0  # EMT conserves energy at 2 fs
    assert metrics["rdf_error"] < 0.15  # independent MD of the same potential: sampling noise only (0.07)
    report = json.loads((tmp_path / "emt" / "stability.json").read_text())
    assert len(report["runs"]) == 4 and not any(run["failure"] for run in report["runs"])
    assert (tmp_path / "emt" / "stability_time.png").exists() and (tmp_path / "emt" / "rdf.png").exists()
    cached = list((tmp_path / "emt" / "reference").glob("reference-*.extxyz"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns

    again = run_stability_suite(EMT(), config, out_dir=tmp_path / "emt")  # deterministic; reference from cache
    assert {k: v for k, v in again.items() if k != "ms_per_step"} == {
        k: v for k, v in metrics.items() if k != "ms_per_step"}
    assert cached[0].stat().st_mtime_ns == stamp

    # a stable but different potential: LJ Cu keeps running, and the RDF says it is another solid
    lj = run_stability_suite(LennardJones(sigma=2.3, epsilon=0.4, rc=5.0), config, out_dir=tmp_path / "lj",
                             reference_dir=tmp_path / "emt" / "reference")
    assert lj["stable_fraction"] == 1.0 and lj["rdf_error"] > 3 * metrics["rdf_error"] and lj["passed"] == 0.0


def test_a_force_field_with_wild_forces_is_unstable(tmp_path: Path) -> None:
    for name, start in (("crystal", _cu((1, 1, 2))), ("molecule", molecule("CH3CH2OH"))):
        config = stability_config_from_dict({"starts": [start], "temperatures": [300, 600], "n_starts": 2,
                                             "steps": 100, "timestep_fs": 0.5})
        metrics = run_stability_suite(WildForces(), config, out_dir=tmp_path / name)
        assert metrics["stable_fraction"] == 0.0 and metrics["passed"] == 0.0, name
        assert metrics["stable_time_ps_mean"] < 0.05 and metrics["nve_stable_time_ps"] < 0.05
        runs = json.loads((tmp_path / name / "stability.json").read_text())["runs"]
        assert all(run["failure"] for run in runs)


def test_rdf_normalisation_crystal_and_molecule() -> None:
    crystal = _cu()
    r, g = radial_distribution([crystal], RDFConfig(r_max=3.0, bins=300))
    rho = len(crystal) / crystal.get_volume()
    dr = r[1] - r[0]
    assert np.sum(g["all"] * rho * 4 * np.pi * r**2 * dr) == pytest.approx(12.0, rel=0.02)  # fcc: 12 neighbours

    water = molecule("H2O")
    r, p = radial_distribution([water], RDFConfig(r_max=3.0, bins=60, pairs=(("O", "H"), ("H", "H"))))
    assert set(p) == {"O-H", "H-H"}
    assert np.sum(p["O-H"]) * (r[1] - r[0]) == pytest.approx(1.0)  # both O–H pairs within r_max
    stretched = water.copy()
    stretched.positions[1] += 5.0 * (stretched.positions[1] - stretched.positions[0])  # one H leaves
    _, p = radial_distribution([stretched], RDFConfig(r_max=3.0, bins=60, pairs=(("O", "H"),)))
    assert np.sum(p["O-H"]) * (r[1] - r[0]) == pytest.approx(0.5)  # the missing weight shows


@pytest.fixture(scope="module")
def painn_model(cu_files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory, registry) -> Path:
    """A tiny PaiNN trained for a few seconds on EMT Cu."""
    out = tmp_path_factory.mktemp("painn")
    raw = tiny_config(cu_files, out / "run", max_epochs=3)
    raw["model"].update(hidden_channels=8, num_layers=1)
    return train(config_from_dict(raw, out), registry, verbose=False).model_path


def test_cli_runs_the_suite_on_a_tiny_painn(painn_model: Path, tmp_path: Path, capsys) -> None:
    config = tmp_path / "stability.yaml"
    write = yaml.safe_dump({"starts": "cu.extxyz", "temperatures": [300], "n_starts": 1, "steps": 60,
                            "reference": {"oracle": "emt"}, "rdf": {"r_max": 4.0, "bins": 40}})
    config.write_text(write)
    from ase.io import write as write_atoms

    write_atoms(tmp_path / "cu.extxyz", _cu((1, 1, 2)))
    code = main(["stability", str(painn_model), str(config), "--tracking", "none", "--out", str(tmp_path / "out"),
                 "--set", "temperatures=[300,600]", "--quiet"])
    printed = json.loads(capsys.readouterr().out)
    assert KEYS | {"stable_time_ps/600K", "rdf_error", "verdict"} <= set(printed)
    assert code == (0 if printed["passed"] == 1.0 else 1)
    assert np.isfinite(printed["rdf_error"]) and printed["runs"] == 2.0
    assert Path(printed["report"]).exists()


def test_bad_configs_say_what_is_wrong(tmp_path: Path, al_files) -> None:
    cases = [({"temperatures": [-5]}, "temperatures: expected a number > 0"),
             ({"steps": 0}, "steps: expected an integer ≥ 1"),
             ({"temperatures": [300, 300]}, "temperatures: each temperature once"),
             ({"thermostat": "nose"}, "unknown key(s) ['thermostat']"),
             ({"reference": {"steps": 10}}, "give exactly one of trajectory"),
             ({"rdf": {"pairs": ["Cu-Xx"]}}, "rdf.pairs: expected 'all' or element pairs"),
             ({"max_rdf_error": 0.1}, "max_rdf_error needs a reference"),
             ({"min_stable_fraction": 1.5}, "min_stable_fraction: expected a number ≥ 0 and ≤ 1")]
    for raw, message in cases:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")
                           .replace("[", r"\[").replace("]", r"\]")):
            stability_config_from_dict(raw)
    with pytest.raises(ConfigError, match="`starts` is required"):
        run_stability_suite(EMT(), stability_config_from_dict({}), out_dir=tmp_path)
    slab = _cu((1, 1, 2))
    slab.pbc = [True, True, False]
    with pytest.raises(ConfigError, match="periodic along some axes only"):
        run_stability_suite(EMT(), stability_config_from_dict({"starts": [slab]}), out_dir=tmp_path)
    raw = campaign_raw(al_files, tmp_path / "c", stop={"md_stable": {"temperature": 300}})
    with pytest.raises(ConfigError, match=r"stop.md_stable: stability config: unknown key\(s\) \['temperature'\]"):
        campaign_from_dict(raw)


# -- the campaign gate ----------------------------------------------------------------------------------
GATE = {"temperatures": [300], "n_starts": 1, "steps": 30}


def _mini_campaign(al_files, output: Path, **extra: object) -> dict:  # noqa: ANN001
    """The test campaign, one training epoch, exploring by perturbation only (fast)."""
    raw = campaign_raw(al_files, output, uq={"name": "latent_distance"}, selector={"name": "random"},
                       explorers=[{"name": "perturb", "n_per_start": 3, "rattle_std": 0.1}], **extra)
    raw["train"]["training"]["max_epochs"] = 1
    return raw


def _gated_suite(monkeypatch: pytest.MonkeyPatch, broken: set[int], kill_at: int | None = None) -> list[int]:
    """Measure iterations in ``broken`` with :class:`WildForces` standing in for their model (an
    unstable model), the others for real; a ``KeyboardInterrupt`` the first time ``kill_at`` is
    measured (a driver killed during the suite). Returns the iterations measured, in order."""
    import atomforge.active_learning._loop as loop

    real, calls = loop.run_stability_suite, []

    def suite(model, config, **options):  # noqa: ANN001, ANN003
        iteration = int(Path(model).parent.parent.name)
        calls.append(iteration)
        if iteration == kill_at and calls.count(iteration) == 1:
            raise KeyboardInterrupt("simulated kill during the stability suite")
        return real(WildForces() if iteration in broken else model, config, **options)

    monkeypatch.setattr(loop, "run_stability_suite", suite)
    return calls


def test_gate_keeps_a_campaign_going_while_unstable_and_stops_it_when_stable(al_files, tmp_path, registry,
                                                                               monkeypatch) -> None:
    calls = _gated_suite(monkeypatch, broken={0}, kill_at=1)
    raw = _mini_campaign(al_files, tmp_path / "c", budget={"per_iteration": 3, "total": 30},
                         stop={"max_iterations": 4, "target_forces_mae": 1e9, "md_stable": GATE})
    with pytest.raises(KeyboardInterrupt):  # the target is met at iteration 0, but the model is unstable: go on
        run_campaign(campaign_from_dict(raw), registry, verbose=False)
    state = json.loads((tmp_path / "c" / "state.json").read_text())
    assert (state["iteration"], state["phase"]) == (1, "stability")
    labels = journal_keys(tmp_path / "c")
    result = run_campaign(campaign_from_dict(raw), registry, verbose=False)  # resumes in the suite
    assert calls == [0, 1, 1]  # iteration 0's suite is not run again
    assert result.iterations == 1 and journal_keys(result.directory) == labels and len(labels) == 3
    assert result.stopped_because.startswith("target forces MAE reached")
    assert "; model MD-stable at 300 K" in result.stopped_because
    history = json.loads((result.directory / "state.json").read_text())["history"]
    assert [h["md_stable_fraction"] for h in history] == [0.0, 1.0]
    assert [h["md_passed"] for h in history] == [0.0, 1.0] and "time_stability_s" in history[1]
    first = json.loads((result.directory / "iterations" / "000" / "stability" / "stability.json").read_text())
    assert first["runs"][0]["failure"] and "not MD-stable" in first["verdict"]


def test_a_used_budget_stops_a_campaign_whose_model_never_passes(al_files, tmp_path, registry, monkeypatch) -> None:
    _gated_suite(monkeypatch, broken={0, 1, 2, 3})
    raw = _mini_campaign(al_files, tmp_path / "c", budget={"per_iteration": 3, "total": 3},
                         stop={"max_iterations": 5, "md_stable": GATE},
                         tracking={"name": "mlflow", "experiment": "gate-test"})
    result = run_campaign(campaign_from_dict(raw), registry, verbose=False)
    assert result.stopped_because == ("label budget used (3 of 3); model not MD-stable at 300 K: stable_fraction "
                                      "0.00 (need ≥ 1)")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("gate-test").experiment_id
    runs = {r.info.run_name: r for r in client.search_runs([experiment])}
    child = runs["iteration-001"]
    assert child.data.metrics["md_stable_fraction"] == 0.0 and "md_stable_time_ps/300K" in child.data.metrics
    assert {"stability/stability_time.png", "stability/stability.json"} <= {
        a.path for a in client.list_artifacts(child.info.run_id, "stability")}
