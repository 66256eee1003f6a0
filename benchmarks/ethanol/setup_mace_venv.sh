#!/usr/bin/env bash
# Create a separate virtual environment with mace-torch for the ethanol peer benchmark.
#
# Usage:
#   bash benchmarks/ethanol/setup_mace_venv.sh            # -> benchmarks/ethanol/.venv-mace
#   MACE_VENV=/some/path bash benchmarks/ethanol/setup_mace_venv.sh
#
# Environment variables:
#   MACE_VENV         venv path (default: <this dir>/.venv-mace)
#   PYTHON            base interpreter (default: python3.11 if present, else python3)
#   MACE_TORCH_SPEC   pip requirement for mace-torch (default: pinned below)
#
# torch is installed FIRST and pinned (torch==2.13.0, the local CPU wheel); every
# later install runs with a constraints file so nothing can upgrade it (an unpinned
# torch would pull several GB of CUDA wheels).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${MACE_VENV:-$HERE/.venv-mace}"
TORCH_VERSION="2.13.0"
MACE_TORCH_SPEC="${MACE_TORCH_SPEC:-mace-torch==0.3.16}"
if [[ -z "${PYTHON:-}" ]]; then
  if command -v python3.11 >/dev/null 2>&1; then PYTHON=python3.11; else PYTHON=python3; fi
fi

echo "[setup_mace_venv] venv: $VENV (base interpreter: $PYTHON)"
if [[ ! -x "$VENV/bin/python" ]]; then
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"

CONSTRAINTS="$VENV/torch-constraints.txt"
echo "torch==${TORCH_VERSION}" > "$CONSTRAINTS"

"$PY" -m pip install --quiet --upgrade pip
# 1. torch first, pinned.
"$PY" -m pip install "torch==${TORCH_VERSION}"
# 2. mace-torch (and its deps: e3nn, ase, matscipy, torch-ema, ...) with torch held fixed.
"$PY" -m pip install -c "$CONSTRAINTS" "$MACE_TORCH_SPEC"

# 3. Verify.
"$PY" - <<'PY'
import importlib.metadata as md

import torch
import mace  # noqa: F401
from mace.calculators import MACECalculator  # noqa: F401
from mace.modules import ScaleShiftMACE  # noqa: F401

for name in ("torch", "mace-torch", "e3nn", "ase", "numpy", "torch-ema", "matscipy"):
    try:
        print(f"  {name}=={md.version(name)}")
    except md.PackageNotFoundError:
        print(f"  {name}: not installed")
assert torch.__version__.startswith("2.13.0"), torch.__version__
print("[setup_mace_venv] import mace OK")
PY
