"""The plugin registry: discovery, failure isolation, duplicates, unknown names, docs."""

from __future__ import annotations

import importlib.metadata
import inspect
import re
import types
from pathlib import Path

import pytest

from atomforge import (
    BackboneSpec,
    DuplicatePluginError,
    LossSpec,
    PluginError,
    PluginKind,
    PluginLoadWarning,
    UnknownPluginError,
    hookimpl,
    hookspecs,
    make_plugin_manager,
    make_registry,
)
from atomforge.registry import DEFAULT_PLUGINS

ROOT = Path(__file__).resolve().parents[1]


def _plugin(name: str, **hooks: object) -> types.ModuleType:
    module = types.ModuleType(name)
    for hook_name, function in hooks.items():
        setattr(module, hook_name, hookimpl(function))
    return module


def test_builtins_cover_the_foundation_kinds(registry) -> None:
    assert "painn" in registry.names(PluginKind.BACKBONE)
    assert {"energy", "forces", "stress"} <= set(registry.names("losses"))
    assert {"ase", "pymatgen"} <= set(registry.names("data_sources"))
    assert {"mlflow", "none"} <= set(registry.names("trackers"))
    assert {"emt", "lj", "xtb"} <= set(registry.names("oracles"))
    assert "torch" in registry.names("engines")
    assert {"train", "evaluate", "md", "plugins", "demo"} <= set(registry.names("commands"))
    assert registry.provided("backbones", "painn").distribution == "atomforge"


def test_builtins_are_loaded_by_module_path_like_entry_points() -> None:
    pm = make_plugin_manager(entry_points=False)
    assert set(DEFAULT_PLUGINS) <= {name for name, _ in pm.list_name_plugin()}
    assert all(pm.distributions[m] == "atomforge" for m in DEFAULT_PLUGINS)


def test_unknown_name_lists_valid_ones(registry) -> None:
    with pytest.raises(UnknownPluginError, match=r"unknown backbone 'painm'.*valid names: .*painn"):
        registry.get("backbones", "painm")


def test_duplicate_names_name_both_providers() -> None:
    def register_losses(register):
        register(LossSpec("forces", object, "an impostor"))

    pm = make_plugin_manager(entry_points=False, extra=[_plugin("impostor", register_losses=register_losses)])
    registry = make_registry(pm)
    with pytest.raises(DuplicatePluginError, match=r"atomforge.plugins.losses.*impostor"):
        registry.get("losses", "forces")
    assert registry.get("losses", "energy").name == "energy"  # the rest keep working


def test_a_plugin_whose_hook_raises_is_reported_and_others_work() -> None:
    def register_backbones(register):
        raise RuntimeError("boom in plugin")

    broken = _plugin("broken_plugin", register_backbones=register_backbones)
    with pytest.warns(PluginLoadWarning, match=r"broken_plugin.*boom in plugin"):
        registry = make_registry(make_plugin_manager(entry_points=False, extra=[broken]))
    assert "painn" in registry.names("backbones")
    assert [f.plugin for f in registry.failures] == ["broken_plugin"]


def test_a_plugin_registering_the_wrong_record_is_reported() -> None:
    def register_backbones(register):
        register(("tuple", "not", "a spec"))

    bad = _plugin("bad_record", register_backbones=register_backbones)
    with pytest.warns(PluginLoadWarning, match="expects a BackboneSpec"):
        make_registry(make_plugin_manager(entry_points=False, extra=[bad]))


class _FakeDist:
    name = "broken-dist"


class _FakeEntryPoint:
    name = "broken_ep"
    dist = _FakeDist()

    def load(self) -> object:
        raise ImportError("No module named 'not_installed_dep'")


def test_entry_point_that_fails_to_import_is_named_with_its_distribution(monkeypatch) -> None:
    real = importlib.metadata.entry_points

    def fake_entry_points(**kwargs):
        return [_FakeEntryPoint()] if kwargs.get("group") == "atomforge" else real(**kwargs)

    monkeypatch.setattr(importlib.metadata, "entry_points", fake_entry_points)
    with pytest.warns(PluginLoadWarning, match=r"'broken_ep' \(distribution 'broken-dist'\).*not_installed_dep"):
        registry = make_registry()
    assert "painn" in registry.names("backbones")
    with pytest.raises(PluginError, match="broken_ep"):
        make_registry(strict=True)


