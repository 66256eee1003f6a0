"""atomforge-example-plugin: a third-party atomforge plugin shipping the ``example_schnet`` backbone.

atomforge never imports this package by name. It finds :mod:`atomforge_example_plugin.plugin`
through the ``atomforge`` entry point declared in ``pyproject.toml`` and calls its hooks.
"""

from __future__ import annotations

from ._schnet import ExampleSchNet

__version__ = "0.1.0"

__all__ = ["ExampleSchNet", "__version__"]
