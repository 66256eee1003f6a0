"""Fitting a UQ head's calibration on held-out data: the raw spread against the actual error.

``scale``: the variance scale that minimises the Gaussian NLL (closed form); ``isotonic``: that
scale, then a monotone map raw σ → calibrated σ (scikit-learn); ``none``: identity. The result
is the JSON record a head's :class:`~atomforge.model.uncertainty.Calibration` loads.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._errors import ConfigError
from ..data.graph import GraphDataset
from ..model.uncertainty import CALIBRATION_METHODS, UQHead, raw_spread
from .evaluate import evaluate_uncertainty
from .metrics import TINY as _TINY

__all__ = ["calibrate", "fit_variance_scale", "fit_isotonic"]


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