def test_every_hook_is_documented_tested_and_has_a_spec_kind() -> None:
    hooks = [n for n, f in inspect.getmembers(hookspecs, inspect.isfunction) if n.startswith("register_")]
    assert sorted(hooks) == sorted(hookspecs.HOOKS_BY_KIND.values())
    assert sorted(hookspecs.HOOKS_BY_KIND) == sorted(k.value for k in PluginKind)
    guide = (ROOT / "docs" / "plugins.md").read_text()
    tests = "".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py"))
    for name in hooks:
        assert len(inspect.getdoc(getattr(hookspecs, name)) or "") > 40, f"{name} lacks a docstring"
        assert name in guide, f"{name} is not documented in docs/plugins.md"
        kind = name.removeprefix("register_")
        assert re.search(rf"\b{kind}\b", tests), f"no test mentions {kind}"


def test_spec_records_are_frozen() -> None:
    spec = BackboneSpec("x", object)
    with pytest.raises(Exception):
        spec.name = "y"  # type: ignore[misc]


_SPEC_OF_KIND = {
    "backbones": "BackboneSpec", "losses": "LossSpec", "data_sources": "DataSourceSpec",
    "uq_heads": "UQHeadSpec", "oracles": "OracleSpec", "explorers": "ExplorerSpec",
    "selectors": "SelectorSpec", "trackers": "TrackerSpec", "engines": "EngineSpec",
    "commands": "CommandSpec",
}


@pytest.mark.parametrize("kind", sorted(_SPEC_OF_KIND))
def test_a_third_party_plugin_can_extend_every_kind(kind: str) -> None:
    import atomforge

    spec_class = getattr(atomforge, _SPEC_OF_KIND[kind])
    spec = spec_class(name=f"thirdparty_{kind}", factory=dict, description="from a test")

    def hook(register):
        register(spec)

    plugin = _plugin(f"plugin_for_{kind}", **{hookspecs.HOOKS_BY_KIND[kind]: hook})
    registry = make_registry(make_plugin_manager(entry_points=False, extra=[plugin]))
    assert registry.get(kind, f"thirdparty_{kind}") is spec
    assert registry.provided(kind, f"thirdparty_{kind}").plugin == f"plugin_for_{kind}"


def test_oracles_label_raw_forces_even_for_constrained_structures(registry) -> None:
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.constraints import FixAtoms

    from atomforge import get_labels

    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.positions[0] += [0.1, 0.05, 0.0]
    atoms.set_constraint(FixAtoms([0]))
    labelled = registry.get("oracles", "emt").factory().label(atoms)
    ref = atoms.copy()
    ref.set_constraint()
    ref.calc = EMT()
    labels = get_labels(labelled)
    assert abs(labels.forces[0]).max() > 0.01  # not zeroed by FixAtoms
    assert labels.forces == pytest.approx(ref.get_forces())
    assert labels.energy == pytest.approx(ref.get_potential_energy())
    assert labels.stress.shape == (3, 3)
    assert atoms.calc is None and atoms.constraints  # the input is untouched


def test_xtb_oracle_labels_a_molecule(registry) -> None:
    from ase.build import molecule

    from atomforge import get_labels

    labels = get_labels(registry.get("oracles", "xtb").factory().label(molecule("H2O")))
    assert labels.energy < -100 and labels.forces.shape == (3, 3) and labels.stress is None
    assert abs(labels.forces.sum(0)).max() < 1e-6


def test_a_misspelled_hook_is_reported_not_ignored() -> None:
    def register_backbone(register):  # missing the "s"
        register(BackboneSpec("never", object))

    typo = _plugin("typo_plugin", register_backbone=register_backbone)
    with pytest.warns(PluginLoadWarning, match=r"typo_plugin.*register_backbone"):
        registry = make_registry(make_plugin_manager(entry_points=False, extra=[typo]))
    assert "painn" in registry.names("backbones") and [f.plugin for f in registry.failures] == ["typo_plugin"]


def test_the_mace_backbone_without_mace_torch_says_what_to_install(registry) -> None:
    import importlib.util

    from atomforge import ConfigError

    if importlib.util.find_spec("mace") is not None:
        pytest.skip("mace-torch is installed here (tests/test_mace.py covers the backbone)")
    with pytest.raises(ConfigError, match=r"pip install 'atomforge\[mace\]'.*e3nn"):
        registry.get("backbones", "mace").factory(num_elements=1, cutoff=4.0)
