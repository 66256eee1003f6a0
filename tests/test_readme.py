"""The README's commands stay true: CI runs exactly the README's test command."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.startswith("python3 -m venv")]


def test_ci_runs_the_readme_test_command() -> None:
    setup_and_demo, setup_and_test = _commands()[:2]
    assert setup_and_demo.endswith("atomforge demo --out runs/demo")
    assert ' ".[test]" && python -m pytest -q && ' in setup_and_test  # the main environment, every test
    assert setup_and_test.endswith(".venv-mace/bin/python -m pytest -q -m mace")  # the mace backbone's own venv
    assert setup_and_test in (ROOT / ".ci" / "run").read_text().splitlines()


def test_readme_config_example_loads(tmp_path) -> None:
    from atomforge import load_config

    block = re.search(r"```yaml\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S).group(1)
    (tmp_path / "config.yaml").write_text(block)
    config = load_config(tmp_path / "config.yaml")
    assert config.model.backbone == "tensornet" and config.training.max_time == 900
