"""DeepSpeed engine benchmark (issue 6): per-rank memory by ZeRO stage, throughput with 1 vs 2
processes, load imbalance with and without balancing on a molecule + cell mix.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/deepspeed/run.py --out docs/benchmarks/deepspeed.json

Each measurement is a ``torchrun`` job of this file (``--worker …``); rank 0 writes a JSON line.
Memory is counted from the tensors each rank holds at rest after an optimiser step (every live
tensor storage, deduplicated, minus what the rank held before the model was built), split into
parameters (the rank's copy or partition), gradients and optimiser state (AdamW/AMSGrad moments
plus DeepSpeed's fp32 master partitions) and the rest (gradients and DeepSpeed's reduction
buffers), at rest after a step and inside the step (gradients present, before the update).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


# -- data ------------------------------------------------------------------------------------------
def _emt_labelled(structures):  # noqa: ANN001, ANN202
    """Each structure labelled with EMT (energy, forces), as a single-point copy."""
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator

    out = []
    for atoms in structures:
        atoms.calc = EMT()
        e, f = atoms.get_potential_energy(), atoms.get_forces()
        atoms.calc = SinglePointCalculator(atoms, energy=e, forces=f)
        out.append(atoms)
    return out


def _rattled(make, n: int, std: float, seed: int):  # noqa: ANN001, ANN202
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        atoms = make()
        atoms.positions += rng.normal(0, std, atoms.positions.shape)
        out.append(atoms)
    return _emt_labelled(out)


def _cu_cells(n: int, repeat: tuple[int, int, int], seed: int):  # noqa: ANN202
    """``n`` rattled fcc Cu cells (``repeat`` of the cubic cell), EMT-labelled."""
    from ase.build import bulk

    return _rattled(lambda: bulk("Cu", "fcc", a=3.61, cubic=True).repeat(repeat), n, 0.06, seed)


def _molecules(n: int, seed: int):  # noqa: ANN202
    """9-atom ethanol molecules (ASE's geometry), rattled and labelled with EMT (the labels only
    matter for the loss's shape here)."""
    from ase.build import molecule

    return _rattled(lambda: molecule("CH3CH2OH"), n, 0.03, seed)


def _data(kind: str):  # noqa: ANN202
    if kind == "cu32":
        return _cu_cells(64, (2, 2, 2), 1)
    if kind == "mixed":  # 16 × 108-atom cells + 48 × 9-atom molecules
        return _cu_cells(16, (3, 3, 3), 2) + _molecules(48, 3)
    raise ValueError(kind)


# -- worker (one rank) -----------------------------------------------------------------------------
def _storages() -> dict[int, int]:
    import torch

    out: dict[int, int] = {}
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.device.type == "cpu" and not obj.is_meta:
                storage = obj.untyped_storage()
                out[storage.data_ptr()] = storage.nbytes()
        except Exception:  # noqa: BLE001 - some objects refuse inspection
            continue
    return out


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(1)
    from atomforge import build_potential, make_registry
    from atomforge import distributed as dist
    from atomforge.data.graph import GraphDataset
    from atomforge.training.losses import CompositeLoss, WeightedTerm
    from atomforge.registry import PluginKind
    from atomforge import TorchBackend, Trainer, TrainSettings, make_optimizer
    from atomforge.workflows.train import model_spec
    from atomforge.config import config_from_dict

    registry = make_registry()
    structures = _data(args.data)
    dataset = GraphDataset(structures, 5.0)
    raw = {"data": {"train": "unused"}, "model": {"backbone": "painn", "cutoff": 5.0,
                                                  "hidden_channels": args.features, "num_layers": args.layers}}
    config = config_from_dict(raw)
    spec = model_spec(config, registry, dataset)
    torch.manual_seed(0)
    gc.collect()
    before = _storages()
    model = build_potential(spec, registry)
    n_params = sum(p.numel() for p in model.parameters())
    loss = CompositeLoss([WeightedTerm(n, w, registry.get(PluginKind.LOSS, n).factory())
                          for n, w in (("energy", 1.0), ("forces", 10.0))])
    settings = TrainSettings(max_epochs=args.epochs, batch_size=args.batch_size, ema_decay=None, seed=0)
    optimizer = make_optimizer(model, lr=1e-3)
    if args.engine == "torch":
        backend = TorchBackend.from_settings(settings)
    else:
        from atomforge.plugins.deepspeed_engine import DeepSpeedBackend

        backend = DeepSpeedBackend(options={"zero_stage": args.stage, "balance": not args.no_balance},
                                   settings=settings)
    engine = Trainer(model=model, loss=loss, optimizer=optimizer, settings=settings, backend=backend)
    result: dict = {"engine": args.engine, "stage": args.stage, "world_size": dist.world_size(),
                    "params": n_params, "data": args.data, "balance": not args.no_balance,
                    "features": args.features, "layers": args.layers, "batch_size": args.batch_size}
    started = time.perf_counter()
    if args.mode == "memory":
        small = GraphDataset(structures[: args.batch_size], 5.0)
        owner = backend.engine if args.engine == "deepspeed" else engine.optimizer
        original = owner.step
        peak: dict = {}
        calls = [0]

        def step(*a, **k):  # noqa: ANN002, ANN003, ANN202 - 2nd step: moments exist, gradients present
            calls[0] += 1
            if calls[0] == 2:
                gc.collect()
                peak.update(_storages())
            return original(*a, **k)

        owner.step = step
        for _ in range(3):  # three optimiser steps: every buffer exists
            engine.train_epoch(small, started)
        owner.step = original
        gc.collect()
        for label, snapshot in (("rest", _storages()), ("step", peak)):
            new = {ptr: size for ptr, size in snapshot.items() if ptr not in before}
            params = _param_bytes(engine, args)
            optim = _optimizer_bytes(engine, new)
            result[label] = {"bytes_total": sum(new.values()), "bytes_params": params, "bytes_optimizer": optim,
                             "bytes_grads_and_buffers": sum(new.values()) - params - optim}
    else:
        times, imbalances = [], []
        for epoch in range(args.epochs):
            engine.epoch = epoch
            t0 = time.perf_counter()
            metrics = engine.train_epoch(dataset, t0)[3]
            times.append(time.perf_counter() - t0)
            imbalances.append(metrics.get("load_imbalance", 1.0))
        warm = times[1:] or times
        per_rank = dist.all_gather_objects(sum(warm))
        result.update({"epoch_s": sum(warm) / len(warm), "structures_per_s": len(dataset) * len(warm) / sum(warm),
                       "load_imbalance": sum(imbalances) / len(imbalances),
                       "epochs_timed": len(warm), "rank_busy_s": per_rank})
        if args.engine == "deepspeed":  # measured imbalance: per-step wall time of each rank's compute
            result["time_imbalance"] = _timed_imbalance(engine, dataset)
    if dist.is_main():
        with open(args.result, "a") as handle:
            handle.write(json.dumps(result) + "\n")


def _param_bytes(engine, args) -> int:  # noqa: ANN001
    total = 0
    for p in engine.model.parameters():
        tensor = p.ds_tensor if args.engine == "deepspeed" and args.stage == 3 else p.data
        total += tensor.numel() * tensor.element_size()
    return total


def _optimizer_bytes(engine, new: dict[int, int]) -> int:  # noqa: ANN001
    """Optimiser moments plus DeepSpeed's fp32 master partitions (all ``new`` storages reached from
    the optimiser object)."""
    import torch

    optimizer = engine.backend.engine.optimizer if hasattr(engine.backend, "engine") else engine.optimizer
    seen: dict[int, int] = {}

    def visit(obj, depth=0):  # noqa: ANN001, ANN202
        if depth > 4:
            return
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            if storage.data_ptr() in new:
                seen[storage.data_ptr()] = storage.nbytes()
        elif isinstance(obj, dict):
            for value in obj.values():
                visit(value, depth + 1)
        elif isinstance(obj, (list, tuple)):
            for value in obj:
                visit(value, depth + 1)

    inner = getattr(optimizer, "optimizer", optimizer)
    visit(inner.state)
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
        visit(getattr(optimizer, name, []))
    params = {p.untyped_storage().data_ptr() for g in inner.param_groups for p in g["params"]}
    model_ptrs = {p.untyped_storage().data_ptr() for p in engine.model.parameters()}
    for ptr in params - model_ptrs:  # master copies the optimiser steps on
        if ptr in new:
            seen[ptr] = new[ptr]
    return sum(seen.values())


def _timed_imbalance(engine, dataset) -> float:  # noqa: ANN001
    """Per-step compute time of each rank (forward with forces; no parameter gradients, no
    communication), max/mean, averaged over one epoch's plan."""
    import torch

    from atomforge import distributed as dist
    from atomforge import keys as K
    from atomforge.data.graph import collate

    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(123)).tolist()
    mine = []
    for step in engine.backend.plan(order, dataset):
        t0 = time.perf_counter()
        for indices in step.batches:
            batch = collate([dataset.graphs[i] for i in indices])
            out = engine.model(batch, compute_forces=True)  # forward + forces: this rank's share
            float(out[K.FORCES].sum())
        mine.append(time.perf_counter() - t0)
    all_ranks = dist.all_gather_objects(mine)
    ratios = [max(step) / (sum(step) / len(step)) for step in zip(*all_ranks)]
    return sum(ratios) / len(ratios)


