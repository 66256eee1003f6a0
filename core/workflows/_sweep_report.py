"""A sweep's report (docs/sweep.md): scaling fits, plots and tables, made from the tracker's store.

The points are read back from the MLflow store — the child runs of the sweep's parent run that
carry ``sweep.done`` — so the report can be regenerated from the store alone
(``atomforge sweep CONFIG --report-only``), without the sweep folder's files. With a tracker that
has no store (``tracking: none``) the points' ``result.json`` files are read instead.

What it makes, in ``<output>/report/`` and logged to the parent run under ``report/``:

- ``points.csv``: every point with its axes, parameters, compute and the fitted error;
- ``report.json``, ``exponents.md``, ``exponents.csv``: the power laws ``L = a·x^(−α) + c`` in data
  (per model, budget and initialisation), in parameters (per data size, budget and
  initialisation) and along the compute frontier (per initialisation), with their intervals;
- ``scaling_data.png``, ``scaling_params.png``, ``compute_frontier.png``: log–log plots with each
  fit and its band;
- ``finetune.md``: the error of each initialisation relative to ``scratch`` at equal data, model
  and budget (when the sweep has an init axis);
- with MD stability measured, the Spearman rank correlation between the fitted error and the
  mean stable time across points.
"""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .._errors import ConfigError
from .._io import read_json, write_json_atomic, write_text_atomic
from .._specs import PluginKind
from ..analysis.scaling import PowerLawFit, compute_frontier, fit_power_law, plot_scaling
from ..registry import Registry

__all__ = ["make_report", "scaling_report", "points_from_store", "metric_key"]

REPORT_DIR = "report"
_AXES = ("size", "model", "budget", "init", "seed")
_NUMBERS = ("n_train", "params", "epochs", "train_s", "samples_seen", "params_x_samples")
STABLE_TIME = "stability_stable_time_ps_mean"


