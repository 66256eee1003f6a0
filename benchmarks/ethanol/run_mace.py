"""Train and benchmark a small MACE model on the ethanol GFN2-xTB data (peer baseline).

Runs inside the separate mace venv (see ``setup_mace_venv.sh``); it does not import
atomforge::

    bash benchmarks/ethanol/setup_mace_venv.sh
    .venv/bin/python benchmarks/ethanol/make_data.py
    OMP_NUM_THREADS=1 benchmarks/ethanol/.venv-mace/bin/python benchmarks/ethanol/run_mace.py \\
        --budget-seconds 900 --out benchmarks/ethanol/results/mace.json

Steps:

1. Read ``<data>/train.extxyz`` and split it with a fixed seed into 950 training and
   50 validation structures (``--n-valid``).
2. Build a ``mace.modules.ScaleShiftMACE`` with MACE's own defaults for everything not
   set here; the "small" configuration used by default is

   - hidden irreps ``64x0e`` (``--num-channels 64 --max-L 0``), i.e. invariant
     node features, the setting MACE-MP calls "small" (but with 64, not 128, channels,
     to suit one CPU thread),
   - ``max_ell 3`` spherical harmonics, ``correlation 3`` (4-body messages),
     2 interactions (``RealAgnosticResidualInteractionBlock``),
   - ``r_max 5.0`` A, 8 Bessel radial functions, polynomial cutoff p=5,
     radial MLP ``[64, 64, 64]``, readout MLP ``16x0e``, SiLU gate,
   - E0s "average" (least squares over the training set; a single composition, so
     only their sum matters), shift/scale from ``compute_mean_rms_energy_forces``
     (MACE's default ``rms_forces_scaling``), ``avg_num_neighbors`` from the data.

   Pass ``--max-L 1 --num-channels 128`` etc. for the larger variants.
3. Train with a hand-written loop on one thread for a wall-clock budget
   (``--budget-seconds``, checked after every optimiser step; validation included):
   MACE's ``WeightedEnergyForcesLoss`` (energy weight 1 on per-atom energies, forces
   weight 100, MACE's defaults), Adam with AMSGrad, lr 0.01, MACE's parameter groups
   and weight decay 5e-7, batch size 10, gradient clipping 10, EMA of the weights
   (decay 0.99), and ``ReduceLROnPlateau`` (factor 0.8, patience ``--patience``
   epochs) on the EMA validation loss. The EMA weights with the best validation loss
   are kept.
4. Evaluate on ``<data>/test.extxyz``: energy MAE (meV/atom), force MAE and RMSE
   (meV/A, over all Cartesian components).
5. Save the model (``torch.save`` of the module, as MACE does) and time
   ``mace.calculators.MACECalculator`` on one ethanol (median ms per ``get_forces()``
   over ``--n-calls-small`` calls, each after a 1e-4 A random displacement so nothing
   is cached) and on ``<data>/ethanol_999.extxyz`` (``--n-calls-large`` calls).
6. Write the JSON summary to ``--out``.

Everything runs with ``torch.set_num_threads(1)``; OMP/MKL thread counts default to 1
(the wrapper should still export ``OMP_NUM_THREADS=1``).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import copy
import importlib.metadata
import json
import logging
import math
import time
import warnings
from collections.abc import Iterable, Sized
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import ase.io
import numpy as np
import torch
from ase import Atoms

# Known noise from e3nn 0.4 / mace under torch 2.13 (TorchScript deprecations, annotations).
warnings.filterwarnings(
    "ignore", message=r"`torch\.jit\.\w+` is deprecated", category=DeprecationWarning
)
warnings.filterwarnings(
    "ignore",
    message=r"The TorchScript type system doesn't support",
    category=UserWarning,
)
warnings.filterwarnings(
    "ignore",
    message=r"Environment variable TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD",
    category=UserWarning,
)

# isort: off
# ``import mace`` must come before e3nn: it sets TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1, without
# which e3nn 0.4.x cannot load its own constants under torch>=2.6 (weights_only=True).
import mace  # noqa: F401
from mace import data as mace_data
from mace import modules
from mace.calculators import MACECalculator
from mace.tools import AtomicNumberTable, torch_geometric
from e3nn import o3
from torch_ema import ExponentialMovingAverage

# isort: on

HERE = Path(__file__).resolve().parent


@dataclass
class ModelConfig:
    """Architecture hyper-parameters (the subset of MACE's that this benchmark sets)."""

    r_max: float = 5.0
    num_channels: int = 64
    max_L: int = 0
    max_ell: int = 3
    correlation: int = 3
    num_interactions: int = 2
    num_radial_basis: int = 8
    num_cutoff_basis: int = 5
    radial_MLP: tuple[int, ...] = (64, 64, 64)
    MLP_irreps: str = "16x0e"
    interaction: str = "RealAgnosticResidualInteractionBlock"
    interaction_first: str = "RealAgnosticResidualInteractionBlock"
    gate: str = "silu"

    @property
    def hidden_irreps(self) -> str:
        parts = [
            f"{self.num_channels}x{ell}{'e' if ell % 2 == 0 else 'o'}"
            for ell in range(self.max_L + 1)
        ]
        return "+".join(parts)


@dataclass
class TrainConfig:
    """Optimisation hyper-parameters."""

    batch_size: int = 10
    lr: float = 0.01
    weight_decay: float = 5e-7
    energy_weight: float = 1.0
    forces_weight: float = 100.0
    ema_decay: float = 0.99
    clip_grad: float = 10.0
    lr_factor: float = 0.8
    patience: int = 50
    n_valid: int = 50
    seed: int = 123
    dtype: str = "float32"


def log(msg: str) -> None:
    print(f"[run_mace] {msg}", flush=True)


def read_frames(path: Path) -> list[Atoms]:
    frames = ase.io.read(path, index=":")
    assert isinstance(frames, list)
    return frames


def to_configuration(atoms: Atoms) -> mace_data.Configuration:
    """A MACE Configuration carrying the reference energy and forces of ``atoms``."""
    return mace_data.Configuration(
        atomic_numbers=atoms.get_atomic_numbers(),
        positions=atoms.get_positions(),
        properties={
            "energy": float(atoms.get_potential_energy()),
            "forces": atoms.get_forces(),
        },
        property_weights={"energy": 1.0, "forces": 1.0},
        cell=np.array(atoms.get_cell()),
        pbc=tuple(bool(p) for p in atoms.get_pbc()),
    )


def make_loader(
    configs: list[mace_data.Configuration],
    z_table: AtomicNumberTable,
    r_max: float,
    batch_size: int,
    shuffle: bool,
    generator: torch.Generator | None = None,
) -> torch_geometric.dataloader.DataLoader:
    dataset = [
        mace_data.AtomicData.from_config(c, z_table=z_table, cutoff=r_max)
        for c in configs
    ]
    return torch_geometric.dataloader.DataLoader(
        dataset=dataset,  # type: ignore[arg-type]  # a list works as a map-style dataset
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=False,
        generator=generator,
    )


def build_model(
    cfg: ModelConfig,
    z_table: AtomicNumberTable,
    atomic_energies: np.ndarray,
    train_loader: torch_geometric.dataloader.DataLoader,
) -> tuple[modules.ScaleShiftMACE, dict[str, float]]:
    """ScaleShiftMACE with data-derived E0s, shift/scale and avg_num_neighbors."""
    avg_num_neighbors = modules.compute_avg_num_neighbors(train_loader)
    mean, rms = modules.compute_mean_rms_energy_forces(train_loader, atomic_energies)
    shift, scale = (
        float(np.asarray(mean).reshape(-1)[0]),
        float(np.asarray(rms).reshape(-1)[0]),
    )
    model = modules.ScaleShiftMACE(
        r_max=cfg.r_max,
        num_bessel=cfg.num_radial_basis,
        num_polynomial_cutoff=cfg.num_cutoff_basis,
        max_ell=cfg.max_ell,
        interaction_cls=modules.interaction_classes[cfg.interaction],
        interaction_cls_first=modules.interaction_classes[cfg.interaction_first],
        num_interactions=cfg.num_interactions,
        num_elements=len(z_table),
        hidden_irreps=o3.Irreps(cfg.hidden_irreps),
        MLP_irreps=o3.Irreps(cfg.MLP_irreps),
        atomic_energies=atomic_energies,
        avg_num_neighbors=avg_num_neighbors,
        atomic_numbers=z_table.zs,
        correlation=cfg.correlation,
        gate=modules.gate_dict[cfg.gate],
        radial_MLP=list(cfg.radial_MLP),
        atomic_inter_scale=scale,
        atomic_inter_shift=shift,
    )
    stats = {
        "avg_num_neighbors": avg_num_neighbors,
        "atomic_inter_shift": shift,
        "atomic_inter_scale": scale,
    }
    return model, stats


def param_groups(
    model: modules.ScaleShiftMACE, tc: TrainConfig
) -> list[dict[str, Any]]:
    """MACE's parameter groups: weight decay only on interaction linears and products."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, param in model.interactions.named_parameters():
        (
            decay
            if ("linear.weight" in name or "skip_tp_full.weight" in name)
            else no_decay
        ).append(param)
    return [
        {"params": list(model.node_embedding.parameters()), "weight_decay": 0.0},
        {"params": decay, "weight_decay": tc.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
        {"params": list(model.products.parameters()), "weight_decay": tc.weight_decay},
        {"params": list(model.readouts.parameters()), "weight_decay": 0.0},
    ]


@dataclass
class Errors:
    loss: float
    energy_mae_meV_per_atom: float
    force_mae_meV_per_A: float
    force_rmse_meV_per_A: float


def evaluate(
    model: torch.nn.Module, loader: Iterable[Any], loss_fn: torch.nn.Module
) -> Errors:
    """Loss and errors of ``model`` over ``loader`` (forces need autograd, so no no_grad)."""
    model.eval()
    losses: list[float] = []
    e_err: list[np.ndarray] = []
    f_err: list[np.ndarray] = []
    for batch in loader:
        out = model(batch.to_dict(), training=False, compute_force=True)
        losses.append(float(loss_fn(pred=out, ref=batch).detach()) * batch.num_graphs)
        n_atoms = (batch.ptr[1:] - batch.ptr[:-1]).detach().numpy()
        e_err.append((out["energy"].detach().numpy() - batch.energy.numpy()) / n_atoms)
        f_err.append(
            (out["forces"].detach().numpy() - batch.forces.numpy()).reshape(-1)
        )
    e = np.concatenate(e_err)
    f = np.concatenate(f_err)
    return Errors(
        loss=float(np.sum(losses) / len(e)),
        energy_mae_meV_per_atom=1e3 * float(np.mean(np.abs(e))),
        force_mae_meV_per_A=1e3 * float(np.mean(np.abs(f))),
        force_rmse_meV_per_A=1e3 * float(np.sqrt(np.mean(f**2))),
    )


@dataclass
class TrainResult:
    model: torch.nn.Module
    train_seconds: float
    epochs: float
    structures_seen: int
    best_epoch: float
    best_valid: Errors


def train(
    model: modules.ScaleShiftMACE,
    train_loader: torch_geometric.dataloader.DataLoader,
    valid_loader: torch_geometric.dataloader.DataLoader,
    tc: TrainConfig,
    budget_seconds: float,
) -> TrainResult:
    """Epoch loop stopped by wall-clock; returns the best-validation EMA model."""
    loss_fn = modules.WeightedEnergyForcesLoss(
        energy_weight=tc.energy_weight, forces_weight=tc.forces_weight
    )
    optimizer = torch.optim.Adam(param_groups(model, tc), lr=tc.lr, amsgrad=True)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, factor=tc.lr_factor, patience=tc.patience
    )
    ema = ExponentialMovingAverage(model.parameters(), decay=tc.ema_decay)
    n_train = len(cast(Sized, train_loader.dataset))

    best_loss = math.inf
    best_state: dict[str, torch.Tensor] | None = None
    best_epoch = -1.0
    best_valid: Errors | None = None
    structures_seen = 0
    epoch = 0
    out_of_time = False
    t0 = time.perf_counter()
    last_report = t0
    while not out_of_time:
        model.train()
        for batch in train_loader:
            optimizer.zero_grad(set_to_none=True)
            out = model(batch.to_dict(), training=True, compute_force=True)
            loss = loss_fn(pred=out, ref=batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=tc.clip_grad)
            optimizer.step()
            ema.update()
            structures_seen += batch.num_graphs
            if time.perf_counter() - t0 >= budget_seconds:
                out_of_time = True
                break
        epoch += 1 if not out_of_time else 0
        with ema.average_parameters():
            valid = evaluate(model, valid_loader, loss_fn)
            if valid.loss < best_loss:
                best_loss = valid.loss
                best_state = copy.deepcopy(model.state_dict())
                best_epoch = structures_seen / n_train
                best_valid = valid
        if not out_of_time:
            scheduler.step(valid.loss)
        now = time.perf_counter()
        if out_of_time or now - last_report >= 15.0 or epoch <= 2:
            last_report = now
            label = (
                f"{epoch:4d}"
                if not out_of_time
                else f"{epoch}+{structures_seen / n_train - epoch:.2f}"
            )
            log(
                f"epoch {label} t={now - t0:7.1f}s lr={optimizer.param_groups[0]['lr']:.2e} "
                f"valid loss={valid.loss:.4f} E={valid.energy_mae_meV_per_atom:.2f} meV/atom "
                f"F MAE={valid.force_mae_meV_per_A:.1f} RMSE={valid.force_rmse_meV_per_A:.1f} meV/A"
            )
    train_seconds = time.perf_counter() - t0
    assert best_state is not None and best_valid is not None
    model.load_state_dict(best_state)
    return TrainResult(
        model=model,
        train_seconds=train_seconds,
        epochs=structures_seen / n_train,
        structures_seen=structures_seen,
        best_epoch=best_epoch,
        best_valid=best_valid,
    )


def time_calculator(
    calc: MACECalculator, atoms: Atoms, n_calls: int, n_warmup: int, seed: int
) -> tuple[float, list[float]]:
    """Median ms per ``get_forces()``; positions nudged by ~1e-4 A before every call."""
    atoms = atoms.copy()
    atoms.calc = calc
    rng = np.random.default_rng(seed)
    times: list[float] = []
    for i in range(n_warmup + n_calls):
        atoms.positions = atoms.positions + rng.normal(
            scale=1e-4, size=atoms.positions.shape
        )
        t = time.perf_counter()
        atoms.get_forces()
        dt = time.perf_counter() - t
        if i >= n_warmup:
            times.append(1e3 * dt)
    return float(np.median(times)), times


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--data",
        type=Path,
        default=HERE / "data",
        help="directory written by make_data.py",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=HERE / "results" / "mace.json",
        help="JSON result path",
    )
    p.add_argument(
        "--model-out",
        type=Path,
        default=None,
        help="saved model (default: next to --out)",
    )
    p.add_argument(
        "--budget-seconds", type=float, default=900.0, help="wall-clock training budget"
    )
    p.add_argument(
        "--n-calls-small", type=int, default=300, help="timed calls on 9 atoms"
    )
    p.add_argument(
        "--n-calls-large", type=int, default=15, help="timed calls on 999 atoms"
    )
    mc, tc = ModelConfig(), TrainConfig()
    p.add_argument("--r-max", type=float, default=mc.r_max)
    p.add_argument("--num-channels", type=int, default=mc.num_channels)
    p.add_argument("--max-L", type=int, default=mc.max_L)
    p.add_argument("--max-ell", type=int, default=mc.max_ell)
    p.add_argument("--correlation", type=int, default=mc.correlation)
    p.add_argument("--num-interactions", type=int, default=mc.num_interactions)
    p.add_argument("--batch-size", type=int, default=tc.batch_size)
    p.add_argument("--lr", type=float, default=tc.lr)
    p.add_argument("--forces-weight", type=float, default=tc.forces_weight)
    p.add_argument("--energy-weight", type=float, default=tc.energy_weight)
    p.add_argument("--ema-decay", type=float, default=tc.ema_decay)
    p.add_argument(
        "--patience",
        type=int,
        default=tc.patience,
        help="ReduceLROnPlateau patience (epochs)",
    )
    p.add_argument("--n-valid", type=int, default=tc.n_valid)
    p.add_argument("--seed", type=int, default=tc.seed)
    p.add_argument("--dtype", choices=["float32", "float64"], default=tc.dtype)
    p.add_argument("--time-only", action="store_true",
                   help="re-time the model recorded in --out (no training) and update --out")
    return p.parse_args()


def retime(args: argparse.Namespace) -> None:
    """Re-measure calculator timings of an already trained model (machine otherwise idle)."""
    summary = json.loads(args.out.read_text())
    calc = MACECalculator(model_paths=summary["config"]["model_path"], device="cpu",
                          default_dtype=args.dtype)
    small = read_frames(args.data / "test.extxyz")[0].copy()
    small.calc = None
    big = ase.io.read(args.data / "ethanol_999.extxyz")
    summary["calc_ms_9_atoms"], _ = time_calculator(calc, small, args.n_calls_small, n_warmup=20, seed=1)
    summary["calc_ms_999_atoms"], _ = time_calculator(calc, big, args.n_calls_large, n_warmup=2, seed=2)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    log(f"re-timed: {summary['calc_ms_9_atoms']:.2f} ms (9 atoms), {summary['calc_ms_999_atoms']:.1f} ms (999)")


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    torch.set_default_dtype(getattr(torch, args.dtype))
    if args.time_only:
        retime(args)
        return
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)

    mc = ModelConfig(
        r_max=args.r_max,
        num_channels=args.num_channels,
        max_L=args.max_L,
        max_ell=args.max_ell,
        correlation=args.correlation,
        num_interactions=args.num_interactions,
    )
    tc = TrainConfig(
        batch_size=args.batch_size,
        lr=args.lr,
        energy_weight=args.energy_weight,
        forces_weight=args.forces_weight,
        ema_decay=args.ema_decay,
        patience=args.patience,
        n_valid=args.n_valid,
        seed=args.seed,
        dtype=args.dtype,
    )

    # --- data -------------------------------------------------------------------------
    t_setup = time.perf_counter()
    frames = read_frames(args.data / "train.extxyz")
    test_frames = read_frames(args.data / "test.extxyz")
    order = np.random.default_rng(tc.seed).permutation(len(frames))
    valid_idx, train_idx = order[: tc.n_valid], order[tc.n_valid :]
    train_cfgs = [to_configuration(frames[i]) for i in train_idx]
    valid_cfgs = [to_configuration(frames[i]) for i in valid_idx]
    test_cfgs = [to_configuration(a) for a in test_frames]
    z_table = AtomicNumberTable(
        sorted({int(z) for c in train_cfgs for z in c.atomic_numbers})
    )
    e0s = mace_data.compute_average_E0s(train_cfgs, z_table)
    atomic_energies = np.array([e0s[z] for z in z_table.zs])
    gen = torch.Generator().manual_seed(tc.seed)
    train_loader = make_loader(
        train_cfgs, z_table, mc.r_max, tc.batch_size, shuffle=True, generator=gen
    )
    valid_loader = make_loader(valid_cfgs, z_table, mc.r_max, 25, shuffle=False)
    test_loader = make_loader(test_cfgs, z_table, mc.r_max, 50, shuffle=False)
    model, stats = build_model(mc, z_table, atomic_energies, train_loader)
    n_params = sum(p.numel() for p in model.parameters())
    setup_seconds = time.perf_counter() - t_setup
    e0s_rounded = {z: round(float(e), 4) for z, e in e0s.items()}
    log(
        f"{len(train_cfgs)} train / {len(valid_cfgs)} valid / {len(test_cfgs)} test structures; "
        f"hidden irreps {mc.hidden_irreps}, {n_params} parameters, dtype {args.dtype}, "
        f"E0s {e0s_rounded}, stats {stats}; setup {setup_seconds:.1f} s"
    )

    # --- train ------------------------------------------------------------------------
    result = train(model, train_loader, valid_loader, tc, args.budget_seconds)
    structures_per_s = result.structures_seen / result.train_seconds
    log(
        f"trained {result.train_seconds:.1f} s, {result.epochs:.2f} epochs "
        f"({structures_per_s:.1f} structures/s); best EMA model after {result.best_epoch:.2f} epochs"
    )

    # --- test -------------------------------------------------------------------------
    loss_fn = modules.WeightedEnergyForcesLoss(
        energy_weight=tc.energy_weight, forces_weight=tc.forces_weight
    )
    test = evaluate(result.model, test_loader, loss_fn)
    log(
        f"test: E MAE {test.energy_mae_meV_per_atom:.3f} meV/atom, F MAE {test.force_mae_meV_per_A:.2f} meV/A, "
        f"F RMSE {test.force_rmse_meV_per_A:.2f} meV/A"
    )

    # --- save + calculator timing -----------------------------------------------------
    model_path = args.model_out or args.out.with_suffix(".model")
    model_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(result.model.cpu(), model_path)
    calc = MACECalculator(
        model_paths=str(model_path), device="cpu", default_dtype=args.dtype
    )
    small = test_frames[0].copy()
    small.calc = None
    big = ase.io.read(args.data / "ethanol_999.extxyz")
    assert isinstance(big, Atoms)
    ms_9, _ = time_calculator(calc, small, args.n_calls_small, n_warmup=20, seed=1)
    ms_999, _ = time_calculator(calc, big, args.n_calls_large, n_warmup=2, seed=2)
    log(
        f"MACECalculator get_forces(): {ms_9:.2f} ms (9 atoms), {ms_999:.1f} ms (999 atoms)"
    )

    summary = {
        "model": "mace-small",
        "config": {
            **{
                k: (list(v) if isinstance(v, tuple) else v)
                for k, v in asdict(mc).items()
            },
            "hidden_irreps": mc.hidden_irreps,
            **asdict(tc),
            "optimizer": "Adam(amsgrad=True)",
            "scheduler": "ReduceLROnPlateau(valid loss)",
            "loss": "WeightedEnergyForcesLoss",
            "E0s": "average",
            "E0s_values": {str(z): float(e) for z, e in e0s.items()},
            **stats,
            "n_train": len(train_cfgs),
            "n_test": len(test_cfgs),
            "budget_seconds": args.budget_seconds,
            "setup_seconds": setup_seconds,
            "best_epoch": result.best_epoch,
            "valid_energy_mae_meV_per_atom": result.best_valid.energy_mae_meV_per_atom,
            "valid_force_mae_meV_per_A": result.best_valid.force_mae_meV_per_A,
            "n_calls_9_atoms": args.n_calls_small,
            "n_calls_999_atoms": args.n_calls_large,
            "model_path": str(model_path),
        },
        "n_params": n_params,
        "train_seconds": result.train_seconds,
        "epochs": result.epochs,
        "train_structures_per_s": structures_per_s,
        "test_energy_mae_meV_per_atom": test.energy_mae_meV_per_atom,
        "test_force_mae_meV_per_A": test.force_mae_meV_per_A,
        "test_force_rmse_meV_per_A": test.force_rmse_meV_per_A,
        "calc_ms_9_atoms": ms_9,
        "calc_ms_999_atoms": ms_999,
        "threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "mace_version": importlib.metadata.version("mace-torch"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
