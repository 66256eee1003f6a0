"""Typed, frozen records that plugins hand to the registry, one kind per extension point."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Callable

__all__ = [
    "PluginKind",
    "BackboneSpec",
    "LossSpec",
    "DataSourceSpec",
    "UQHeadSpec",
    "OracleSpec",
    "ExplorerSpec",
    "SelectorSpec",
    "TrackerSpec",
    "EngineSpec",
    "CommandSpec",
    "Spec",
]


class PluginKind(str, enum.Enum):
    """The extension points; the value is the registry's (and config's) plural name."""

    BACKBONE = "backbones"
    LOSS = "losses"
    DATA_SOURCE = "data_sources"
    UQ_HEAD = "uq_heads"
    ORACLE = "oracles"
    EXPLORER = "explorers"
    SELECTOR = "selectors"
    TRACKER = "trackers"
    ENGINE = "engines"
    COMMAND = "commands"
    FIELD = "fields"


@dataclass(frozen=True)
class _Spec:
    name: str  # registry name used in config files
    factory: Callable[..., Any]  # builds the plugin's object; signature per kind, see below
    description: str = ""  # one line shown by ``atomforge plugins``

    kind: PluginKind = PluginKind.BACKBONE  # overridden by each subclass


@dataclass(frozen=True)
class BackboneSpec(_Spec):
    """A model architecture.

    ``factory(*, num_elements: int, cutoff: float, **options) -> atomforge.Backbone``.
    ``equivariant`` declares whether outputs are rotation-equivariant *by construction*; the
    conformance kit only demands rotation checks from backbones that declare it.
    """

    equivariant: bool = True
    #: ``fit_options(options: dict, statistics: atomforge.DataStatistics) -> dict``, optional: called
    #: once when a model is built for training from scratch, with the backbone's options from the
    #: config and statistics of the training set; returns the options the backbone is built with
    #: and that the model file records (e.g. ``avg_num_neighbors: auto`` made a number). Not called
    #: for ``model.init_from`` (the file's options hold).
    fit_options: Callable[[dict[str, Any], Any], dict[str, Any]] | None = None
    #: ``importer(path: Path) -> (config, metadata, state_dict)``, optional: reads a model file of
    #: another package (e.g. a MACE ``.model``) as an atomforge model-file config (backbone,
    #: options, cutoff, dtype, elements, atomic_energies, scale, shift), metadata (what was and was
    #: not carried over) and the state dict of the :class:`atomforge.Potential`. Used by
    #: ``model.init_from`` and ``atomforge import-model``.
    importer: Callable[[Any], tuple[dict[str, Any], dict[str, Any], dict[str, Any]]] | None = None
    #: ``pretrained(name: str) -> (config, metadata, state_dict)``, optional: a pretrained model
    #: that ships with the backbone's package (no download), in the importer's format. Used by
    #: ``model.pretrained: NAME`` (= ``model.init_from: "pretrained:NAME"``) and ``atomforge
    #: import-model --backbone B pretrained:NAME out.pt``. Unknown names raise ConfigError listing
    #: ``pretrained_names``.
    pretrained: Callable[[str], tuple[dict[str, Any], dict[str, Any], dict[str, Any]]] | None = None
    #: the names ``pretrained`` accepts (shown by ``atomforge plugins`` and in errors)
    pretrained_names: tuple[str, ...] = ()
    kind: PluginKind = PluginKind.BACKBONE


@dataclass(frozen=True)
class LossSpec(_Spec):
    """A loss term. ``factory(**options) -> atomforge.LossTerm``."""

    kind: PluginKind = PluginKind.LOSS


@dataclass(frozen=True)
class DataSourceSpec(_Spec):
    """A data source. ``factory(options: dict, base_dir: Path) -> list[ase.Atoms]`` (labelled)."""

    kind: PluginKind = PluginKind.DATA_SOURCE


@dataclass(frozen=True)
class UQHeadSpec(_Spec):
    """An uncertainty head. ``factory(potential, **options) -> atomforge.UQHead`` (mean outputs
    plus ``energy_std``, ``forces_std``, ``forces_std_max``; see docs/uq.md)."""

    kind: PluginKind = PluginKind.UQ_HEAD


@dataclass(frozen=True)
class OracleSpec(_Spec):
    """A label oracle. ``factory(**options) -> atomforge.Oracle`` (labels ``ase.Atoms``)."""

    kind: PluginKind = PluginKind.ORACLE


@dataclass(frozen=True)
class ExplorerSpec(_Spec):
    """An explorer. ``factory(**options)`` -> object proposing candidate configurations."""

    kind: PluginKind = PluginKind.EXPLORER


@dataclass(frozen=True)
class SelectorSpec(_Spec):
    """A selector. ``factory(**options)`` -> object picking candidates to label."""

    kind: PluginKind = PluginKind.SELECTOR


@dataclass(frozen=True)
class TrackerSpec(_Spec):
    """An experiment tracker. ``factory(*, run_dir: Path, **options) -> atomforge.Tracker``."""

    kind: PluginKind = PluginKind.TRACKER


@dataclass(frozen=True)
class EngineSpec(_Spec):
    """A training engine: the backend the one training loop calls.

    ``factory(*, options: Mapping[str, Any] | None, settings: TrainSettings) -> TrainingBackend``
    (see :class:`atomforge.TrainingBackend`). ``options`` is the engine's own config block: the
    top-level section named like the engine (``deepspeed:`` for ``training.engine: deepspeed``),
    ``None`` when absent. ``check_options(options)``, if given, validates that block before any
    data is read (raise :class:`atomforge.ConfigError`). ``distributed`` engines may run under a
    launcher with several processes (``atomforge train --nproc N``; campaigns run them as
    supervised jobs); the factory of one joins the launcher's process group.
    """

    check_options: Callable[[Any], Any] | None = None
    distributed: bool = False
    kind: PluginKind = PluginKind.ENGINE


@dataclass(frozen=True)
class CommandSpec(_Spec):
    """A CLI sub-command.

    ``factory(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace, Registry], int]``:
    the factory adds the command's arguments to ``parser`` and returns the function that runs it.
    """

    help: str = ""
    kind: PluginKind = PluginKind.COMMAND


Spec = _Spec
