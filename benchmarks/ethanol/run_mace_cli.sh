#!/usr/bin/env bash
# MACE trained by MACE's own command line (`mace_run_train`), one thread: the peer of the
# side-by-side benchmark (benchmarks/ethanol/side_by_side.sh). Runs in the mace venv.
#
#   EPOCHS=40 SEED=0 bash benchmarks/ethanol/run_mace_cli.sh DATA_DIR WORK_DIR
#
# mace_run_train has no wall-clock budget: EPOCHS is chosen so that it ends near the budget
# (side_by_side.sh measures seconds per epoch first). Settings: mace_run_train's defaults
# (float64, lr 0.01, AMSGrad, weight decay 5e-7, batch 10, weighted loss energy 1 / forces 100,
# ReduceLROnPlateau factor 0.8 patience 50, gradient clip 10, E0s by least squares, radial MLP
# [64, 64, 64], 8 Bessel functions, p = 5, 2 RealAgnosticResidual interactions) plus
# hidden irreps 64x0e, max_ell 3, correlation 3, r_max 5 Å, EMA 0.99, 5 % validation.
set -euo pipefail
data="$(cd "$1" && pwd)"
work="$2"
here="$(cd "$(dirname "$0")" && pwd)"
MACE_VENV="${MACE_VENV:-$here/.venv-mace}"
EPOCHS="${EPOCHS:-40}"
SEED="${SEED:-0}"
DTYPE="${DTYPE:-float64}"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
mkdir -p "$work"
cd "$work"
start=$(date +%s.%N)
"$MACE_VENV/bin/mace_run_train" --name mace --seed "$SEED" --device cpu --default_dtype "$DTYPE" \
  --train_file "$data/train.extxyz" --valid_fraction 0.05 --energy_key energy --forces_key forces \
  --model MACE --hidden_irreps 64x0e --max_ell 3 --correlation 3 --num_interactions 2 --r_max 5.0 \
  --E0s average --batch_size 10 --valid_batch_size 10 --max_num_epochs "$EPOCHS" \
  --ema --ema_decay 0.99 --amsgrad --error_table PerAtomMAE --eval_interval 1 --num_workers 0 \
  > mace_run_train.log 2>&1
end=$(date +%s.%N)
python3 - "$start" "$end" "$EPOCHS" <<'PY'
import json, sys
start, end, epochs = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
json.dump({"wall_seconds": end - start, "epochs": epochs}, open("timing.json", "w"))
PY
ls "$work"/*.model
