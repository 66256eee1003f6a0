"""The structure store and streaming training: round trips, same results as in memory, loader
workers, size-aware batches, mid-epoch resume, mixing ratios, streamed normalisation, bad stores."""

from __future__ import annotations

import json
from pathlib import Path

import ase.io
import lmdb
import numpy as np
import pytest
import torch
from ase.build import molecule

from atomforge import (
    ConfigError,
    DataValidationError,
    MixedDataset,
    StoreDataset,
    StoreError,
    StoreWriter,
    StructureStore,
    config_from_dict,
    fit_normalization,
    get_labels,
    read_training_state,
    size_batches,
)
from atomforge.data.store import FORMAT_VERSION, pack_structures
from atomforge.data.streaming import add_sums, normalization_from_sums, normalization_sums
from atomforge.workflows.train import train

from conftest import cu_structures, emt_label, tiny_config


@pytest.fixture(scope="module")
def cu_store(tmp_path_factory: pytest.TempPathFactory, cu_files: dict[str, Path]) -> Path:
    """The train and test files of ``cu_files`` packed into stores."""
    folder = tmp_path_factory.mktemp("stores")
    for name in ("train", "test"):
        with StoreWriter(folder / name) as writer:
            pack_structures(writer, ase.io.read(cu_files[name], ":"), source_id=name)
    return folder


def test_round_trip_keeps_everything(tmp_path: Path) -> None:
    cell = cu_structures(1)[0]
    cell.info.update(config_type="bulk", group=7, fidelity=1, weight=2.0)
    cell.arrays["magmoms"] = np.linspace(0, 1, len(cell))
    mol = emt_label(molecule("CH4"))
    mol.info["charge"] = -1.0
    with StoreWriter(tmp_path / "s", compress=True) as writer:
        writer.append(cell)
        writer.append(mol)
    store = StructureStore(tmp_path / "s")
    assert len(store) == 2 and store.elements == [1, 6, 29] and store.config_types == ["bulk"]
    back = store[0]
    for a, b in ((cell, back), (mol, store[1])):
        la, lb = get_labels(a), get_labels(b)
        assert np.array_equal(a.positions, b.positions) and np.array_equal(a.numbers, b.numbers)
        assert np.array_equal(a.cell[:], b.cell[:]) and list(a.pbc) == list(b.pbc)
        assert la.energy == lb.energy and np.array_equal(la.forces, lb.forces)
    assert np.allclose(get_labels(cell).stress, get_labels(back).stress) and get_labels(store[1]).stress is None
    assert back.info == {"config_type": "bulk", "group": 7, "fidelity": 1, "weight": 2.0}
    assert np.array_equal(back.arrays["magmoms"], cell.arrays["magmoms"]) and store[1].info["charge"] == -1.0
    assert store.column("n_atoms").tolist() == [8, 5] and store.column("labels").tolist() == [7, 3]
    assert store.column("group").tolist() == [7, -1] and store.elements_of([1]) == [1, 6]


def test_streamed_training_equals_in_memory(registry, cu_files, cu_store, tmp_path) -> None:
    """Same split, order, graphs and normalisation: the same model, with or without workers."""
    results = {}
    for name, train_source, loader in (("memory", str(cu_files["train"]), {}),
                                       ("store", {"source": "store", "path": str(cu_store / "train")}, {}),
                                       ("workers", {"source": "store", "path": str(cu_store / "train")},
                                        {"workers": 2, "prefetch": 2, "cache_gb": 0})):
        raw = tiny_config(cu_files, tmp_path / name, max_epochs=2)
        raw["data"].update(train=train_source, loader=loader)
        results[name] = train(config_from_dict(raw), registry, verbose=False).test_metrics
    for name in ("store", "workers"):
        for key, value in results["memory"].items():
            assert results[name][key] == pytest.approx(value, rel=1e-6), (name, key)


def test_store_splits_and_indices(registry, cu_files, cu_store, tmp_path) -> None:
    with StoreWriter(tmp_path / "s") as writer:
        pack_structures(writer, ase.io.read(cu_files["train"], ":"), source_id="t")
        writer.write_split("train", np.arange(0, 18))
        writer.write_split("valid", np.arange(18, 24))
    raw = tiny_config(cu_files, tmp_path / "run", max_epochs=1)
    raw["data"] = {"train": {"source": "store", "path": str(tmp_path / "s"), "split": "train"},
                   "valid": {"source": "store", "path": str(tmp_path / "s"), "indices": "18:24"}}
    outcome = train(config_from_dict(raw), registry, verbose=False)
    assert outcome.test_metrics["best_valid_forces_count"] == 6
    raw["data"]["train"]["split"] = "nope"
    raw["output"] = str(tmp_path / "run2")
    with pytest.raises(StoreError, match="no split 'nope'"):
        train(config_from_dict(raw), registry, verbose=False)


