"""The ``mace`` backbone plugin (mace-torch): physics kit, MACE's own numbers for imported files,
training from scratch with atomforge's losses, UQ heads, fine-tuning a MACE file, a campaign and
the DeepSpeed engine.

mace-torch pins e3nn 0.4.4 and SevenNet (in the main test extra) needs e3nn ≥ 0.5, so these tests
run in their own environment (``pip install -e '.[test-mace]'``; the README's test command makes
it). Selected with ``-m mace``; in the main environment they are skipped as a module.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from ase import Atoms
from ase.build import bulk, molecule
from ase.io import write

pytestmark = [pytest.mark.mace,
              pytest.mark.skipif(importlib.util.find_spec("mace") is None,
                                 reason="mace-torch is not installed here (its own venv: pip install -e '.[test-mace]')")]

from atomforge import (  # noqa: E402
    ConfigError, ModelFileError, config_from_dict, load_calculator, load_model, read_model_file,
)
from atomforge.model.modelfile import import_model  # noqa: E402
from atomforge.testing import check_backbone  # noqa: E402
from atomforge.workflows.train import train  # noqa: E402

from conftest import cu_structures, emt_label, tiny_config  # noqa: E402

SMALL = {"avg_num_neighbors": 4.0, "num_channels": 8, "max_ell": 2, "correlation": 2, "radial_MLP": [16],
         "MLP_irreps": "4x0e"}
TRAIN_SMALL = {"num_channels": 8, "max_ell": 1, "correlation": 2, "radial_MLP": [8], "MLP_irreps": "4x0e",
               "num_bessel": 6}


def _backbone():
    from atomforge.plugins.mace import MACEBackbone

    return MACEBackbone


@pytest.mark.parametrize("options", [SMALL, {**SMALL, "max_L": 1, "pair_repulsion": True, "atomic_numbers": [1, 8]}],
                         ids=["64x0e-like", "L1+zbl"])
def test_mace_backbone_passes_the_physics_kit(options) -> None:
    results = check_backbone(_backbone(), options=options)
    assert all(r.passed for r in results), [r for r in results if not r.passed]


def test_bad_options_are_clear_errors() -> None:
    backbone = _backbone()
    with pytest.raises(ConfigError, match="avg_num_neighbors must be a positive number.*fitted to the training data"):
        backbone(num_elements=2, cutoff=4.0, avg_num_neighbors="auto")
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['channels'\]"):
        backbone(num_elements=2, cutoff=4.0, avg_num_neighbors=3.0, channels=8)
    with pytest.raises(ConfigError, match="interaction_cls 'Nope' is not one of"):
        backbone(num_elements=2, cutoff=4.0, avg_num_neighbors=3.0, interaction_cls="Nope")
    with pytest.raises(ConfigError, match="head 'pt' is not one of"):
        backbone(num_elements=2, cutoff=4.0, avg_num_neighbors=3.0, head="pt")


def test_importing_mace_does_not_leave_torch_load_unsafe() -> None:
    _backbone()(num_elements=1, cutoff=3.0, **SMALL)
    assert os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD") is None


# -- a user's MACE model file --------------------------------------------------------------------
@pytest.fixture(scope="module")
def mace_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small ScaleShiftMACE as ``mace_run_train`` builds it (L = 1, ZBL, float64), perturbed
    weights, saved the way MACE saves models (``torch.save`` of the module)."""
    import mace  # noqa: F401
    from e3nn import o3
    from mace import modules

    torch.manual_seed(0)
    with torch.random.fork_rng():
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            model = modules.ScaleShiftMACE(
                r_max=4.5, num_bessel=6, num_polynomial_cutoff=5, max_ell=2,
                interaction_cls=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
                interaction_cls_first=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
                num_interactions=2, num_elements=3, hidden_irreps=o3.Irreps("8x0e+8x1o"),
                MLP_irreps=o3.Irreps("4x0e"), atomic_energies=np.array([-13.6, -1030.0, -2040.0]),
                avg_num_neighbors=6.0, atomic_numbers=[1, 6, 8], correlation=2, gate=torch.nn.functional.silu,
                pair_repulsion=True, radial_MLP=[16, 16], atomic_inter_scale=0.7, atomic_inter_shift=0.05)
        finally:
            torch.set_default_dtype(previous)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(0.1 * torch.randn_like(parameter))
    path = tmp_path_factory.mktemp("mace") / "small.model"
    torch.save(model, path)
    return path


