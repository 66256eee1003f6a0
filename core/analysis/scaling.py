"""Scaling laws: power-law fits with bootstrap confidence intervals, the compute frontier, plots.

A scaling sweep (``atomforge sweep``, docs/sweep.md) measures an error ``L`` (e.g. the test force
MAE) against a resource ``x`` — training structures ``N``, parameters ``P`` or training compute
``C`` — and summarises it by

    L(x) = a · x^(−α) + c

where ``α`` is the scaling exponent and ``c`` the error no amount of ``x`` removes (label noise,
a model family's floor). The fit is done on ``log L`` (every point weighs by its *relative*
error, so a curve spanning two decades of error is not fitted to its largest values only), with
``c`` in ``[0, min L]``.

Confidence intervals come from a bootstrap:

- **over seeds** when some ``x`` was measured more than once (several training seeds): each
  bootstrap sample draws, at every ``x``, that many values from its own repeats with
  replacement, and refits; the spread is what the seeds' scatter allows;
- **over residuals** when every ``x`` was measured once: the fitted curve times resampled
  multiplicative residuals (the log-space residuals), refitted.

The interval of each parameter is the central ``confidence`` percentile interval of its bootstrap
values; :meth:`PowerLawFit.band` gives the same band around the curve itself (what the plots
shade).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .plots import pyplot, save_figure

__all__ = ["PowerLawFit", "fit_power_law", "compute_frontier", "plot_scaling"]

_MAX_ALPHA = 6.0  # exponents beyond this are not a scaling law any more (and would overflow x^-α)


@dataclass(frozen=True)
class PowerLawFit:
    """``L(x) = a·x^(−alpha) + c`` fitted to measured points, with bootstrap intervals."""

    a: float  # prefactor (in the units of L, for x in its own units)
    alpha: float  # the exponent: L − c falls as x^(−alpha)
    c: float  # the irreducible error (0 when fitted without one)
    a_ci: tuple[float, float]  # central `confidence` interval of a (nan when no bootstrap was possible)
    alpha_ci: tuple[float, float]
    c_ci: tuple[float, float]
    confidence: float  # e.g. 0.95
    n_points: int  # measurements used (all seeds)
    n_x: int  # distinct x values
    method: str  # bootstrap over "seeds" | "residuals" | "none" (as many points as parameters)
    rms_log_residual: float  # root mean square of log(L) − log(fit): 0.1 ≈ 10 % scatter
    samples: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)), repr=False, compare=False)  # [B, 3] (a, alpha, c)

    def predict(self, x: Any) -> np.ndarray:
        """The fitted curve at ``x``."""
        return _curve(np.asarray(x, dtype=float), self.a, self.alpha, self.c)

    def band(self, x: Any) -> tuple[np.ndarray, np.ndarray]:
        """Pointwise central ``confidence`` band of the curve at ``x`` (the curve itself, twice,
        when there are no bootstrap samples)."""
        x = np.asarray(x, dtype=float)
        if len(self.samples) == 0:
            return self.predict(x), self.predict(x)
        curves = np.stack([_curve(x, *row) for row in self.samples])
        tail = 50 * (1 - self.confidence)
        return np.percentile(curves, tail, axis=0), np.percentile(curves, 100 - tail, axis=0)

    def to_dict(self) -> dict[str, Any]:
        """Plain numbers (JSON): the parameters, their intervals (``null`` without a bootstrap)
        and the fit's size (no samples)."""
        ci = lambda pair: [None if math.isnan(v) else v for v in pair]  # noqa: E731 - strict JSON has no NaN
        return {"a": self.a, "alpha": self.alpha, "c": self.c, "a_ci": ci(self.a_ci),
                "alpha_ci": ci(self.alpha_ci), "c_ci": ci(self.c_ci), "confidence": self.confidence,
                "n_points": self.n_points, "n_x": self.n_x, "method": self.method,
                "rms_log_residual": self.rms_log_residual}


def _curve(x: np.ndarray, a: float, alpha: float, c: float) -> np.ndarray:
    return a * np.power(x, -alpha) + c