def test_size_batches_respect_the_atom_budget() -> None:
    sizes = np.array([9, 9, 9, 200, 9, 9, 2000, 9])
    batches = size_batches(np.arange(8), sizes, max_atoms=220, max_structures=3)
    assert [b.tolist() for b in batches] == [[0, 1, 2], [3, 4, 5], [6], [7]]
    assert all(sizes[b].sum() <= 220 or len(b) == 1 for b in batches)
    assert [b.tolist() for b in size_batches(np.arange(5), sizes, max_atoms=None, max_structures=2)] == [
        [0, 1], [2, 3], [4]]


def test_size_batches_respect_the_edge_budget() -> None:
    sizes = np.array([9, 9, 9, 9])
    edges = np.array([70, 70, 500, 70])  # a dense structure has many more edges for its atoms
    batches = size_batches(np.arange(4), sizes, max_atoms=100, max_structures=10, edges=edges, max_edges=200)
    assert [b.tolist() for b in batches] == [[0, 1], [2], [3]]
    only_edges = size_batches(np.arange(4), sizes, max_atoms=None, max_structures=10, edges=edges, max_edges=150)
    assert [b.tolist() for b in only_edges] == [[0, 1], [2], [3]]
    with pytest.raises(ValueError, match="edges per structure"):
        size_batches(np.arange(4), sizes, max_atoms=None, max_structures=2, max_edges=10)


def test_store_edges_match_the_graphs_and_count_only_what_is_asked(cu_store) -> None:
    from atomforge import GraphDataset
    data = StoreDataset(cu_store / "train", 4.0)
    memory = GraphDataset(list(StructureStore(cu_store / "train")), 4.0)
    partial = data.edges([1, 3])
    assert partial[1] == memory.edges()[1] and partial[0] == -1
    assert data.edges().tolist() == memory.edges().tolist()


def test_batch_edges_trains_with_the_budget(registry, cu_files, tmp_path) -> None:
    from atomforge import GraphDataset
    raw = tiny_config(cu_files, tmp_path / "run", max_epochs=1, batch_size=100, batch_edges=1000)
    train(config_from_dict(raw), registry, verbose=False)
    per_structure = GraphDataset(ase.io.read(cu_files["train"], ":"), raw["model"]["cutoff"]).edges()
    steps = read_training_state(tmp_path / "run")["history"][0]["steps"]
    assert steps > 1 and steps >= int(np.ceil(per_structure[:18].sum() / 1000))
    with pytest.raises(ConfigError, match="batch_edges"):
        config_from_dict(tiny_config(cu_files, tmp_path / "x", batch_edges=0))


def test_batch_atoms_trains_with_fewer_larger_steps(registry, cu_files, tmp_path) -> None:
    raw = tiny_config(cu_files, tmp_path / "run", max_epochs=1, batch_size=100, batch_atoms=40)
    train(config_from_dict(raw), registry, verbose=False)
    steps = read_training_state(tmp_path / "run")["history"][0]["steps"]
    assert steps == 18 // 5 + 1  # 18 training structures of 8 atoms, 5 per 40-atom batch
    with pytest.raises(ConfigError, match="batch_atoms"):
        config_from_dict(tiny_config(cu_files, tmp_path / "x", batch_atoms=0))


def test_mid_epoch_resume_gives_the_same_model(registry, cu_files, cu_store, tmp_path) -> None:
    """A run stopped after a mid-epoch checkpoint and resumed equals one trained straight through."""
    source = {"source": "store", "path": str(cu_store / "train")}

    def config(output: Path, **extra: object) -> object:
        raw = tiny_config(cu_files, output, max_epochs=2, checkpoint_steps=2, **extra)
        raw["data"]["train"] = source
        raw["loss"].append({"name": "rotation_augmentation"})  # the augmentation generator must resume too
        return config_from_dict(raw)

    whole = train(config(tmp_path / "whole"), registry, verbose=False)
    # stop inside epoch 1 by a time limit hit right after the first mid-epoch checkpoint
    import atomforge.training.loop as loop

    original = loop.Trainer._save_partial

    def stop_after(self, started, partial):  # noqa: ANN001
        original(self, started, partial)
        raise KeyboardInterrupt

    loop.Trainer._save_partial = stop_after
    try:
        with pytest.raises(KeyboardInterrupt):
            train(config(tmp_path / "cut"), registry, verbose=False)
    finally:
        loop.Trainer._save_partial = original
    folders = sorted(p.name for p in (tmp_path / "cut" / "checkpoint").iterdir() if p.is_dir())
    assert folders == ["epoch0-step2"]
    resumed = train(config(tmp_path / "cut"), registry, resume=True, verbose=False)
    for key, value in whole.test_metrics.items():
        assert resumed.test_metrics[key] == pytest.approx(value, rel=1e-6), key
    from atomforge import read_training_state  # the epoch's running sums (per-term losses, train errors) resume too

    for straight, cut in zip(*(read_training_state(tmp_path / run)["history"] for run in ("whole", "cut"))):
        for key in ("train_terms", "train_errors", "valid_terms"):
            assert cut[key] == pytest.approx(straight[key], rel=1e-6) and cut[key], key


