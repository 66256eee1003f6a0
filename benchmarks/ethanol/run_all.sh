#!/usr/bin/env bash
# Side-by-side ethanol benchmark: atomforge PaiNN vs MACE, same data, same budget, 1 thread each.
#
#   bash benchmarks/ethanol/run_all.sh            # BUDGET=900 by default (15 min of training)
#
# 1. makes the GFN2-xTB data (tblite) if absent, 2. trains both models AT THE SAME TIME, one per
# core, each on one thread, for $BUDGET seconds, 3. re-times both ASE calculators one after the
# other on the now idle machine, 4. prints a table (results/*.json hold everything).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
BUDGET="${BUDGET:-900}"
PY="${PY:-$root/.venv/bin/python}"
MACE_VENV="${MACE_VENV:-$here/.venv-mace}"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MLFLOW_DISABLE_TELEMETRY=true
mkdir -p "$here/results"
[ -f "$here/data/train.extxyz" ] || "$PY" "$here/make_data.py" --out "$here/data"
[ -x "$MACE_VENV/bin/python" ] || bash "$here/setup_mace_venv.sh"
rm -rf "$here/results/atomforge-run"
"$PY" "$here/run_atomforge.py" --budget-seconds "$BUDGET" --out "$here/results/atomforge.json" \
    > "$here/results/atomforge.log" 2>&1 &
af=$!
"$MACE_VENV/bin/python" "$here/run_mace.py" --budget-seconds "$BUDGET" --out "$here/results/mace.json" \
    > "$here/results/mace.log" 2>&1 &
mace=$!
wait "$af" "$mace"
# timings again, one at a time (the training-time timings above overlapped the other process)
"$PY" "$here/run_atomforge.py" --time-only "$here/results/atomforge-run/model.pt" --out "$here/results/atomforge.json" > /dev/null
"$MACE_VENV/bin/python" "$here/run_mace.py" --time-only --out "$here/results/mace.json" > /dev/null
"$PY" - "$here/results" <<'PYEOF'
import json, sys, pathlib
res = {n: json.loads((pathlib.Path(sys.argv[1]) / f"{n}.json").read_text()) for n in ("atomforge", "mace")}
keys = [("test_force_mae_meV_per_A", "test force MAE (meV/Å)"), ("test_force_rmse_meV_per_A", "test force RMSE (meV/Å)"),
        ("test_energy_mae_meV_per_atom", "test energy MAE (meV/atom)"), ("train_structures_per_s", "training structures/s"),
        ("epochs", "epochs in budget"), ("n_params", "parameters"), ("calc_ms_9_atoms", "ASE call, 9 atoms (ms)"),
        ("calc_ms_999_atoms", "ASE call, 999 atoms (ms)")]
print(f"| metric | atomforge ({res['atomforge']['model']}) | MACE ({res['mace']['model']}) |")
print("|---|---|---|")
for k, label in keys:
    a, m = res["atomforge"].get(k), res["mace"].get(k)
    fmt = lambda v: "n/a" if v is None else (f"{v:.1f}" if isinstance(v, float) else str(v))
    print(f"| {label} | {fmt(a)} | {fmt(m)} |")
PYEOF
