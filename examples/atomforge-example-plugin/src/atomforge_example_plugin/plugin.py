"""The plugin module: the object atomforge registers with its plugin manager.

``pyproject.toml`` points the ``atomforge`` entry-point group at this module::

    [project.entry-points.atomforge]
    example = "atomforge_example_plugin.plugin"

atomforge imports it (isolated: an import error here is reported by entry-point name and
distribution and the other plugins keep working), then calls each ``register_*`` hook it
implements. This one provides one plugin of almost every kind: a backbone, a training engine,
a data source, a label oracle, a selector and an uncertainty head. Each is checked by the
matching atomforge conformance kit in ``tests/``.
"""

from __future__ import annotations

from typing import Callable

from atomforge import (
    BackboneSpec,
    DataSourceSpec,
    EngineSpec,
    OracleSpec,
    SelectorSpec,
    UQHeadSpec,
    hookimpl,
)

from ._accumulate import make_backend, parse_options
from ._bootstrap import BootstrapReadout
from ._md17 import read_md17
from ._morse import morse_oracle
from ._schnet import ExampleSchNet
from ._selector import EnergyStdSelector

BACKBONE_NAME = "example_schnet"
ENGINE_NAME = "example_accumulate"


@hookimpl
def register_backbones(register: Callable[[BackboneSpec], None]) -> None:
    """Provide ``example_schnet``; config: ``model: {backbone: example_schnet, ...}``."""
    register(
        BackboneSpec(
            name=BACKBONE_NAME,
            factory=ExampleSchNet,
            description="compact SchNet (continuous-filter convolutions); example third-party plugin",
            # The energy depends on distances only, so it is invariant and the wrapper's forces
            # -dE/dr are rotation-equivariant by construction: the kit may check rotations.
            equivariant=True,
        )
    )


@hookimpl
def register_engines(register: Callable[[EngineSpec], None]) -> None:
    """Provide ``example_accumulate``; config: ``training: {engine: example_accumulate}`` and the
    engine's own block ``example_accumulate: {steps: N}``."""
    register(EngineSpec(name=ENGINE_NAME, factory=make_backend,
                        description="torch backend with gradient accumulation (steps); example third-party engine",
                        check_options=parse_options))


@hookimpl
def register_data_sources(register: Callable[[DataSourceSpec], None]) -> None:
    """Provide ``example_md17``: MD17 / rMD17 / sGDML ``.npz`` trajectories."""
    register(DataSourceSpec("example_md17", read_md17, "MD17/rMD17/sGDML .npz (z, R, E, F); energy_unit, stride, limit"))


@hookimpl
def register_oracles(register: Callable[[OracleSpec], None]) -> None:
    """Provide ``example_morse``: ASE's Morse pair potential as an oracle."""
    register(OracleSpec("example_morse", morse_oracle, "ASE Morse pair potential; epsilon, r0, rho0, rcut1, rcut2"))


@hookimpl
def register_selectors(register: Callable[[SelectorSpec], None]) -> None:
    """Provide ``example_energy_std``: the largest energy std per atom first."""
    register(SelectorSpec("example_energy_std", EnergyStdSelector, "largest energy std per atom first; minimum"))


@hookimpl
def register_uq_heads(register: Callable[[UQHeadSpec], None]) -> None:
    """Provide ``example_bootstrap_readout``: bootstrap linear readouts on latent features."""
    register(UQHeadSpec("example_bootstrap_readout", BootstrapReadout,
                        "bootstrap ensemble of linear readouts fitted after training; members, ridge, seed"))
