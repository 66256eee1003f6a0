"""The plugin manager factory and the registry of everything plugins provide.

Built-in plugins are the modules named in :data:`DEFAULT_PLUGINS`; third-party plugins are the
entry points of the ``atomforge`` group. Both go through :func:`_load_plugin`, so a built-in is
loaded exactly like an external package. A plugin that fails to import, or whose hook raises,
is reported by name and distribution (a :class:`PluginLoadWarning`) and the others keep working;
``strict=True`` re-raises instead.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import warnings
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable, Iterable

import pluggy

from . import hookspecs
from ._errors import DuplicatePluginError, PluginError, UnknownPluginError
from ._specs import PluginKind, Spec
from .data.fields import DEFAULT_FIELDS, FieldSpec, FieldTable

__all__ = [
    "DEFAULT_PLUGINS",
    "ENTRY_POINT_GROUP",
    "PluginLoadWarning",
    "PluginFailure",
    "Provided",
    "PluginManager",
    "Registry",
    "make_plugin_manager",
    "make_registry",
]

ENTRY_POINT_GROUP = "atomforge"
BUILTIN_DISTRIBUTION = "atomforge"

#: Module paths of the built-in plugins, loaded like entry points (never imported by core code).
DEFAULT_PLUGINS: tuple[str, ...] = (
    "atomforge._commands",
    "atomforge.plugins.painn",
    "atomforge.plugins.transformer",
    "atomforge.plugins.mace",
    "atomforge.plugins.chgnet_backbone",
    "atomforge.plugins.sevennet",
    "atomforge.plugins.tensornet",
    "atomforge.plugins.losses",
    "atomforge.plugins.physics_losses",
    "atomforge.plugins.hessian",
    "atomforge.plugins.denoising",
    "atomforge.plugins.data_sources",
    "atomforge.plugins.oracles",
    "atomforge.plugins.explorers",
    "atomforge.plugins.selectors",
    "atomforge.plugins.trackers",
    "atomforge.plugins.engines",
    "atomforge.plugins.deepspeed_engine",
    "atomforge.plugins.uq",
    "atomforge.active_learning.commands",
)


class PluginLoadWarning(UserWarning):
    """Warned when a plugin cannot be loaded or its hook fails; the other plugins keep working."""


@dataclass(frozen=True)
class PluginFailure:
    """A plugin that could not be used: its name, distribution and the error."""

    plugin: str
    distribution: str
    error: str


@dataclass(frozen=True)
class Provided:
    """A spec together with the plugin and distribution that registered it."""

    spec: Spec
    plugin: str
    distribution: str


class PluginManager(pluggy.PluginManager):
    """A pluggy manager that also remembers distributions and load failures."""

    def __init__(self, *, strict: bool = False) -> None:
        super().__init__(hookspecs.PROJECT_NAME)
        self.add_hookspecs(hookspecs)
        self.strict = strict  # re-raise plugin failures instead of warning
        self.distributions: dict[str, str] = {}  # plugin name -> distribution name
        self.failures: list[PluginFailure] = []

    def report_failure(self, plugin: str, distribution: str, error: BaseException) -> None:
        """Record (and warn about) a failed plugin, or raise in strict mode."""
        failure = PluginFailure(plugin, distribution, f"{type(error).__name__}: {error}")
        if self.strict:
            raise PluginError(
                f"plugin {plugin!r} from distribution {distribution!r} failed: {failure.error}"
            ) from error
        self.failures.append(failure)
        warnings.warn(
            f"atomforge plugin {plugin!r} (distribution {distribution!r}) was skipped: "
            f"{failure.error}. The other plugins keep working; fix or uninstall it.",
            PluginLoadWarning,
            stacklevel=3,
        )


def _load_plugin(
    pm: PluginManager, name: str, load: Callable[[], Any], distribution: str
) -> None:
    """Import one plugin and register it; failures are isolated and reported by name."""
    try:
        plugin = load()
        if pm.is_registered(plugin):
            return
        pm.register(plugin, name=name)
    except Exception as error:  # noqa: BLE001 - any failure of a plugin must not stop the others
        pm.report_failure(name, distribution, error)
        return
    try:
        pm.check_pending()  # a misspelled hook (e.g. register_backbone) must not pass silently
    except pluggy.PluginValidationError as error:
        pm.unregister(name=name)
        pm.report_failure(name, distribution, error)
        return
    pm.distributions[name] = distribution


def make_plugin_manager(
    *,
    entry_points: bool = True,
    builtins: Iterable[str] = DEFAULT_PLUGINS,
    extra: Iterable[ModuleType | object] = (),
    strict: bool = False,
) -> PluginManager:
    """Build a plugin manager: built-ins, then ``atomforge`` entry points, then ``extra`` objects.

    Tests build their own manager (e.g. ``entry_points=False`` plus an ``extra`` plugin).
    """
    pm = PluginManager(strict=strict)
    for module_path in builtins:
        _load_plugin(pm, module_path, lambda m=module_path: importlib.import_module(m),
                     BUILTIN_DISTRIBUTION)
    if entry_points:
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = ep.dist.name if ep.dist is not None else "unknown"
            _load_plugin(pm, ep.name, ep.load, dist)
    for index, obj in enumerate(extra):
        name = getattr(obj, "__name__", f"extra-{index}")
        _load_plugin(pm, name, lambda o=obj: o, "extra")
    return pm


@dataclass
class Registry:
    """Everything the plugins of a manager provide, by kind and name."""

    pm: PluginManager
    _entries: dict[PluginKind, dict[str, list[Provided]]] = field(default_factory=dict)
    _fields: FieldTable | None = None

    @classmethod
    def from_manager(cls, pm: PluginManager) -> "Registry":
        """Call every ``register_*`` hook of every plugin and collect the specs."""
        registry = cls(pm)
        for kind in PluginKind:
            registry._entries[kind] = registry._collect(kind)
        return registry

    @property
    def failures(self) -> list[PluginFailure]:
        """Plugins that failed to load or register."""
        return list(self.pm.failures)

    def _collect(self, kind: PluginKind) -> dict[str, list[Provided]]:
        found: dict[str, list[Provided]] = {}
        caller = getattr(self.pm.hook, hookspecs.HOOKS_BY_KIND[kind.value])
        for impl in caller.get_hookimpls():
            plugin = impl.plugin_name
            dist = self.pm.distributions.get(plugin, "unknown")
            staged: list[Provided] = []

            def register(spec: Spec, _staged: list[Provided] = staged) -> None:
                if not isinstance(spec, (Spec, FieldSpec)) or spec.kind is not kind:
                    raise PluginError(
                        f"register_{kind.value} expects a {_record_name(kind)} record, "
                        f"got {type(spec).__name__}"
                    )
                _staged.append(Provided(spec, plugin, dist))

            try:
                impl.function(**{arg: register for arg in impl.argnames})
            except Exception as error:  # noqa: BLE001 - isolate the failing plugin
                self.pm.report_failure(plugin, dist, error)
                continue
            for provided in staged:
                found.setdefault(provided.spec.name, []).append(provided)
        return found

    @property
    def fields(self) -> FieldTable:
        """The batch fields: atomforge's (:data:`~atomforge.DEFAULT_FIELDS`) plus every
        plugin's (``register_fields``); a name declared twice is a :class:`PluginError`."""
        if self._fields is None:
            provided = self.entries(PluginKind.FIELD)
            who = {p.spec.name: f"plugin {p.plugin!r} (distribution {p.distribution!r})" for p in provided}
            self._fields = DEFAULT_FIELDS.extended([p.spec for p in provided], provider=who)
        return self._fields

    def names(self, kind: PluginKind | str) -> list[str]:
        """Sorted registry names of one kind."""
        return sorted(self._entries[PluginKind(kind)])

    def entries(self, kind: PluginKind | str) -> list[Provided]:
        """All provided specs of one kind (duplicates included), sorted by name."""
        by_name = self._entries[PluginKind(kind)]
        return [p for name in sorted(by_name) for p in by_name[name]]

    @staticmethod
    def _singular(kind: PluginKind) -> str:
        return {"losses": "loss", "uq_heads": "UQ head", "data_sources": "data source", "fields": "field"}.get(
            kind.value, kind.value[:-1])

    def provided(self, kind: PluginKind | str, name: str) -> Provided:
        """The spec registered under ``name`` with its provider; clear errors otherwise."""
        kind = PluginKind(kind)
        candidates = self._entries[kind].get(name)
        if not candidates:
            valid = ", ".join(self.names(kind)) or "(none registered)"
            raise UnknownPluginError(
                f"unknown {self._singular(kind)} {name!r}; valid names: {valid}. "
                "Install the package that provides it or fix the name."
            )
        if len(candidates) > 1:
            who = " and ".join(f"{p.plugin!r} (distribution {p.distribution!r})" for p in candidates)
            raise DuplicatePluginError(
                f"{self._singular(kind)} name {name!r} is registered by both {who}; "
                "uninstall one of them or rename its entry."
            )
        return candidates[0]

    def get(self, kind: PluginKind | str, name: str) -> Any:
        """The spec registered under ``name`` (see :meth:`provided` for the errors)."""
        return self.provided(kind, name).spec


def _record_name(kind: PluginKind) -> str:
    """The spec record class a hook of ``kind`` takes, e.g. ``UQHeadSpec``."""
    return {PluginKind.UQ_HEAD: "UQHeadSpec", PluginKind.DATA_SOURCE: "DataSourceSpec",
            PluginKind.LOSS: "LossSpec"}.get(kind, kind.name.title().replace("_", "") + "Spec")


def make_registry(pm: PluginManager | None = None, **manager_options: Any) -> Registry:
    """Build a :class:`Registry` from ``pm`` or from a fresh :func:`make_plugin_manager`."""
    return Registry.from_manager(pm or make_plugin_manager(**manager_options))
