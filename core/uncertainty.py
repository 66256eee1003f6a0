"""Uncertainty: the base class of UQ heads, calibration, UQ metrics and plots.

A UQ head (:func:`atomforge.hookspecs.register_uq_heads`) wraps a trained or to-be-trained
:class:`~atomforge.Potential` and returns the usual outputs (mean energy, forces, stress) plus
:data:`keys.ENERGY_STD` [B], :data:`keys.FORCES_STD` [N] (std of each force component of an
atom) and :data:`keys.FORCES_STD_MAX` [B]. Forces always come from the Potential's
:func:`~atomforge.potential.energy_derivatives`, so conservation lives in one place.

The raw spread of a head is rarely calibrated, so every head carries a :class:`Calibration`
fitted on the validation set (:func:`calibrate`): a variance scale by Gaussian NLL minimisation
(closed form) or an isotonic map (scikit-learn). It is stored as JSON in the model file.
See ``docs/uq.md``.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
from torch import nn

from . import keys as K
from ._errors import ConfigError
from ._specs import PluginKind
from .graph import GraphDataset, iterate_batches
from .potential import Potential

__all__ = [
    "CALIBRATION_METHODS", "Calibration", "UQHead", "UQFitContext", "UQAccumulator", "build_uq_head",
    "member_statistics", "replicate_batch", "fit_variance_scale", "fit_isotonic", "calibrate",
    "spearman", "gaussian_nll", "miscalibration_area", "ence", "evaluate_uncertainty",
    "uncertainty_metrics", "calibration_plot", "error_vs_uncertainty_plot", "wrap_for_training", "fit_uq_head", "uq_report",
]

CALIBRATION_METHODS = ("scale", "isotonic", "none")
_TINY = 1e-12


# -- calibration -----------------------------------------------------------------------------------
class Calibration(nn.Module):
    """Maps a head's raw std to a calibrated std: ``σ = scale·σ_raw`` or, after an isotonic fit,
    a monotone piecewise-linear map ``σ = f(σ_raw)``. Energy and forces are calibrated apart.

    Its state is plain JSON (:meth:`to_dict`), kept in the model file's config; nothing of it is
    in the ``state_dict`` (the isotonic map has a data-dependent size).
    """

    def __init__(self) -> None:
        super().__init__()
        self.active = True  # False while the raw spread is being measured
        self.state: dict[str, Any] = {"method": "none", "energy": {"scale": 1.0}, "forces": {"scale": 1.0}}

    def to_dict(self) -> dict[str, Any]:
        return dict(self.state)

    def load(self, state: Mapping[str, Any] | None) -> None:
        """Restore a :meth:`to_dict` record (``None`` = identity)."""
        if state:
            self.state = dict(state)

    def map(self, quantity: str, std: torch.Tensor) -> torch.Tensor:
        """Calibrated std of ``quantity`` (``energy`` or ``forces``)."""
        record = self.state.get(quantity, {})
        if not self.active or not record:
            return std
        if "x" in record:
            xp = torch.tensor(record["x"], dtype=std.dtype, device=std.device)
            fp = torch.tensor(record["y"], dtype=std.dtype, device=std.device)
            return _interp(std, xp, fp)
        return std * float(record.get("scale", 1.0))

    def forward(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Calibrate the std keys of ``outputs`` in place and add :data:`keys.FORCES_STD_MAX`."""
        if K.ENERGY_STD in outputs:
            outputs[K.ENERGY_STD] = self.map("energy", outputs[K.ENERGY_STD])
        if K.FORCES_STD in outputs:
            std = self.map("forces", outputs[K.FORCES_STD])
            outputs[K.FORCES_STD] = std
            size = int(batch[K.N_ATOMS].shape[0])
            outputs[K.FORCES_STD_MAX] = std.new_zeros(size).scatter_reduce(
                0, batch[K.BATCH], std, reduce="amax", include_self=False)
        return outputs


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """``numpy.interp`` in torch: piecewise linear, constant beyond the ends."""
    if xp.numel() == 1:
        return fp.expand_as(x).clone()
    x = x.clamp(xp[0], xp[-1])
    index = torch.searchsorted(xp, x.contiguous()).clamp(1, xp.numel() - 1)
    x0, x1, y0, y1 = xp[index - 1], xp[index], fp[index - 1], fp[index]
    t = (x - x0) / (x1 - x0).clamp_min(_TINY)
    return y0 + t * (y1 - y0)


