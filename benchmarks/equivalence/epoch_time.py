"""Seconds per training epoch of the ethanol benchmark's model (PaiNN 64x3, batch 4, one thread),
for comparing two versions of the training loop on the same machine.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/equivalence/epoch_time.py --epochs 4
    # an older version, from a git worktree whose core/ is linked as atomforge (see docs/benchmarks.md):
    OMP_NUM_THREADS=1 PYTHONPATH=/tmp/old/path .venv/bin/python benchmarks/equivalence/epoch_time.py --epochs 4

Works with atomforge 0.1 (history in ``checkpoint.pt``) and later (``read_training_state``).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import tempfile
from pathlib import Path

import torch

import atomforge

DATA = Path(__file__).resolve().parents[1] / "ethanol" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--data", type=Path, default=DATA)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        raw = {"data": {"train": str(args.data / "train.extxyz"), "valid_fraction": 0.05},
               "model": {"backbone": "painn", "cutoff": 5.0, "hidden_channels": 64, "num_layers": 3, "num_rbf": 20},
               "loss": [{"name": "energy", "weight": 1.0}, {"name": "forces", "weight": 10.0}],
               "training": {"max_epochs": args.epochs, "batch_size": 4, "lr": 0.003, "seed": 0, "num_threads": 1,
                            "ema_decay": 0.995, "scheduler": {"name": "cosine", "min_lr": 1e-5}},
               "output": f"{tmp}/run", "tracking": "none"}
        if hasattr(atomforge, "read_training_state"):
            outcome = atomforge.train(atomforge.config_from_dict(raw), atomforge.make_registry(), verbose=False)
            history = atomforge.read_training_state(outcome.run_dir)["history"]
        else:  # atomforge 0.1
            from atomforge.workflow import train

            outcome = train(atomforge.config_from_dict(raw), atomforge.make_registry(), verbose=False)
            history = torch.load(outcome.run_dir / "checkpoint.pt", weights_only=True)["history"]
    elapsed = [h["elapsed"] for h in history]
    print(f"atomforge {atomforge.__version__}: seconds per epoch",
          [round(b - a, 2) for a, b in zip([0.0, *elapsed], elapsed)])


if __name__ == "__main__":
    main()
