"""Built-in selectors: which explored candidates to label.

- ``trust_window`` — DP-GEN's rule: candidates with ``lo ≤ max force std < hi``, at random;
- ``top_k`` — the most uncertain candidates (below ``hi`` if given), optionally weighted by their
  density in latent space (``density: β``) so that outliers of the explored set come last;
- ``diversity`` — within the trust window, spread over latent space by k-means (the candidate
  nearest each centroid) or farthest-point sampling (scikit-learn / NumPy), so near-duplicates
  are not labelled twice;
- ``random`` — uniform at random, ignoring uncertainty (the baseline of learning-curve studies).

Trust levels are absolute (eV/Å) or, with ``adaptive: true``, multiples of the model's
calibration scale: its typical max force std on the validation set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from atomforge import Candidate, ConfigError, Selection, SelectorSpec, hookimpl


@dataclass(frozen=True)
class TrustWindow:
    """Lower and upper trust levels on the max force std; absolute eV/Å or calibration multiples."""

    lo: float = 0.05  # below: the model is accurate here, labelling teaches little
    hi: float = 0.5  # at or above: the configuration is unphysical for the model, not learnable
    adaptive: bool = False  # lo/hi multiply the calibration scale instead of being eV/Å

    def __post_init__(self) -> None:
        if not 0 <= self.lo < self.hi:
            raise ConfigError(f"trust window needs 0 ≤ lo < hi; got lo={self.lo}, hi={self.hi}")

    def levels(self, calibration: float | None) -> tuple[float, float]:
        """Absolute (lo, hi) in eV/Å."""
        if not self.adaptive:
            return self.lo, self.hi
        if calibration is None or not calibration > 0:
            raise ConfigError("adaptive trust levels need the model's calibration scale (a UQ head "
                              f"with a validation set); got {calibration!r}. Use absolute lo/hi instead.")
        return self.lo * calibration, self.hi * calibration


def _stds(candidates: Sequence[Candidate], selector: str) -> np.ndarray:
    values = [c.max_force_std for c in candidates]
    if any(v is None for v in values):
        raise ConfigError(f"the {selector!r} selector needs force uncertainties, but the model gives "
                          "none; configure a UQ head (model.uq) or use the 'random' selector")
    return np.asarray(values, dtype=float)


def classify(stds: np.ndarray, lo: float, hi: float) -> dict[str, int]:
    """How many candidates are accurate (σ < lo), candidates (lo ≤ σ < hi) and failed (σ ≥ hi)."""
    return {"accurate": int((stds < lo).sum()), "candidate": int(((stds >= lo) & (stds < hi)).sum()),
            "failed": int((stds >= hi).sum())}


def _check_budget(budget: int) -> None:
    if budget < 0:
        raise ConfigError(f"a selection budget must be ≥ 0; got {budget}")


class TrustWindowSelector:
    """Up to ``budget`` candidates drawn at random from the trust window (DP-GEN)."""

    def __init__(self, *, lo: float = 0.05, hi: float = 0.5, adaptive: bool = False) -> None:
        self.window = TrustWindow(lo, hi, adaptive)

    def select(self, candidates: Sequence[Candidate], budget: int, *, calibration: float | None = None,
               seed: int = 0) -> Selection:
        _check_budget(budget)
        stds = _stds(candidates, "trust_window")
        lo, hi = self.window.levels(calibration)
        inside = np.flatnonzero((stds >= lo) & (stds < hi))
        picked = np.random.default_rng(seed).permutation(inside)[:budget]
        return Selection(tuple(int(i) for i in picked), lo, hi, classify(stds, lo, hi))


def latent_density(features: np.ndarray, max_reference: int = 4096, seed: int = 0) -> np.ndarray:
    """Each row's mean Gaussian similarity to the rows (to a random ``max_reference`` of them in a
    larger pool, so memory stays N × 4096), on z-scored features with the median squared pairwise
    distance as 2·bandwidth²: ≈ 1 in the bulk of the pool, → 0 for outliers."""
    if len(features) < 2:
        return np.ones(len(features))
    std = features.std(0)
    scaled = (features - features.mean(0)) / np.where(std > 0, std, 1.0)
    reference = scaled
    if len(scaled) > max_reference:
        reference = scaled[np.random.default_rng(seed).choice(len(scaled), max_reference, replace=False)]
    squared = np.maximum((scaled**2).sum(1)[:, None] + (reference**2).sum(1)[None, :] - 2 * scaled @ reference.T, 0.0)
    pairs = squared[np.triu_indices(len(scaled), 1)] if reference is scaled else squared  # no self-pairs
    bandwidth = float(np.median(pairs))
    similarity = np.exp(-squared / (2 * bandwidth)) if bandwidth > 0 else np.ones_like(squared)
    density = similarity.mean(1)
    return density / density.max()


class TopKSelector:
    """The ``budget`` most uncertain candidates, skipping those at or above ``hi`` (if given).

    ``density: β`` ranks by σ · ρ^β instead, ρ the candidate's density in latent space among the
    candidates below ``hi`` (information-density weighting, Settles & Craven 2008): uncertain but
    typical configurations before uncertain outliers of the explored set."""

    def __init__(self, *, hi: float | None = None, adaptive: bool = False, density: float = 0.0) -> None:
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not density >= 0:
            raise ConfigError(f"top_k selector: density must be an exponent ≥ 0 (0 = off); got {density!r}")
        self.hi = hi  # upper trust level; None keeps every candidate
        self.adaptive = adaptive  # hi multiplies the calibration scale
        self.density = float(density)  # β of σ · ρ^β; 0 ranks by σ alone

    def select(self, candidates: Sequence[Candidate], budget: int, *, calibration: float | None = None,
               seed: int = 0) -> Selection:
        _check_budget(budget)
        stds = _stds(candidates, "top_k")
        hi = None if self.hi is None else TrustWindow(0.0, self.hi, self.adaptive).levels(calibration)[1]
        pool = np.array([i for i in range(len(candidates)) if hi is None or stds[i] < hi], dtype=int)
        score = stds[pool]
        if self.density > 0 and len(pool):
            if any(candidates[i].features is None for i in pool):
                raise ConfigError("the top_k selector with density needs latent features on every candidate")
            features = np.stack([np.asarray(candidates[i].features, dtype=float) for i in pool])
            score = score * latent_density(features) ** self.density
        order = [int(i) for i in pool[np.argsort(-score, kind="stable")]]
        counts = classify(stds, 0.0, hi) if hi is not None else {}
        return Selection(tuple(order[:budget]), None, hi, counts)


def farthest_point(features: np.ndarray, k: int, seed: int = 0) -> list[int]:
    """Greedy farthest-point sampling: each pick maximises its distance to those already picked."""
    rng = np.random.default_rng(seed)
    picked = [int(rng.integers(len(features)))]
    distance = np.linalg.norm(features - features[picked[0]], axis=1)
    while len(picked) < min(k, len(features)):
        nxt = int(np.argmax(distance))
        picked.append(nxt)
        distance = np.minimum(distance, np.linalg.norm(features - features[nxt], axis=1))
    return picked


def kmeans_representatives(features: np.ndarray, k: int, seed: int = 0) -> list[int]:
    """k-means (scikit-learn) into ``k`` clusters; the member nearest each centroid."""
    from sklearn.cluster import KMeans

    k = min(k, len(features))
    model = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(features)
    picked = []
    for cluster in range(k):
        members = np.flatnonzero(model.labels_ == cluster)
        nearest = members[np.argmin(np.linalg.norm(features[members] - model.cluster_centers_[cluster], axis=1))]
        picked.append(int(nearest))
    return picked


_METHODS = {"kmeans": kmeans_representatives, "farthest_point": farthest_point}


class DiversitySelector:
    """Spread the selection over latent space within the trust window (``window: false`` uses every
    candidate, which also works without a UQ head). ``shortlist: m`` first keeps the m × budget
    most uncertain candidates of the window (uncertainty first, then diversity among them)."""

    def __init__(self, *, method: str = "farthest_point", lo: float = 0.05, hi: float = 0.5,
                 adaptive: bool = False, window: bool = True, shortlist: float | None = None) -> None:
        if method not in _METHODS:
            raise ConfigError(f"diversity selector: unknown method {method!r}; valid: {', '.join(_METHODS)}")
        if shortlist is not None and (isinstance(shortlist, bool) or not shortlist >= 1):
            raise ConfigError(f"diversity selector: shortlist must be a number ≥ 1 (× the budget) or null; "
                              f"got {shortlist!r}")
        if shortlist is not None and not window:
            raise ConfigError("diversity selector: shortlist ranks by uncertainty; it needs window: true")
        self.method = method  # kmeans | farthest_point
        self.window = TrustWindow(lo, hi, adaptive) if window else None
        self.shortlist = shortlist  # keep the shortlist × budget most uncertain of the window; None = all

    def _pool(self, candidates: Sequence[Candidate], calibration: float | None,
              budget: int) -> tuple[np.ndarray, Selection]:
        if self.window is None:
            return np.arange(len(candidates)), Selection(())
        stds = _stds(candidates, "diversity")
        lo, hi = self.window.levels(calibration)
        pool = np.flatnonzero((stds >= lo) & (stds < hi))
        if self.shortlist is not None:  # most uncertain first (stable order for ties)
            pool = pool[np.argsort(-stds[pool], kind="stable")][: max(budget, int(round(self.shortlist * budget)))]
        return pool, Selection((), lo, hi, classify(stds, lo, hi))

    def select(self, candidates: Sequence[Candidate], budget: int, *, calibration: float | None = None,
               seed: int = 0) -> Selection:
        _check_budget(budget)
        pool, info = self._pool(candidates, calibration, budget)
        if budget == 0 or len(pool) == 0:
            return info
        if any(candidates[i].features is None for i in pool):
            raise ConfigError("the diversity selector needs latent features on every candidate")
        features = np.stack([np.asarray(candidates[i].features, dtype=float) for i in pool])
        chosen = _METHODS[self.method](features, budget, seed)
        return Selection(tuple(int(pool[i]) for i in chosen), info.lo, info.hi, info.counts)


class RandomSelector:
    """Uniformly random candidates, ignoring uncertainty (baseline)."""

    def select(self, candidates: Sequence[Candidate], budget: int, *, calibration: float | None = None,
               seed: int = 0) -> Selection:
        _check_budget(budget)
        picked = np.random.default_rng(seed).permutation(len(candidates))[:budget]
        return Selection(tuple(int(i) for i in picked))


@hookimpl
def register_selectors(register) -> None:  # noqa: ANN001
    register(SelectorSpec("trust_window", TrustWindowSelector,
                          "DP-GEN trust window lo ≤ max force std < hi (absolute or adaptive)"))
    register(SelectorSpec("top_k", TopKSelector, "the most uncertain candidates (below hi)"))
    register(SelectorSpec("diversity", DiversitySelector,
                          "trust window + k-means / farthest-point spread in latent space"))
    register(SelectorSpec("random", RandomSelector, "uniformly random (baseline)"))
