"""Batch fields by registry: collate, replicate and split read the field table; a plugin adds a
field through register_fields and it travels through graphs, batches, ensembles and training."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from ase import Atoms

from atomforge import (
    DEFAULT_FIELDS,
    DataValidationError,
    FieldSpec,
    GraphDataset,
    LossSpec,
    PluginError,
    atoms_to_graph,
    collate,
    config_from_dict,
    hookimpl,
    make_plugin_manager,
    make_registry,
    replicate_batch,
    split_batch,
    train,
)
from atomforge import keys as K
from atomforge.testing import sample_structures

from conftest import cu_structures, tiny_config


def _graphs(fields=None) -> list[dict[str, torch.Tensor]]:
    systems = sample_structures(0)
    mol, xtal = systems["molecule"], systems["crystal"]
    mol.info["charge"] = -1.0
    return [atoms_to_graph(a, 4.0, fields=fields) for a in (mol, xtal, mol)]


def _magmom_plugin(read=None) -> types.SimpleNamespace:
    @hookimpl
    def register_fields(register):
        register(FieldSpec("magmoms", per="atom", read=read or (lambda atoms: atoms.arrays.get("magmoms")),
                           description="collinear magnetic moments"))
        register(FieldSpec("run_id", per="global", dtype="long", description="one value for the batch"))

    return types.SimpleNamespace(__name__="magmom_plugin", register_fields=register_fields)


def test_collate_concatenates_by_kind_and_split_inverts_it() -> None:
    graphs = _graphs()
    batch = collate(graphs)
    n_atoms = [int(g[K.N_ATOMS][0]) for g in graphs]
    assert batch[K.POSITIONS].shape == (sum(n_atoms), 3)
    assert batch[K.EDGE_INDEX].shape == (2, sum(g[K.EDGE_INDEX].shape[1] for g in graphs))
    assert batch[K.CELL].shape == (3, 3, 3) and batch[K.CHARGE].tolist() == [-1.0, 0.0, -1.0]
    # edge indices of the second structure are offset by the atoms of the first
    e0 = graphs[0][K.EDGE_INDEX].shape[1]
    assert int(batch[K.EDGE_INDEX][:, e0:].min()) == n_atoms[0]
    assert batch[K.BATCH].tolist() == [b for b, n in enumerate(n_atoms) for _ in range(n)]
    for original, sliced in zip(graphs, split_batch(batch)):
        assert set(sliced) == set(original)
        for key in original:
            assert torch.equal(original[key], sliced[key]), key


def test_replicate_batch_equals_collating_copies() -> None:
    graphs = _graphs()
    batch = collate(graphs)
    replicated = replicate_batch(batch, 3)
    reference = collate(graphs * 3)
    assert set(replicated) == set(reference)
    for key in reference:
        assert torch.equal(replicated[key], reference[key]), key


def test_an_unregistered_key_is_a_clear_error() -> None:
    graphs = _graphs()
    for graph in graphs:
        graph["mystery"] = torch.zeros(1)
    with pytest.raises(DataValidationError, match="'mystery' is not a registered field.*register_fields"):
        collate(graphs)


def test_metadata_goes_through_the_field_readers() -> None:
    atoms = Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]])
    atoms.info.update({"spin": 3, "fidelity": 2, "weight": 0.5})
    atoms.set_initial_charges([0.5, 0.5])
    graph = atoms_to_graph(atoms, 3.0)
    assert graph[K.SPIN].tolist() == [3.0] and graph[K.FIDELITY].dtype == torch.long
    assert graph[K.FIDELITY].tolist() == [2] and graph[K.WEIGHT].tolist() == [0.5]
    assert graph[K.CHARGE].tolist() == [1.0]  # an ASE db's per-atom initial charges, summed
    assert all(DEFAULT_FIELDS[k].read is not None for k in K.METADATA_KEYS)


def test_a_plugin_field_is_read_batched_replicated_and_sliced() -> None:
    registry = make_registry(make_plugin_manager(entry_points=False, extra=[_magmom_plugin()]))
    fields = registry.fields
    built_in = make_registry(make_plugin_manager(entry_points=False)).fields  # incl. built-in plugins' fields
    assert fields["magmoms"].per.value == "atom" and len(fields) == len(built_in) + 2  # + its mask
    systems = [cu_structures(1, seed=s)[0] for s in range(3)]
    for k, atoms in enumerate(systems):
        atoms.new_array("magmoms", np.full(len(atoms), float(k)))
    data = GraphDataset(systems, 4.0, fields=fields)
    batch = collate(data.graphs, fields)
    assert batch["magmoms"].tolist() == [float(k) for k in range(3) for _ in range(8)]
    assert replicate_batch(batch, 2, fields)["magmoms"].shape == (48,)
    assert [g["magmoms"].tolist() for g in split_batch(batch, fields)] == [[float(k)] * 8 for k in range(3)]
    with pytest.raises(DataValidationError, match="'magmoms' is not a registered field"):
        collate(data.graphs)  # the default table does not know the plugin's field


def test_a_global_field_must_agree_within_a_batch() -> None:
    registry = make_registry(make_plugin_manager(entry_points=False, extra=[_magmom_plugin()]))
    graphs = _graphs(registry.fields)
    for k, graph in enumerate(graphs):
        graph["run_id"] = torch.tensor(7)
    assert collate(graphs, registry.fields)["run_id"].item() == 7
    assert replicate_batch(collate(graphs, registry.fields), 2, registry.fields)["run_id"].item() == 7
    graphs[1]["run_id"] = torch.tensor(8)
    with pytest.raises(DataValidationError, match="global field 'run_id' differs"):
        collate(graphs, registry.fields)


def test_a_field_of_the_wrong_shape_names_the_field_and_structure() -> None:
    registry = make_registry(make_plugin_manager(entry_points=False,
                                                 extra=[_magmom_plugin(read=lambda atoms: np.zeros(2))]))
    with pytest.raises(DataValidationError, match=r"structure 0 of data.train: field 'magmoms' has shape \(2,\); "
                                                  r"expected \(8,\)"):
        GraphDataset(cu_structures(1), 4.0, fields=registry.fields, source="data.train")


def test_a_plugin_cannot_redeclare_a_builtin_field() -> None:
    @hookimpl
    def register_fields(register):
        register(FieldSpec("forces", per="structure"))

    plugin = types.SimpleNamespace(__name__="clash_plugin", register_fields=register_fields)
    registry = make_registry(make_plugin_manager(entry_points=False, extra=[plugin]))
    with pytest.raises(PluginError, match="'forces' \\(from plugin 'clash_plugin'.*already declared"):
        registry.fields
    with pytest.raises(PluginError, match="dtype must be one of"):
        FieldSpec("x", per="atom", dtype="complex")


def test_a_plugin_field_reaches_the_loss_during_training(cu_files, tmp_path) -> None:
    """A plugin's per-structure field is in every training and validation batch the loss sees."""
    seen: list[list[float]] = []

    class TemperatureAwareLoss:
        requires: tuple[str, ...] = ()
        outputs: tuple[str, ...] = ()

        def __call__(self, batch, outputs, model):
            seen.append(batch["temperature"].tolist())
            return outputs[K.ENERGY].new_zeros(())

    @hookimpl
    def register_fields(register):
        register(FieldSpec("temperature", per="structure", read=lambda atoms: atoms.info.get("temperature"),
                           default=300.0))

    @hookimpl
    def register_losses(register):
        register(LossSpec("sees_temperature", TemperatureAwareLoss))

    plugin = types.SimpleNamespace(__name__="temperature_plugin", register_fields=register_fields,
                                   register_losses=register_losses)
    registry = make_registry(make_plugin_manager(entry_points=False, extra=[plugin]))
    raw = tiny_config(cu_files, tmp_path / "run", max_epochs=1, batch_size=4)
    raw["loss"].append({"name": "sees_temperature"})
    train(config_from_dict(raw), registry, verbose=False)
    assert seen and all(len(values) >= 1 and set(values) == {300.0} for values in seen)
    assert {len(values) for values in seen} == {4, 2, 6}  # 18 training structures in batches of 4, 6 to validate
