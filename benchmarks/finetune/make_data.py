"""Data for the "cheap -> expensive level of theory" fine-tuning benchmark.

Pre-train on many GFN2-xTB frames of four small molecules, fine-tune on a few B3LYP/6-31G*
frames of ethanol. Runs with the project venv (``ase``, ``numpy``, ``tblite``, ``pyscf``)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/finetune/make_data.py            # defaults
    .venv/bin/python benchmarks/finetune/make_data.py --out /tmp/ft --n-ethanol 20 \\
        --n-small 20 --n-valid 8 --n-ft-train 2 --n-ft-test 2 --n-ft-hot 1     # smoke test

MD is ``benchmarks/ethanol/make_data.py``'s (imported, not copied): GFN2-xTB (tblite), BFGS
pre-relaxation, Langevin 0.5 fs, friction 0.01/fs, FixCom, every trajectory with its own seed,
rattled start and thermalisation. What it writes into ``--out`` (default
``benchmarks/finetune/data``):

``pretrain_xtb.extxyz``
    GFN2-xTB MD frames (stride ``--stride``, default 10 steps) of ethanol (``--n-ethanol``,
    default 1600), methanol, acetaldehyde CH3CHO and dimethyl ether CH3OCH3 (``--n-small``,
    default 800 each); each molecule's frames come from ``--n-traj`` (4) trajectories, of which
    ``--n-traj-hot`` (1) run at ``--t-hot`` (900 K), the rest at ``--t-train`` (600 K).
``pretrain_valid_xtb.extxyz``
    ``--n-valid`` (50) frames per molecule from separate trajectories (same split of
    temperatures), for validation during pre-training.
``ft_train_b3lyp.extxyz`` / ``ft_train_xtb.extxyz``
    ``--n-ft-train`` (200) ethanol frames of a new independent 600 K trajectory, one every
    ``--ft-stride`` (20) steps, relabelled with B3LYP/6-31G* (and the same geometries with their
    xTB labels). Frame order is the MD order: take the first 25/50/100/200.
``ft_test_b3lyp.extxyz`` / ``ft_test_xtb.extxyz``
    ``--n-ft-test`` (100) frames taken evenly from ``benchmarks/ethanol/data-i16/test.extxyz``
    (independent 600 K trajectory), with B3LYP and with their original xTB labels.
``ft_hot_b3lyp.extxyz`` / ``ft_hot_xtb.extxyz``
    ``--n-ft-hot`` (50) frames taken evenly from ``data-i16/test_1000K.extxyz``, likewise.
``manifest.json``
    counts per file and molecule, seeds, temperatures, timings, the command, software versions
    and the B3LYP unit check (analytic force vs central finite difference of the energy).
``b3lyp_progress.log``
    the B3LYP progress (also printed), with ETA.

Every frame has info ``config_type`` (molecule name), ``fidelity`` (0 = GFN2-xTB,
1 = B3LYP/6-31G*), ``level`` and the MD provenance (``temperature_K``, ``md_step``,
``trajectory``; the re-used data-i16 frames also ``source`` and ``source_index``). Energies in
eV, forces in eV/A (``SinglePointCalculator``: the extxyz ``energy`` key and ``forces`` array).

B3LYP: :class:`atomforge.plugins.oracles.PySCFOracle` ``(xc="B3LYP", basis="6-31G*")``: RKS,
conv_tol 1e-9 Ha, default grid (level 3), analytic gradients; PySCF >= 2.3's ``B3LYP`` is libxc's
HYB_GGA_XC_B3LYP (VWN-RPA, as in Gaussian). A frame whose SCF does not converge is retried with
a second-order (Newton) solver and 300 cycles; if that fails too it is skipped and listed in
``manifest.json`` and ``<file>.failed.json``.

The B3LYP step is resumable: each labelled frame is appended and fsync'ed at once; a restart
keeps the frames already written (checked against the geometries they came from by
``source_index``), drops a half-written last frame, and labels only the rest. The xTB files are
re-used on a restart when they exist with the expected number of frames (delete them, or pass
``--redo-xtb``, to regenerate). ``--skip-b3lyp`` writes only the xTB parts.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # deterministic xTB; one core per PySCF worker

import argparse
import io
import json
import multiprocessing as mp
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ase import Atoms, units
from ase.build import molecule
from ase.io import read, write
from ase.optimize import BFGS

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE.parent / "ethanol"))
import make_data as eth  # noqa: E402  benchmarks/ethanol/make_data.py

DEFAULT_OUT = HERE / "data"
DEFAULT_SOURCE = HERE.parent / "ethanol" / "data-i16"
XTB_LEVEL = "GFN2-xTB"
DFT_XC, DFT_BASIS = "B3LYP", "6-31G*"
DFT_LEVEL = f"{DFT_XC}/{DFT_BASIS}"
CONV_TOL = 1e-9

#: config_type -> ase.build.molecule name
MOLECULES = {
    "ethanol": "CH3CH2OH",
    "methanol": "CH3OH",
    "acetaldehyde": "CH3CHO",
    "dimethyl_ether": "CH3OCH3",
}


# ----------------------------------------------------------------------------------------- xTB


def relaxed(name: str) -> Atoms:
    """``ase.build.molecule`` geometry of ``name`` relaxed with GFN2-xTB (as eth.relaxed_ethanol)."""
    atoms = molecule(MOLECULES[name])
    atoms.calc = eth.make_calculator()
    opt = BFGS(atoms, logfile=None)
    opt.run(fmax=0.05, steps=100)
    print(f"[relax {name}] {opt.get_number_of_steps()} BFGS steps, E = {atoms.get_potential_energy():.4f} eV, "
          f"max|F| = {np.abs(atoms.get_forces()).max():.4f} eV/A", flush=True)
    atoms.calc = None
    return atoms


def split(n: int, parts: int) -> list[int]:
    """``n`` frames over ``parts`` trajectories, as evenly as possible (first ones get the extra)."""
    return [n // parts + (1 if k < n % parts else 0) for k in range(parts)]


def tag(frames: list[Atoms], config_type: str, fidelity: int, level: str) -> list[Atoms]:
    for f in frames:
        f.info.update(config_type=config_type, fidelity=fidelity, level=level)
    return frames


@dataclass
class XtbTimer:
    """Wall time and number of xTB force calls (one per Langevin step)."""

    seconds: float = 0.0
    calls: int = 0

    def run(self, start: Atoms, spec: eth.TrajSpec, n_therm: int, stride: int) -> list[Atoms]:
        t0 = time.perf_counter()
        frames = eth.run_trajectory(start, spec, n_therm, stride)
        self.seconds += time.perf_counter() - t0
        self.calls += n_therm + spec.n_frames * stride
        return frames


def molecule_specs(name: str, n: int, args: argparse.Namespace, seed0: int, label: str) -> list[eth.TrajSpec]:
    """``n`` frames of ``name`` over ``args.n_traj`` trajectories (the last ``n_traj_hot`` hot)."""
    specs = []
    for k, n_k in enumerate(split(n, args.n_traj)):
        hot = k >= args.n_traj - args.n_traj_hot
        temp = args.t_hot if hot else args.t_train
        if n_k > 0:
            specs.append(eth.TrajSpec(f"{name}_{label}{k}_{temp:.0f}K", "", temp, n_k, seed0 + k))
    return specs


def existing(path: Path, n: int, redo: bool) -> list[Atoms] | None:
    """The frames of ``path`` when it holds exactly ``n`` frames (re-use on restart)."""
    if redo or not path.exists():
        return None
    try:
        frames = read(path, ":")
    except Exception:  # noqa: BLE001  a broken file is regenerated
        return None
    return frames if len(frames) == n else None


def seeds_for(args: argparse.Namespace) -> dict[str, object]:
    """Every trajectory's seed: pretrain seed+100m+k, valid seed+100m+50+k, fine-tune seed+900.

    The default base seed (1000) keeps clear of data-i16's seeds (0, 1, 2; box 3)."""
    return {
        "pretrain": {name: [args.seed + 100 * m + k for k in range(args.n_traj)]
                     for m, name in enumerate(MOLECULES)},
        "pretrain_valid": {name: [args.seed + 100 * m + 50 + k for k in range(args.n_traj)]
                           for m, name in enumerate(MOLECULES)},
        "ft_train": args.seed + 900,
    }


