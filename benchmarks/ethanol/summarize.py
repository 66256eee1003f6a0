"""Markdown tables from ``evaluate_models.py`` results (several JSON files, one model per name).

    python benchmarks/ethanol/summarize.py results/side-s0/evaluation.json results/final.json ...

Later files override earlier ones for the same model name (e.g. a re-timing on an idle machine);
``PATH:SUFFIX`` appends SUFFIX to that file's model names (``side-s1/evaluation.json:_s1``).
Prints one row per model: test and hot force MAE / RMSE, hot per-frame RMSE p50 / p90 / p99 /
max, energy MAE and the calculator times (median over interleaved rounds, with min–max).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> None:
    models: dict[str, dict] = {}
    for argument in sys.argv[1:]:
        path, _, suffix = argument.partition(":")  # PATH[:SUFFIX] appends SUFFIX to its model names
        data = json.loads(Path(path).read_text())
        for name in data.get("models", {}):
            entry = models.setdefault(name + suffix, {})
            for key, value in data.get(name, {}).items():
                entry[key] = value
    print("| model | test F MAE / RMSE | hot F MAE / RMSE | hot frame RMSE p50 / p90 / p99 / max | "
          "E MAE test / hot (meV/atom) | ms/call 9 atoms | ms/call 999 atoms |")
    print("|---|---|---|---|---|---|---|")
    for name, m in models.items():
        t, h, timing = m.get("test"), m.get("hot"), m.get("timing_ms")
        errors = (f"{t['force_mae']:.1f} / {t['force_rmse']:.1f} | {h['force_mae']:.1f} / {h['force_rmse']:.1f} | "
                  f"{h['frame_rmse_p50']:.0f} / {h['frame_rmse_p90']:.0f} / {h['frame_rmse_p99']:.0f} / "
                  f"{h['frame_rmse_max']:.0f} | {t['energy_mae_meV_per_atom']:.2f} / {h['energy_mae_meV_per_atom']:.2f}"
                  if t and h else "– | – | – | –")
        times = (" | ".join(f"{timing[s]['median']:.1f} ({timing[s]['min']:.1f}–{timing[s]['max']:.1f})"
                            if s == "9" else f"{timing[s]['median']:.0f} ({timing[s]['min']:.0f}–{timing[s]['max']:.0f})"
                            for s in ("9", "999")) if timing else "– | –")
        print(f"| {name} | {errors} | {times} |")


if __name__ == "__main__":
    main()
