"""How fast a store streams, against how fast training consumes, and what memory it takes.

``loader``: structures/s delivered by :meth:`atomforge.StoreDataset.batches` (read, decode,
neighbour list, collate) with 0, 1, 2 … worker processes, and the time to the first batch.
``train``: structures/s consumed by PaiNN training steps on the same batches (built beforehand,
so reading is not counted). Streaming never slows training when ``loader`` ≥ ``train`` with the
workers left over beside the training process. Prints one JSON line per measurement.

    python benchmarks/store/stream_benchmark.py STORE --batches 200 --workers 0 1 2
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np
import torch

from atomforge import CompositeLoss, StoreDataset, TorchBackend, WeightedTerm, build_potential, make_registry, size_batches
from atomforge.plugins.losses import EnergyLoss, ForceLoss


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _plan(data: StoreDataset, batches: int, batch_atoms: int, seed: int) -> list[np.ndarray]:
    order = np.random.default_rng(seed).permutation(len(data))
    return size_batches(order, data.sizes(), max_atoms=batch_atoms, max_structures=10**6)[:batches]


def measure_loader(data: StoreDataset, plan: list[np.ndarray], workers: int) -> dict[str, float]:
    data.workers, data.prefetch = workers, 4
    started = time.perf_counter()
    first, count = None, 0
    for batch in data.batches(plan):
        first = first if first is not None else time.perf_counter() - started
        count += int(batch["n_atoms"].shape[0])
    elapsed = time.perf_counter() - started
    return {"what": "loader", "workers": workers, "structures_per_s": count / elapsed, "first_batch_s": first,
            "batches": len(plan), "structures": count, "rss_mb": _rss_mb()}


def measure_training(data: StoreDataset, plan: list[np.ndarray], hidden: int, layers: int) -> dict[str, float]:
    registry = make_registry()
    elements = [int(z) for z in data.numbers()]
    spec = {"backbone": "painn", "cutoff": data.cutoff, "dtype": "float32",
            "options": {"hidden_channels": hidden, "num_layers": layers}, "elements": elements,
            "atomic_energies": [0.0] * len(elements), "scale": 1.0, "shift": 0.0}
    model = build_potential(spec, registry)
    backend = TorchBackend(batch_size=10**6)
    backend.setup(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    loss = CompositeLoss([WeightedTerm("energy", 1.0, EnergyLoss()), WeightedTerm("forces", 10.0, ForceLoss())])
    batches = list(data.batches(plan))  # read beforehand: only the steps are timed

    def loss_of(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return loss(batch, backend.forward(batch, compute_forces=True, compute_stress=False), model)[0]

    backend.step([batches[0]], loss_of)  # warm-up
    started = time.perf_counter()
    count = 0
    for batch in batches:
        backend.step([batch], loss_of)
        count += int(batch["n_atoms"].shape[0])
    elapsed = time.perf_counter() - started
    return {"what": "train", "model": f"painn {hidden}x{layers}", "structures_per_s": count / elapsed,
            "steps_per_s": len(batches) / elapsed, "structures": count, "rss_mb": _rss_mb()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store")
    parser.add_argument("--cutoff", type=float, default=5.0)
    parser.add_argument("--batch-atoms", type=int, default=512)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--no-train", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = StoreDataset(args.store, args.cutoff)
    plan = _plan(data, args.batches, args.batch_atoms, seed=0)
    print(json.dumps({"store": args.store, "structures_in_store": len(data), "batch_atoms": args.batch_atoms}))
    for workers in args.workers:
        print(json.dumps(measure_loader(data, plan, workers)), flush=True)
    if not args.no_train:
        print(json.dumps(measure_training(data, plan, args.hidden, args.layers)), flush=True)


if __name__ == "__main__":
    main()