def xtb_stage(args: argparse.Namespace, manifest: dict) -> tuple[list[Atoms], list[Atoms], list[Atoms]]:
    """Pre-training sets and the fine-tuning trajectory (xTB labels); re-used when present."""
    out = args.out
    counts = {name: (args.n_ethanol if name == "ethanol" else args.n_small) for name in MOLECULES}
    paths = {"pretrain": out / "pretrain_xtb.extxyz", "valid": out / "pretrain_valid_xtb.extxyz",
             "ft": out / "ft_train_xtb.extxyz"}
    wanted = {"pretrain": sum(counts.values()), "valid": args.n_valid * len(MOLECULES), "ft": args.n_ft_train}
    have = {key: existing(paths[key], wanted[key], args.redo_xtb) for key in paths}
    if all(v is not None for v in have.values()):
        print("[xtb] all xTB files exist with the expected counts: re-using them", flush=True)
        return have["pretrain"], have["valid"], have["ft"]

    timer = XtbTimer()
    t_all = time.perf_counter()
    starts = {name: relaxed(name) for name in MOLECULES}
    results: dict[str, list[Atoms]] = {}
    for key, per_mol, label, offset in (("pretrain", counts, "pt", 0),
                                        ("valid", {n: args.n_valid for n in MOLECULES}, "va", 50)):
        if have[key] is not None:
            print(f"[xtb] re-using {paths[key]}", flush=True)
            results[key] = have[key]
            continue
        frames: list[Atoms] = []
        for m, name in enumerate(MOLECULES):
            for spec in molecule_specs(name, per_mol[name], args, args.seed + 100 * m + offset, label):
                frames += tag(timer.run(starts[name], spec, args.n_therm, args.stride), name, 0, XTB_LEVEL)
        write(paths[key], frames, format="extxyz")
        print(f"[xtb] wrote {len(frames)} frames -> {paths[key]}", flush=True)
        results[key] = frames
    if have["ft"] is not None:
        print(f"[xtb] re-using {paths['ft']}", flush=True)
        results["ft"] = have["ft"]
    else:
        spec = eth.TrajSpec("ethanol_ft_600K", "", args.t_train, args.n_ft_train, args.seed + 900)
        ft = tag(timer.run(starts["ethanol"], spec, args.n_therm, args.ft_stride), "ethanol", 0, XTB_LEVEL)
        for i, f in enumerate(ft):
            f.info["source_index"] = i
        write(paths["ft"], ft, format="extxyz")
        print(f"[xtb] wrote {len(ft)} frames -> {paths['ft']}", flush=True)
        results["ft"] = ft
    if timer.calls:  # a partial regeneration does not overwrite the timing of the full one
        key = "xtb" if all(v is None for v in have.values()) else "xtb_partial_regeneration"
        manifest["timings"][key] = {
            "calls": timer.calls, "md_seconds": round(timer.seconds, 2),
            "seconds_per_call": timer.seconds / timer.calls,
            "stage_seconds": round(time.perf_counter() - t_all, 2),
            "note": "calls = Langevin steps (one GFN2-xTB energy+gradient each) of the trajectories "
                    "generated in this run; BFGS pre-relaxations excluded",
        }
    return results["pretrain"], results["valid"], results["ft"]


