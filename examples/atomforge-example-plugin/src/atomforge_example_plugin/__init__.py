"""atomforge-example-plugin: a third-party atomforge plugin shipping a backbone (``example_schnet``)
and a training engine (``example_accumulate``).

atomforge never imports this package by name. It finds :mod:`atomforge_example_plugin.plugin`
through the ``atomforge`` entry point declared in ``pyproject.toml`` and calls its hooks.
"""

from __future__ import annotations

from ._accumulate import AccumulatingBackend
from ._schnet import ExampleSchNet

__version__ = "0.2.0"

__all__ = ["AccumulatingBackend", "ExampleSchNet", "__version__"]
