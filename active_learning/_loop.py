"""Drive a :class:`~._campaign.Campaign` phase by phase, decide when to stop, track in MLflow.

Phases of iteration *i*: ``train`` (model *i* on everything labelled so far) → [``stability``:
the ``stop.md_stable`` suite on model *i*, when configured] → stop? → ``explore`` → ``select`` →
stop? → ``label`` → ``track`` (child run *i*) → iteration *i + 1*. The model of the last
iteration is the final one; it has seen every label.

Stopping: a *target* (an error target, ``accurate_fraction``) stops the campaign — with an
``md_stable`` gate only once the model passes the stability suite (a gate without a target stops
it as soon as the model passes). *Limits* (``max_iterations``, the label budget, nothing left to
label) stop it regardless; ``stopped_because`` then says whether the model passed the gate.

Before the first phase a driver holds the campaign lock (taken by :class:`Campaign`) and has
probed the oracle; an iteration whose every requested label failed halts the campaign
(:class:`LabellingHalted`) instead of training on nothing new.
"""

from __future__ import annotations

import math
from collections import Counter
from concurrent.futures import Executor
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml

from atomforge import PluginKind, Registry, pyplot, read_json, run_stability_suite, save_figure, stability_verdict
from atomforge import Tracker

from ._campaign import Campaign, CampaignResult, LabellingHalted
from ._config import CampaignConfig

__all__ = ["run_campaign", "error_metric", "learning_curve_plot", "uncertainty_histogram"]


def error_metric(metrics: dict[str, float], quantity: str) -> float | None:
    """The error a target is checked against: test set if there is one, else validation."""
    for key in (f"test_{quantity}_mae", f"best_valid_{quantity}_mae"):
        if key in metrics and math.isfinite(metrics[key]):
            return float(metrics[key])
    return None


MD_PREFIX = "md_"  # the stability suite's metrics in state['metrics'], the history and the child runs


def _error_target(campaign: Campaign, metrics: dict[str, float]) -> str | None:
    config = campaign.config
    targets = (("forces", config.stop.target_forces_mae, "meV/Å"), ("energy", config.stop.target_energy_mae, "meV/atom"))
    for quantity, target, unit in targets:
        error = error_metric(metrics, quantity)
        if target is not None and error is not None and error <= target:
            return f"target {quantity} MAE reached ({error:.3g} ≤ {target:g} {unit})"
    return None


def _md_verdict(campaign: Campaign) -> tuple[bool, str] | None:
    """The ``md_stable`` gate's verdict on the iteration's model (None: no gate)."""
    gate = campaign.config.stop.md_stable
    if gate is None:
        return None
    measured = {k[len(MD_PREFIX):]: v for k, v in campaign.state.get("metrics", {}).items() if k.startswith(MD_PREFIX)}
    if "stable_fraction" not in measured:
        return False, "MD stability not measured"
    return stability_verdict(measured, gate)


def _gated(campaign: Campaign, target: str | None) -> str | None:
    """The stop reason when ``target`` (a met target, or None) stops the campaign: always without
    an ``md_stable`` gate; with one, only when the model passed it — and a gate without any
    target stops the campaign as soon as the model passes."""
    verdict = _md_verdict(campaign)
    if verdict is None:
        return target
    passed, text = verdict
    stop = campaign.config.stop
    has_target = any(t is not None for t in (stop.target_forces_mae, stop.target_energy_mae, stop.accurate_fraction))
    if passed and (target or not has_target):
        return f"{target}; {text}" if target else text
    if target:
        campaign.log(f"iteration {campaign.state['iteration']}: {target}, but {text}: continuing")
    return None


def _limit(campaign: Campaign, reason: str) -> str:
    """A limit stops the campaign whatever the gate says; the reason says what it said."""
    verdict = _md_verdict(campaign)
    return reason if verdict is None else f"{reason}; {verdict[1]}"


def _stop_after_training(campaign: Campaign, metrics: dict[str, float]) -> str | None:
    config, i = campaign.config, campaign.state["iteration"]
    reason = _gated(campaign, _error_target(campaign, metrics))
    if reason:
        return reason
    if i >= config.stop.max_iterations:
        return _limit(campaign, f"max_iterations ({config.stop.max_iterations}) reached")
    if campaign.labels_requested >= config.budget.total:
        return _limit(campaign, f"label budget used ({campaign.labels_requested} of {config.budget.total})")
    return None


def _stop_after_selection(campaign: Campaign, record: dict[str, Any]) -> str | None:
    target, counts = campaign.config.stop.accurate_fraction, record.get("counts", {})
    if target is not None and record["n_explored"] and "accurate" in counts:
        fraction = counts["accurate"] / record["n_explored"]
        if fraction >= target:
            reason = _gated(campaign, f"{fraction:.0%} of explored configurations are below the lower trust level "
                                      f"(target {target:.0%})")
            if reason:
                return reason
    if not record["keys"]:
        return _limit(campaign, "nothing left to label (no new candidate in the trust window)")
    return None


