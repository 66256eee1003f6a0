"""Wall time per campaign iteration, split into explore / select / label / train, for the example
campaign (examples/al-cu-deepspeed) with the plain engine and with the DeepSpeed engine
(ZeRO-2, 2 processes). Issue 8's benchmark.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/active_learning/run_engines.py \
        --out docs/benchmarks/al-engines.json

Each campaign runs in a fresh directory under benchmarks/active_learning/results/engines/ (git-
ignored); the per-iteration times come from the campaigns' own history (``time_*_s``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
EXAMPLE = HERE.parents[1] / "examples" / "al-cu-deepspeed"
PHASES = ("train", "explore", "select", "label")


def run(campaign: str, output: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    command = [sys.executable, "-m", "atomforge", "al", "run", str(EXAMPLE / campaign), "--quiet",
               "--set", f"output={output}"]
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"{campaign} failed:\n{done.stderr[-3000:]}")
    state = json.loads((output / "state.json").read_text())
    rows = []
    for entry in state["history"]:
        rows.append({"iteration": entry["iteration"], "labels": entry["labels"],
                     **{p: round(entry.get(f"time_{p}_s", 0.0), 2) for p in PHASES},
                     "test_forces_mae": entry.get("test_forces_mae")})
    return {"campaign": campaign, "wall_s": round(wall, 1), "stopped_because": state["stopped_because"],
            "iterations": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "engines.json")
    args = parser.parse_args()
    subprocess.run([sys.executable, str(EXAMPLE / "make_data.py")], check=True)
    results = HERE / "results" / "engines"
    summary = []
    for campaign in ("campaign-plain.yaml", "campaign-deepspeed.yaml"):
        output = results / campaign.split(".")[0]
        if output.exists():
            import shutil

            shutil.rmtree(output)
        summary.append(run(campaign, output))
        print(json.dumps(summary[-1], indent=1), flush=True)
    args.out.write_text(json.dumps({"machine": f"{os.uname().nodename}, {os.cpu_count()} CPUs",
                                    "command": " ".join(sys.argv), "runs": summary}, indent=1))


if __name__ == "__main__":
    main()
