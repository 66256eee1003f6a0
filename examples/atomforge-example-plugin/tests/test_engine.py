"""Tests of the ``example_accumulate`` engine: atomforge's engine kit, its options block, and
that accumulating micro-batches gives the big batch's step."""

from __future__ import annotations

import pytest
import torch

from atomforge import ConfigError, EngineSpec, GraphDataset, TrainSettings, make_plugin_manager, make_registry
from atomforge.testing import check_engine
from atomforge_example_plugin import plugin
from atomforge_example_plugin._accumulate import parse_options


def _spec() -> EngineSpec:
    pm = make_plugin_manager(entry_points=False, builtins=(), extra=[plugin])
    return make_registry(pm).get("engines", "example_accumulate")


@pytest.mark.parametrize("steps", [1, 2])
def test_example_accumulate_passes_the_engine_kit(steps: int) -> None:
    results = check_engine(_spec(), options={"steps": steps})
    assert {"trains", "resumes", "reproducible"} <= {r.name.split(" ")[0].rstrip(":") for r in results}


def test_the_options_block_is_validated() -> None:
    assert parse_options(None).steps == 2 and parse_options({"steps": 4}).steps == 4
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['step'\]"):
        _spec().check_options({"step": 4})
    with pytest.raises(ConfigError, match="steps: expected an integer"):
        parse_options({"steps": 0})
    with pytest.raises(ConfigError, match="must divide training.batch_size"):
        _spec().factory(options={"steps": 3}, settings=TrainSettings(batch_size=4))


def test_micro_batches_split_each_step() -> None:
    from atomforge.testing import lj_clusters

    backend = _spec().factory(options={"steps": 2}, settings=TrainSettings(batch_size=4, device="cpu"))
    data = GraphDataset(lj_clusters(6, 0), 6.0)
    steps = list(backend.plan(list(range(6)), data))
    assert [list(map(list, s.batches)) for s in steps] == [[[0, 1], [2, 3]], [[4], [5]]]


def test_accumulated_gradient_equals_the_big_batch_gradient() -> None:
    """Two micro-batches of two identical-size structures: the accumulated gradient of the mean
    of their losses is the gradient of the four-structure batch's loss."""
    from atomforge import Potential, collate
    from atomforge import keys as K
    from atomforge.testing import RadialTestBackbone, lj_clusters

    torch.manual_seed(0)
    model = Potential(RadialTestBackbone(num_elements=1, cutoff=6.0), elements=[18], atomic_energies=[0.0]).double()
    data = GraphDataset(lj_clusters(4, 0), 6.0, dtype=torch.float64)

    def loss_of(batch):
        out = model(batch, compute_forces=True)
        return ((out[K.FORCES] - batch[K.FORCES]) ** 2).mean()

    loss_of(collate(data.graphs)).backward()
    big = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    assert sum(g is not None for g in big) >= 4
    model.zero_grad()
    backend = _spec().factory(options={"steps": 2}, settings=TrainSettings(batch_size=4, grad_clip=None, device="cpu"))
    backend.setup(model, torch.optim.SGD(model.parameters(), lr=0.0))
    backend.step([collate(data.graphs[:2]), collate(data.graphs[2:])], loss_of)
    for a, b in zip(big, (p.grad for p in model.parameters())):
        if a is None:
            assert b is None or not b.any()
        else:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