def _history_entry(campaign: Campaign, i: int) -> dict[str, Any]:
    folder = campaign.iter_dir(i)
    selection = _read(folder / "selection.json")
    stds = np.asarray(selection.get("stds", []), dtype=float)
    entry: dict[str, Any] = {
        "iteration": i, "train_labels": campaign.state.get("train_labels", 0),
        "labels": len(campaign.journal.with_status("ok")), "label_failures": len(campaign.journal.with_status("failed")),
        "selected": len(selection.get("keys", [])), "explored": selection.get("n_explored", 0),
        **{f"explored_{k}": v for k, v in selection.get("counts", {}).items()},
        "explored_unphysical": _count_frames(folder / "rejected.extxyz"),
        "lo": selection.get("lo"), "hi": selection.get("hi"), "calibration": selection.get("calibration"),
        "data_hash": campaign.state.get("train_data_hash", ""),
        **{f"std_{name}": float(f(stds)) for name, f in (("mean", np.mean), ("median", np.median), ("max", np.max))
           if stds.size},
        **campaign.state.get("metrics", {}),
        **{f"time_{phase}_s": seconds for phase, seconds in campaign.state.get("phase_times", {}).get(str(i), {}).items()},
    }
    return entry


def _count_frames(path: Path) -> int:
    """Frames in an extxyz file (0 if absent or empty)."""
    if not path.exists() or not path.stat().st_size:
        return 0
    from ase.io import read

    return len(read(path, index=":"))


def _read(path: Path) -> dict[str, Any]:
    return read_json(path, {})


def uncertainty_histogram(stds: list[float], lo: float | None, hi: float | None, path: Path) -> Path:
    """Histogram of the explored max force stds with the trust levels (PNG)."""
    fig, ax = pyplot().subplots(figsize=(5, 3.5))
    if stds:
        ax.hist(stds, bins=30, color="tab:blue", alpha=0.8)
    for level, name in ((lo, "lo"), (hi, "hi")):
        if level is not None:
            ax.axvline(level, color="tab:red", linestyle="--", label=f"{name} = {level:.3g}")
    ax.set_xlabel("max force std (eV/Å)")
    ax.set_ylabel("explored configurations")
    ax.legend() if lo is not None or hi is not None else None
    return save_figure(fig, path, dpi=100)


def learning_curve_plot(history: list[dict[str, Any]], path: Path) -> Path:
    """Forces and energy MAE (validation, and test if any) vs labels used to train (PNG)."""
    fig, axes = pyplot().subplots(1, 2, figsize=(9, 3.5))
    x = [h["train_labels"] for h in history]
    for ax, quantity, unit in ((axes[0], "forces", "meV/Å"), (axes[1], "energy", "meV/atom")):
        for prefix in ("best_valid", "test"):
            y = [h.get(f"{prefix}_{quantity}_mae", np.nan) for h in history]
            if np.isfinite(y).any():
                ax.plot(x, y, "o-", label=prefix.replace("best_", ""))
        ax.set_xlabel("labels")
        ax.set_ylabel(f"{quantity} MAE ({unit})")
        ax.legend()
    return save_figure(fig, path, dpi=100)


def _make_tracker(campaign: Campaign) -> Tracker:
    options = dict(campaign.config.tracking)
    spec = campaign.registry.get(PluginKind.TRACKER, options.pop("name", "mlflow"))
    options.setdefault("experiment", "atomforge-al")
    tracker = spec.factory(run_dir=campaign.dir, **options)
    previous = campaign.state.get("parent_run_id")
    campaign.state["parent_run_id"] = tracker.start(run_name=campaign.dir.name, resume_run_id=previous)
    nested = tracker.nested_options() if hasattr(tracker, "nested_options") else {}
    # the training jobs open their runs under this one (live curves, model, plots); see Campaign.iteration_tracking
    campaign.state["iteration_tracking"] = {"name": spec.name, **nested} if nested else None
    campaign.save_state()
    if previous is None:
        record = _config_record(campaign.config)
        tracker.log_dict(record, "campaign.yaml")
        from atomforge import flatten

        tracker.log_params(flatten(record))
    return tracker


def _config_record(config: CampaignConfig) -> dict[str, Any]:
    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return str(value) if isinstance(value, Path) else value

    return plain(asdict(config))


