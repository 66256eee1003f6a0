"""The campaign loop: train → explore → score → select → label → track, resumable at every step.

Each iteration walks through phases recorded in ``state.json`` (written atomically); every phase
writes its output atomically before the state moves on, so a killed run resumes at the phase it
was in: training continues from its checkpoint, exploring restarts (it is seeded), labelling
requests only candidates the journal does not hold. Plugins are reached through the registry
by name only.

A :class:`Campaign` owns its directory: it takes the campaign lock (``_lock.py``) before reading
anything there and holds it until :meth:`Campaign.close`. Before the first phase the driver probes
the oracle (:meth:`Campaign.probe_oracle`); events worth keeping (lock takeovers, probes, worker
deaths, halts) are appended to ``campaign.log``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import sys
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from ase import Atoms
from ase.io import read, write

from atomforge import (
    AtomforgeError,
    Candidate,
    ConfigError,
    DataValidationError,
    LabelResult,
    PluginKind,
    Registry,
    config_from_dict,
    get_labels,
    has_checkpoint,
    load_calculator,
    train,
    uncertainty_of,
    unphysical_reason,
    write_text_atomic,
)

from ._config import CAMPAIGN_ONLY, TRAIN_KEYS, CampaignConfig
from ._labelling import OracleCall, build_oracle, label_all, make_executor
from ._lock import CampaignLock, describe_holder
from ._trainjob import run_training_job
from ._stratify import stratified_select, unknown_keys
from ._store import JournalEntry, LabelJournal, LabelledSet, read_json, repair_journal, structure_hash, write_json_atomic

_LOG = logging.getLogger("atomforge.active_learning")

__all__ = ["Campaign", "CampaignResult", "OracleProbeFailed", "LabellingHalted", "STATE_FILE", "LOG_FILE", "score",
           "latent_features", "stable_split"]

STATE_FILE = "state.json"
LOG_FILE = "campaign.log"  # append-only record of the drivers' events
TRUST_KEYS = ("lo", "hi", "adaptive")


class OracleProbeFailed(AtomforgeError):
    """The oracle could not be built, or could not label a starting structure, at campaign start."""


class LabellingHalted(AtomforgeError):
    """Every label an iteration requested failed: the oracle looks broken, so the campaign stops."""


@dataclass(frozen=True)
class CampaignResult:
    """Where a finished (or stopped) campaign stands."""

    directory: Path
    iterations: int  # completed explore-label rounds
    labels: int  # labels in the data set
    stopped_because: str
    final_model: Path


class Campaign:
    """One campaign directory and the steps that advance it."""

    def __init__(self, config: CampaignConfig, registry: Registry, *, executor: Executor | None = None,
                 verbose: bool = True) -> None:
        self.config, self.registry, self.verbose = config, registry, verbose
        self.dir = config.output
        self.dir.mkdir(parents=True, exist_ok=True)
        self._executor = executor
        self._owns_executor = executor is None
        self.lock = CampaignLock(self.dir).acquire()  # raises CampaignLocked naming the holder
        try:
            self.log(f"driver started: pid {os.getpid()}, lock {self.lock.mode}"
                     + (f" ({self.lock.note})" if self.lock.note else ""), quiet=True)
            if self.lock.took_over is not None:
                gone = describe_holder(self.lock.took_over)
                self.log(f"took over the campaign lock of a driver that is gone ({gone}): it was killed or crashed "
                         "without releasing it; resuming from the records on disk", warning=True)
            self.journal = LabelJournal(self.dir / "journal.jsonl")
            self.labelled = LabelledSet(self.dir / "labelled.extxyz")
            self.state: dict[str, Any] = read_json(self.dir / STATE_FILE) or {
                "iteration": 0, "phase": "train", "stopped_because": None, "parent_run_id": None,
                "child_runs": {}, "history": []}
            self._check_names()
        except BaseException:
            self.lock.release()
            raise

    # -- helpers ------------------------------------------------------------------------------------
    def log(self, message: str, *, warning: bool = False, quiet: bool = False) -> None:
        """Print ``message`` (unless not verbose; warnings always, ``quiet`` never) and append it to
        ``campaign.log``."""
        if warning or (self.verbose and not quiet):
            print(f"[al] {'warning: ' if warning else ''}{message}", file=sys.stderr)
        try:
            with open(self.dir / LOG_FILE, "a") as handle:
                handle.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} [{os.getpid()}] "
                             f"{'WARNING ' if warning else ''}{message}\n")
        except OSError:  # the log is a convenience; never let it stop a campaign
            pass

    def _check_names(self) -> None:
        """Fail early on unknown plugin names and bad explorer options, before anything runs."""
        self.registry.get(PluginKind.ORACLE, self.config.oracle.name)
        self.registry.get(PluginKind.SELECTOR, self.config.selector.name)
        engines = self.registry.names(PluginKind.ENGINE)
        unknown = sorted(set(self.config.train) - set(TRAIN_KEYS) - set(engines))
        if unknown:
            raise ConfigError(f"train: unknown key(s) {unknown}; valid keys: {list(TRAIN_KEYS)} and the options block "
                              f"of an installed engine, named like it (engines: {', '.join(engines)})")
        engine = str((self.config.train.get("training") or {}).get("engine", "torch"))
        processes = int(self.config.train.get("processes", 1))
        if processes > 1 and not self.registry.get(PluginKind.ENGINE, engine).distributed:
            raise ConfigError(f"train.processes={processes} needs a distributed engine in train.training.engine "
                              f"(e.g. deepspeed); the {engine!r} engine runs one process")
        for explorer in self.config.explorers:  # built once to check options (e.g. a missing file)
            self.registry.get(PluginKind.EXPLORER, explorer.name).factory(**explorer.options)

    def save_state(self) -> None:
        write_json_atomic(self.dir / STATE_FILE, self.state)

    def iter_dir(self, iteration: int) -> Path:
        path = self.dir / "iterations" / f"{iteration:03d}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def model_path(self, iteration: int) -> Path:
        return self.iter_dir(iteration) / "train" / "model.pt"

    @property
    def labels_requested(self) -> int:
        return len(self.journal.entries)

    def _executor_for_labels(self) -> Executor:
        if self._executor is None:
            e = self.config.executor
            self._executor = make_executor(e.kind, max_workers=e.max_workers, start_method=e.start_method,
                                           address=e.address)
        return self._executor

    def close(self, *, error: bool = False) -> None:
        """Stop the campaign's own executor (after an ``error``, kill its workers at once: their
        results could not be recorded any more) and release the campaign lock."""
        try:
            if self._owns_executor and self._executor is not None:
                executor, self._executor = self._executor, None
                if error and hasattr(executor, "terminate"):
                    executor.terminate()
                else:
                    executor.shutdown(wait=True, cancel_futures=True)
        finally:
            self.lock.release()

    # -- the oracle probe ---------------------------------------------------------------------------
    def oracle_call(self) -> OracleCall:
        o = self.config.oracle
        return OracleCall(self.registry.get(PluginKind.ORACLE, o.name).factory, dict(o.options), o.timeout, o.retries)

    def _oracle_fingerprint(self) -> str:
        o = self.config.oracle
        text = json.dumps([o.name, o.options, o.timeout, o.retries], sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def probe_oracle(self) -> None:
        """Check the oracle before anything is spent: build it through the executor (importable,
        constructible) and label the first initial structure within its timeout (validated like
        every label). The label is skipped on a resume whose oracle settings were probed before,
        unless the last driver halted because every label failed. Nothing is journalled; a
        failure raises :class:`OracleProbeFailed`."""
        o, call = self.config.oracle, self.oracle_call()
        fingerprint = self._oracle_fingerprint()
        previous = self.state.get("oracle_probe") or {}
        full = not (previous.get("ok") and previous.get("fingerprint") == fingerprint) or bool(self.state.get("halted"))
        executor = self._executor_for_labels()
        fix = (f"Nothing was labelled or journalled and no budget was spent; fix `oracle:` in the campaign file "
               f"(name {o.name!r}, options {o.options}) and re-run `atomforge al run`.")
        if not full:
            try:
                error = executor.submit(build_oracle, call).result()
            except Exception as failure:  # noqa: BLE001 - e.g. the worker died while building it
                error = f"{type(failure).__name__}: {failure}"
            if error:
                raise OracleProbeFailed(f"the oracle {o.name!r} failed its start-up probe: {error}. {fix}")
            self.log(f"oracle probe: {o.name!r} built (its labelling was probed on {previous.get('date')} "
                     "with the same settings)")
            return
        atoms = read(self.dir / "initial.extxyz", index=0).copy()  # no labels, no calculator: the structure only
        atoms.info.pop("al_key", None)
        key = structure_hash(atoms)
        self.log(f"oracle probe: labelling the first initial structure with {o.name!r} (timeout {o.timeout} s)")
        result = label_all(executor, call, [(key, atoms)], lambda r: None,
                           log=lambda line: self.log(f"oracle probe: {line}", warning=True))[0]
        if not result.ok:
            raise OracleProbeFailed(
                f"the oracle {o.name!r} failed its start-up probe (one label of the first initial structure, "
                f"timeout {o.timeout} s, {o.retries} retries): {result.error}. {fix}")
        self.state["oracle_probe"] = {"ok": True, "fingerprint": fingerprint, "key": key, "attempts": result.attempts,
                                      "seconds": round(result.seconds, 3), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
        self.state.pop("halted", None)
        self.save_state()
        self.log(f"oracle probe: {o.name!r} labelled it in {result.seconds:.2f} s ({result.attempts} attempt(s)); "
                 "the result is valid")
        self._compare_with_initial_labels(result.atoms)

    def _compare_with_initial_labels(self, probed: Atoms) -> None:
        """Warn when the oracle disagrees with the initial data's label of the probed structure:
        labels from another method or other settings would be mixed into one training set."""
        try:
            stored, fresh = get_labels(read(self.dir / "initial.extxyz", index=0)), get_labels(probed)
        except Exception:  # noqa: BLE001 - an unlabelled or odd initial structure: nothing to compare
            return
        if stored.energy is None or fresh.energy is None:
            return
        d_energy = abs(stored.energy - fresh.energy) / max(1, len(probed))
        comparable = stored.forces is not None and fresh.forces is not None and stored.forces.shape == fresh.forces.shape
        d_forces = float(np.abs(stored.forces - fresh.forces).max()) if comparable else 0.0
        if d_energy > 5e-3 or d_forces > 5e-2:
            self.log(f"oracle probe: the oracle's label of the first initial structure differs from the initial "
                     f"data's ({d_energy:.3g} eV/atom, max force difference {d_forces:.3g} eV/Å): are the initial "
                     "data labelled with the same method and settings? Mixed label sources bias the model.",
                     warning=True)

    # -- setup --------------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Materialise the initial data once, record the config, repair the journal."""
        initial = self.dir / "initial.extxyz"
        if not initial.exists():
            spec = self.registry.get(PluginKind.DATA_SOURCE, self.config.initial_data.source)
            structures = list(spec.factory(dict(self.config.initial_data.options), self.config.base_dir))
            write_extxyz_atomic(initial, structures)
        repaired = repair_journal(self.journal, self.labelled, self.state["iteration"])
        if repaired:
            self.log(f"recovered {repaired} label(s) stored before the journal line was written")

    def data_hash(self) -> str:
        """SHA-256 (16 hex) of the training data: initial plus labelled structures."""
        digest = hashlib.sha256()
        for path in (self.dir / "initial.extxyz", self.labelled.path):
            if path.exists():
                digest.update(path.read_bytes())
        return digest.hexdigest()[:16]

    def iteration_tracking(self, iteration: int) -> dict[str, Any] | str:
        """The training job's ``tracking`` block: a run nested under the campaign's run, named
        ``iteration-NNN``, in the same store (``state['iteration_tracking']``, set when the
        campaign's tracker starts), so the iteration's curves, model and plots are logged live.
        ``none`` when the campaign's tracker cannot open runs from another process."""
        nested = self.state.get("iteration_tracking")
        if not nested:
            return "none"
        return {**nested, "run_name": f"iteration-{iteration:03d}"}

    # -- training -----------------------------------------------------------------------------------
    def train_config(self, iteration: int) -> dict[str, Any]:
        """The `atomforge train` config of an iteration: campaign data + the user's model/training.

        The data are written to ``iterations/NNN/data/{train,valid}.extxyz`` with a stable split
        (:func:`stable_split`: a structure held out once stays held out), so a warm-started model
        is never validated on structures its predecessor trained on."""
        folder = self.iter_dir(iteration) / "data"
        folder.mkdir(exist_ok=True)
        structures = list(read(self.dir / "initial.extxyz", index=":")) + self.labelled.read()
        parts = stable_split(len(structures), self.config.valid_fraction)
        data: dict[str, Any] = {}
        for name, indices in zip(("train", "valid"), parts):
            write_extxyz_atomic(folder / f"{name}.extxyz", [structures[i] for i in indices])
            data[name] = {"source": "ase", "path": str(folder / f"{name}.extxyz")}
        if self.config.test is not None:
            data["test"] = {"source": self.config.test.source, **self.config.test.options}
        head = self.config.train.get("head")  # a multi-head model: the head the oracle's labels train
        if head is not None:
            for name in ("train", "valid"):
                data[name]["head"] = head
        replay = self.config.train.get("replay") or []
        if replay:  # pre-training data mixed in (fine-tuning without forgetting)
            own = 1.0 - sum(float(r["ratio"]) for r in replay)
            data["train"] = [{**data["train"], "ratio": own}, *(dict(r) for r in replay)]
            # an epoch = one pass over the campaign's own labels (plus their share of replay), not
            # the replayed set's size: validation, EMA selection and schedulers stay on the labels' scale
            data["epoch_size"] = max(1, math.ceil(len(parts[0]) / own))
        user = {k: v for k, v in self.config.train.items() if k not in CAMPAIGN_ONLY}
        raw = {**user, "data": data, "output": str(self.iter_dir(iteration) / "train"),
               "tracking": self.iteration_tracking(iteration)}
        raw["training"] = {"seed": self.config.seed, **dict(self.config.train.get("training") or {})}
        warm = self.config.train.get("warm_start")
        previous = self.model_path(iteration - 1) if iteration > 0 else None
        if warm and previous is not None and previous.exists():  # DP-GEN's init-model / training_reuse
            model = {k: v for k, v in dict(raw.get("model") or {}).items() if k != "pretrained"}
            raw["model"] = {**model, "init_from": str(previous)}
            raw["training"].update((warm if isinstance(warm, dict) else {}).get("training") or {})
        return raw

    def train_model(self, iteration: int) -> dict[str, float]:
        """Train (or resume training) the iteration's model; returns its metrics."""
        run_dir = self.iter_dir(iteration) / "train"
        metrics_file = run_dir / "metrics.json"
        if not metrics_file.exists():
            raw = self.train_config(iteration)
            config_file = self.iter_dir(iteration) / "train.yaml"
            config_file.write_text(yaml.safe_dump(raw, sort_keys=False))
            resume = has_checkpoint(run_dir)
            engine = str((raw.get("training") or {}).get("engine", "torch"))
            if self.registry.get(PluginKind.ENGINE, engine).distributed:  # a supervised distributed job
                processes = int(self.config.train.get("processes", 1))
                self.log(f"iteration {iteration}: training on {self._n_training()} structures, "
                         f"{processes} {engine} process(es); log: {self.iter_dir(iteration) / 'train.log'}")
                run_training_job(config_file, self.iter_dir(iteration), processes=processes, resume=resume,
                                 cwd=self.dir)
            else:
                self.log(f"iteration {iteration}: training on {self._n_training()} structures")
                train(config_from_dict(raw, self.dir), self.registry, resume=resume, verbose=self.verbose)
        return read_json(metrics_file, {})

    def timed(self, phase: str) -> Any:
        """Context manager adding the block's wall time to ``state['phase_times'][iteration][phase]``."""
        import contextlib
        import time

        @contextlib.contextmanager
        def block() -> Any:
            started = time.perf_counter()
            try:
                yield
            finally:
                times = self.state.setdefault("phase_times", {}).setdefault(str(self.state["iteration"]), {})
                times[phase] = times.get(phase, 0.0) + time.perf_counter() - started

        return block()

    def _n_training(self) -> int:
        return len(read(self.dir / "initial.extxyz", index=":")) + len(self.journal.with_status("ok"))

    # -- exploring and scoring ----------------------------------------------------------------------
    def trust(self) -> dict[str, Any]:
        """The trust window in the selector's options (``lo``, ``hi``, ``adaptive``)."""
        options = self.config.selector.options
        return {k: options[k] for k in TRUST_KEYS if k in options}

    def levels(self, calibration: float | None) -> tuple[float | None, float | None]:
        """Absolute (lo, hi) in eV/Å from the selector's trust window; None where not set."""
        trust = self.trust()
        factor = (calibration or 0.0) if trust.get("adaptive") else 1.0
        lo, hi = trust.get("lo"), trust.get("hi")
        return (None if lo is None else lo * factor), (None if hi is None else hi * factor)

    def starts(self, iteration: int) -> list[Atoms]:
        """Starting points: drawn from ``starts`` (default: initial + labelled data)."""
        if self.config.starts is not None:
            spec = self.registry.get(PluginKind.DATA_SOURCE, self.config.starts.source)
            pool = list(spec.factory(dict(self.config.starts.options), self.config.base_dir))
        else:
            pool = list(read(self.dir / "initial.extxyz", index=":")) + self.labelled.read()
        rng = np.random.default_rng(self.config.seed + 7919 * iteration)
        picked = rng.choice(len(pool), size=min(self.config.starts_per_iteration, len(pool)), replace=False)
        return [pool[i] for i in picked]

    def calibration(self, calc: Any) -> float | None:
        """The model's typical max force std on its training data (median over ≤ 32 structures)."""
        structures = list(read(self.dir / "initial.extxyz", index=":"))[:16] + self.labelled.read()[-16:]
        sigmas = [score(a, calc)[0] for a in structures]
        sigmas = [s for s in sigmas if s is not None]
        return float(np.median(sigmas)) if sigmas else None

    def explore(self, iteration: int) -> None:
        """Run every explorer with the iteration's model; score and store the candidates."""
        # a multi-head model explores and scores on the head the oracle's labels train
        calc = load_calculator(self.model_path(iteration), registry=self.registry, head=self.config.train.get("head"))
        calibration = self.calibration(calc)
        hi = self.levels(calibration)[1]
        frames: list[Atoms] = []
        for k, choice in enumerate(self.config.explorers):
            explorer = self.registry.get(PluginKind.EXPLORER, choice.name).factory(**choice.options)
            found = explorer.explore(self.starts(iteration), calc, hi=hi, seed=self.config.seed + 1000 * iteration + k)
            frames.extend(found)
            self.log(f"iteration {iteration}: explorer {choice.name!r} proposed {len(found)} configurations")
        self._store_candidates(iteration, frames, calc, calibration)

    def _store_candidates(self, iteration: int, frames: list[Atoms], calc: Any, calibration: float | None) -> None:
        rows, features, rejected = [], [], []
        folder = self.iter_dir(iteration)
        for frame in frames:
            reason = unphysical_reason(frame, self.config.min_distance_ratio)
            if reason is None:
                try:
                    sigma, energy_std = score(frame, calc)
                except DataValidationError as error:  # the model refuses it (e.g. overlapping atoms)
                    reason = f"the model cannot evaluate it: {error}"
            if reason is not None:  # exploded MD frames: kept for inspection, never labelled
                frame.info.update({"rejected": reason, "al_key": structure_hash(frame)})
                rejected.append(frame)
                continue
            frame.info.update({"max_force_std": np.nan if sigma is None else sigma,
                               "energy_std": np.nan if energy_std is None else energy_std,
                               "al_key": structure_hash(frame)})
            features.append(latent_features(frame, calc))
            rows.append(frame)
        if rejected:
            self.log(f"iteration {iteration}: {len(rejected)} unphysical configuration(s) dropped "
                     f"(e.g. {rejected[0].info['rejected']}); see rejected.extxyz")
        write_extxyz_atomic(folder / "rejected.extxyz", rejected)
        np.save(folder / "features.npy", np.array(features))
        write_extxyz_atomic(folder / "candidates.extxyz", rows)
        write_json_atomic(folder / "calibration.json", {"calibration": calibration})

    def candidates(self, iteration: int) -> list[Candidate]:
        folder = self.iter_dir(iteration)
        path = folder / "candidates.extxyz"
        frames = list(read(path, index=":")) if path.stat().st_size else []
        features = np.load(folder / "features.npy") if frames else []
        out = []
        for frame, feature in zip(frames, features):
            sigma, energy_std = frame.info.get("max_force_std", np.nan), frame.info.get("energy_std", np.nan)
            out.append(Candidate(frame, None if np.isnan(sigma) else float(sigma),
                                 None if np.isnan(energy_std) else float(energy_std), np.asarray(feature),
                                 str(frame.info.get("explorer", "")), str(frame.info["al_key"])))
        return out

    # -- selecting and labelling --------------------------------------------------------------------
    def make_selector(self) -> Any:
        return self.registry.get(PluginKind.SELECTOR, self.config.selector.name).factory(**self.config.selector.options)

    def select(self, iteration: int) -> dict[str, Any]:
        """Pick this iteration's candidates (never one already journalled) and store the choice."""
        folder = self.iter_dir(iteration)
        every = self.candidates(iteration)
        fresh, seen = [], set(self.journal.entries)
        for candidate in every:
            if candidate.key not in seen:
                fresh.append(candidate)
                seen.add(candidate.key)
        budget = max(0, min(self.config.budget.per_iteration, self.config.budget.total - self.labels_requested))
        calibration = read_json(folder / "calibration.json", {}).get("calibration")
        selector, seed = self.make_selector(), self.config.seed + iteration
        groups: dict[str, int] | None = None
        if self.config.budget.stratify:
            unknown = unknown_keys(fresh, self.config.budget.stratify)
            if unknown:
                info = sorted({k for c in fresh for k in c.atoms.info})
                _LOG.warning("budget.stratify key(s) %s are set on no candidate, so they do not split the budget; "
                             "keys the explorers set: %s", unknown, ["explorer", *info])
            selection, groups = stratified_select(selector, fresh, budget, self.config.budget.stratify,
                                                  calibration=calibration, seed=seed)
        else:
            selection = selector.select(fresh, budget, calibration=calibration, seed=seed)
        record = {"keys": [fresh[i].key for i in selection.indices], "lo": selection.lo, "hi": selection.hi,
                  "counts": dict(selection.counts), "n_explored": len(every), "budget": budget,
                  "calibration": calibration, "stds": [c.max_force_std for c in every if c.max_force_std is not None]}
        if groups is not None:
            record["groups"] = groups  # labels selected per stratum
        write_json_atomic(folder / "selection.json", record)
        return record

    def record_label(self, iteration: int, result: LabelResult) -> None:
        """Store one label: the structure first, then its journal line (see ``_store``)."""
        if result.ok:
            self.labelled.append(result.atoms, result.key)
        status = "ok" if result.ok else "failed"
        self.journal.append(JournalEntry(result.key, status, iteration, result.error or "", result.attempts,
                                         round(result.seconds, 3)))
        if not result.ok:
            self.log(f"label {result.key} failed and is skipped: {result.error}")

    def label(self, iteration: int) -> list[LabelResult]:
        """Request every selected label the journal does not hold yet; returns their results."""
        selection = read_json(self.iter_dir(iteration) / "selection.json")
        by_key = {c.key: c.atoms for c in self.candidates(iteration)}
        pending = [(k, by_key[k]) for k in selection["keys"] if k not in self.journal]
        if not pending:
            return []
        o = self.config.oracle
        self.log(f"iteration {iteration}: labelling {len(pending)} candidates with {o.name!r}")
        return label_all(self._executor_for_labels(), self.oracle_call(), pending,
                         lambda r: self.record_label(iteration, r), log=lambda line: self.log(line, warning=True))


