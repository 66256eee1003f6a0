"""The hook specifications: every extension point of atomforge.

A plugin is a module (or object) with functions decorated by :data:`hookimpl`, named after the
hooks below. Every hook is called **once per plugin**, when a :class:`~atomforge.Registry` is
built (:func:`atomforge.make_registry`), with one argument, ``register``; the plugin calls
``register(spec)`` for every thing it provides, with the frozen record of that kind from
:mod:`atomforge` (``BackboneSpec``, ``LossSpec``, …). Results are not combined by pluggy: the
registry collects every record by kind and name, and *using* a name two plugins registered is
an error naming both. A hook that raises, or registers a record of the wrong kind, makes its
plugin fail alone (reported with its distribution; the others keep working).

Built-in plugins (modules in ``atomforge.plugins``) are registered by the very same loader as
third-party packages, which advertise their plugin module in the ``atomforge`` entry-point
group::

    # pyproject.toml of a third-party package
    [project.entry-points.atomforge]
    my_backbone = "my_package.plugin"

    # my_package/plugin.py
    from atomforge import BackboneSpec, hookimpl

    @hookimpl
    def register_backbones(register):
        register(BackboneSpec(name="my_net", factory=MyNet, description="..."))

Factories are called later, when a config names the thing; their signatures are given per hook
below and checked by the conformance kits in :mod:`atomforge.testing`. All hooks were added in
atomforge 0.1 except ``register_fields`` (0.2); in 0.2 the engine factory changed to return a
training backend (see ``register_engines``).
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
from .data.fields import FieldSpec

PROJECT_NAME = "atomforge"
hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


# == data: what goes into a batch =======================================================================
@hookspec
def register_data_sources(register: Callable[[DataSourceSpec], None]) -> None:
    """Register data sources (``data.train: {source: NAME, ...}``).

    ``factory(options: dict, base_dir: Path) -> list[ase.Atoms]``: ``options`` is the source
    entry without ``source`` (``path``/``paths`` already resolved against ``base_dir``, the
    config file's folder). Each structure carries its labels where ASE keeps them (a
    ``SinglePointCalculator`` — :func:`atomforge.attach_labels` makes one — or
    ``info['energy'|'stress']`` / ``arrays['forces']``) and metadata in ``info`` (``charge``,
    ``spin``, ``fidelity``, ``weight``). Unknown options: :class:`atomforge.ConfigError` listing the
    valid ones; unreadable files: :class:`atomforge.DataValidationError`. Checked by
    :func:`atomforge.testing.check_data_source`.

    Example: ``register(DataSourceSpec("ase", read_ase, "any file ase.io.read reads"))``.
    """


@hookspec
def register_fields(register: Callable[[FieldSpec], None]) -> None:
    """Register batch fields: keys a graph may carry beyond atomforge's own, with how they are
    batched (``per``: atom, edge, structure or global), their dtype and trailing shape and, for
    data read from ``ase.Atoms``, a ``read(atoms)`` function (``None`` = absent; ``default``
    fills it). Collation, replication for ensembles and per-rank sharding then handle the key
    like a built-in. No factory: the record is the field.

    Example: ``register(FieldSpec("magmoms", per="atom", read=lambda a: a.arrays.get("magmoms")))``.
    Added in 0.2.
    """


# == models ===========================================================================================
@hookspec
def register_backbones(register: Callable[[BackboneSpec], None]) -> None:
    """Register model architectures (``model.backbone: NAME``).

    ``factory(*, num_elements: int, cutoff: float, **options) -> atomforge.Backbone``, with
    ``options`` the remaining keys of the config's ``model`` block; the backbone maps a batch
    with edge vectors to per-atom energies (normalised units) and, optionally, latent features
    (see docs/plugins.md, "The backbone contract"). Raise :class:`atomforge.ConfigError` for bad
    option values. ``BackboneSpec.equivariant`` declares rotation equivariance by construction.
    Checked by :func:`atomforge.testing.check_backbone`.

    Example: ``register(BackboneSpec("painn", PaiNN, "equivariant message passing", equivariant=True))``.
    """


@hookspec
def register_uq_heads(register: Callable[[UQHeadSpec], None]) -> None:
    """Register uncertainty heads (``uq: {name: NAME, ...}``).

    ``factory(potential: atomforge.Potential, **options) -> atomforge.UQHead``, with ``options``
    the rest of the ``uq`` block. The head's ``forward(batch, compute_forces=, compute_stress=)``
    returns the mean outputs plus ``keys.ENERGY_STD`` [B], ``keys.FORCES_STD`` [N] and
    ``keys.FORCES_STD_MAX`` [B], calibrated; forces come from the Potential's
    ``energy_derivatives``. Built-ins: ``deep_ensemble``, ``shallow_ensemble``, ``mc_dropout``,
    ``latent_distance``. Checked by :func:`atomforge.testing.check_uq_head`; see docs/uq.md.

    Example: ``register(UQHeadSpec("deep_ensemble", DeepEnsemble, "K independently trained models"))``.
    """


# == training ==========================================================================================
@hookspec
def register_losses(register: Callable[[LossSpec], None]) -> None:
    """Register loss terms (entries of the config's ``loss`` list).

    ``factory(**options) -> atomforge.LossTerm``, with ``options`` the entry without ``name`` and
    ``weight``. ``term(batch, outputs, model)`` returns a scalar tensor; ``term.requires`` names
    the labels it needs (checked on the data before training), ``term.outputs`` the model outputs
    (``forces``, ``stress``) it needs. An optional ``augment(batch, generator)`` transforms
    training batches (:class:`atomforge.Augmentation`).

    Example: ``register(LossSpec("forces", ForceLoss, "force components; kind: mse|mae|huber"))``.
    """


@hookspec
def register_engines(register: Callable[[EngineSpec], None]) -> None:
    """Register training engines (``training.engine: NAME``): backends of the one training loop.

    ``factory(*, options: Mapping | None, settings: atomforge.TrainSettings) ->
    atomforge.TrainingBackend``: ``options`` is the engine's own block — the top-level config
    section named like the engine (``deepspeed:`` for ``training.engine: deepspeed``), ``None``
    when absent — validated first by ``EngineSpec.check_options(options)`` if given. The loop
    (:class:`atomforge.Trainer`) owns epochs, seeds, EMA, validation, stopping and checkpoints;
    the backend supplies the step, the collectives, its state and the export. Subclass
    :class:`atomforge.TorchBackend` to change one part. ``EngineSpec.distributed`` engines may
    run under a launcher with several processes. Checked by :func:`atomforge.testing.check_engine`.

    Example: ``register(EngineSpec("torch", make_backend, "one process, any device"))``.
    Changed in 0.2: the factory returns a backend (was: an engine object with ``fit``).
    """


@hookspec
def register_trackers(register: Callable[[TrackerSpec], None]) -> None:
    """Register experiment trackers (``tracking: NAME`` or ``{name: NAME, ...}``).

    ``factory(*, run_dir: Path, experiment: str, **options) -> atomforge.Tracker``, with
    ``options`` the rest of the ``tracking`` block; ``run_dir`` is the run's output folder and
    ``experiment`` the ``tracking.experiment`` name. Built-ins: ``mlflow`` (default), ``none``.

    Example: ``register(TrackerSpec("mlflow", MLflowTracker, "MLflow (local sqlite store by default)"))``.
    """


# == active learning ======================================================================================
@hookspec
def register_oracles(register: Callable[[OracleSpec], None]) -> None:
    """Register label oracles (a campaign's ``oracle: {name: NAME, ...}``).

    ``factory(**options) -> atomforge.Oracle``: ``oracle.label(atoms)`` returns a labelled *copy*
    (energy, forces and, for 3D-periodic cells, stress) and never mutates its input; raise
    :class:`atomforge.OracleFailure` for a structure it cannot label. Factory and options must be
    picklable (workers build the oracle). :class:`atomforge.CalculatorOracle` wraps any ASE
    calculator. Checked by :func:`atomforge.testing.check_oracle`.

    Example: ``register(OracleSpec("emt", emt_oracle, "ASE effective-medium theory"))``.
    """


@hookspec
def register_explorers(register: Callable[[ExplorerSpec], None]) -> None:
    """Register explorers (a campaign's ``explorers: [{name: NAME, ...}]``).

    ``factory(**options) -> atomforge.Explorer``: ``explore(starts, calculator, *, hi, seed) ->
    list[ase.Atoms]`` proposes unlabelled copies from the starting structures, driven by any ASE
    calculator (in a campaign the current model's UQ calculator; read its uncertainty with
    :func:`atomforge.uncertainty_of` and stop trajectories at ``hi`` eV/Å when not ``None``).
    Options named ``path``/``paths`` are resolved against the campaign file's folder.

    Example: ``register(ExplorerSpec("md", MDExplorer, "MD with the model's UQ calculator"))``.
    """


@hookspec
def register_selectors(register: Callable[[SelectorSpec], None]) -> None:
    """Register selectors (a campaign's ``selector: {name: NAME, ...}``).

    ``factory(**options) -> atomforge.Selector``: ``select(candidates, budget, *, calibration=None,
    seed=0) -> atomforge.Selection`` picks at most ``budget`` distinct indices into
    ``candidates`` (each an :class:`atomforge.Candidate` with ``max_force_std``, ``energy_std``,
    latent ``features``), deterministically for a seed; ``budget`` may be 0 and ``candidates``
    empty. Checked by :func:`atomforge.testing.check_selector`.

    Example: ``register(SelectorSpec("top_k", TopK, "the k most uncertain candidates"))``.
    """


# == the command line ======================================================================================
@hookspec
def register_commands(register: Callable[[CommandSpec], None]) -> None:
    """Register ``atomforge`` sub-commands.

    ``factory(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace, Registry], int]``:
    add the command's arguments to ``parser`` and return the function that runs it (its return
    value is the exit code; raise :class:`atomforge.AtomforgeError` for a clear error message).

    Example: ``register(CommandSpec("al", add_al_command, "active-learning campaigns", help="..."))``.
    """


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
    "fields": "register_fields",
}
