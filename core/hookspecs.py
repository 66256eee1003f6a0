"""The hook specifications: every extension point of atomforge.

A plugin is a module (or object) with functions decorated by :data:`hookimpl`. Each hook is
called once with a ``register`` callable; the plugin calls ``register(spec)`` for every thing it
provides, with a frozen spec record from :mod:`atomforge._specs`. Built-in plugins (modules in
``atomforge.plugins``) are registered by the very same loader as third-party packages, which
advertise their plugin module in the ``atomforge`` entry-point group::

    # pyproject.toml of a third-party package
    [project.entry-points.atomforge]
    my_backbone = "my_package.plugin"

    # my_package/plugin.py
    from atomforge import BackboneSpec, hookimpl

    @hookimpl
    def register_backbones(register):
        register(BackboneSpec(name="my_net", factory=MyNet, description="..."))

All hooks were added in atomforge 0.1.
"""

from __future__ import annotations

from typing import Callable

import pluggy

from ._specs import (
    BackboneSpec,
    CommandSpec,
    DataSourceSpec,
    EngineSpec,
    ExplorerSpec,
    LossSpec,
    OracleSpec,
    SelectorSpec,
    TrackerSpec,
    UQHeadSpec,
)

PROJECT_NAME = "atomforge"
hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def register_backbones(register: Callable[[BackboneSpec], None]) -> None:
    """Register model architectures.

    ``register(BackboneSpec(name="painn", factory=PaiNN, equivariant=True))``. The factory is
    called as ``factory(num_elements=..., cutoff=..., **options)`` with the remaining keys of the
    config's ``model`` block, and returns an :class:`atomforge.Backbone` that maps a batch with
    edge vectors to per-atom energies. Run :func:`atomforge.testing.check_backbone` on it.
    """


@hookspec
def register_losses(register: Callable[[LossSpec], None]) -> None:
    """Register loss terms, e.g. ``register(LossSpec(name="forces", factory=ForceLoss))``.

    The factory receives the options of the config's ``loss`` entry (without ``name`` and
    ``weight``) and returns an :class:`atomforge.LossTerm`: ``term(batch, outputs, model)`` returns a
    scalar tensor; ``term.requires`` names the labels and ``term.outputs`` the model outputs it needs.
    """


@hookspec
def register_data_sources(register: Callable[[DataSourceSpec], None]) -> None:
    """Register data sources, e.g. ``register(DataSourceSpec(name="ase", factory=read_ase))``.

    ``factory(options, base_dir)`` returns a list of labelled ``ase.Atoms``; relative paths in
    ``options`` resolve against ``base_dir`` (the config file's folder).
    """


@hookspec
def register_uq_heads(register: Callable[[UQHeadSpec], None]) -> None:
    """Register uncertainty heads, e.g. ``register(UQHeadSpec(name="deep_ensemble", factory=DeepEnsemble))``.

    ``factory(potential, **options)`` wraps a :class:`atomforge.Potential` (any backbone) and
    returns an :class:`atomforge.UQHead`, whose ``forward(batch, compute_forces=, compute_stress=)``
    returns the mean outputs plus ``keys.ENERGY_STD``, ``keys.FORCES_STD`` and
    ``keys.FORCES_STD_MAX`` (calibrated). Options come from the config's ``uq`` block. Built-ins:
    ``deep_ensemble``, ``shallow_ensemble``, ``mc_dropout``, ``latent_distance``. See docs/uq.md.
    """


@hookspec
def register_oracles(register: Callable[[OracleSpec], None]) -> None:
    """Register label oracles, e.g. ``register(OracleSpec(name="emt", factory=EMTOracle))``.

    ``factory(**options)`` returns an :class:`atomforge.Oracle`, whose ``label(atoms)`` returns a
    copy of ``atoms`` carrying energy, forces and (for periodic cells) stress.
    """


@hookspec
def register_explorers(register: Callable[[ExplorerSpec], None]) -> None:
    """Register explorers that propose candidate configurations for active learning."""


@hookspec
def register_selectors(register: Callable[[SelectorSpec], None]) -> None:
    """Register selectors that pick which candidates to label."""


@hookspec
def register_trackers(register: Callable[[TrackerSpec], None]) -> None:
    """Register experiment trackers, e.g. ``mlflow`` and ``none``.

    ``factory(run_dir=Path, **options)`` returns an :class:`atomforge.Tracker`.
    """


@hookspec
def register_engines(register: Callable[[EngineSpec], None]) -> None:
    """Register training engines (``torch`` built in; ``deepspeed`` for sharded training)."""


@hookspec
def register_commands(register: Callable[[CommandSpec], None]) -> None:
    """Register ``atomforge`` CLI sub-commands, e.g. ``al`` from active learning."""


HOOKS_BY_KIND = {
    "backbones": "register_backbones",
    "losses": "register_losses",
    "data_sources": "register_data_sources",
    "uq_heads": "register_uq_heads",
    "oracles": "register_oracles",
    "explorers": "register_explorers",
    "selectors": "register_selectors",
    "trackers": "register_trackers",
    "engines": "register_engines",
    "commands": "register_commands",
}