def _ethanol(seed: int) -> Atoms:
    atoms = molecule("CH3CH2OH")
    atoms.rattle(0.1, seed=seed)
    return atoms


def test_an_imported_mace_file_gives_maces_numbers(mace_file, tmp_path) -> None:
    from mace.calculators import MACECalculator

    out = import_model(mace_file, "mace", tmp_path / "imported.pt")
    config, metadata, state = read_model_file(out)  # a plain atomforge file: weights + JSON, weights_only load
    assert config["backbone"] == "mace" and config["dtype"] == "float64" and config["elements"] == [1, 6, 8]
    assert config["atomic_energies"] == [-13.6, -1030.0, -2040.0] and config["scale"] == pytest.approx(0.7)
    assert metadata["head"] == "Default" and "carried_over" in metadata
    ours = load_calculator(out)
    theirs = MACECalculator(model_paths=str(mace_file), device="cpu", default_dtype="float64")
    crystal = bulk("C", "diamond", a=3.6) * (2, 1, 1)
    crystal.numbers[1], crystal.numbers[3] = 8, 1
    crystal.rattle(0.05, seed=2)
    for atoms in (_ethanol(1), crystal):
        a, b = atoms.copy(), atoms.copy()
        a.calc, b.calc = ours, theirs
        assert a.get_potential_energy() == pytest.approx(b.get_potential_energy(), rel=1e-12)
        np.testing.assert_allclose(a.get_forces(), b.get_forces(), atol=1e-10)
        if atoms.pbc.all():
            np.testing.assert_allclose(a.get_stress(), b.get_stress(), atol=1e-10)


def test_a_mace_file_is_a_starting_point_for_fine_tuning(mace_file, tmp_path, registry) -> None:
    frames = []
    for seed in range(12):
        atoms = _ethanol(seed)
        atoms.calc = load_calculator(import_model(mace_file, "mace", tmp_path / "ref.pt"))
        frames.append(emt_free_labels(atoms, shift=0.01 * seed))
    write(tmp_path / "train.extxyz", frames)
    raw = {"data": {"train": "train.extxyz", "valid_fraction": 0.25},
           "model": {"backbone": "mace", "init_from": str(mace_file)},
           "loss": [{"name": "energy", "weight": 1.0}, {"name": "forces", "weight": 10.0}],
           "training": {"max_epochs": 0, "batch_size": 3, "lr": 0.001, "seed": 1},
           "output": "zero", "tracking": "none"}
    # zero epochs: the exported model is MACE's model
    zero = train(config_from_dict(raw, tmp_path), registry, verbose=False)
    reference = load_calculator(tmp_path / "ref.pt")
    a, b = _ethanol(5), _ethanol(5)
    a.calc, b.calc = load_calculator(zero.model_path), reference
    assert a.get_potential_energy() == pytest.approx(b.get_potential_energy(), rel=1e-10)
    # a few epochs move it towards the new labels (shifted energies)
    tuned = train(config_from_dict({**raw, "output": "tuned", "training": {**raw["training"], "max_epochs": 3}},
                                   tmp_path), registry, verbose=False)
    assert tuned.epochs == 3
    # an element the MACE model does not know is refused before training
    from atomforge import attach_labels

    ammonia = molecule("NH3")
    write(tmp_path / "with_n.extxyz", frames[:4] + [attach_labels(ammonia, energy=-1.0, forces=np.zeros((4, 3)))])
    with pytest.raises(Exception, match=r"Z=\[7\]"):
        train(config_from_dict({**raw, "data": {"train": "with_n.extxyz", "valid_fraction": 0.25}, "output": "n"},
                               tmp_path), registry, verbose=False)


def emt_free_labels(atoms: Atoms, shift: float) -> Atoms:
    """Labels from the calculator attached to ``atoms`` (energy shifted by ``shift``)."""
    from atomforge import attach_labels

    energy = atoms.get_potential_energy() + shift
    return attach_labels(Atoms(atoms.numbers, atoms.positions), energy=energy, forces=atoms.get_forces())


