"""Batched MD through torch-sim vs ASE one system at a time, with the same atomforge model.

Throughput in system·steps per second of Langevin NVT (300 K, 0.5 fs): ASE's ``Langevin`` with
:class:`atomforge.AtomforgeCalculator` runs the systems one after another; torch-sim's
``integrate`` (``nvt_langevin``) runs them all as one batch through
:func:`atomforge.torchsim_model` — one neighbour-list pass per system and one model call for the
whole batch per step. ASE's rate does not depend on how many systems there are (they run one by
one), so it is measured on at most ``--ase-systems`` of them. Rates are per CPU second of this
process (``time.process_time``, one torch thread), so other jobs on a shared core do not skew them.

The model is PaiNN as in the ethanol benchmark (64 channels, 3 layers, 20 radial functions, 5 Å,
float32) with seeded random weights: speed depends on the architecture, not on the weights (give
``--model FILE`` to time a trained one). Before timing, the batched energies and forces are
checked against the calculator's, one by one.

Relaxations (``--relax``, ethanol: the seeded model's forces on the Cu cells are already below the
threshold): FIRE to a largest force of 0.05 eV/Å (at most 300 steps) from ethanol rattled by
0.1 Å, ASE's ``FIRE`` one by one vs torch-sim's batched ``fire`` (``ts.optimize``), in systems
per CPU second.

    taskset -c 1 python benchmarks/torchsim/run.py --out benchmarks/torchsim/results.json
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from ase import Atoms, units  # noqa: E402
from ase.build import bulk, molecule  # noqa: E402
from ase.md.langevin import Langevin  # noqa: E402
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution  # noqa: E402

import atomforge  # noqa: E402
from atomforge import AtomforgeCalculator, build_potential, load_model, make_registry, torchsim_model  # noqa: E402

TEMPERATURE, TIMESTEP_FS, FRICTION_PER_FS = 300.0, 0.5, 0.01
FMAX = 0.05  # eV/Å, relaxations


def systems(kind: str, count: int) -> list[Atoms]:
    """``count`` rattled copies of ethanol (9 atoms, open) or a 32-atom Cu cell (periodic)."""
    out = []
    for k in range(count):
        atoms = molecule("CH3CH2OH") if kind == "ethanol" else bulk("Cu", "fcc", a=3.61, cubic=True).repeat(2)
        atoms.rattle(0.02, seed=k)
        out.append(atoms)
    return out


def model(path: str | None) -> torch.nn.Module:
    if path:
        return load_model(path)
    torch.manual_seed(0)
    config = {"backbone": "painn", "cutoff": 5.0, "elements": [1, 6, 8, 29], "atomic_energies": [0.0] * 4,
              "scale": 0.1, "shift": 0.0, "dtype": "float32",
              "options": {"hidden_channels": 64, "num_layers": 3, "num_rbf": 20}}
    return build_potential(config, make_registry()).eval()


def ase_rate(net: torch.nn.Module, structures: list[Atoms], steps: int) -> float:
    """System·steps per second of ASE Langevin, one system after another."""
    calc = AtomforgeCalculator(net)
    start = time.process_time()
    for k, atoms in enumerate(structures):
        atoms = atoms.copy()
        atoms.calc = calc
        rng = np.random.default_rng(k)
        MaxwellBoltzmannDistribution(atoms, temperature_K=TEMPERATURE, rng=rng)  # as ts.integrate's init
        Langevin(atoms, timestep=TIMESTEP_FS * units.fs, temperature_K=TEMPERATURE,
                 friction=FRICTION_PER_FS / units.fs, rng=rng, fixcm=False).run(steps)
    return len(structures) * steps / (time.process_time() - start)


def torchsim_rate(net: torch.nn.Module, structures: list[Atoms], steps: int) -> float:
    """System·steps per second of torch-sim's batched Langevin (``ts.integrate``)."""
    import torch_sim as ts

    adapter = torchsim_model(net, compute_stress=False)
    run = dict(model=adapter, integrator=ts.nvt_langevin, temperature=TEMPERATURE,
               timestep=TIMESTEP_FS * 1e-3, gamma=torch.tensor(FRICTION_PER_FS / units.fs))  # timestep in ps
    ts.integrate(structures, n_steps=2, **run)  # warm-up
    start = time.process_time()
    ts.integrate(structures, n_steps=steps, **run)
    return len(structures) * steps / (time.process_time() - start)