def fit_variance_scale(errors: np.ndarray, stds: np.ndarray) -> float:
    """The ``s`` minimising the Gaussian NLL of ``errors`` under ``N(0, (s·σ)²)``: closed form
    ``s² = mean(e²/σ²)``. Zero stds are ignored (they carry no information about ``s``)."""
    errors, stds = np.asarray(errors, float).ravel(), np.asarray(stds, float).ravel()
    keep = stds > _TINY
    if not keep.any():
        return 1.0
    return float(np.sqrt(np.mean((errors[keep] / stds[keep]) ** 2)))


def fit_isotonic(errors: np.ndarray, stds: np.ndarray) -> dict[str, list[float]]:
    """A monotone map raw σ → calibrated σ: isotonic regression (scikit-learn) of the squared
    error on the raw std, then a square root. Returned as knots ``{"x": [...], "y": [...]}``."""
    from sklearn.isotonic import IsotonicRegression

    errors, stds = np.asarray(errors, float).ravel(), np.asarray(stds, float).ravel()
    iso = IsotonicRegression(increasing=True, out_of_bounds="clip", y_min=_TINY).fit(stds, errors**2)
    return {"x": [float(v) for v in iso.X_thresholds_], "y": [float(np.sqrt(v)) for v in iso.y_thresholds_]}


# -- the base class of heads -------------------------------------------------------------------------
@dataclass(frozen=True)
class UQFitContext:
    """What a head's post-training :meth:`UQHead.fit` may use."""

    train: GraphDataset  # the training structures (graphs built with the model's cutoff)
    valid: GraphDataset  # the validation structures
    train_member: Callable[[int], Potential]  # trains a fresh, independently seeded Potential
    batch_size: int = 32  # structures per batch when predicting


class UQHead(nn.Module):
    """Base class of UQ heads: ``forward(batch, compute_forces=, compute_stress=)`` returns the
    mean outputs of :class:`~atomforge.Potential` plus the std keys, calibrated.

    Subclasses implement :meth:`predict` (raw spread) and may override :meth:`fit` (steps after
    the engine has trained the model: more ensemble members, a latent density) and these flags:
    """

    #: the engine trains the head itself (shallow ensemble, MC dropout), not the bare Potential
    trains_with_model: bool = False
    #: model outputs some loss term must consume for the head to learn a spread (e.g. energy_std)
    needs_loss_outputs: tuple[str, ...] = ()

    def __init__(self, potential: Potential) -> None:
        super().__init__()
        self.potential = potential
        self.calibration = Calibration()

    @property
    def cutoff(self) -> float:
        return self.potential.cutoff

    @property
    def elements(self) -> list[int]:
        return self.potential.elements

    def forward(
        self, batch: dict[str, torch.Tensor], *, compute_forces: bool = True, compute_stress: bool = False
    ) -> dict[str, torch.Tensor]:
        outputs = self.predict(batch, compute_forces=compute_forces, compute_stress=compute_stress)
        return self.calibration(outputs, batch)

    def predict(
        self, batch: dict[str, torch.Tensor], *, compute_forces: bool, compute_stress: bool
    ) -> dict[str, torch.Tensor]:
        """Mean outputs and the raw (uncalibrated) :data:`keys.ENERGY_STD` / :data:`keys.FORCES_STD`."""
        raise NotImplementedError

    def fit(self, context: UQFitContext) -> None:
        """Post-training steps; the default has none."""

    def uq_config(self) -> dict[str, Any]:
        """Extra JSON the head needs to be rebuilt (merged into its options); default none."""
        return {}