def evenly(frames: list[Atoms], n: int, source: str) -> list[Atoms]:
    """``n`` frames at evenly spaced indices of ``frames``, tagged as ethanol/xTB with their source."""
    idx = np.unique(np.round(np.linspace(0, len(frames) - 1, n)).astype(int))
    if len(idx) != n:
        raise ValueError(f"cannot take {n} distinct frames from {len(frames)} ({source})")
    picked = []
    for i in idx:
        f = frames[int(i)].copy()
        f.calc = frames[int(i)].calc
        f.info.update(source=source, source_index=int(i))
        picked.append(f)
    return tag(picked, "ethanol", 0, XTB_LEVEL)


# -------------------------------------------------------------------------------------- B3LYP

_ORACLE = None


def _oracle():
    global _ORACLE
    if _ORACLE is None:
        from atomforge.plugins.oracles import PySCFOracle

        _ORACLE = PySCFOracle(xc=DFT_XC, basis=DFT_BASIS, conv_tol=CONV_TOL)
    return _ORACLE


def _newton_fallback(atoms: Atoms) -> tuple[float, np.ndarray]:
    """Same method, second-order SCF with 300 cycles (used only when the plain SCF fails)."""
    oracle = _oracle()
    mf = oracle._mean_field(oracle._molecule(atoms)).newton()
    mf.max_cycle = 300
    energy = mf.kernel()
    if not mf.converged:
        raise RuntimeError("SCF not converged (plain DIIS, then Newton with 300 cycles)")
    gradient = np.asarray(mf.nuc_grad_method().kernel())
    return float(energy) * units.Hartree, -gradient * units.Hartree / units.Bohr