def _track_iteration(campaign: Campaign, tracker: Tracker, i: int) -> None:
    """One child run per iteration (created once, even across resumes)."""
    entry = _history_entry(campaign, i)
    if str(i) in campaign.state["child_runs"]:
        return
    folder = campaign.iter_dir(i)
    trained = _read(folder / "train" / "tracking.json").get("run_id")  # the run the training job logged into
    child = tracker.child(f"iteration-{i:03d}", run_id=trained) if trained else tracker.child(f"iteration-{i:03d}")
    if not trained and child.run_id is not None:  # the training job was not tracked (an older campaign, or a
        _log_training(child, folder / "train")       # tracker without nested_options): log what it would have
    child.log_params({k: entry[k] for k in ("lo", "hi", "calibration", "data_hash") if entry.get(k) is not None})
    child.log_metrics({k: float(v) for k, v in entry.items() if isinstance(v, (int, float)) and v is not None}, step=i)
    selection = _read(folder / "selection.json")
    if selection:
        child.log_artifact(uncertainty_histogram(selection.get("stds", []), entry["lo"], entry["hi"],
                                                 folder / "uncertainty.png"), "plots")
    for name in ("train.log", "train/metrics.json"):  # the training job's (rank-0) output
        if (folder / name).exists():
            child.log_artifact(folder / name, "training")
    for name in ("stability_time.png", "rdf.png", "stability.json"):  # the md_stable suite's (docs/stability.md)
        if (folder / "stability" / name).exists():
            child.log_artifact(folder / "stability" / name, "stability")
    child.end("FINISHED")
    tracker.log_metrics({"labels": entry["labels"], **{k: v for k, v in entry.items()
                                                       if k.endswith("_mae") or k.startswith(MD_PREFIX)}}, step=i)
    campaign.state["child_runs"][str(i)] = child.run_id
    campaign.state["history"].append(entry)


def _log_training(child: Tracker, run_dir: Path) -> None:
    """Afterwards, what a tracked training job logs itself: per-epoch metrics (from the
    checkpoint's history), the learning curve, the parity plots and the model."""
    from atomforge import EpochRecord, TrackerCallback, has_checkpoint, read_training_state

    if has_checkpoint(run_dir):
        callback = TrackerCallback(child)
        for row in read_training_state(run_dir)["history"]:
            callback.on_epoch_end(None, EpochRecord(**row))
    for name in ("learning_curve.png", "parity_valid.png", "parity_test.png"):
        if (run_dir / name).exists():
            child.log_artifact(run_dir / name, "plots")
    if (run_dir / "model.pt").exists():
        child.log_artifact(run_dir / "model.pt")
        if hasattr(child, "log_model"):
            child.log_model(run_dir / "model.pt")


def _finish(campaign: Campaign, tracker: Tracker, reason: str) -> None:
    i = campaign.state["iteration"]
    campaign.state.update(stopped_because=reason, phase="done", final_iteration=i)
    _track_iteration(campaign, tracker, i)
    history = campaign.state["history"]
    tracker.log_artifact(learning_curve_plot(history, campaign.dir / "learning_curve.png"), "plots")
    tracker.log_dict({"history": history, "stopped_because": reason}, "history.json")
    campaign.save_state()
    campaign.log(f"campaign finished: {reason}")


def _phase_train(campaign: Campaign, tracker: Tracker) -> None:
    campaign.state["train_labels"] = len(campaign.journal.with_status("ok"))
    campaign.state["train_data_hash"] = campaign.data_hash()
    with campaign.timed("train"):
        metrics = campaign.train_model(campaign.state["iteration"])
    campaign.state["metrics"] = metrics
    if campaign.config.stop.md_stable is not None:  # the gate measures the model before any stop decision
        campaign.state["phase"] = "stability"
        return None
    reason = _stop_after_training(campaign, metrics)
    if reason:
        return _finish(campaign, tracker, reason)
    campaign.state["phase"] = "explore"


def _phase_stability(campaign: Campaign, tracker: Tracker) -> None:
    """The ``stop.md_stable`` suite on the iteration's model; its metrics join the iteration's."""
    i, gate = campaign.state["iteration"], campaign.config.stop.md_stable
    if gate is not None:  # (a resumed campaign whose file no longer has the gate goes straight on)
        with campaign.timed("stability"):
            measured = _stability(campaign, i)
        campaign.state["metrics"] = {**campaign.state["metrics"], **{f"{MD_PREFIX}{k}": v for k, v in measured.items()}}
        campaign.log(f"iteration {i}: {stability_verdict(measured, gate)[1]}")
    reason = _stop_after_training(campaign, campaign.state["metrics"])
    if reason:
        return _finish(campaign, tracker, reason)
    campaign.state["phase"] = "explore"