def build_uq_head(potential: Potential, uq: Mapping[str, Any], registry: Any) -> UQHead:
    """Wrap ``potential`` with the head named ``uq["name"]`` (options ``uq["options"]``) through
    the registry, and restore ``uq["calibration"]`` if present."""
    spec = registry.get(PluginKind.UQ_HEAD, uq["name"])
    options = dict(uq.get("options", {}))
    try:
        head = spec.factory(potential, **options)
    except TypeError as error:
        raise ConfigError(f"uq head {uq['name']!r} rejected its options {sorted(options)}: {error}") from error
    if not isinstance(head, UQHead):
        raise ConfigError(f"uq head {uq['name']!r} returned {type(head).__name__}, not an atomforge UQHead")
    head.calibration.load(uq.get("calibration"))
    return head


@contextlib.contextmanager
def raw_spread(head: UQHead) -> Iterator[UQHead]:
    """Switch calibration off inside the block (to measure the raw spread)."""
    before = head.calibration.active
    head.calibration.active = False
    try:
        yield head
    finally:
        head.calibration.active = before


# -- helpers for heads -----------------------------------------------------------------------------------
def member_statistics(members: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Mean over the leading (member) axis of every output, plus the spread: ENERGY_STD from
    ``energy`` [K, B] and FORCES_STD [N] (RMS over the 3 components of the per-component std) from
    ``forces`` [K, N, 3]. K = 1 gives zero spread."""
    out = {key: value.mean(0) for key, value in members.items()}
    if K.ENERGY in members:
        out[K.ENERGY_STD] = _std(members[K.ENERGY])
    if K.FORCES in members:
        out[K.FORCES_STD] = _std(members[K.FORCES]).pow(2).mean(-1).sqrt()
    return out


def _std(values: torch.Tensor) -> torch.Tensor:
    """Population std over axis 0 (an ensemble of identical members has exactly zero)."""
    centred = values - values.mean(0, keepdim=True)
    return centred.pow(2).mean(0).clamp_min(0).sqrt()


def replicate_batch(batch: dict[str, torch.Tensor], copies: int) -> dict[str, torch.Tensor]:
    """``copies`` disjoint copies of a batch in one batch (atoms, structures and edges tiled, the
    edge and structure indices offset), so stochastic samples run as one pass."""
    n_atoms, n_structures = int(batch[K.POSITIONS].shape[0]), int(batch[K.N_ATOMS].shape[0])
    n_edges = int(batch[K.EDGE_INDEX].shape[1])
    out: dict[str, torch.Tensor] = {}
    for key, value in batch.items():
        if key == K.EDGE_INDEX:
            offsets = torch.arange(copies, device=value.device).repeat_interleave(n_edges) * n_atoms
            out[key] = value.repeat(1, copies) + offsets
        elif key == K.BATCH:
            offsets = torch.arange(copies, device=value.device).repeat_interleave(n_atoms) * n_structures
            out[key] = value.repeat(copies) + offsets
        else:
            out[key] = value.repeat(copies, *([1] * (value.dim() - 1)))
    return out


# -- metrics ---------------------------------------------------------------------------------------------
def spearman(predicted: np.ndarray, actual: np.ndarray) -> float:
    """Spearman rank correlation (nan when either side is constant)."""
    from scipy.stats import spearmanr

    predicted, actual = np.asarray(predicted, float).ravel(), np.asarray(actual, float).ravel()
    if len(predicted) < 3 or np.ptp(predicted) == 0 or np.ptp(actual) == 0:
        return float("nan")
    return float(spearmanr(predicted, actual).statistic)


def gaussian_nll(errors: np.ndarray, stds: np.ndarray) -> float:
    """Mean negative log-likelihood of ``errors`` under ``N(0, σ²)`` (σ floored at 1e-12·max)."""
    errors, stds = np.asarray(errors, float).ravel(), np.asarray(stds, float).ravel()
    var = np.maximum(stds, max(float(stds.max(initial=0.0)) * 1e-6, _TINY)) ** 2
    return float(np.mean(0.5 * np.log(2 * np.pi * var) + errors**2 / (2 * var)))


def calibration_curve(errors: np.ndarray, stds: np.ndarray, n: int = 99) -> tuple[np.ndarray, np.ndarray]:
    """(expected, observed) fractions of errors inside the central Gaussian interval of
    probability ``p`` for ``n`` values of ``p`` in (0, 1)."""
    from scipy.stats import norm

    errors, stds = np.abs(np.asarray(errors, float).ravel()), np.asarray(stds, float).ravel()
    expected = np.linspace(0.01, 0.99, n)
    z = norm.ppf(0.5 + expected / 2)
    observed = np.array([(errors <= zi * stds).mean() for zi in z])
    return expected, observed


def miscalibration_area(errors: np.ndarray, stds: np.ndarray) -> float:
    """Area between the calibration curve and the diagonal (0 = perfect, 0.5 = worst)."""
    expected, observed = calibration_curve(errors, stds)
    return float(np.trapezoid(np.abs(observed - expected), expected))


def ence(errors: np.ndarray, stds: np.ndarray, bins: int = 10) -> float:
    """Expected normalised calibration error (Levi et al. 2022): mean over equal-count bins of
    σ of ``|RMV − RMSE| / RMV``."""
    errors, stds = np.asarray(errors, float).ravel(), np.asarray(stds, float).ravel()
    order = np.argsort(stds)
    values = []
    for chunk in np.array_split(order, min(bins, len(order))):
        rmv = math.sqrt(float(np.mean(stds[chunk] ** 2)))
        rmse = math.sqrt(float(np.mean(errors[chunk] ** 2)))
        if rmv > _TINY:
            values.append(abs(rmv - rmse) / rmv)
    return float(np.mean(values)) if values else float("nan")


class UQAccumulator:
    """Collects errors and predicted stds batch by batch; :meth:`metrics` summarises them.

    Energy is per structure (eV). Forces are per component, each with its atom's std; the
    per-atom error is the RMS over the atom's components, the per-structure error the RMS over
    its atoms' components, compared with the RMS of its atoms' stds.
    """

    def __init__(self) -> None:
        self.parts: dict[str, list[np.ndarray]] = {}

    def _put(self, name: str, values: torch.Tensor) -> None:
        self.parts.setdefault(name, []).append(values.detach().double().cpu().numpy())

    def add(self, batch: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        """Add one batch; quantities without both a label and a std are skipped."""
        if K.ENERGY in batch and K.ENERGY_STD in outputs:
            self._put("energy_error", outputs[K.ENERGY] - batch[K.ENERGY])
            self._put("energy_std", outputs[K.ENERGY_STD])
        if K.FORCES in batch and K.FORCES_STD in outputs:
            size = int(batch[K.N_ATOMS].shape[0])
            error = outputs[K.FORCES] - batch[K.FORCES]
            n = batch[K.N_ATOMS].to(error.dtype)
            per_structure = torch.zeros(size, dtype=error.dtype).index_add(0, batch[K.BATCH], error.pow(2).sum(-1))
            std_structure = torch.zeros(size, dtype=error.dtype).index_add(
                0, batch[K.BATCH], outputs[K.FORCES_STD].pow(2))
            self._put("forces_error", error)
            self._put("forces_std", outputs[K.FORCES_STD])
            self._put("structure_forces_error", (per_structure / (3 * n)).sqrt())
            self._put("structure_forces_std", (std_structure / n).sqrt())

    def array(self, name: str) -> np.ndarray:
        return np.concatenate(self.parts[name])

    def pairs(self, quantity: str) -> tuple[np.ndarray, np.ndarray]:
        """(errors, stds) with one std per error: per structure for energy, per component for forces."""
        errors, stds = self.array(f"{quantity}_error"), self.array(f"{quantity}_std")
        if quantity == "forces":
            stds = np.repeat(stds, 3)
        return errors.ravel(), stds

    def metrics(self) -> dict[str, float]:
        """Spearman ρ, Gaussian NLL, miscalibration area, ENCE and mean std of energy and forces."""
        out: dict[str, float] = {}
        if "energy_error" in self.parts:
            errors, stds = self.pairs("energy")
            out["energy_std_mean"] = float(stds.mean())
            out["energy_spearman"] = spearman(stds, np.abs(errors))
            out.update(_calibration_metrics("energy", errors, stds))
        if "forces_error" in self.parts:
            errors, stds = self.pairs("forces")
            atom_error = np.sqrt((self.array("forces_error") ** 2).mean(-1))
            out["forces_std_mean"] = float(self.array("forces_std").mean())
            out["forces_spearman_atom"] = spearman(self.array("forces_std"), atom_error)
            out["forces_spearman_structure"] = spearman(self.array("structure_forces_std"),
                                                        self.array("structure_forces_error"))
            out.update(_calibration_metrics("forces", errors, stds))
        return out


def _calibration_metrics(prefix: str, errors: np.ndarray, stds: np.ndarray) -> dict[str, float]:
    return {f"{prefix}_nll": gaussian_nll(errors, stds),
            f"{prefix}_miscalibration_area": miscalibration_area(errors, stds),
            f"{prefix}_ence": ence(errors, stds)}


def evaluate_uncertainty(model: nn.Module, dataset: GraphDataset, *, batch_size: int = 32) -> UQAccumulator:
    """Predict ``dataset`` with a UQ head and accumulate errors against predicted stds."""
    model.eval()
    acc = UQAccumulator()
    for batch in iterate_batches(dataset, batch_size):
        acc.add(batch, {k: v.detach() for k, v in model(batch, compute_forces=True).items()})
    return acc


def uncertainty_metrics(model: nn.Module, structures: Any, *, batch_size: int = 32) -> dict[str, float]:
    """``uq_``-prefixed :meth:`UQAccumulator.metrics` of a UQ head on labelled ``ase.Atoms``."""
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    dataset = GraphDataset(list(structures), model.cutoff, dtype=dtype)
    metrics = evaluate_uncertainty(model, dataset, batch_size=batch_size).metrics()
    return {f"uq_{k}": v for k, v in metrics.items()}


def calibrate(head: UQHead, valid: GraphDataset, *, method: str = "scale", batch_size: int = 32) -> dict[str, Any]:
    """Fit the head's calibration on ``valid`` (raw spread vs actual error) and install it.

    ``scale``: variance scale by NLL minimisation, per quantity; ``isotonic``: the scale, then
    an isotonic map on top; ``none``: identity. Returns the JSON record (also kept by the head).
    """
    if method not in CALIBRATION_METHODS:
        raise ConfigError(f"uq.calibration: unknown method {method!r}; valid: {', '.join(CALIBRATION_METHODS)}")
    with raw_spread(head):
        acc = evaluate_uncertainty(head, valid, batch_size=batch_size)
    record: dict[str, Any] = {"method": method}
    for quantity in ("energy", "forces"):
        if f"{quantity}_error" not in acc.parts or method == "none":
            continue
        errors, stds = acc.pairs(quantity)
        record[quantity] = {"scale": fit_variance_scale(errors, stds)}
        if method == "isotonic":
            stds = stds if quantity == "energy" else acc.array("forces_std")
            errors = errors if quantity == "energy" else np.sqrt((acc.array("forces_error") ** 2).mean(-1))
            record[quantity] = fit_isotonic(errors, stds)
    head.calibration.load(record)
    return record


# -- plots -----------------------------------------------------------------------------------------------
def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _quantities(acc: UQAccumulator) -> list[tuple[str, str]]:
    return [(q, u) for q, u in (("energy", "eV"), ("forces", "eV/Å")) if f"{q}_error" in acc.parts]


def calibration_plot(acc: UQAccumulator, path: Path | str, *, title: str = "") -> Path:
    """Observed vs expected fraction of errors inside the Gaussian interval (diagonal = calibrated)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.4, 4.2))
    ax.plot([0, 1], [0, 1], color="grey", lw=1)
    for quantity, _ in _quantities(acc):
        expected, observed = calibration_curve(*acc.pairs(quantity))
        area = float(np.trapezoid(np.abs(observed - expected), expected))
        ax.plot(expected, observed, label=f"{quantity} (area {area:.3f})")
    ax.set_xlabel("expected fraction inside interval")
    ax.set_ylabel("observed fraction")
    ax.legend()
    ax.set_title(title or "calibration")
    return _save(fig, plt, path)