def relaxed_per_s(net: torch.nn.Module, structures: list[Atoms], batched: bool) -> tuple[float, float]:
    """Systems relaxed per CPU second, and the largest force left (eV/Å)."""
    import torch_sim as ts
    from ase.optimize import FIRE
    from torch_sim.optimizers import fire

    start = time.process_time()
    if batched:
        adapter = torchsim_model(net, compute_stress=False)
        final = ts.optimize(structures, adapter, optimizer=fire, max_steps=300,
                            convergence_fn=ts.generate_force_convergence_fn(FMAX, include_cell_forces=False))
        elapsed, left = time.process_time() - start, float(adapter(final)["forces"].norm(dim=1).max())
        return len(structures) / elapsed, left
    calc, left = AtomforgeCalculator(net), 0.0
    for atoms in structures:
        atoms = atoms.copy()
        atoms.calc = calc
        FIRE(atoms, logfile=None).run(fmax=FMAX, steps=300)
        left = max(left, float(np.linalg.norm(atoms.get_forces(), axis=1).max()))
    return len(structures) / (time.process_time() - start), left


def rattled(count: int) -> list[Atoms]:
    out = systems("ethanol", count)
    for k, atoms in enumerate(out):
        atoms.rattle(0.1, seed=100 + k)
    return out


def agreement(net: torch.nn.Module, structures: list[Atoms]) -> float:
    """Largest |force difference| (eV/Å) between one batched call and the calculator one by one."""
    import torch_sim as ts

    adapter = torchsim_model(net)
    state = ts.io.atoms_to_state(structures, torch.device("cpu"), adapter.dtype)
    forces = adapter(state)["forces"].numpy()
    calc = AtomforgeCalculator(net)
    worst = 0.0
    for k, atoms in enumerate(structures):
        atoms = atoms.copy()
        atoms.calc = calc
        worst = max(worst, float(np.abs(atoms.get_forces() - forces[state.system_idx.numpy() == k]).max()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", nargs="+", default=["ethanol", "cu"], choices=["ethanol", "cu"])
    parser.add_argument("--batch", nargs="+", type=int, default=[16, 64], help="systems per torch-sim batch")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--ase-systems", type=int, default=8, help="systems ASE runs (its rate is per system)")
    parser.add_argument("--model", default=None, help="an atomforge model file (default: seeded PaiNN)")
    parser.add_argument("--relax", action="store_true", help="also time ethanol relaxations (FIRE)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    net = model(args.model)
    rows = []
    for kind in args.kinds:
        check = agreement(net, systems(kind, 4))
        ase = ase_rate(net, systems(kind, args.ase_systems), args.steps)
        for batch in args.batch:
            batched = torchsim_rate(net, systems(kind, batch), args.steps)
            rows.append({"system": kind, "atoms": len(systems(kind, 1)[0]), "batch": batch, "steps": args.steps,
                         "ase_system_steps_per_s": round(ase, 2), "torchsim_system_steps_per_s": round(batched, 2),
                         "speedup": round(batched / ase, 2), "max_force_difference_eV_per_A": check})
            print(json.dumps(rows[-1]), flush=True)
    if args.relax:
        ase, ase_left = relaxed_per_s(net, rattled(args.ase_systems), batched=False)
        for batch in args.batch:
            batched, left = relaxed_per_s(net, rattled(batch), batched=True)
            rows.append({"system": "ethanol", "relax": "FIRE", "batch": batch, "ase_systems_per_s": round(ase, 2),
                         "torchsim_systems_per_s": round(batched, 2), "speedup": round(batched / ase, 2),
                         "max_force_left_eV_per_A": round(max(left, ase_left), 4)})
            print(json.dumps(rows[-1]), flush=True)
    record = {"rows": rows, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "atomforge": atomforge.__version__, "machine": platform.processor() or platform.machine(),
              "python": platform.python_version()}
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