def b3lyp_job(item: tuple[int, Atoms]) -> dict:
    """Label one frame; returns a dict (picklable) with energy/forces or the failure."""
    key, atoms = item
    t0 = time.perf_counter()
    note = ""
    try:
        labelled = _oracle().label(atoms)
        energy, forces = labelled.get_potential_energy(), labelled.get_forces()
    except Exception as first:  # noqa: BLE001  OracleFailure (SCF not converged) or numerical trouble
        note = f"first attempt failed ({first}); Newton fallback"
        try:
            energy, forces = _newton_fallback(atoms)
        except Exception as second:  # noqa: BLE001
            return {"key": key, "ok": False, "error": f"{note}: {second}", "seconds": time.perf_counter() - t0}
    return {"key": key, "ok": True, "energy": float(energy), "forces": np.asarray(forces, float),
            "note": note, "seconds": time.perf_counter() - t0}


def frame_text(frame: Atoms) -> str:
    buf = io.StringIO()
    write(buf, frame, format="extxyz")
    return buf.getvalue()


def complete_frames(path: Path) -> list[Atoms]:
    """Frames of ``path``; a half-written last frame (killed run) is cut off the file."""
    if not path.exists():
        return []
    data = path.read_bytes()
    lines = data.splitlines(keepends=True)
    pos = i = 0
    good = 0  # byte offset after the last complete frame
    while i < len(lines):
        try:
            n = int(lines[i].strip())
        except ValueError:
            break
        block = lines[i:i + n + 2]
        if len(block) < n + 2 or not block[-1].endswith(b"\n"):
            break
        pos += sum(len(b) for b in block)
        i += n + 2
        good = pos
    if good < len(data):
        print(f"[b3lyp] {path.name}: dropping {len(data) - good} bytes of a half-written frame", flush=True)
        with open(path, "r+b") as fh:
            fh.truncate(good)
    return read(path, ":") if good else []


