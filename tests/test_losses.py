"""Loss plugins compute what they say: per-atom energy, force and stress errors, weighted."""

from __future__ import annotations

import pytest
import torch

from atomforge import keys as K


def _batch():
    return {
        K.N_ATOMS: torch.tensor([2, 4]),
        K.BATCH: torch.tensor([0, 0, 1, 1, 1, 1]),
        K.WEIGHT: torch.tensor([1.0, 3.0]),
        K.ENERGY: torch.tensor([2.0, 4.0]),
        K.FORCES: torch.zeros(6, 3),
        K.STRESS: torch.zeros(2, 3, 3),
    }


def test_energy_loss_is_per_atom_and_weighted(registry) -> None:
    outputs = {K.ENERGY: torch.tensor([4.0, 8.0])}  # errors 2 and 4 eV -> 1 eV/atom each
    # huber beyond delta: delta * (|e| - delta / 2) = 0.5 * (1 - 0.25)
    for kind, expected in (("mse", 1.0), ("mae", 1.0), ("huber", 0.375)):
        term = registry.get("losses", "energy").factory(kind=kind, delta=0.5)
        assert float(term(_batch(), outputs, None)) == pytest.approx(expected, rel=1e-6), kind


def test_force_loss_weights_atoms_by_their_structure(registry) -> None:
    forces = torch.zeros(6, 3)
    forces[:2] = 1.0  # structure 0 (weight 1): every component off by 1
    term = registry.get("losses", "forces").factory(kind="mse")
    # weighted mean over components: (2 atoms * 3 comps * 1 * 1) / (3 * (2*1 + 4*3)) = 6 / 42
    assert float(term(_batch(), {K.FORCES: forces}, None)) == pytest.approx(6 / 42)


def test_stress_loss(registry) -> None:
    stress = torch.zeros(2, 3, 3)
    stress[1] = 0.1
    term = registry.get("losses", "stress").factory(kind="mae")
    assert float(term(_batch(), {K.STRESS: stress}, None)) == pytest.approx(3 * 9 * 0.1 / (9 * 4))


def test_unknown_kind_is_refused(registry) -> None:
    from atomforge import ConfigError

    with pytest.raises(ConfigError, match="not one of"):
        registry.get("losses", "forces").factory(kind="l3")
