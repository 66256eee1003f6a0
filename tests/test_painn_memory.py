"""PaiNN's edge chunking at inference (option ``edge_chunk``): the same numbers as the unchunked
computation, training untouched, the conformance kit passing while chunked, bad values refused,
and the edge-level intermediates no longer kept for the backward pass."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk

from atomforge import (
    ConfigError, build_potential, collate, atoms_to_graph, differentiable_inputs, keys as K,
    load_model, model_curl, save_model,
)
from atomforge.plugins.painn import PaiNN
from atomforge.plugins.uq import DeepEnsemble, ShallowEnsemble
from atomforge.testing import check_backbone, make_test_potential, predict, sample_structures

SMALL = {"hidden_channels": 16, "num_layers": 3, "num_rbf": 8}
CHUNK = 7  # edges per chunk: every test structure below has several chunks per layer


def _structures() -> dict[str, Atoms]:
    """A periodic cell (a 2x2x2 supercell of the kit's triclinic crystal, cell < cutoff) and a molecule."""
    systems = sample_structures(seed=0)
    return {"crystal": systems["crystal"].repeat((2, 2, 2)), "molecule": systems["molecule"]}


def _pair(dtype: torch.dtype, chunk: int = CHUNK, options: dict | None = None):  # noqa: ANN202
    """The same randomly initialised potential unchunked (``edge_chunk: 0``) and chunked."""
    options = {**SMALL, **(options or {})}
    plain = make_test_potential(PaiNN, options={**options, "edge_chunk": 0}, dtype=dtype)
    chunked = make_test_potential(PaiNN, options={**options, "edge_chunk": chunk}, dtype=dtype)
    chunked.load_state_dict(plain.state_dict())
    return plain, chunked


def _edges(potential, atoms: Atoms) -> int:  # noqa: ANN001
    return int(atoms_to_graph(atoms, potential.cutoff)[K.EDGE_INDEX].shape[1])


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.float64, 1e-10)])
def test_chunked_energy_forces_stress_equal_the_unchunked_ones(dtype, tol) -> None:
    plain, chunked = _pair(dtype)
    for name, atoms in _structures().items():
        edges = _edges(plain, atoms)
        assert chunked.backbone.chunk_size(edges, dtype) == CHUNK and edges >= 4 * CHUNK  # several chunks
        assert plain.backbone.chunk_size(edges, dtype) is None
        stress = bool(atoms.pbc.all())
        want, got = predict(plain, atoms, stress=stress), predict(chunked, atoms, stress=stress)
        assert set(got) == {K.ENERGY, K.FORCES} | ({K.STRESS} if stress else set())
        for key in got:
            assert _relative(got[key], want[key]) < tol, (name, key, _relative(got[key], want[key]))
    # several structures in one batch (edges of different structures share chunks)
    systems = list(_structures().values())
    want, got = predict(plain, *systems), predict(chunked, *systems)
    assert _relative(got[K.FORCES], want[K.FORCES]) < tol and _relative(got[K.ENERGY], want[K.ENERGY]) < tol


def test_auto_leaves_small_systems_unchunked_and_chunks_large_ones() -> None:
    auto = make_test_potential(PaiNN, options=SMALL)  # no edge_chunk: "auto", as old model files
    assert auto.backbone.edge_chunk is None
    least = 36 * 2**20 // (3 * 16 * 4)  # AUTO_CHUNK_BYTES per [C, 3, F] float32 tensor
    assert auto.backbone.chunk_size(least, torch.float32) is None  # one chunk: the plain path
    assert auto.backbone.chunk_size(least + 2, torch.float32) == least // 2 + 1  # two halves
    assert auto.backbone.chunk_size(2 * least, torch.float32) == least
    assert auto.backbone.chunk_size(3 * least + 5, torch.float32) == least + 2  # 3 equal chunks, none smaller
    assert auto.backbone.chunk_size(10 * least, torch.float64) == least // 2
    auto.train()
    assert auto.backbone.chunk_size(10 * least, torch.float32) is None  # training: never
    auto.eval()
    plain, _ = _pair(torch.float64)
    atoms = _structures()["crystal"]
    want, got = predict(plain, atoms, stress=True), predict(auto.double(), atoms, stress=True)
    assert all(np.array_equal(got[k], want[k]) for k in want)  # bit-identical: the same code path


