#!/bin/bash
# Streaming vs in-memory training on the ethanol benchmark data (issue 17, benchmark 2):
# the same PaiNN 64x3 run from train.extxyz in memory, and from a store packed from it —
# cached after the first epoch (the default), streamed every epoch with 0 and 1 loader workers.
# Prints time per epoch and the validation force MAE of each epoch (equal = same results).
#   bash benchmarks/store/ethanol_stream.sh [DATA=benchmarks/ethanol/data-i16] [EPOCHS=4] [OUT=/tmp/eth-stream]
set -euo pipefail
DATA=${DATA:-benchmarks/ethanol/data-i16}; EPOCHS=${EPOCHS:-4}; OUT=${OUT:-/tmp/eth-stream}
export OMP_NUM_THREADS=1 MLFLOW_DISABLE_TELEMETRY=true
rm -rf "$OUT" && mkdir -p "$OUT"
atomforge data pack "$OUT/train.store" "$DATA/train.extxyz" --quiet > /dev/null
for kind in memory store-cached store-w0 store-w1; do
  case $kind in
    memory) train="$PWD/$DATA/train.extxyz"; loader="{}";;
    store-cached) train="{source: store, path: $OUT/train.store}"; loader="{}";;
    store-w0) train="{source: store, path: $OUT/train.store}"; loader="{workers: 0, cache_gb: 0}";;
    store-w1) train="{source: store, path: $OUT/train.store}"; loader="{workers: 1, cache_gb: 0}";;
  esac
  cat > "$OUT/$kind.yaml" <<YAML
data: {train: $train, valid_fraction: 0.05, loader: $loader}
model: {backbone: painn, cutoff: 5.0, hidden_channels: 64, num_layers: 3}
training: {max_epochs: $EPOCHS, batch_size: 8, num_threads: 1, seed: 0}
tracking: none
output: $OUT/run-$kind
YAML
  start=$(date +%s.%N)
  atomforge train "$OUT/$kind.yaml" > "$OUT/$kind.log" 2>&1
  end=$(date +%s.%N)
  python - "$OUT/run-$kind" "$kind" "$(echo "$end - $start" | bc)" <<'PY'
import json, sys, torch
from atomforge import read_training_state
state = read_training_state(sys.argv[1])
times = [h["elapsed"] for h in state["history"]]
per_epoch = [round(b - a, 2) for a, b in zip([0.0] + times, times)]
print(json.dumps({"run": sys.argv[2], "wall_s": round(float(sys.argv[3]), 1), "epoch_s": per_epoch,
                  "valid_forces_mae": [round(h["valid_metrics"]["forces_mae"], 6) for h in state["history"]]}))
PY
done