def _least_squares(x: np.ndarray, y: np.ndarray, start: np.ndarray, irreducible: bool) -> tuple[np.ndarray, float]:
    """Fit ``(log A, alpha, c)`` of ``A·x^-alpha + c`` (x already scaled to ~1) on log y."""
    from scipy.optimize import least_squares

    log_y = np.log(y)
    c_max = float(y.min()) * (1 - 1e-9)

    def residuals(p: np.ndarray) -> np.ndarray:
        c = p[2] if irreducible else 0.0
        return np.log(np.exp(p[0]) * np.power(x, -p[1]) + c) - log_y

    lower, upper = [-np.inf, 0.0, 0.0], [np.inf, _MAX_ALPHA, max(c_max, 1e-300)]
    p0 = np.clip(np.asarray(start, float), [-1e300, 0.0, 0.0], [1e300, _MAX_ALPHA, upper[2] * (1 - 1e-6)])
    if not irreducible:
        p0, lower, upper = p0[:2], lower[:2], upper[:2]
        result = least_squares(lambda p: residuals(np.append(p, 0.0)), p0, bounds=(lower, upper), method="trf")
        return np.append(result.x, 0.0), float(result.cost)
    result = least_squares(residuals, p0, bounds=(lower, upper), method="trf")
    return result.x, float(result.cost)


def _starts(x: np.ndarray, y: np.ndarray, irreducible: bool) -> list[np.ndarray]:
    """Starting points: a straight line in log–log through ``y − c0`` for a few offsets ``c0``."""
    starts = []
    for share in ((0.0, 0.5, 0.9) if irreducible else (0.0,)):
        c0 = share * float(y.min())
        slope, intercept = np.polyfit(np.log(x), np.log(y - c0), 1)
        starts.append(np.array([intercept, float(np.clip(-slope, 0.01, _MAX_ALPHA - 0.01)), c0]))
    return starts


def _fit(x: np.ndarray, y: np.ndarray, irreducible: bool, start: np.ndarray | None = None) -> np.ndarray:
    """Best ``(log A, alpha, c)`` over the starting points (or from ``start``)."""
    best, best_cost = None, math.inf
    for p0 in ([start] if start is not None else _starts(x, y, irreducible)):
        params, cost = _least_squares(x, y, p0, irreducible)
        if cost < best_cost:
            best, best_cost = params, cost
    return best  # type: ignore[return-value]


def _check_points(x: np.ndarray, y: np.ndarray, n_params: int) -> None:
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"fit_power_law: x and y must be 1-D and of equal length; got shapes {x.shape} and {y.shape}")
    bad = ~(np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0))
    if bad.any():
        raise ValueError(f"fit_power_law: x and y must be finite and > 0 (a log–log fit); {int(bad.sum())} point(s) "
                         f"are not, e.g. x={x[bad][0]!r}, y={y[bad][0]!r}")
    if len(np.unique(x)) < n_params:
        kind = "with an offset c" if n_params == 3 else "without an offset"
        raise ValueError(f"fit_power_law: a power law {kind} needs ≥ {n_params} distinct x values; got "
                         f"{len(np.unique(x))} ({sorted(set(x.tolist()))})")


def fit_power_law(x: Sequence[float], y: Sequence[float], *, bootstrap: int = 1000, confidence: float = 0.95,
                  irreducible: bool = True, rng: np.random.Generator | int | None = 0) -> PowerLawFit:
    """Fit ``y = a·x^(−alpha) + c`` (``c = 0`` with ``irreducible=False``) to the points
    ``(x, y)``, repeats of an ``x`` being seeds, with ``bootstrap`` resamples for the intervals
    (module docstring). Needs ≥ 3 distinct ``x`` (2 without the offset); intervals need more
    points than parameters.
    Raises ``ValueError`` for non-positive or non-finite values."""
    x, y = np.asarray(x, dtype=float).ravel(), np.asarray(y, dtype=float).ravel()
    n_params = 3 if irreducible else 2
    _check_points(x, y, n_params)
    if not 0 < confidence < 1:
        raise ValueError(f"fit_power_law: confidence must be in (0, 1); got {confidence}")
    scale = float(np.exp(np.log(x).mean()))  # x / its geometric mean: a well-conditioned fit
    xs = x / scale
    best = _fit(xs, y, irreducible)
    residual = np.log(y) - np.log(_curve(xs, math.exp(best[0]), best[1], best[2]))
    generator = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    method = "none" if len(x) <= n_params or bootstrap <= 0 else (
        "seeds" if len(np.unique(x)) < len(x) else "residuals")
    samples = _bootstrap(xs, y, best, residual, method, bootstrap, irreducible, generator)
    to_physical = lambda p: (math.exp(p[0]) * scale ** p[1], p[1], p[2])  # noqa: E731  A (x/s)^-α = (A s^α) x^-α
    physical = np.array([to_physical(p) for p in samples]) if len(samples) else np.zeros((0, 3))
    a, alpha, c = to_physical(best)
    cis = [_interval(physical[:, k], confidence) for k in range(3)]
    return PowerLawFit(a=float(a), alpha=float(alpha), c=float(c), a_ci=cis[0], alpha_ci=cis[1], c_ci=cis[2],
                       confidence=confidence, n_points=len(x), n_x=len(np.unique(x)), method=method,
                       rms_log_residual=float(np.sqrt(np.mean(residual ** 2))), samples=physical)


