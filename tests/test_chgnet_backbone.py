"""The ``chgnet`` backbone plugin: CHGNet's own numbers for its shipped checkpoints (zero shot,
against ``CHGNetCalculator``), the physics kit, save/load, parameter groups and fine-tuning from
``model.pretrained``.

Tolerances (float32, as CHGNet runs): CHGNet itself deviates from a float64 evaluation of the same
weights by ~1e-4 eV/Å in the forces of a 64-atom oxide, so forces are compared to 3e-4 eV/Å,
stress to 1e-5 eV/Å³ and energies to 1e-6 relative.
"""

from __future__ import annotations

import contextlib
import io
import math

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, molecule

chgnet = pytest.importorskip("chgnet")
# CHGNet's BatchedGraph builds its volumes with torch.tensor(list of tensors with grad)
pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True:UserWarning")

from atomforge import ConfigError, config_from_dict, load_model, make_registry, read_model_file  # noqa: E402
from atomforge._specs import PluginKind  # noqa: E402
from atomforge.model import modelfile  # noqa: E402
from atomforge.model.calculator import AtomforgeCalculator  # noqa: E402
from atomforge.model.modelfile import build_potential, import_model, read_or_import_model_file  # noqa: E402
from atomforge.plugins import chgnet_backbone  # noqa: E402
from atomforge.plugins.chgnet_backbone import CHGNetBackbone, line_graph  # noqa: E402
from atomforge.testing import check_backbone  # noqa: E402
from atomforge.workflows.train import train  # noqa: E402

from conftest import tiny_config, write_cu_sets  # noqa: E402

SMALL = {"atom_fea_dim": 8, "bond_fea_dim": 8, "angle_fea_dim": 8, "num_radial": 7, "num_angular": 7,
         "atom_conv_hidden_dim": 8, "bond_conv_hidden_dim": 8, "mlp_hidden_dims": [8], "n_conv": 3}
F_TOL, S_TOL, E_REL = 3e-4, 1e-5, 1e-6


@pytest.fixture(scope="module")
def chgnet_registry():
    """The user's registry, with this plugin added while it is not yet a built-in."""
    registry = make_registry()
    if "chgnet" in registry.names(PluginKind.BACKBONE):
        return registry
    return make_registry(extra=[chgnet_backbone])


def _pretrained(name: str, registry) -> torch.nn.Module:
    config, _, state = read_or_import_model_file(f"pretrained:{name}", "chgnet", registry)
    potential = build_potential(config, registry)
    potential.load_state_dict(state)
    return potential


def _theirs(name: str):
    from chgnet.model import CHGNet
    from chgnet.model.dynamics import CHGNetCalculator

    with contextlib.redirect_stdout(io.StringIO()):
        return CHGNetCalculator(CHGNet.load(model_name=name, use_device="cpu", verbose=False), use_device="cpu",
                                on_isolated_atoms="ignore")


@pytest.fixture(scope="module")
def v030(chgnet_registry):
    return _pretrained("0.3.0", chgnet_registry), _theirs("0.3.0")


def _compare(ours_calc, theirs_calc, atoms: Atoms, reference: Atoms | None = None) -> None:
    """Energy, forces (and stress, for periodic cells) of both agree; ``reference`` is what CHGNet
    sees (e.g. the molecule in a vacuum box)."""
    a, b = atoms.copy(), (reference if reference is not None else atoms).copy()
    a.calc, b.calc = ours_calc, theirs_calc
    energy = b.get_potential_energy()
    assert a.get_potential_energy() == pytest.approx(energy, rel=E_REL, abs=1e-5)
    np.testing.assert_allclose(a.get_forces(), b.get_forces(), atol=F_TOL, rtol=0)
    if atoms.pbc.all():  # CHGNet's stress is GPa internally; its calculator converts to eV/Å³ (ASE)
        np.testing.assert_allclose(a.get_stress(), b.get_stress(), atol=S_TOL, rtol=0)