def error_vs_uncertainty_plot(acc: UQAccumulator, path: Path | str, *, title: str = "") -> Path:
    """Actual error against predicted std (log-log): per structure for energy, per atom for forces."""
    plt = _pyplot()
    panels = _quantities(acc)
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(4.4 * max(len(panels), 1), 4.2), squeeze=False)
    for ax, (quantity, unit) in zip(axes[0], panels):
        if quantity == "energy":
            errors, stds = acc.pairs("energy")
        else:
            stds = acc.array("forces_std")
            errors = np.sqrt((acc.array("forces_error") ** 2).mean(-1))
        errors, stds = np.abs(errors) + _TINY, stds + _TINY
        ax.scatter(stds, errors, s=3, alpha=0.4)
        lo, hi = float(min(stds.min(), errors.min())), float(max(stds.max(), errors.max()))
        ax.plot([lo, hi], [lo, hi], color="grey", lw=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"predicted std ({unit})")
        ax.set_ylabel(f"|error| ({unit})")
        ax.set_title(f"{quantity}  ρ={spearman(stds, errors):.2f}")
    if title:
        fig.suptitle(title)
    return _save(fig, plt, path)


def _save(fig: Any, plt: Any, path: Path | str) -> Path:
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- the UQ steps of ``atomforge train`` (called from workflow.train) ----------------------------------
def wrap_for_training(potential: Potential, uq: Any, registry: Any, loss_outputs: tuple[str, ...]) -> nn.Module:
    """The module the engine trains: the head itself when it ``trains_with_model`` (shallow
    ensemble, MC dropout), else the bare Potential. Also validates the head's options early."""
    if uq is None:
        return potential
    head = build_uq_head(potential, {"name": uq.name, "options": uq.options}, registry)
    if not head.trains_with_model:
        return potential
    missing = [key for key in head.needs_loss_outputs if key not in loss_outputs]
    if missing:
        hints = {K.ENERGY_STD: "- {name: energy_nll, weight: 0.01, detach_mean: true}",
                 K.FORCES_STD: "- {name: forces_nll, weight: 0.01}"}
        raise ConfigError(
            f"uq head {uq.name!r} learns its spread only from a loss term on {missing}; add "
            + " and ".join(f"`{hints.get(k, k)}`" for k in missing) + " to `loss` (see docs/uq.md)"
        )
    return head