def label_file(name: str, geometries: list[Atoms], args: argparse.Namespace, log, later: int = 0) -> dict:
    """B3LYP labels for ``geometries`` (each with info['source_index']) appended to ``out/name``.

    ``later``: frames still to label in the files after this one (for the overall ETA)."""
    path = args.out / name
    failed_path = args.out / (name + ".failed.json")
    done = complete_frames(path)
    by_index = {int(g.info["source_index"]): g for g in geometries}
    for f in done:  # a resumed file must hold exactly the frames we would label now
        src = by_index.get(int(f.info.get("source_index", -1)))
        if src is None or not np.allclose(src.get_positions(), f.get_positions(), atol=1e-6):
            raise RuntimeError(f"{path} holds a frame (source_index {f.info.get('source_index')}) that does not "
                               "match the current geometries; move the file away to relabel")
    failures = json.loads(failed_path.read_text()) if failed_path.exists() else []
    skip = {int(f.info["source_index"]) for f in done} | {int(x["source_index"]) for x in failures}
    todo = [g for g in geometries if int(g.info["source_index"]) not in skip]
    if done:
        print(f"[b3lyp] {name}: resuming, {len(done)} frames already labelled, {len(todo)} to go", flush=True)
    # frames are appended in order; resuming only ever removes a prefix, so the order stays the MD order
    order = [int(g.info["source_index"]) for g in geometries]
    todo_order = [int(g.info["source_index"]) for g in todo]
    if [i for i in order if i in set(todo_order)] != todo_order or \
            (done and todo_order and min(todo_order) < max(int(f.info["source_index"]) for f in done)):
        raise RuntimeError(f"{name}: labelled frames are not a prefix of the requested ones")

    seconds, notes = [], []
    t0 = time.perf_counter()
    items = list(enumerate(todo))
    if args.workers > 1 and len(items) > 1:
        pool = mp.get_context("spawn").Pool(args.workers)
        results = pool.imap(b3lyp_job, items)
    else:
        pool = None
        results = map(b3lyp_job, items)
    try:
        with open(path, "a") as fh:
            for k, res in enumerate(results):
                src = todo[res["key"]]
                idx = int(src.info["source_index"])
                seconds.append(res["seconds"])
                if res["ok"]:
                    frame = eth.labelled_frame(src, res["energy"], res["forces"], dict(src.info))
                    frame.info.update(config_type="ethanol", fidelity=1, level=DFT_LEVEL)
                    fh.write(frame_text(frame))
                    fh.flush()
                    os.fsync(fh.fileno())
                    if res["note"]:
                        notes.append({"source_index": idx, "note": res["note"]})
                        print(f"[b3lyp] {name} frame {idx}: {res['note']}", flush=True)
                else:
                    failures.append({"source_index": idx, "error": res["error"]})
                    failed_path.write_text(json.dumps(failures, indent=1))
                    print(f"[b3lyp] {name} frame {idx}: FAILED, skipped ({res['error']})", flush=True)
                elapsed = time.perf_counter() - t0
                rate = elapsed / (k + 1)
                msg = (f"[b3lyp] {name} {len(done) + k + 1}/{len(geometries)}: {res['seconds']:.1f} s "
                       f"(mean {np.mean(seconds):.1f} s/frame, wall {rate:.1f} s/frame), "
                       f"ETA this file {rate * (len(items) - k - 1) / 60:.1f} min, "
                       f"all B3LYP {rate * (len(items) - k - 1 + later) / 60:.1f} min")
                print(msg, flush=True)
                log.write(time.strftime("%H:%M:%S ") + msg + "\n")
                log.flush()
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    labelled = complete_frames(path)
    return {"frames": len(labelled), "requested": len(geometries), "labelled_this_run": len(items),
            "resumed_from": len(done), "seconds": round(time.perf_counter() - t0, 2),
            "seconds_per_call_this_run": float(np.mean(seconds)) if seconds else None,
            "failures": failures, "fallbacks": notes}


def unit_check(frame: Atoms, h: float = 1e-3) -> dict:
    """Analytic B3LYP force on one coordinate vs a central difference of the energy (eV, A)."""
    oracle = _oracle()
    t0 = time.perf_counter()
    labelled = oracle.label(frame)
    t_label = time.perf_counter() - t0
    forces = labelled.get_forces()
    atom, axis = np.unravel_index(np.argmax(np.abs(forces)), forces.shape)
    energies = []
    for sign in (+1, -1):
        moved = frame.copy()
        moved.positions[atom, axis] += sign * h
        mf = oracle._mean_field(oracle._molecule(moved))
        energies.append(float(mf.kernel()) * units.Hartree)
    fd = -(energies[0] - energies[1]) / (2 * h)
    xtb_f = frame.get_forces()
    check = {
        "atom": int(atom), "axis": "xyz"[axis], "step_A": h,
        "energy_eV": float(labelled.get_potential_energy()),
        "force_analytic_eV_per_A": float(forces[atom, axis]),
        "force_finite_difference_eV_per_A": float(fd),
        "abs_difference_eV_per_A": float(abs(fd - forces[atom, axis])),
        "xtb_force_same_component_eV_per_A": float(xtb_f[atom, axis]),
        "rms_force_b3lyp_eV_per_A": float(np.sqrt((forces**2).mean())),
        "rms_force_xtb_eV_per_A": float(np.sqrt((xtb_f**2).mean())),
        "rms_force_difference_b3lyp_minus_xtb_eV_per_A": float(np.sqrt(((forces - xtb_f) ** 2).mean())),
        "seconds_single_label": round(t_label, 2),
    }
    print(f"[units] atom {atom} {'xyz'[axis]}: analytic {forces[atom, axis]:.5f} eV/A, finite difference "
          f"(h={h} A) {fd:.5f} eV/A, |diff| {check['abs_difference_eV_per_A']:.1e}; xTB {xtb_f[atom, axis]:.4f}; "
          f"E = {check['energy_eV']:.4f} eV", flush=True)
    return check


