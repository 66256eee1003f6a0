"""One public plugin surface: built-in plugins (and the active-learning package) import nothing
from atomforge but the names it exports, exactly as a third-party package would."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

import atomforge

ROOT = Path(__file__).resolve().parents[1]
PUBLIC_MODULES = {"atomforge.testing"}  # public modules beyond atomforge itself (keys, distributed are in __all__)


def _atomforge_imports(path: Path) -> list[tuple[int, str, str]]:
    """(line, module, name) of every import of atomforge in a file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("atomforge"):
            found.extend((node.lineno, node.module, alias.name) for alias in node.names)
        elif isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name, "") for alias in node.names if alias.name.startswith("atomforge"))
    return found


def _violations(folder: str) -> list[str]:
    bad = []
    for path in sorted((ROOT / folder).glob("*.py")):
        for line, module, name in _atomforge_imports(path):
            where = f"{path.relative_to(ROOT)}:{line}"
            if module == "atomforge" and name and name not in atomforge.__all__:
                bad.append(f"{where}: `from atomforge import {name}` — {name} is not in atomforge.__all__")
            elif module not in ("atomforge", *PUBLIC_MODULES):
                bad.append(f"{where}: imports {module}{'.' + name if name else ''}; use `from atomforge import …`")
    return bad


@pytest.mark.parametrize("folder", ["plugins", "active_learning"])
def test_plugins_import_only_the_public_api(folder: str) -> None:
    assert _violations(folder) == []


def test_the_checker_catches_private_imports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "bad.py").write_text(
        "from atomforge.training.loop import _KEEP\nfrom atomforge import Trainer, _secret\nimport atomforge.plugins.painn\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    bad = _violations("plugins")
    assert len(bad) == 3 and "atomforge.training.loop" in bad[0] and "_secret" in bad[1] and "plugins.painn" in bad[2]


def test_every_exported_name_exists_and_is_documented() -> None:
    guide = (ROOT / "docs" / "plugins.md").read_text()
    missing = [name for name in atomforge.__all__ if not hasattr(atomforge, name)]
    assert missing == []
    undocumented = [name for name in atomforge.__all__ if name != "__version__" and f"`{name}" not in guide]
    assert undocumented == [], f"docs/plugins.md (the public surface) does not mention {undocumented}"


LAYERS = ("data", "exploration", "model", "analysis", "training", "workflows")  # each imports only those before it


def test_core_sub_packages_import_only_upstream_ones() -> None:
    """Data flows one way through core: a sub-package never imports one downstream of it."""
    bad = []
    for position, package in enumerate(LAYERS):
        allowed = set(LAYERS[:position + 1])
        for path in sorted((ROOT / "core" / package).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.level == 2 and node.module:
                    target = node.module.split(".")[0]
                    if target in LAYERS and target not in allowed:
                        bad.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {target} (downstream of {package})")
    assert bad == []