def _oxide() -> Atoms:
    """A rattled 16-atom Li/Mn/Ni/O rocksalt cell (cell < cutoff: images are neighbours)."""
    atoms = bulk("NiO", "rocksalt", a=4.18, cubic=True) * (2, 1, 1)
    atoms.numbers[[0, 1]] = 3
    atoms.numbers[[2, 3]] = 25
    atoms.rattle(0.06, seed=1)
    return atoms


def _metal() -> Atoms:
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.set_cell(atoms.cell[:] @ (np.eye(3) + [[0.02, 0.01, 0], [0, -0.01, 0], [0, 0, 0.015]]), scale_atoms=True)
    atoms.rattle(0.08, seed=2)
    return atoms


# -- zero shot: CHGNet's numbers ---------------------------------------------------------------------
def test_pretrained_030_gives_chgnets_numbers_on_periodic_cells(v030) -> None:
    potential, theirs = v030
    ours = AtomforgeCalculator(potential)
    for atoms in (_oxide(), _metal()):
        _compare(ours, theirs, atoms)


def test_a_molecule_needs_no_box(v030) -> None:
    """CHGNet needs a lattice (pymatgen Structure): it sees the molecule in a 25 Å vacuum box;
    atomforge's backbone works on the open structure's edges directly."""
    potential, theirs = v030
    mol = molecule("CH3CH2OH")
    mol.rattle(0.05, seed=3)
    boxed = mol.copy()
    boxed.set_cell([25.0, 25.0, 25.0])
    boxed.center()
    boxed.pbc = True
    _compare(AtomforgeCalculator(potential), theirs, mol, reference=boxed)


def test_a_shallow_ensemble_works_on_chgnet_features(v030, chgnet_registry) -> None:
    """A shallow-ensemble UQ head on the pretrained CHGNet: its heads read CHGNet's atom features,
    its σ is finite, positive and depends on the structure."""
    from atomforge import atoms_to_graph
    from atomforge.data.fields import collate
    from atomforge.model.uncertainty import build_uq_head

    potential, _ = v030
    head = build_uq_head(potential, {"name": "shallow_ensemble", "options": {"num_heads": 4}}, chgnet_registry).eval()
    calm, hot = _metal(), _metal()
    hot.rattle(0.4, seed=5)
    outs = [{k: v.detach() for k, v in head(collate([atoms_to_graph(a, 5.0)]), compute_forces=True).items()}
            for a in (calm, hot)]
    n = len(calm)
    assert outs[0]["energy"].shape == (1,) and outs[0]["forces"].shape == (n, 3) and outs[0]["forces_std"].shape == (n,)
    assert all(float(o["energy_std"][0]) > 0 and bool(torch.isfinite(o["forces_std"]).all()) for o in outs)
    assert not torch.allclose(outs[0]["forces_std"].mean(), outs[1]["forces_std"].mean())


def test_pretrained_020_and_structures_without_angles(chgnet_registry) -> None:
    """0.2.0 (other bases, readout biases): CHGNet skips the bond/angle updates of a structure with
    no bond under 3 Å; the plugin does so per structure, so a batch mixing one with a crystal gives
    each its own numbers."""
    potential, theirs = _pretrained("0.2.0", chgnet_registry), _theirs("0.2.0")
    ours = AtomforgeCalculator(potential)
    dimer = Atoms("Li2", positions=[[0, 0, 0], [3.4, 0.1, 0]], cell=[18.0, 18.0, 18.0], pbc=True)
    for atoms in (_oxide(), dimer):
        _compare(ours, theirs, atoms)
    from atomforge.testing._backbone import predict

    together = predict(potential, dimer, _oxide())
    single = np.array([predict(potential, a)["energy"][0] for a in (dimer, _oxide())])
    np.testing.assert_allclose(together["energy"], single, rtol=1e-6)


