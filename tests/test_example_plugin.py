"""The example third-party plugin (examples/atomforge-example-plugin) works as a real package.

The package is pip-installed into a temporary directory (never into the venv), that directory is
put on ``sys.path`` for one test at a time, and ``example_schnet`` must then be discovered
through the ``atomforge`` entry point alone, pass the conformance kit, train and round-trip a
model file. A fixture removes the example's modules from ``sys.modules`` before and after each
test, so nothing leaks into other tests.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from atomforge import (
    ModelFileError,
    PluginKind,
    config_from_dict,
    load_config,
    load_model,
    make_registry,
    read_model_file,
)
from atomforge.testing import check_backbone, predict
from atomforge.workflows.train import train
from conftest import cu_structures, tiny_config

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "atomforge-example-plugin"
DISTRIBUTION = "atomforge-example-plugin"
ENTRY_POINT = "example"
PACKAGE = "atomforge_example_plugin"
BACKBONE = "example_schnet"
SMALL = {"hidden_channels": 16, "num_interactions": 2, "num_rbf": 8}


def _run(args: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Run ``python -m ...`` with check=True; on failure show pip's/pytest's own output."""
    try:
        return subprocess.run([sys.executable, "-m", *args], check=True, capture_output=True,
                              text=True, **kwargs)
    except subprocess.CalledProcessError as error:
        pytest.fail(f"{' '.join(args[:2])} failed ({error.returncode}):\n{error.stdout}\n{error.stderr}")


@pytest.fixture(scope="module")
def example_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the example's source tree (pip builds in-tree; the repo stays clean)."""
    target = tmp_path_factory.mktemp("example-src") / "atomforge-example-plugin"
    shutil.copytree(EXAMPLE, target, ignore=shutil.ignore_patterns(
        "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache"))
    return target


@pytest.fixture(scope="module")
def example_site(example_copy: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example installed by pip, with its dist-info and entry points, in a private folder."""
    site = tmp_path_factory.mktemp("example-install") / "site"
    _run(["pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
          "--disable-pip-version-check", "--quiet", "--target", str(site), str(example_copy)])
    return site


def _forget_example_modules() -> None:
    for name in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
        del sys.modules[name]
    importlib.invalidate_caches()


@pytest.fixture
def installed(example_site: Path) -> Iterator[Path]:
    """``example_site`` on ``sys.path`` for one test; afterwards no trace of the example is left."""
    _forget_example_modules()
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(example_site))
        importlib.invalidate_caches()
        yield example_site
    _forget_example_modules()  # sys.path is restored here; drop modules and metadata caches


def test_example_is_not_visible_outside_the_fixture() -> None:
    assert PACKAGE not in sys.modules
    assert BACKBONE not in make_registry().names(PluginKind.BACKBONE)


def test_example_backbone_is_discovered_through_its_entry_point(installed: Path) -> None:
    registry = make_registry()
    assert not registry.failures, registry.failures
    assert BACKBONE in registry.names("backbones")
    provided = registry.provided("backbones", BACKBONE)
    assert (provided.plugin, provided.distribution) == (ENTRY_POINT, DISTRIBUTION)
    # the code comes from the installed copy, not from the source tree
    assert Path(inspect.getfile(provided.spec.factory)).is_relative_to(installed)
    # ... and it is the entry point that brings it in: without entry points it is absent
    assert BACKBONE not in make_registry(entry_points=False).names("backbones")
    assert "painn" in registry.names("backbones")  # the built-ins are still there


def test_discovered_example_backbone_passes_the_conformance_kit(installed: Path) -> None:
    spec = make_registry().get("backbones", BACKBONE)
    results = check_backbone(spec, options=SMALL)
    assert spec.equivariant and any(r.name.startswith("rotation") for r in results)
    assert all(r.passed for r in results)


def test_example_readme_model_block_builds_the_backbone(installed: Path, tmp_path: Path) -> None:
    readme = (EXAMPLE / "README.md").read_text()
    block = re.search(r"```yaml\n(.*?)```", readme, flags=re.S).group(1)
    (tmp_path / "config.yaml").write_text(block)
    model = load_config(tmp_path / "config.yaml").model
    assert model.backbone == BACKBONE and set(model.options) == set(SMALL)
    spec = make_registry().get("backbones", model.backbone)
    backbone = spec.factory(num_elements=2, cutoff=model.cutoff, **model.options)
    assert backbone.cutoff == model.cutoff


def test_model_trained_with_the_example_names_its_provider(installed: Path, cu_files: dict[str, Path],
                                                           tmp_path: Path) -> None:
    raw = tiny_config(cu_files, tmp_path / "run", max_epochs=2)
    raw["model"] = {"backbone": BACKBONE, "cutoff": 4.0, **SMALL}
    registry = make_registry()
    outcome = train(config_from_dict(raw), registry, verbose=False)
    config, _, _ = read_model_file(outcome.model_path)
    assert (config["backbone"], config["provider"]) == (BACKBONE, DISTRIBUTION)
    model = load_model(outcome.model_path, registry=registry)
    atoms = cu_structures(1, seed=5)[0]
    assert predict(model, atoms)["forces"].shape == (len(atoms), 3)
    # where the plugin is not installed, loading says which distribution to install
    with pytest.raises(ModelFileError, match=rf"{BACKBONE}.*{DISTRIBUTION}"):
        load_model(outcome.model_path, registry=make_registry(entry_points=False))


def test_the_examples_own_tests_pass_against_the_installed_package(example_copy: Path,
                                                                   example_site: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(example_site),
                                                                   os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    result = _run(["pytest", "-q", "-p", "no:cacheprovider", "-rs", "tests"], cwd=example_copy, env=env)
    assert re.search(r"\b\d+ passed\b", result.stdout), result.stdout
    assert "skipped" not in result.stdout and "failed" not in result.stdout, result.stdout