# -- driver ----------------------------------------------------------------------------------------
def launch(nproc: int, result: Path, *options: str) -> None:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    if nproc == 1 and "--engine=torch" in options:
        command = [sys.executable, str(Path(__file__)), "--worker", f"--result={result}", *options]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                   str(Path(__file__)), "--worker", f"--result={result}", *options]
    print("$", " ".join(command[-8:]), flush=True)
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        print(done.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"benchmark job failed: {options}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--result", type=Path)
    parser.add_argument("--mode", default="memory", choices=["memory", "throughput"])
    parser.add_argument("--engine", default="deepspeed", choices=["deepspeed", "torch"])
    parser.add_argument("--stage", type=int, default=0)
    parser.add_argument("--data", default="cu32")
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--no-balance", action="store_true")
    parser.add_argument("--out", type=Path, default=HERE / "results.json")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    raw = args.out.with_suffix(".jsonl")
    raw.unlink(missing_ok=True)
    if not args.skip_memory:  # ≥ 10 M parameters: PaiNN 512 features × 4 layers
        for stage in (0, 1, 2, 3):
            launch(2, raw, "--mode=memory", f"--stage={stage}", "--features=512", "--layers=4", "--batch-size=2")
    if not args.skip_throughput:
        launch(1, raw, "--mode=throughput", "--engine=torch", "--epochs=4")
        for stage in (0, 2, 3):
            launch(2, raw, "--mode=throughput", f"--stage={stage}", "--epochs=4")
        launch(1, raw, "--mode=throughput", "--stage=2", "--epochs=4")
        for balance in ((), ("--no-balance",)):
            launch(2, raw, "--mode=throughput", "--stage=2", "--data=mixed", "--epochs=3", *balance)
        launch(1, raw, "--mode=throughput", "--engine=torch", "--data=mixed", "--epochs=3")
    rows = [json.loads(line) for line in raw.read_text().splitlines()]
    args.out.write_text(json.dumps({"machine": os.uname().nodename, "cpus": os.cpu_count(),
                                    "command": " ".join(sys.argv), "rows": rows}, indent=1))
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