def _original_forward(self: PaiNN, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PaiNN's forward as it was before edge chunking (verbatim, the layer inlined)."""
    centre, neighbour = batch[K.EDGE_INDEX][0], batch[K.EDGE_INDEX][1]
    lengths = batch[K.EDGE_LENGTHS]
    directions = batch[K.EDGE_VECTORS] / lengths.unsqueeze(-1)
    basis, envelope = self.radial(lengths)
    all_filters = (self.filters(basis) * envelope.unsqueeze(-1)).split(3 * self.features, -1)
    s = self.embedding(batch[K.ELEMENT_INDEX])
    v = None
    for layer, filters in zip(self.layers, all_filters):
        f = layer.features
        x = layer.context(s)[neighbour] * filters
        ds, dvv, dvs = torch.split(x, f, dim=-1)
        dv = dvs.unsqueeze(1) * directions.unsqueeze(-1)
        if v is None:
            v = s.new_zeros((s.shape[0], 3, f))
        else:
            dv = torch.addcmul(dv, dvv.unsqueeze(1), v[neighbour])
        s = s.index_add(0, centre, ds)
        v = v.index_add(0, centre, dv)
        uv, vv = torch.split(layer.mix_vectors(v), f, dim=-1)
        vv_norm = torch.sqrt((vv * vv).sum(1) + 1e-8)
        a_vv, a_sv, a_ss = torch.split(layer.update(torch.cat([s, vv_norm], -1)), f, dim=-1)
        s = s + a_sv * (uv * vv).sum(1) + a_ss
        v = v + a_vv.unsqueeze(1) * uv
    out = {K.NODE_ENERGY: self.readout(s).squeeze(-1), K.NODE_FEATURES: s}
    if v is not None:
        out[K.NODE_VECTORS] = v
    return out


def _training_step(potential, batch) -> tuple[torch.Tensor, list[torch.Tensor]]:  # noqa: ANN001
    potential.train()
    potential.zero_grad(set_to_none=True)
    out = potential(batch, compute_forces=True, compute_stress=False)
    loss = (out[K.ENERGY] ** 2).mean() + 10.0 * (out[K.FORCES] ** 2).mean()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in potential.parameters()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_training_is_bit_identical_with_and_without_the_option(dtype) -> None:
    systems = list(_structures().values())
    batch = collate([atoms_to_graph(a, 4.0, dtype=dtype) for a in systems])
    reference = make_test_potential(PaiNN, options={**SMALL, "edge_chunk": 0}, dtype=dtype)
    reference.backbone.forward = types.MethodType(_original_forward, reference.backbone)
    want_loss, want_grads = _training_step(reference, batch)
    for option in (CHUNK, 1, "auto", 0):
        potential = make_test_potential(PaiNN, options={**SMALL, "edge_chunk": option}, dtype=dtype)
        potential.load_state_dict(reference.state_dict())
        loss, grads = _training_step(potential, batch)
        assert potential.backbone.chunk_size(int(batch[K.EDGE_INDEX].shape[1]), dtype) is None  # plain path
        assert torch.equal(loss, want_loss), option
        assert all(torch.equal(g, w) for g, w in zip(grads, want_grads)), option


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_conformance_kit_passes_with_a_small_forced_chunk(dtype) -> None:
    results = check_backbone(PaiNN, options={**SMALL, "num_layers": 2, "edge_chunk": 5}, dtype=dtype)
    assert all(r.passed for r in results)
    assert any(r.name.startswith("finite-difference forces") for r in results)
    assert "finite-strain stress (crystal)" in {r.name for r in results}


@pytest.mark.parametrize("value", [-1, 1.5, "big", "off", True, float("nan"), float("inf"), [100], {"n": 1}])
def test_bad_edge_chunk_values_raise_config_error(value) -> None:
    with pytest.raises(ConfigError, match="edge_chunk"):
        PaiNN(num_elements=1, cutoff=4.0, edge_chunk=value)


@pytest.mark.parametrize("value, stored", [("auto", None), (None, None), (0, 0), (100, 100), (100.0, 100)])
def test_good_edge_chunk_values(value, stored) -> None:
    assert PaiNN(num_elements=1, cutoff=4.0, edge_chunk=value).edge_chunk == stored


def test_model_files_with_and_without_the_option_load(tmp_path, registry) -> None:
    config = {"backbone": "painn", "provider": "atomforge", "cutoff": 4.0, "dtype": "float64",
              "options": dict(SMALL), "elements": [1, 8], "atomic_energies": [-0.5, -2.0], "scale": 1.3, "shift": 0.1}
    potential = build_potential(config, registry)
    old = save_model(potential, tmp_path / "old.pt", config=config)  # as written before the option
    options = json.loads(json.dumps({**SMALL, "edge_chunk": CHUNK}))  # JSON-serialisable, as in the file
    new = save_model(potential, tmp_path / "new.pt", config={**config, "options": options})
    old_model, new_model = load_model(old, registry=registry), load_model(new, registry=registry)
    assert old_model.backbone.edge_chunk is None and new_model.backbone.edge_chunk == CHUNK
    atoms = _structures()["crystal"]
    want, got = predict(old_model, atoms, stress=True), predict(new_model, atoms, stress=True)
    assert all(_relative(got[k], want[k]) < 1e-10 for k in want)


def test_uq_heads_and_double_backward_work_while_chunked() -> None:
    """vmap (vectorised deep ensemble) falls back to the plain path; the shallow ensemble's batched
    backward and the curl's double backward run through the chunks."""
    plain, chunked = _pair(torch.float64, options={"num_layers": 2})
    batch = collate([atoms_to_graph(_structures()["crystal"], 4.0, dtype=torch.float64)])
    for head in (lambda p: DeepEnsemble(p, num_members=2, vectorize=True),
                 lambda p: ShallowEnsemble(p, num_heads=3)):
        want = head(plain).eval().predict(batch, compute_forces=True, compute_stress=True)
        got = head(chunked).eval().predict(batch, compute_forces=True, compute_stress=True)
        for key in (K.ENERGY, K.FORCES, K.STRESS, K.ENERGY_STD, K.FORCES_STD):
            assert _relative(got[key].detach().numpy(), want[key].detach().numpy()) < 1e-10, key
    curls = [model_curl(p, batch, probes=2, generator=torch.Generator().manual_seed(0)) for p in (plain, chunked)]
    assert abs(float(curls[1].jacobian) - float(curls[0].jacobian)) < 1e-10 * float(curls[0].jacobian)


def _kept_bytes(potential, batch) -> tuple[int, int]:  # noqa: ANN001
    """Bytes of the distinct storages autograd keeps for the forces/stress backward pass, and of
    the largest one."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        positions, strain = differentiable_inputs(batch, True, True)
        potential.energy_outputs(batch, positions, strain)
    return sum(storages.values()), max(storages.values())


def test_edge_level_intermediates_are_not_kept_for_the_backward_pass() -> None:
    """Allocator-independent memory check: with chunking, what autograd keeps between the forward
    and the backward pass scales with atoms, not with edges × features."""
    options = {"hidden_channels": 32, "num_layers": 3, "num_rbf": 8}
    plain, chunked = _pair(torch.float32, chunk=500, options=options)
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((4, 4, 4))  # 256 atoms, 4608 edges
    atoms.numbers[:] = 1
    atoms.rattle(0.05, seed=0)
    batch = collate([atoms_to_graph(atoms, 4.0)])
    edges, atoms_n, f = int(batch[K.EDGE_INDEX].shape[1]), len(atoms), options["hidden_channels"]
    assert chunked.backbone.chunk_size(edges, torch.float32) == 500 and edges > 8 * 500
    plain_total, plain_largest = _kept_bytes(plain.eval(), batch)
    total, largest = _kept_bytes(chunked.eval(), batch)
    edge_tensor = edges * 3 * f * 4  # one [E, 3F] float32 tensor
    assert plain_largest >= edge_tensor and plain_total > 10 * edge_tensor  # the problem: many of them
    assert largest < edge_tensor / 4  # nothing [E, 3F]-sized is kept …
    assert total < plain_total / 8  # … and far less in all
    assert largest <= max(atoms_n * 3 * f * 4, edges * 9 * 4)  # node tensors and [E, 3, 3] geometry at most
    with torch.no_grad():  # and without gradients the chunks run as plain code
        out = chunked(batch, compute_forces=False)
    assert torch.isfinite(out[K.ENERGY]).all()
