"""Re-time the UQ heads trained by ``run_uq.py`` on an idle machine (no training).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/uq/retime.py

Loads ``results/{ethanol,cu}-runs/<head>/model.pt`` and prints the median ms per ASE
``get_forces()`` of each head relative to the single model (deep-ensemble member 0), for 9-atom
ethanol, the 999-atom ethanol box and a 32-atom Cu cell. ``latent_distance`` is fitted in memory
by ``run_uq.py`` and has no model file, so it is not re-timed here.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
from ase.build import bulk
from ase.io import read

import atomforge
from atomforge import AtomforgeCalculator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _bench_timing import median_call_ms  # noqa: E402

HERE = Path(__file__).resolve().parent


def heads(system: str) -> dict[str, torch.nn.Module]:
    runs = HERE / "results" / f"{system}-runs"
    loaded = {name: atomforge.load_model(runs / name / "model.pt")
              for name in ("deep_ensemble", "shallow_ensemble", "mc_dropout")}
    deep = loaded["deep_ensemble"]
    vectorised, loop, local = copy.deepcopy(deep), copy.deepcopy(deep), copy.deepcopy(loaded["shallow_ensemble"])
    vectorised.vectorize, loop.vectorize, local.force_spread = True, False, "local"
    out = {"single": deep.potential, "deep_ensemble (vmap)": vectorised, "deep_ensemble (loop)": loop,
           "shallow_ensemble (gradient)": loaded["shallow_ensemble"], "shallow_ensemble (local)": local,
           "mc_dropout": loaded["mc_dropout"]}
    if (runs / "shallow_vector" / "model.pt").exists():  # force_spread: vector (added in session 2)
        out["shallow_ensemble (vector)"] = atomforge.load_model(runs / "shallow_vector" / "model.pt")
    return out


def table(models: dict[str, torch.nn.Module], atoms, calls: int) -> dict[str, float]:
    ms = {name: median_call_ms(AtomforgeCalculator(model), atoms, calls, 3) for name, model in models.items()}
    return {name: round(t / ms["single"], 2) for name, t in ms.items()} | {"single_ms": round(ms["single"], 2)}


def main() -> None:
    torch.set_num_threads(1)
    data = HERE.parents[0] / "ethanol" / "data"
    ethanol = heads("ethanol")
    cu = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 2))
    cu.rattle(0.05, seed=0)
    result = {"ethanol_9": table(ethanol, read(data / "test.extxyz", 0), 200),
              "ethanol_999": table(ethanol, read(data / "ethanol_999.extxyz"), 5),
              "cu_32": table(heads("cu"), cu, 100)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
