#!/usr/bin/env bash
# MACE inside atomforge (`mace` backbone) vs MACE's own `mace_run_train`, side by side: same data,
# same settings, same wall-clock budget, one thread each, run AT THE SAME TIME (one per core);
# then both (and any other model files given in EXTRA) evaluated on the independent 600 K and the
# 1000 K trajectories and timed, interleaved, on the idle machine.
#
#   SEED=0 BUDGET=900 MACE_EPOCHS=32 bash benchmarks/ethanol/side_by_side.sh
#
# MACE_EPOCHS: mace_run_train has no time budget; pick the epochs that end near BUDGET seconds
# of wall-clock with the other core busy (measured 2026-12-03: ~27 s per epoch + ~45 s of start-up
# and final evaluation, float64, so 32 epochs ≈ 900 s). The result JSON records both wall times.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
SEED="${SEED:-0}"
BUDGET="${BUDGET:-900}"
MACE_EPOCHS="${MACE_EPOCHS:-32}"
DATA="${DATA:-$here/data-i16}"
OUT="${OUT:-$here/results/side-s$SEED}"
PY="${PY:-$root/.venv/bin/python}"
MACE_VENV="${MACE_VENV:-$here/.venv-mace}"
EXTRA="${EXTRA:-}"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MLFLOW_DISABLE_TELEMETRY=true
[ -f "$DATA/train.extxyz" ] || "$PY" "$here/make_data.py" --out "$DATA" --seed 16 --n-test 1000 --n-hot 500
[ -x "$MACE_VENV/bin/mace_run_train" ] || bash "$here/setup_mace_venv.sh"
"$MACE_VENV/bin/python" -c "import atomforge" 2>/dev/null || "$MACE_VENV/bin/pip" install -q -c "$root/constraints.txt" -e "$root"
mkdir -p "$OUT"
rm -rf "$OUT/af-mace" "$OUT/mace-cli"
# 1. both trainings at the same time, one core each
"$MACE_VENV/bin/python" "$here/run_atomforge.py" --backbone mace --data "$DATA" --seed "$SEED" \
    --budget-seconds "$BUDGET" --run-dir "$OUT/af-mace" --out "$OUT/af-mace.json" \
    --n-calls-small 20 --n-calls-large 1 > "$OUT/af-mace.log" 2>&1 &
af=$!
EPOCHS="$MACE_EPOCHS" SEED="$SEED" bash "$here/run_mace_cli.sh" "$DATA" "$OUT/mace-cli" > "$OUT/mace-cli.log" 2>&1 &
mace=$!
wait "$af" "$mace"
# 2. errors on both held-out trajectories, then interleaved timing on the idle machine
"$MACE_VENV/bin/python" "$here/evaluate_models.py" --data "$DATA" --out "$OUT/evaluation.json" \
    af_mace="$OUT/af-mace/model.pt" mace_cli="$OUT/mace-cli/mace.model" $EXTRA