# ---------------------------------------------------------------------------------------- main


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("ase", "numpy", "tblite", "pyscf"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    try:
        import pyscf.dft.libxc as libxc

        out["libxc"] = libxc.__version__
    except Exception:  # noqa: BLE001
        pass
    return out


def counts_of(frames: list[Atoms]) -> dict[str, int]:
    out: dict[str, int] = {}
    for f in frames:
        out[f.info["config_type"]] = out.get(f.info["config_type"], 0) + 1
    return out


def write_manifest(args: argparse.Namespace, manifest: dict) -> None:
    tmp = args.out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, default=str))
    tmp.replace(args.out / "manifest.json")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    p.add_argument("--source", type=Path, default=DEFAULT_SOURCE,
                   help="directory with the xTB ethanol test.extxyz / test_1000K.extxyz (read only)")
    p.add_argument("--seed", type=int, default=1000,
                   help="base seed: pretrain seed+100m+k, valid seed+100m+50+k, fine-tune trajectory seed+900")
    p.add_argument("--n-ethanol", type=int, default=1600, help="pre-training frames of ethanol")
    p.add_argument("--n-small", type=int, default=800,
                   help="pre-training frames of each of methanol, acetaldehyde, dimethyl ether")
    p.add_argument("--n-valid", type=int, default=50, help="validation frames per molecule")
    p.add_argument("--n-traj", type=int, default=4, help="trajectories per molecule (pre-train and valid)")
    p.add_argument("--n-traj-hot", type=int, default=1, help="of these, how many run at --t-hot")
    p.add_argument("--t-train", type=float, default=600.0, help="temperature (K)")
    p.add_argument("--t-hot", type=float, default=900.0, help="temperature of the hot trajectories (K)")
    p.add_argument("--stride", type=int, default=10, help="MD steps between pre-training frames")
    p.add_argument("--n-therm", type=int, default=500, help="thermalisation steps per trajectory")
    p.add_argument("--n-ft-train", type=int, default=200, help="B3LYP fine-tuning frames (new trajectory)")
    p.add_argument("--ft-stride", type=int, default=20, help="MD steps between fine-tuning frames")
    p.add_argument("--n-ft-test", type=int, default=100, help="B3LYP test frames from data-i16/test.extxyz")
    p.add_argument("--n-ft-hot", type=int, default=50, help="B3LYP frames from data-i16/test_1000K.extxyz")
    p.add_argument("--skip-b3lyp", action="store_true", help="only the xTB parts")
    p.add_argument("--no-unit-check", action="store_true", help="skip the finite-difference check (3 SCFs)")
    p.add_argument("--redo-xtb", action="store_true", help="regenerate xTB files even if they exist")
    p.add_argument("--workers", type=int, default=1, help="processes for the B3LYP step")
    args = p.parse_args()
    if args.ft_stride < 20:
        p.error("--ft-stride must be >= 20 (frames must decorrelate)")
    if not 0 <= args.n_traj_hot <= args.n_traj:
        p.error("--n-traj-hot must be between 0 and --n-traj")
    return args