def test_the_import_model_command_writes_a_weights_only_file(mace_file, tmp_path) -> None:
    done = subprocess.run([sys.executable, "-m", "atomforge", "import-model", str(mace_file), str(tmp_path / "m.pt"),
                           "--backbone", "mace"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert '"head": "Default"' in done.stdout
    payload = torch.load(tmp_path / "m.pt", weights_only=True)  # nothing but tensors, strings and numbers
    assert payload["format"] == "atomforge-model"


def test_a_non_mace_file_is_refused_clearly(tmp_path) -> None:
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")  # a pickle, but not a MACE model
    with pytest.raises(ModelFileError, match="not a MACE ScaleShiftMACE model"):
        import_model(tmp_path / "other.pt", "mace", tmp_path / "x.pt")
    (tmp_path / "garbage.model").write_bytes(b"not a model")
    with pytest.raises(ModelFileError, match="neither an atomforge nor a readable MACE model file"):
        import_model(tmp_path / "garbage.model", "mace", tmp_path / "y.pt")


# -- training inside atomforge -------------------------------------------------------------------
def _mace_config(cu_files: dict, output: Path, **extra: object) -> dict:
    raw = tiny_config(cu_files, output)
    raw["model"] = {"backbone": "mace", "cutoff": 4.0, **TRAIN_SMALL}
    raw["loss"] = [{"name": "energy", "weight": 1.0}, {"name": "forces", "weight": 10.0},
                   {"name": "stress", "weight": 1.0}]
    raw.update(extra)
    return raw


def test_training_from_scratch_fits_avg_num_neighbors_and_learns(cu_files, tmp_path, registry) -> None:
    raw = _mace_config(cu_files, tmp_path / "run")
    raw["training"] = {**raw["training"], "max_epochs": 6}
    outcome = train(config_from_dict(raw), registry, verbose=False)
    config, _, _ = read_model_file(outcome.model_path)
    assert isinstance(config["options"]["avg_num_neighbors"], float) and config["options"]["avg_num_neighbors"] > 10
    assert config["options"]["atomic_numbers"] == [29]
    assert np.isfinite(outcome.test_metrics["test_forces_mae"]) and np.isfinite(outcome.test_metrics["test_stress_mae"])
    # the model file loads on its own, without DeepSpeed or the training code
    check = subprocess.run([sys.executable, "-c", (
        "import sys; sys.modules['deepspeed'] = None\nfrom atomforge import load_calculator\nfrom ase.build import bulk\n"
        f"a = bulk('Cu', cubic=True); a.calc = load_calculator({str(outcome.model_path)!r})\n"
        "print(a.get_potential_energy(), a.get_stress()[0])")], capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stderr[-2000:]
    history = __import__("atomforge").read_training_state(tmp_path / "run")["history"]
    assert history[-1]["valid_loss"] < history[0]["valid_loss"]


@pytest.mark.parametrize("uq", [{"name": "deep_ensemble", "num_members": 2}, {"name": "shallow_ensemble", "num_heads": 3},
                                {"name": "latent_distance", "method": "gmm", "components": 2}],
                         ids=["deep", "shallow", "latent"])
def test_uq_heads_wrap_a_mace_backbone(cu_files, tmp_path, registry, uq) -> None:
    raw = _mace_config(cu_files, tmp_path / "run", uq=uq)
    raw["training"] = {**raw["training"], "max_epochs": 2}
    if uq["name"] == "shallow_ensemble":
        raw["loss"].append({"name": "energy_nll", "weight": 0.01, "detach_mean": True})
    outcome = train(config_from_dict(raw), registry, verbose=False)
    model = load_model(outcome.model_path)
    atoms = cu_structures(1, seed=9)[0]
    atoms.calc = load_calculator(outcome.model_path)
    atoms.get_forces()
    stds = [v for k, v in atoms.calc.results.items() if k.endswith("_std") or k.endswith("_std_max")]
    assert stds and all(np.all(np.isfinite(v)) for v in stds)
    assert model is not None


def test_a_campaign_trains_mace_models(al_files, tmp_path, registry) -> None:
    from atomforge.active_learning import campaign_from_dict, run_campaign
    from conftest import campaign_raw

    raw = campaign_raw(al_files, tmp_path / "campaign", stop={"max_iterations": 1})
    raw["train"]["model"] = {"backbone": "mace", "cutoff": 4.0, **TRAIN_SMALL}
    raw["train"]["training"] = {"max_epochs": 1, "batch_size": 4, "lr": 0.005}
    result = run_campaign(campaign_from_dict(raw), registry, verbose=False)
    assert result.stopped_because.startswith("max_iterations")
    config, _, _ = read_model_file(result.directory / "iterations" / "000" / "train" / "model.pt")
    assert config["backbone"] == "mace"


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed here")
def test_deepspeed_zero3_trains_a_mace_model_like_one_process(tmp_path, registry) -> None:
    write(tmp_path / "train.extxyz", cu_structures(16, seed=11))
    write(tmp_path / "valid.extxyz", cu_structures(4, seed=12))
    raw = {"data": {"train": "train.extxyz", "valid": "valid.extxyz"},
           "model": {"backbone": "mace", "cutoff": 4.0, **TRAIN_SMALL},
           "loss": [{"name": "energy", "weight": 1.0}, {"name": "forces", "weight": 10.0}],
           "training": {"engine": "deepspeed", "max_epochs": 3, "batch_size": 4, "lr": 0.005, "seed": 3,
                        "scheduler": "none", "num_threads": 1},
           "deepspeed": {"zero_stage": 3}, "tracking": "none"}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    single = {**raw, "training": {**raw["training"], "engine": "torch"}, "output": "single"}
    single.pop("deepspeed")
    train(config_from_dict(single, tmp_path), registry, verbose=False)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "atomforge", "train", str(tmp_path / "run.yaml"), "--quiet", "--set=output=zero3"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    from atomforge import read_training_state

    ours, reference = read_training_state(tmp_path / "zero3")["history"], read_training_state(tmp_path / "single")["history"]
    assert len(ours) == len(reference) == 3
    for a, b in zip(ours, reference):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-3)
        assert a["valid_loss"] == pytest.approx(b["valid_loss"], rel=1e-3)
    assert load_model(tmp_path / "zero3" / "model.pt") is not None


def test_a_campaign_starts_from_a_mace_file_and_warm_starts(mace_file, tmp_path, registry) -> None:
    """Active learning from a foundation MACE: the first model fine-tunes the MACE file, the next
    iterations warm-start from the previous one."""
    from ase.calculators.emt import EMT

    from atomforge import attach_labels
    from atomforge.active_learning import campaign_from_dict, run_campaign

    def labelled(seed: int) -> Atoms:  # EMT labels H, C and O crudely: enough to drive the loop
        atoms = _ethanol(seed)
        atoms.calc = EMT()
        return attach_labels(Atoms(atoms.numbers, atoms.positions), energy=atoms.get_potential_energy(),
                             forces=atoms.get_forces())

    write(tmp_path / "initial.extxyz", [labelled(s) for s in range(8)])
    write(tmp_path / "test.extxyz", [labelled(s) for s in range(20, 23)])
    raw = {"initial_data": str(tmp_path / "initial.extxyz"), "test": str(tmp_path / "test.extxyz"),
           "oracle": {"name": "emt", "timeout": 30, "retries": 1},
           "train": {"model": {"backbone": "mace", "init_from": str(mace_file)}, "warm_start": True,
                     "uq": {"name": "deep_ensemble", "num_members": 2},
                     "training": {"max_epochs": 1, "batch_size": 4, "lr": 0.001}},
           "explorers": [{"name": "perturb", "n_per_start": 3, "rattle_std": 0.05}],
           "selector": {"name": "trust_window", "lo": 0.0, "hi": 1000.0},
           "budget": {"per_iteration": 2, "total": 4}, "stop": {"max_iterations": 2},
           "starts_per_iteration": 2, "executor": {"kind": "serial"}, "tracking": "none",
           "output": str(tmp_path / "campaign")}
    result = run_campaign(campaign_from_dict(raw), registry, verbose=False)
    assert result.stopped_because.startswith("max_iterations") and result.labels == 4
    for iteration in ("000", "001"):
        config, _, _ = read_model_file(result.directory / "iterations" / iteration / "train" / "model.pt")
        assert config["backbone"] == "mace" and config["elements"] == [1, 6, 8]
        assert config["options"]["hidden_irreps"] == "8x0e+8x1o"  # the MACE file's architecture throughout