def test_mixing_draws_the_configured_ratios(cu_store) -> None:
    a = StoreDataset(cu_store / "train", 4.0)
    b = StoreDataset(cu_store / "test", 4.0)
    mixed = MixedDataset([a, b], [0.75, 0.25], epoch_size=40)
    assert mixed.counts().tolist() == [30, 10]
    order = mixed.epoch_order(np.random.default_rng(0))
    assert len(order) == 40 and (order < 24).sum() == 30 and (order >= 24).sum() == 10
    assert len(set(order[order >= 24].tolist())) == 8  # 10 of 8: every structure, then repeats
    assert np.array_equal(order, mixed.epoch_order(np.random.default_rng(0)))
    with pytest.raises(ConfigError, match="ratio"):
        config_from_dict({"data": {"train": [{"path": "a.xyz"}, {"path": "b.xyz"}]}})


def test_streamed_normalisation_equals_the_in_memory_fit(cu_store) -> None:
    data = StoreDataset(cu_store / "train", 4.0)
    structures = [data.structure(k) for k in range(len(data))]
    labels = [get_labels(s) for s in structures]
    expected = fit_normalization([s.numbers for s in structures], np.array([lab.energy for lab in labels]),
                                 [lab.forces for lab in labels], [29])
    halves = [normalization_sums(data, [29], np.arange(r, len(data), 2)) for r in range(2)]  # two "ranks"
    atomic, scale, shift = normalization_from_sums(add_sums(halves))
    assert atomic == pytest.approx(expected[0], rel=1e-10)
    assert scale == pytest.approx(expected[1], rel=1e-10) and shift == pytest.approx(expected[2], abs=1e-9)


def test_sharded_plan_reads_disjoint_shards(cu_store) -> None:
    """deepspeed shard_data: rank r plans only positions ≡ r (mod ranks), equal step counts."""
    from atomforge.plugins.deepspeed_engine import DeepSpeedBackend, parse_options
    from atomforge import TrainSettings

    data = StoreDataset(cu_store / "train", 4.0)
    plans = []
    for rank in range(2):
        backend = DeepSpeedBackend.__new__(DeepSpeedBackend)
        backend.options, backend.settings = parse_options({"shard_data": True}), TrainSettings(batch_size=4)
        backend.world_size, backend.rank, backend._costs = 2, rank, None
        plans.append([[int(i) for micro in step.batches for i in micro] for step in backend.plan(np.arange(24), data)])
    assert len(plans[0]) == len(plans[1]) == 6
    read = [set(i for step in plan for i in step) for plan in plans]
    assert read[0].isdisjoint(read[1]) and all(i % 2 == r for r, s in enumerate(read) for i in s)


def test_sharded_edge_budget_counts_only_the_own_shard(cu_store) -> None:
    from atomforge.plugins.deepspeed_engine import DeepSpeedBackend, parse_options
    from atomforge import TrainSettings

    data = StoreDataset(cu_store / "train", 4.0)
    backend = DeepSpeedBackend.__new__(DeepSpeedBackend)
    backend.options = parse_options({"shard_data": True})
    backend.settings = TrainSettings(batch_size=100, batch_edges=2000)
    backend.world_size, backend.rank, backend._costs = 2, 1, None
    steps = list(backend.plan(np.arange(len(data)), data))
    counted = data.edges(np.array([], dtype=np.int64))
    assert (counted[0::2] == -1).all() and (counted[1::2] > 0).all()  # rank 1 counted only odd positions
    assert all(counted[step.batches[0]].sum() <= 1000 or len(step.batches[0]) == 1 for step in steps)


def test_required_labels_are_checked_from_the_columns(tmp_path) -> None:
    with StoreWriter(tmp_path / "s") as writer:
        writer.append(cu_structures(1)[0])
        writer.append(molecule("H2O"))  # unlabelled
    with pytest.raises(DataValidationError, match="structure 1 .* 'energy' label"):
        StoreDataset(tmp_path / "s", 4.0, require=("energy",))
    assert len(StoreDataset(tmp_path / "s", 4.0)) == 2