def fit_uq_head(model: nn.Module, uq: Any, registry: Any, context: UQFitContext) -> tuple[UQHead, dict[str, Any]]:
    """Wrap the trained ``model`` (unless it is already the head), run the head's post-training
    fit (extra ensemble members, latent density), calibrate on ``context.valid``. Returns the
    head and its model-file record ``{name, provider, options, calibration}``."""
    head = model if isinstance(model, UQHead) else build_uq_head(
        model, {"name": uq.name, "options": uq.options}, registry)
    head.fit(context)
    record = calibrate(head, context.valid, method=uq.calibration, batch_size=context.batch_size)
    provider = registry.provided(PluginKind.UQ_HEAD, uq.name).distribution
    options = {**uq.options, **head.uq_config()}
    return head.eval(), {"name": uq.name, "provider": provider, "options": options, "calibration": record}


def uq_report(head: nn.Module, sets: Mapping[str, GraphDataset], tracker: Any, run_dir: Path,
              *, batch_size: int = 32) -> dict[str, float]:
    """UQ metrics (``{valid,test}_uq_*``) and the calibration and error-vs-uncertainty plots of
    the valid and test sets, logged to the tracker. (The valid set is the calibration set.)"""
    metrics: dict[str, float] = {}
    for name in ("valid", "test"):
        if name not in sets:
            continue
        acc = evaluate_uncertainty(head, sets[name], batch_size=batch_size)
        metrics.update({f"{name}_uq_{k}": v for k, v in acc.metrics().items()})
        for plot in (calibration_plot(acc, run_dir / f"calibration_{name}.png", title=f"{name} set"),
                     error_vs_uncertainty_plot(acc, run_dir / f"uncertainty_{name}.png", title=f"{name} set")):
            tracker.log_artifact(plot, "plots")
    tracker.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)})
    return metrics