def _stability(campaign: Campaign, i: int) -> dict[str, float]:
    """The suite's metrics for model ``i``: from ``iterations/NNN/stability/stability.json`` when
    a driver already ran it (written last, atomically), else run now. Starts default to the
    campaign's initial data; generated reference MD is cached once for all iterations."""
    folder = campaign.iter_dir(i) / "stability"
    done = _read(folder / "stability.json").get("metrics")
    if done:
        return done
    gate = campaign.config.stop.md_stable
    if gate.starts is None:
        from ase.io import read

        gate = replace(gate, starts=tuple(read(campaign.dir / "initial.extxyz", index=":")))
    campaign.log(f"iteration {i}: MD-stability suite ({', '.join(f'{t:g}' for t in gate.temperatures)} K, "
                 f"{gate.n_starts} start(s), {gate.steps} steps)")
    return run_stability_suite(campaign.model_path(i), gate, out_dir=folder, registry=campaign.registry,
                               head=campaign.config.train.get("head"),
                               reference_dir=campaign.dir / "stability-reference",
                               progress=lambda message: campaign.log(message, quiet=True))


def _phase_explore(campaign: Campaign, tracker: Tracker) -> None:
    with campaign.timed("explore"):
        campaign.explore(campaign.state["iteration"])
    campaign.state["phase"] = "select"


def _phase_select(campaign: Campaign, tracker: Tracker) -> None:
    with campaign.timed("select"):
        record = campaign.select(campaign.state["iteration"])
    campaign.log(f"iteration {campaign.state['iteration']}: explored {record['n_explored']}, "
                 f"classes {record['counts']}, selected {len(record['keys'])}")
    reason = _stop_after_selection(campaign, record)
    if reason:
        return _finish(campaign, tracker, reason)
    campaign.state["phase"] = "label"


def _phase_label(campaign: Campaign, tracker: Tracker) -> None:
    i = campaign.state["iteration"]
    with campaign.timed("label"):
        results = campaign.label(i)
    entries = [e for e in campaign.journal.entries.values() if e.iteration == i]
    if results and entries and not any(e.status == "ok" for e in entries):
        _halt(campaign, i, entries)
    campaign.state["phase"] = "track"


def _halt(campaign: Campaign, i: int, entries: list[Any]) -> None:
    """Stop the campaign: every label iteration ``i`` requested failed (the oracle looks broken)."""
    reasons = Counter(e.reason for e in entries).most_common(3)
    summary = "; ".join(f"{n} × {reason}" for reason, n in reasons)
    reason = (f"every label requested in iteration {i} failed ({len(entries)} of {len(entries)}): {summary}")
    campaign.state["halted"] = reason
    campaign.save_state()
    campaign.log(f"campaign halted: {reason}", warning=True)
    raise LabellingHalted(
        f"{reason}. The oracle looks broken, so the campaign stops here instead of training on nothing new. "
        "These structures are journalled as failed and are not requested again; fix the oracle and re-run "
        "`atomforge al run`: it probes the oracle again, then continues with the next iteration.")


def _phase_track(campaign: Campaign, tracker: Tracker) -> None:
    _track_iteration(campaign, tracker, campaign.state["iteration"])
    campaign.state.update(iteration=campaign.state["iteration"] + 1, phase="train")


PHASES: dict[str, Callable[[Campaign, Tracker], None]] = {
    "train": _phase_train, "stability": _phase_stability, "explore": _phase_explore, "select": _phase_select,
    "label": _phase_label, "track": _phase_track,
}


def run_campaign(config: CampaignConfig, registry: Registry, *, executor: Executor | None = None,
                 verbose: bool = True) -> CampaignResult:
    """Run (or resume) the campaign in ``config.output`` until a stop criterion holds.

    Holds the campaign lock throughout (another driver of the directory raises
    :class:`~._lock.CampaignLocked` naming the holder) and probes the oracle before the first
    phase (:class:`~._campaign.OracleProbeFailed`); an iteration whose every label failed raises
    :class:`~._campaign.LabellingHalted`."""
    campaign = Campaign(config, registry, executor=executor, verbose=verbose)
    try:
        campaign.prepare()
        (campaign.dir / "campaign.yaml").write_text(yaml.safe_dump(_config_record(config), sort_keys=False))
        if campaign.state["phase"] != "done":
            campaign.probe_oracle()
        tracker = _make_tracker(campaign)
        try:
            while campaign.state["phase"] != "done":
                PHASES[campaign.state["phase"]](campaign, tracker)
                campaign.save_state()
        except BaseException as error:
            tracker.end("KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
            raise
        tracker.end("FINISHED")
    except BaseException as error:
        campaign.log(f"driver stopped: {type(error).__name__}: {error}".splitlines()[0], quiet=True)
        campaign.close(error=True)
        raise
    campaign.log(f"driver finished: {campaign.state['stopped_because']}", quiet=True)
    campaign.close()
    final = campaign.state["final_iteration"]
    return CampaignResult(campaign.dir, final, len(campaign.journal.with_status("ok")),
                          campaign.state["stopped_because"], campaign.model_path(final))