# -- the plugin's own contract ----------------------------------------------------------------------
def test_a_small_untrained_chgnet_passes_the_physics_kit(chgnet_registry) -> None:
    spec = chgnet_registry.provided(PluginKind.BACKBONE, "chgnet").spec
    results = check_backbone(spec, options={"checkpoint": "0.3.0", **SMALL})
    assert any(r.name.startswith("rotation") for r in results)  # invariant energies: rotation is checked
    assert all(r.passed for r in results), [r for r in results if not r.passed]


def test_the_line_graph_is_chgnets() -> None:
    """Undirected bonds pair each edge with its reverse (self-images included); angles are the
    ordered pairs of distinct short edges at one centre."""
    # atom 0 with neighbours 1 (short), 2 (short), 0's own image (long), and the reverses
    edges = torch.tensor([[0, 1, 0, 2, 0, 0], [1, 0, 2, 0, 0, 0]])
    shifts = torch.tensor([[0, 0, 0], [0, 0, 0], [1, 0, 0], [-1, 0, 0], [0, 0, 1], [0, 0, -1]], dtype=torch.float)
    lengths = torch.tensor([1.0, 1.0, 2.0, 2.0, 4.0, 4.0])
    graph = line_graph(edges, shifts, lengths, 3.0, 3)
    d2u = graph["directed2undirected"].tolist()
    assert d2u[0] == d2u[1] and d2u[2] == d2u[3] and d2u[4] == d2u[5] and len(set(d2u)) == 3
    assert [d2u[int(e)] for e in graph["undirected2directed"]] == list(range(3))
    pairs = sorted(zip(*(t.tolist() for t in graph["angles"])))
    assert pairs == [(0, 2), (2, 0)]  # the 4 Å self-image edge is no bond-graph node


def test_bad_options_are_clear_errors(chgnet_registry) -> None:
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['channels'\]"):
        CHGNetBackbone(num_elements=1, cutoff=6.0, channels=8)
    with pytest.raises(ConfigError, match="unknown checkpoint '9.9'"):
        CHGNetBackbone(num_elements=1, cutoff=6.0, checkpoint="9.9")
    with pytest.raises(ConfigError, match="bond_graph_cutoff must be in"):
        CHGNetBackbone(num_elements=1, cutoff=2.5)
    with pytest.raises(ConfigError, match="pooled readouts are not supported"):
        CHGNetBackbone(num_elements=1, cutoff=6.0, mlp_first=False)
    with pytest.raises(ConfigError, match="ships 0.3.0, 0.2.0, r2scan"):
        read_or_import_model_file("pretrained:0.1.0", "chgnet", chgnet_registry)


def test_parameter_groups_cover_every_weight_once(v030) -> None:
    backbone = v030[0].backbone
    groups = backbone.parameter_groups()
    assert list(groups) == ["embedding", "interaction.0", "interaction.1", "interaction.2", "interaction.3", "readout"]
    owner: dict[str, str] = {}
    for group, prefixes in groups.items():
        for name, _ in backbone.named_parameters():
            if any(name == p or name.startswith(p + ".") for p in prefixes):
                assert name not in owner, (name, owner.get(name), group)
                owner[name] = group
    assert set(owner) == {name for name, _ in backbone.named_parameters()}
    assert groups["interaction.3"] == ["chgnet.atom_conv_layers.3"]  # CHGNet's last block: atom conv only
    old = CHGNetBackbone(num_elements=1, cutoff=5.0, checkpoint="0.2.0").parameter_groups()
    assert old["readout"] == ["chgnet.mlp"]  # 0.2.0 has no readout norm


