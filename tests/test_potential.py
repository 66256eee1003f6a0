"""PaiNN through the conformance kit; the kit catches broken backbones; normalisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from atomforge import Backbone, ConformanceError, fit_normalization, keys as K
from atomforge.testing import check_backbone


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_painn_passes_the_conformance_kit(registry, dtype) -> None:
    results = check_backbone(registry.get("backbones", "painn"),
                             options={"hidden_channels": 16, "num_layers": 2, "num_rbf": 8}, dtype=dtype)
    names = {r.name for r in results}
    assert any(n.startswith("finite-difference forces") for n in names)
    assert any(n.startswith("rotation") for n in names)
    assert "finite-strain stress (crystal)" in names
    assert all(r.passed for r in results)


class _AbsolutePositions(Backbone):
    """Broken on purpose: energy depends on absolute positions (not translation invariant)."""

    def __init__(self, *, num_elements: int, cutoff: float) -> None:
        super().__init__(num_elements=num_elements, cutoff=cutoff)
        self.w = torch.nn.Parameter(torch.tensor([0.3, -0.2, 0.1]))

    def forward(self, batch):
        return {K.NODE_ENERGY: torch.sin(batch[K.POSITIONS] @ self.w.to(batch[K.POSITIONS].dtype))}


class _Chiral(Backbone):
    """Broken on purpose: uses the x component of edge vectors (not rotation invariant)."""

    def __init__(self, *, num_elements: int, cutoff: float) -> None:
        super().__init__(num_elements=num_elements, cutoff=cutoff)

    def forward(self, batch):
        x = batch[K.EDGE_VECTORS][:, 0] ** 2
        fc = 0.5 * (torch.cos(torch.pi * batch[K.EDGE_LENGTHS] / self.cutoff) + 1)
        e = (x * fc).new_zeros(batch[K.POSITIONS].shape[0]).index_add(0, batch[K.EDGE_INDEX][0], x * fc)
        return {K.NODE_ENERGY: e}


def test_kit_catches_a_translation_dependent_backbone() -> None:
    with pytest.raises(ConformanceError, match=r"translation \(molecule\)"):
        check_backbone(_AbsolutePositions)


def test_kit_catches_a_non_equivariant_backbone_unless_declared() -> None:
    with pytest.raises(ConformanceError, match=r"rotation \(molecule\)"):
        check_backbone(_Chiral)
    results = check_backbone(_Chiral, equivariant=False)  # declared: rotation not demanded
    assert not any(r.name.startswith("rotation") for r in results)


def test_reference_energies_recover_known_composition_energies() -> None:
    rng = np.random.default_rng(0)
    e0 = {1: -13.6, 8: -2041.0}
    numbers = [rng.choice([1, 8], size=rng.integers(2, 9)) for _ in range(40)]
    energies = np.array([sum(e0[int(z)] for z in zs) + rng.normal(0, 1e-3) for zs in numbers])
    forces = [rng.normal(0, 0.5, (len(zs), 3)) for zs in numbers]
    atomic, scale, shift = fit_normalization(numbers, energies, forces, [1, 8])
    np.testing.assert_allclose(atomic, [-13.6, -2041.0], atol=5e-3)
    assert scale == pytest.approx(0.5, rel=0.1)
    assert abs(shift) < 1e-3


class _HardCutoff(Backbone):
    """Broken on purpose: pair energy with a hard step at the cutoff."""

    def __init__(self, *, num_elements: int, cutoff: float) -> None:
        super().__init__(num_elements=num_elements, cutoff=cutoff)

    def forward(self, batch):
        r = batch[K.EDGE_LENGTHS]
        pair = torch.exp(-r) * (r < self.cutoff).to(r.dtype)
        e = pair.new_zeros(batch[K.POSITIONS].shape[0]).index_add(0, batch[K.EDGE_INDEX][0], pair)
        return {K.NODE_ENERGY: e}


def test_kit_catches_a_hard_cutoff() -> None:
    with pytest.raises(ConformanceError, match=r"smooth cutoff"):
        check_backbone(_HardCutoff)