def _bootstrap(xs: np.ndarray, y: np.ndarray, best: np.ndarray, residual: np.ndarray, method: str, count: int,
               irreducible: bool, rng: np.random.Generator) -> np.ndarray:
    """``count`` refits on resampled data (``method`` seeds | residuals), started at ``best``."""
    if method == "none":
        return np.zeros((0, 3))
    groups = [np.flatnonzero(xs == value) for value in np.unique(xs)]
    fitted = _curve(xs, math.exp(best[0]), best[1], best[2])
    out = []
    for _ in range(count):
        if method == "seeds":
            picks = np.concatenate([rng.choice(g, size=len(g), replace=True) for g in groups])
            xb, yb = xs[picks], y[picks]
        else:
            xb, yb = xs, fitted * np.exp(rng.choice(residual, size=len(residual), replace=True))
        out.append(_fit(xb, yb, irreducible, start=best))
    return np.array(out)


def _interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    if len(values) == 0:
        return (math.nan, math.nan)
    tail = 50 * (1 - confidence)
    return (float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail)))


def compute_frontier(x: Sequence[float], y: Sequence[float]) -> np.ndarray:
    """Indices of the Pareto frontier of error ``y`` against cost ``x`` (both smaller is better),
    in order of increasing ``x``: the points no cheaper-or-equal point beats. The compute
    frontier of a sweep is this over every (data size, model, budget) point."""
    x, y = np.asarray(x, dtype=float).ravel(), np.asarray(y, dtype=float).ravel()
    if x.shape != y.shape:
        raise ValueError(f"compute_frontier: x and y differ in length ({len(x)} vs {len(y)})")
    order = np.lexsort((y, x))  # by cost, then error
    frontier, best = [], math.inf
    for index in order:
        if np.isfinite(y[index]) and y[index] < best:
            frontier.append(int(index))
            best = float(y[index])
    return np.array(frontier, dtype=np.int64)


Series = Mapping[str, tuple[Sequence[float], Sequence[float], "PowerLawFit | None"]]  # label → (x, y, fit or None)


def plot_scaling(series: Series | Mapping[str, Series], path: Path | str, *, xlabel: str, ylabel: str,
                 title: str = "") -> Path:
    """Log–log plot of each series' points (every seed), its fitted curve and the curve's
    confidence band; the legend gives each exponent with its interval. ``series``: label →
    ``(x, y, fit or None)``, or panel title → such a mapping (one panel each, side by side,
    e.g. one per model family)."""
    panels = series if series and all(isinstance(v, Mapping) for v in series.values()) else {"": series}
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(6.0 * len(panels), 4.6), squeeze=False, sharey=True)
    for ax, (name, content) in zip(axes[0], panels.items()):
        _draw_series(ax, content)  # type: ignore[arg-type]
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_title(" — ".join(t for t in (title, name) if t))
        ax.grid(True, which="both", alpha=0.25)
        if content:
            ax.legend(fontsize=7)
    axes[0][0].set_ylabel(ylabel)
    return save_figure(fig, path)


def _draw_series(ax: Any, series: Series) -> None:
    colors = [pyplot().get_cmap("tab20" if len(series) > 10 else "tab10")(k % 20) for k in range(len(series))]
    for color, (label, (x, y, fit)) in zip(colors, series.items()):
        x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
        text = label
        if fit is not None:
            grid = np.geomspace(x.min(), x.max(), 64)
            lo, hi = fit.band(grid)
            ax.fill_between(grid, lo, hi, color=color, alpha=0.18, lw=0)
            ax.plot(grid, fit.predict(grid), color=color, lw=1.5)
            ci = "" if math.isnan(fit.alpha_ci[0]) else f" [{fit.alpha_ci[0]:.2f}, {fit.alpha_ci[1]:.2f}]"
            text = f"{label}: α={fit.alpha:.2f}{ci}"
        ax.scatter(x, y, color=color, s=18, label=text, zorder=3)