def test_import_save_and_load_round_trip(v030, chgnet_registry, tmp_path) -> None:
    potential, theirs = v030
    path = import_model("pretrained:0.3.0", "chgnet", tmp_path / "chgnet.pt", chgnet_registry)
    config, metadata, state = read_model_file(path)  # weights + JSON, a weights_only load
    assert config["backbone"] == "chgnet" and config["options"] == {"checkpoint": "0.3.0"}
    assert config["cutoff"] == 6.0 and config["elements"] == list(range(1, 95)) and config["scale"] == 1.0
    atom_ref = theirs.model.composition_model.fc.weight.detach().double().reshape(-1)
    np.testing.assert_array_equal(config["atomic_energies"], atom_ref.numpy())  # AtomRef, Z = 1…94
    assert metadata["pretrained"] == "0.3.0" and "site_wise" in metadata["not_carried_over"]
    assert not any("composition_model" in key or "site_wise" in key for key in state)
    loaded = load_model(path, registry=chgnet_registry)
    atoms = _oxide()
    a, b = atoms.copy(), atoms.copy()
    a.calc, b.calc = AtomforgeCalculator(potential), AtomforgeCalculator(loaded)
    assert a.get_potential_energy() == b.get_potential_energy()
    np.testing.assert_array_equal(a.get_forces(), b.get_forces())
    # an untrained model of the checkpoint's architecture has exactly the file's weights
    fresh = CHGNetBackbone(num_elements=94, cutoff=6.0, checkpoint="0.3.0")
    shapes = {f"backbone.{k}": tuple(v.shape) for k, v in fresh.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in state.items() if k.startswith("backbone.")}


def test_finetuning_from_pretrained(chgnet_registry, tmp_path, monkeypatch) -> None:
    """``model: {backbone: chgnet, pretrained: "0.3.0"}``: one epoch on 10 EMT Cu cells."""
    # the config reader resolves pretrained:NAME with the default registry; add the plugin there
    # while it is not yet a built-in
    monkeypatch.setattr(modelfile, "make_registry", lambda *args, **kwargs: chgnet_registry)
    files = write_cu_sets(tmp_path, {"train": (10, 1), "test": (2, 2)})
    raw = tiny_config(files, tmp_path / "run", max_epochs=1, batch_size=2)
    raw["model"] = {"backbone": "chgnet", "pretrained": "0.3.0"}
    config = config_from_dict(raw)
    assert config.model.cutoff == 6.0 and config.model.options["checkpoint"] == "0.3.0"
    outcome = train(config, chgnet_registry, verbose=False)
    metrics = outcome.test_metrics
    assert all(math.isfinite(metrics[k]) for k in ("test_energy_mae", "test_forces_mae"))
    tuned = load_model(outcome.model_path, registry=chgnet_registry)
    start = _pretrained("0.3.0", chgnet_registry)
    changed = [k for k, v in tuned.state_dict().items() if not torch.equal(v, start.state_dict()[k])]
    assert any(k.startswith("backbone.chgnet.") for k in changed)


def test_a_pretrained_chgnet_fine_tunes_under_deepspeed_with_two_processes(tmp_path) -> None:
    """Foundation model + DeepSpeed engine: ZeRO-2 over 2 processes, frozen embedding, per-group LR."""
    import os
    import subprocess
    import sys

    import yaml
    from ase.io import write

    from atomforge import load_model
    from conftest import cu_structures

    write(tmp_path / "cu.extxyz", cu_structures(8, seed=3))
    raw = {"data": {"train": "cu.extxyz", "valid_fraction": 0.25},
           "model": {"backbone": "chgnet", "pretrained": "0.3.0"},
           "finetune": {"freeze": ["embedding"], "lr": {"readout": 1.0e-3}},
           "training": {"engine": "deepspeed", "max_epochs": 1, "batch_size": 4, "lr": 1.0e-4, "num_threads": 1},
           "deepspeed": {"zero_stage": 2}, "output": "run", "tracking": "none"}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    done = subprocess.run([sys.executable, "-m", "atomforge", "train", "run.yaml", "--nproc", "2", "--quiet"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    model = load_model(tmp_path / "run" / "model.pt")
    assert model.elements[:3] == [1, 2, 3] and len(model.elements) == 94
