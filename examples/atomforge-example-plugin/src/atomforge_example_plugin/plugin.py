"""The plugin module: the object atomforge registers with its plugin manager.

``pyproject.toml`` points the ``atomforge`` entry-point group at this module::

    [project.entry-points.atomforge]
    example = "atomforge_example_plugin.plugin"

atomforge imports it (isolated: an import error here is reported by entry-point name and
distribution and the other plugins keep working), then calls each ``register_*`` hook it
implements. This one implements a single hook.
"""

from __future__ import annotations

from typing import Callable

from atomforge import BackboneSpec, hookimpl

from ._schnet import ExampleSchNet

BACKBONE_NAME = "example_schnet"


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