def test_bad_stores_give_clear_errors(tmp_path) -> None:
    with pytest.raises(StoreError, match="not a structure store"):
        StructureStore(tmp_path)
    with StoreWriter(tmp_path / "s") as writer:
        pack_structures(writer, cu_structures(3), source_id="x")
    with StoreWriter(tmp_path / "s"):  # one writer holds it: a second is refused at once
        with pytest.raises(StoreError, match="being written by pid"):
            StoreWriter(tmp_path / "s")
    env = lmdb.open(str(tmp_path / "s"), subdir=True)
    with env.begin(write=True) as txn:
        meta = json.loads(txn.get(b"meta"))
        record = bytearray(txn.get(b"s" + (1).to_bytes(8, "big")))
        record[40] ^= 0xFF
        txn.put(b"s" + (1).to_bytes(8, "big"), bytes(record))
        txn.put(b"meta", json.dumps({**meta, "version": FORMAT_VERSION + 1}).encode())
    env.close()
    with pytest.raises(StoreError, match="newer atomforge"):
        StructureStore(tmp_path / "s")
    env = lmdb.open(str(tmp_path / "s"), subdir=True)
    with env.begin(write=True) as txn:
        txn.put(b"meta", json.dumps(meta).encode())
    env.close()
    store = StructureStore(tmp_path / "s")
    assert len(store[0]) == 8
    with pytest.raises(StoreError, match="structure 1 .* damaged"):
        store[1]
    data = (tmp_path / "s" / "data.mdb").read_bytes()
    store.close()
    (tmp_path / "s" / "data.mdb").write_bytes(data[: len(data) // 3])
    with pytest.raises(StoreError, match="truncated"):  # refused before LMDB maps it (SIGBUS otherwise)
        StructureStore(tmp_path / "s")


def test_wrong_label_shape_is_refused_and_committed_data_kept(tmp_path) -> None:
    good = cu_structures(4)
    bad = good[0].copy()
    bad.arrays["forces"] = np.zeros((len(bad) - 1, 3))
    with StoreWriter(tmp_path / "s") as writer:
        with pytest.raises(DataValidationError, match="structure 4 of src: forces label has shape"):
            pack_structures(writer, [*good, bad], source_id="x", commit_every=2, where="src")
    store = StructureStore(tmp_path / "s")
    assert len(store) == 4 and store.meta["sources"]["x"]["done"] == 4 and not store.meta["sources"]["x"]["complete"]


def test_loader_workers_keep_plan_order(cu_store) -> None:
    data = StoreDataset(cu_store / "train", 4.0, workers=2, prefetch=2)
    plan = [np.array([5, 1]), np.array([0]), np.array([23, 7, 9])]
    got = [b["n_atoms"].tolist() for b in data.batches(plan)]
    assert got == [[8, 8], [8], [8, 8, 8]]
    first = next(iter(data.batches(plan)))
    assert torch.equal(first["positions"][:8], data.graphs[5]["positions"])


def test_small_sets_are_cached_after_the_first_read(cu_store) -> None:
    data = StoreDataset(cu_store / "train", 4.0, cache_gb=0.01, workers=2)
    plan = [np.arange(0, 12), np.arange(12, 24)]
    first = [b["positions"] for b in data.batches(plan)]
    assert data._cache is not None and len(data._cache) == 24  # built here, not in workers: kept
    again = [b["positions"] for b in data.batches(plan)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert StoreDataset(cu_store / "train", 4.0, cache_gb=1e-6).batches(plan) is not None


def test_store_source_filters_by_fidelity_and_config_type(registry, tmp_path) -> None:
    from atomforge.plugins.data_sources import read_store

    structures = cu_structures(6)
    for k, atoms in enumerate(structures):
        atoms.info.update(fidelity=k % 2, config_type="hot" if k < 2 else "cold")
    with StoreWriter(tmp_path / "s") as writer:
        pack_structures(writer, structures, source_id="x")
    assert read_store({"path": str(tmp_path / "s"), "fidelity": 1}, tmp_path).indices.tolist() == [1, 3, 5]
    assert read_store({"path": str(tmp_path / "s"), "config_type": "hot", "fidelity": 0},
                      tmp_path).indices.tolist() == [0]
    with pytest.raises(ConfigError, match="config types: \\['hot', 'cold'\\]"):
        read_store({"path": str(tmp_path / "s"), "config_type": "warm"}, tmp_path)
    with pytest.raises(ConfigError, match="reach past"):
        read_store({"path": str(tmp_path / "s"), "indices": "4:10"}, tmp_path)