def main() -> None:
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    old = {}
    if (args.out / "manifest.json").exists():
        try:
            old = json.loads((args.out / "manifest.json").read_text())
        except ValueError:
            old = {}
    if old.get("seeds") != json.loads(json.dumps(seeds_for(args))):
        old = {}  # timings and the unit check of another run's data are not carried over
    manifest: dict = {
        "command": "OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", "") + " "
                   + " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "cwd": os.getcwd(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
        "versions": versions(),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "levels": {"0": XTB_LEVEL + " (tblite, accuracy 1, electronic temperature 300 K)",
                   "1": f"{DFT_LEVEL} (PySCF RKS, libxc HYB_GGA_XC_B3LYP = VWN-RPA variant, conv_tol {CONV_TOL} Ha, "
                        "grid level 3, analytic gradients without grid response)"},
        "md": {"timestep_fs": eth.TIMESTEP_FS, "friction_per_fs": eth.FRICTION_PER_FS, "thermostat": "Langevin",
               "constraint": "FixCom (saved forces are the raw gradient)", "n_therm": args.n_therm,
               "pretrain_stride": args.stride, "ft_stride": args.ft_stride,
               "temperatures_K": {"pretrain/valid": f"{args.n_traj - args.n_traj_hot} of {args.n_traj} trajectories "
                                                    f"per molecule at {args.t_train:.0f}, {args.n_traj_hot} at "
                                                    f"{args.t_hot:.0f}",
                                  "ft_train": args.t_train, "ft_test": "600 (data-i16 test)",
                                  "ft_hot": "1000 (data-i16 test_1000K)"}},
        "seeds": seeds_for(args),
        "timings": dict(old.get("timings", {})),
        "files": {},
    }

    pretrain, valid, ft_xtb = xtb_stage(args, manifest)
    test_src = read(args.source / "test.extxyz", ":")
    hot_src = read(args.source / "test_1000K.extxyz", ":")
    test_xtb = evenly(test_src, args.n_ft_test, "data-i16/test.extxyz")
    hot_xtb = evenly(hot_src, args.n_ft_hot, "data-i16/test_1000K.extxyz")
    write(args.out / "ft_test_xtb.extxyz", test_xtb, format="extxyz")
    write(args.out / "ft_hot_xtb.extxyz", hot_xtb, format="extxyz")
    for name, frames in (("pretrain_xtb.extxyz", pretrain), ("pretrain_valid_xtb.extxyz", valid),
                         ("ft_train_xtb.extxyz", ft_xtb), ("ft_test_xtb.extxyz", test_xtb),
                         ("ft_hot_xtb.extxyz", hot_xtb)):
        manifest["files"][name] = {"frames": len(frames), "per_molecule": counts_of(frames), "fidelity": 0,
                                   "level": XTB_LEVEL}
    manifest["files"]["ft_test_xtb.extxyz"]["source_indices"] = [int(f.info["source_index"]) for f in test_xtb]
    manifest["files"]["ft_hot_xtb.extxyz"]["source_indices"] = [int(f.info["source_index"]) for f in hot_xtb]
    manifest["timings"]["xtb_stage_wall_seconds_this_run"] = round(time.perf_counter() - t_start, 2)
    write_manifest(args, manifest)

    if not args.skip_b3lyp:
        if not args.no_unit_check:
            manifest["unit_check"] = old.get("unit_check") or unit_check(ft_xtb[0])
            write_manifest(args, manifest)
        t_b3 = time.perf_counter()
        b3 = dict(old.get("timings", {}).get("b3lyp_files", {}))
        with open(args.out / "b3lyp_progress.log", "a") as log:
            log.write(time.strftime("%Y-%m-%d %H:%M:%S ") + f"start (workers={args.workers})\n")
            jobs = (("ft_train_b3lyp.extxyz", ft_xtb), ("ft_test_b3lyp.extxyz", test_xtb),
                    ("ft_hot_b3lyp.extxyz", hot_xtb))
            pending = [max(0, len(g) - len(complete_frames(args.out / n))) for n, g in jobs]
            for j, (name, geoms) in enumerate(jobs):
                res = label_file(name, geoms, args, log, later=sum(pending[j + 1:]))
                prev = b3.get(name, {})
                # keep per-call timings across resumes: frames labelled in earlier runs count too
                calls = res["labelled_this_run"] + prev.get("calls", 0)
                secs = (res["seconds_per_call_this_run"] or 0) * res["labelled_this_run"] \
                    + prev.get("call_seconds", 0.0)
                b3[name] = {"calls": calls, "call_seconds": round(secs, 2)}
                manifest["files"][name] = {"frames": res["frames"], "requested": res["requested"],
                                           "per_molecule": {"ethanol": res["frames"]}, "fidelity": 1,
                                           "level": DFT_LEVEL, "failures": res["failures"],
                                           "fallbacks": res["fallbacks"]}
                manifest["timings"]["b3lyp_files"] = b3
                write_manifest(args, manifest)
        calls = sum(v["calls"] for v in b3.values())
        secs = sum(v["call_seconds"] for v in b3.values())
        manifest["timings"]["b3lyp"] = {
            "calls": calls, "call_seconds_total": round(secs, 2),
            "seconds_per_call": secs / calls if calls else None, "workers": args.workers,
            "stage_wall_seconds_this_run": round(time.perf_counter() - t_b3, 2),
            "note": "seconds_per_call: wall time of one SCF + gradient in a worker (shared 2-core machine)"}
    manifest["timings"]["total_wall_seconds_this_run"] = round(time.perf_counter() - t_start, 2)
    manifest["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    write_manifest(args, manifest)
    print(f"[done] {json.dumps({k: v['frames'] for k, v in manifest['files'].items()})} "
          f"in {time.perf_counter() - t_start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
