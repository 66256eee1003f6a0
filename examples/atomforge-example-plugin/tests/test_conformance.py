"""Tests of the ``example_schnet`` backbone: the conformance kit plus two checks of our own.

Run from this folder with ``pytest`` (``pythonpath = ["src"]`` in pyproject.toml makes the
source importable) or after ``pip install .``; the entry-point test needs the installed package
and is skipped otherwise.
"""

from __future__ import annotations

import importlib.metadata

import pytest
import torch
from ase import Atoms

from atomforge import BackboneSpec, ConfigError, make_plugin_manager, make_registry
from atomforge.testing import check_backbone, make_test_potential, predict
from atomforge_example_plugin import ExampleSchNet, plugin

DISTRIBUTION = "atomforge-example-plugin"
SMALL = {"hidden_channels": 16, "num_interactions": 2, "num_rbf": 8}  # fast, still non-trivial
CUTOFF = 4.0


def _spec_from_plugin_module() -> BackboneSpec:
    """The spec as atomforge sees it, registered from our plugin module alone (no install)."""
    pm = make_plugin_manager(entry_points=False, builtins=(), extra=[plugin])
    return make_registry(pm).get("backbones", "example_schnet")


def test_the_plugin_module_registers_example_schnet() -> None:
    spec = _spec_from_plugin_module()
    assert spec.factory is ExampleSchNet
    assert spec.equivariant  # invariant energy ⇒ equivariant forces, so rotations are checked


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_example_schnet_passes_the_conformance_kit(dtype: torch.dtype) -> None:
    results = check_backbone(_spec_from_plugin_module(), options=SMALL, cutoff=CUTOFF, dtype=dtype)
    names = " ".join(r.name for r in results)
    assert "finite-difference forces" in names and "rotation" in names and "supercell" in names
    assert all(r.passed for r in results)


def _dimer(distance: float) -> Atoms:
    return Atoms([8, 1], positions=[[0.0, 0.0, 0.0], [distance, 0.0, 0.0]])


def test_energy_and_forces_vanish_smoothly_at_the_cutoff() -> None:
    potential = make_test_potential(ExampleSchNet, options=SMALL, cutoff=CUTOFF)
    apart = predict(potential, _dimer(CUTOFF + 0.5))
    inside = predict(potential, _dimer(0.5 * CUTOFF))
    edge = predict(potential, _dimer(CUTOFF - 1e-3))
    bound = abs(inside["energy"][0] - apart["energy"][0])
    assert bound > 1e-3  # the atoms do interact inside the cutoff ...
    # ... and the interaction fades out: a hard cutoff would jump by O(bound) here.
    assert abs(edge["energy"][0] - apart["energy"][0]) < 1e-4 * bound
    assert abs(edge["forces"]).max() < 1e-2 * abs(inside["forces"]).max()
    assert abs(apart["forces"]).max() == 0.0


def test_invalid_options_are_rejected_with_the_option_named() -> None:
    with pytest.raises(ConfigError, match="num_rbf=1"):
        ExampleSchNet(num_elements=2, cutoff=CUTOFF, num_rbf=1)


def test_installed_package_is_found_through_its_entry_point() -> None:
    try:
        importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"{DISTRIBUTION} is not installed; `pip install .` to test its entry point")
    provided = make_registry().provided("backbones", "example_schnet")
    assert (provided.plugin, provided.distribution) == ("example", DISTRIBUTION)