def make_report(config: Any, registry: Registry, *, tracker: Any = None,
                fallback: Sequence[Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Read the points (store, else files), fit, plot, write ``report/`` and log it to the
    parent run (``tracker``, or the parent reopened from the store when None)."""
    reopened = tracker is None
    if reopened:
        tracker = _reopen_parent(config, registry)
    uri = getattr(tracker, "uri", None) if tracker is not None else None
    if uri is not None and getattr(tracker, "run_id", None):
        points = points_from_store(uri, tracker.run_id)
    elif fallback is not None:
        points = list(fallback)
    else:
        points = _points_from_files(config.output)
    out = config.output / REPORT_DIR
    report = scaling_report(points, config.fits, list(config.data.test), out)
    report["source"] = "mlflow" if uri is not None else "files"
    if tracker is not None:
        _log_report(tracker, report, out)
        if reopened:
            tracker.end("FINISHED")
    return report


def _reopen_parent(config: Any, registry: Registry) -> Any:
    """The sweep's parent run (``sweep.json``'s id, else the newest run tagged with the sweep's
    name in the experiment); None for a tracker without a store."""
    options = {k: v for k, v in config.tracking.items() if k != "name"}
    tracker = registry.get(PluginKind.TRACKER, config.tracking["name"]).factory(run_dir=config.output, **options)
    uri = getattr(tracker, "uri", None)
    if uri is None:
        return None
    state = read_json(config.output / "sweep.json") or {}
    run_id = state.get("parent_run_id") if state.get("tracking_uri") in (None, uri) else None
    run_id = run_id or _find_parent(uri, options.get("experiment", "atomforge-sweep"), config.name)
    if run_id is None:
        raise ConfigError(f"--report-only: no sweep named {config.name!r} in the MLflow store {uri} (experiment "
                          f"{options.get('experiment')!r}); run the sweep first, or set tracking to its store")
    tracker.start(run_name=config.name, resume_run_id=run_id)
    return tracker


def _client(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _find_parent(uri: str, experiment: str, name: str) -> str | None:
    client = _client(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs([found.experiment_id], filter_string=f"tags.`atomforge.sweep` = '{name}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def points_from_store(uri: str, parent_run_id: str) -> list[dict[str, Any]]:
    """The done points of a sweep, read from the child runs of its parent run in an MLflow
    store (the newest run of each point key wins: a point re-run after a kill)."""
    client = _client(uri)
    parent = client.get_run(parent_run_id)
    query = f"tags.`mlflow.parentRunId` = '{parent_run_id}' and tags.`sweep.done` = 'true'"
    runs, token = [], None
    while True:
        page = client.search_runs([parent.info.experiment_id], filter_string=query, max_results=1000,
                                  page_token=token, order_by=["attributes.start_time ASC"])
        runs.extend(page)
        token = page.token
        if not token:
            break
    points: dict[str, dict[str, Any]] = {}
    for run in runs:
        tags, metrics = run.data.tags, run.data.metrics
        point = {"key": tags["sweep.key"], **{k: tags[f"sweep.{k}"] for k in _AXES},
                 "family": tags.get("sweep.family", ""),
                 **{k: metrics.get(f"sweep_{k}", math.nan) for k in _NUMBERS}, "run_id": run.info.run_id,
                 "stopped_because": tags.get("sweep.stopped_because"),
                 "metrics": {k: v for k, v in metrics.items() if not k.startswith("sweep_")}}
        point["size"], point["seed"] = int(point["size"]), int(point["seed"])
        points[point["key"]] = point
    return list(points.values())


def _points_from_files(output: Path) -> list[dict[str, Any]]:
    return [read_json(path) for path in sorted((output / "points").glob("*/result.json"))]


def metric_key(fits: Any, tests: Sequence[str]) -> str:
    """The metric a sweep's fits use: ``test_<set>_<metric>`` (``best_valid_<metric>`` without test sets)."""
    test = fits.test or (tests[0] if tests else None)
    return f"test_{test}_{fits.metric}" if test else f"best_valid_{fits.metric}"


# -- the report itself (pure: points in, files and numbers out) ------------------------------------
def scaling_report(points: Sequence[Mapping[str, Any]], fits: Any, tests: Sequence[str], out: Path) -> dict[str, Any]:
    """Fits, tables and plots of ``points`` into ``out``; returns the report (also ``report.json``)."""
    out.mkdir(parents=True, exist_ok=True)
    key = metric_key(fits, tests)
    usable = [p for p in points if _finite(p.get("metrics", {}).get(key))]
    compute = fits.compute
    scalings = {
        "data": _group_fits(usable, key, "n_train", ("model", "budget", "init"), fits),
        "params": _group_fits(usable, key, "params", ("family", "size", "budget", "init"), fits),
        "compute": _frontier_fits(usable, key, compute, fits),
    }
    report: dict[str, Any] = {"metric": key, "compute": compute, "points": len(points), "fitted_points": len(usable),
                              "fits": [f for rows in scalings.values() for f in rows if "alpha" in f],
                              "skipped": [f for rows in scalings.values() for f in rows if "alpha" not in f],
                              "finetune": _finetune_table(usable, key), "stability": _stability(usable, key)}
    report["files"] = _write(out, points, report, scalings, key, compute)
    write_json_atomic(out / "report.json", report)
    return report


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def _group_fits(points: Sequence[Mapping[str, Any]], key: str, x_name: str, by: Sequence[str],
                fits: Any) -> list[dict[str, Any]]:
    """One fit of ``metric(x)`` per group of points sharing the axes ``by``."""
    groups: dict[tuple, list[Mapping[str, Any]]] = defaultdict(list)
    for point in points:
        groups[tuple(point[a] for a in by)].append(point)
    rows = []
    for values, members in sorted(groups.items(), key=lambda item: tuple(map(str, item[0]))):
        label = "/".join(str(v) for v in values)
        x = np.array([float(p[x_name]) for p in members])
        y = np.array([float(p["metrics"][key]) for p in members])
        rows.append(_fit_row(x_name, label, dict(zip(by, values)), x, y, fits))
    return rows


def _fit_row(kind: str, label: str, group: Mapping[str, Any], x: np.ndarray, y: np.ndarray, fits: Any) -> dict[str, Any]:
    row: dict[str, Any] = {"scaling": {"n_train": "data", "params": "params"}.get(kind, "compute"), "x": kind,
                           "group": label, **{f"group.{k}": v for k, v in group.items()},
                           "x_values": x.tolist(), "y_values": y.tolist()}
    try:
        fit = fit_power_law(x, y, bootstrap=fits.bootstrap, confidence=fits.confidence, irreducible=fits.irreducible,
                            rng=0)
    except ValueError as error:
        row["reason"] = str(error)
        return row
    row.update(fit.to_dict())
    row["_fit"] = fit  # for the plots; dropped before writing
    row["decades"] = float(np.log10(x.max() / x.min()))
    return row


def _frontier_fits(points: Sequence[Mapping[str, Any]], key: str, compute: str, fits: Any) -> list[dict[str, Any]]:
    """Per model family (default: backbone) and initialisation: the Pareto frontier of error
    against compute, and a power law along it."""
    rows = []
    by_init: dict[tuple[str, str], list[Mapping[str, Any]]] = defaultdict(list)
    for point in points:
        by_init[(str(point.get("family", "")), str(point["init"]))].append(point)
    for (family, init), members in sorted(by_init.items()):
        x = np.array([float(p[compute]) for p in members])
        y = np.array([float(p["metrics"][key]) for p in members])
        keep = np.isfinite(x) & (x > 0)
        chosen = compute_frontier(x[keep], y[keep])
        row = _fit_row(compute, f"{family}/{init}", {"family": family, "init": init}, x[keep][chosen],
                       y[keep][chosen], fits)
        row["frontier"] = [members[i]["key"] for i in np.flatnonzero(keep)[chosen]]
        row["all_x"], row["all_y"] = x[keep].tolist(), y[keep].tolist()
        rows.append(row)
    return rows


def _finetune_table(points: Sequence[Mapping[str, Any]], key: str) -> list[dict[str, Any]]:
    """Mean error over seeds per (size, model, budget, init), and its ratio to ``scratch``."""
    means: dict[tuple, list[float]] = defaultdict(list)
    for p in points:
        means[(p["size"], p["model"], p["budget"], p["init"])].append(float(p["metrics"][key]))
    inits = sorted({k[3] for k in means})
    if len(inits) < 2:
        return []
    rows = []
    for size, model, budget, init in sorted(means, key=lambda k: (int(k[0]), str(k[1]), str(k[2]), str(k[3]))):
        mean = float(np.mean(means[(size, model, budget, init)]))
        scratch = means.get((size, model, budget, "scratch"))
        rows.append({"size": size, "model": model, "budget": budget, "init": init, "seeds": len(means[(size, model, budget, init)]),
                     "error": mean, "ratio_to_scratch": mean / float(np.mean(scratch)) if scratch else None})
    return rows


def _stability(points: Sequence[Mapping[str, Any]], key: str) -> dict[str, Any] | None:
    """Spearman ρ (and p) between the fitted error and the mean stable MD time across points."""
    pairs = [(p["metrics"][key], p["metrics"][STABLE_TIME]) for p in points
             if isinstance(p["metrics"].get(STABLE_TIME), (int, float)) and math.isfinite(p["metrics"][STABLE_TIME])]
    if not pairs:
        return None
    out: dict[str, Any] = {"points": len(pairs), "error": key, "stable_time": STABLE_TIME}
    errors, times = np.array(pairs, dtype=float).T
    if len(pairs) < 3 or np.ptp(errors) == 0 or np.ptp(times) == 0:
        return {**out, "spearman_rho": None, "p_value": None, "note": "needs ≥ 3 points that differ"}
    from scipy.stats import spearmanr

    result = spearmanr(errors, times)
    return {**out, "spearman_rho": float(result.statistic), "p_value": float(result.pvalue)}


# -- files and plots --------------------------------------------------------------------------------
_LABELS = {"n_train": "training structures N", "params": "parameters P",
           "params_x_samples": "compute C = parameters × structures seen", "samples": "structures seen",
           "samples_seen": "structures seen", "train_s": "training time (s)"}


def _write(out: Path, points: Sequence[Mapping[str, Any]], report: dict[str, Any],
           scalings: Mapping[str, list[dict[str, Any]]], key: str, compute: str) -> list[str]:
    compute = "samples_seen" if compute == "samples" else compute
    files = [_points_csv(out / "points.csv", points, key)]
    family_of = {p["model"]: str(p.get("family", "")) for p in points}
    for name, x_label in (("data", "n_train"), ("params", "params")):
        panels: dict[str, dict[str, Any]] = defaultdict(dict)  # one panel per model family
        for row in scalings[name]:
            family = family_of.get(row.get("group.model"), "") if name == "data" else str(row.get("group.family", ""))
            panels[family][row["group"]] = (row["x_values"], row["y_values"], row.get("_fit"))
        files.append(plot_scaling(dict(sorted(panels.items())), out / f"scaling_{name}.png", xlabel=_LABELS[x_label],
                                  ylabel=key, title="data" if name == "data" else "parameters"))
    files.append(_frontier_plot(out / "compute_frontier.png", scalings["compute"], key, compute))
    rows = [r for rows in scalings.values() for r in rows]
    for row in rows:
        row.pop("_fit", None)
    files += _exponent_tables(out, rows, key)
    if report["finetune"]:
        files.append(write_text_atomic(out / "finetune.md", _finetune_markdown(report["finetune"], key)))
    return [str(Path(f).name) for f in files]


def _frontier_plot(path: Path, rows: Sequence[Mapping[str, Any]], key: str, compute: str) -> Path:
    from ..analysis.plots import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for k, row in enumerate(rows):
        color = f"C{k % 10}"
        ax.scatter(row["all_x"], row["all_y"], color=color, s=10, alpha=0.35)
        fit: PowerLawFit | None = row.get("_fit")
        text = f"{row['group']} frontier"
        if fit is not None:
            grid = np.geomspace(min(row["x_values"]), max(row["x_values"]), 64)
            lo, hi = fit.band(grid)
            ax.fill_between(grid, lo, hi, color=color, alpha=0.18, lw=0)
            ax.plot(grid, fit.predict(grid), color=color, lw=1.5)
            text += f": α={fit.alpha:.2f}"
        ax.plot(row["x_values"], row["y_values"], "o--", color=color, ms=5, lw=0.8, label=text)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(_LABELS.get(compute, compute))
    ax.set_ylabel(key)
    ax.set_title("compute frontier (Pareto: no cheaper point is better)")
    ax.grid(True, which="both", alpha=0.25)
    if rows:
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def _points_csv(path: Path, points: Sequence[Mapping[str, Any]], key: str) -> Path:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    extra = sorted({k for p in points for k in p.get("metrics", {}) if k.startswith(("test_", "best_valid_", "stability_"))})
    writer.writerow(["key", *_AXES, "family", *_NUMBERS, *extra])
    for p in sorted(points, key=lambda p: p["key"]):
        writer.writerow([p["key"], *(p[a] for a in _AXES), p.get("family", ""), *(p.get(n) for n in _NUMBERS),
                         *(p.get("metrics", {}).get(k) for k in extra)])
    return write_text_atomic(path, buffer.getvalue())


def _ci(row: Mapping[str, Any], name: str) -> str:
    lo, hi = row.get(f"{name}_ci") or (None, None)
    value = row[name]
    return f"{value:.3g}" if lo is None else f"{value:.3g} [{lo:.3g}, {hi:.3g}]"


def _exponent_tables(out: Path, rows: Sequence[Mapping[str, Any]], key: str) -> list[Path]:
    fitted = [r for r in rows if "alpha" in r]
    confidence = f"{fitted[0]['confidence']:.0%}" if fitted else ""
    lines = [f"# Scaling exponents of {key}", "",
             f"L(x) = a·x^(−α) + c; [{confidence} bootstrap interval] over seeds (repeats of an x) or residuals; "
             "none: as many points as parameters", "",
             "| scaling | x | group | α | c | a | points | decades | bootstrap | rms log residual |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in fitted:
        lines.append(f"| {r['scaling']} | {r['x']} | {r['group']} | {_ci(r, 'alpha')} | {_ci(r, 'c')} | {r['a']:.3g} "
                     f"| {r['n_points']} ({r['n_x']} x) | {r['decades']:.2f} | {r['method']} | {r['rms_log_residual']:.3f} |")
    for r in rows:
        if "alpha" not in r:
            lines.append(f"| {r['scaling']} | {r['x']} | {r['group']} | — | — | — | {len(r['x_values'])} | — | — | "
                         f"not fitted: {r['reason']} |")
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    columns = ["scaling", "x", "group", "alpha", "alpha_lo", "alpha_hi", "c", "c_lo", "c_hi", "a", "a_lo", "a_hi",
               "n_points", "n_x", "decades", "method", "rms_log_residual"]
    writer.writerow(columns)
    for r in fitted:
        writer.writerow([r["scaling"], r["x"], r["group"], r["alpha"], *r["alpha_ci"], r["c"], *r["c_ci"], r["a"],
                         *r["a_ci"], r["n_points"], r["n_x"], r["decades"], r["method"], r["rms_log_residual"]])
    return [write_text_atomic(out / "exponents.md", "\n".join(lines) + "\n"),
            write_text_atomic(out / "exponents.csv", buffer.getvalue())]


def _finetune_markdown(rows: Sequence[Mapping[str, Any]], key: str) -> str:
    lines = [f"# {key} by initialisation (mean over seeds; ratio to scratch)", "",
             "| size | model | budget | init | seeds | error | ratio to scratch |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = "—" if r["ratio_to_scratch"] is None else f"{r['ratio_to_scratch']:.2f}"
        lines.append(f"| {r['size']} | {r['model']} | {r['budget']} | {r['init']} | {r['seeds']} | {r['error']:.4g} | {ratio} |")
    return "\n".join(lines) + "\n"


def _log_report(tracker: Any, report: Mapping[str, Any], out: Path) -> None:
    """The report's files as the parent run's artifacts (``report/``), the exponents as metrics."""
    for name in (*report["files"], "report.json"):
        tracker.log_artifact(out / name, REPORT_DIR)
    metrics = {}
    for row in report["fits"]:
        name = f"alpha_{row['scaling']}/{row['group']}"
        metrics[name] = row["alpha"]
        metrics[name.replace("alpha_", "c_", 1)] = row["c"]
    stability = report.get("stability") or {}
    if stability.get("spearman_rho") is not None:
        metrics["stability_spearman_rho"] = stability["spearman_rho"]
    if metrics:
        tracker.log_metrics(metrics)