def write_extxyz_atomic(path: Path, frames: list[Atoms]) -> None:
    """Write ``frames`` as extxyz to ``path`` atomically (an empty list gives an empty file)."""
    buffer = io.StringIO()
    if frames:
        write(buffer, frames, format="extxyz")
    write_text_atomic(path, buffer.getvalue())


def stable_split(count: int, fraction: float) -> tuple[list[int], list[int]]:
    """(train, valid) positions of ``count`` structures in campaign order (initial, then labels
    as appended): position *i* is held out when ``round((i + 1)·f) > round(i·f)`` — round(count·f)
    of them, spread evenly, and the choice of the first *n* never changes as labels are added."""
    valid = [i for i in range(count) if math.floor((i + 1) * fraction + 0.5) > math.floor(i * fraction + 0.5)]
    held = set(valid)
    return [i for i in range(count) if i not in held], valid


def score(atoms: Atoms, calc: Any) -> tuple[float | None, float | None]:
    """(max force std, energy std) of ``atoms`` under ``calc``; None without a UQ head."""
    work = Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
    work.calc = calc
    work.get_forces()
    return uncertainty_of(calc.results)


def latent_features(atoms: Atoms, calc: Any) -> np.ndarray:
    """The model's mean latent atom features of ``atoms`` (its ``NODE_FEATURES``); a radial
    distribution histogram when the model exposes none."""
    import torch

    from atomforge import Potential, atoms_to_graph, collate, keys

    model = getattr(calc, "model", None)
    potential = model if isinstance(model, Potential) else getattr(model, "potential", None)
    if isinstance(potential, Potential):
        dtype = next(potential.parameters()).dtype
        batch = collate([atoms_to_graph(atoms, potential.cutoff, dtype=dtype)])
        with torch.no_grad():
            out = potential.energy_outputs(batch, batch[keys.POSITIONS], None)
        if keys.NODE_FEATURES in out:
            return out[keys.NODE_FEATURES].mean(0).double().numpy()
    distances = atoms.get_all_distances(mic=bool(atoms.pbc.any()))[np.triu_indices(len(atoms), 1)]
    return np.histogram(distances, bins=32, range=(0.0, 8.0))[0] / max(1, len(atoms))
