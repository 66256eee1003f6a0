"""Selectors: trust window, top-k, diversity and random, as registered."""

from __future__ import annotations

import numpy as np
import pytest
from ase.build import bulk

from atomforge import ConfigError
from atomforge.exploration.records import Candidate

STDS = [0.01, 0.04, 0.05, 0.1, 0.2, 0.3, 0.49, 0.5, 0.9, 2.0]


def _candidates(stds=STDS, features=None) -> list[Candidate]:
    atoms = bulk("Cu")
    feats = features if features is not None else [np.array([s]) for s in stds]
    return [Candidate(atoms, s, None, f) for s, f in zip(stds, feats)]


def _make(registry, name, **options):
    return registry.get("selectors", name).factory(**options)


def test_trust_window_picks_only_inside_the_window_and_counts_classes(registry) -> None:
    selection = _make(registry, "trust_window", lo=0.05, hi=0.5).select(_candidates(), 100, seed=1)
    picked = sorted(STDS[i] for i in selection.indices)
    assert picked == [0.05, 0.1, 0.2, 0.3, 0.49]  # lo inclusive, hi exclusive
    assert dict(selection.counts) == {"accurate": 2, "candidate": 5, "failed": 3}
    assert (selection.lo, selection.hi) == (0.05, 0.5)


def test_trust_window_respects_the_budget_and_the_seed(registry) -> None:
    selector = _make(registry, "trust_window", lo=0.05, hi=0.5)
    a, b = (selector.select(_candidates(), 2, seed=7) for _ in range(2))
    assert len(a.indices) == 2 and a.indices == b.indices
    assert all(0.05 <= STDS[i] < 0.5 for i in a.indices)


def test_adaptive_trust_levels_scale_with_the_calibration(registry) -> None:
    selector = _make(registry, "trust_window", lo=1.0, hi=5.0, adaptive=True)
    selection = selector.select(_candidates(), 100, calibration=0.1)
    assert (selection.lo, selection.hi) == pytest.approx((0.1, 0.5))
    assert sorted(STDS[i] for i in selection.indices) == [0.1, 0.2, 0.3, 0.49]
    with pytest.raises(ConfigError, match="calibration"):
        selector.select(_candidates(), 3, calibration=None)


def test_bad_windows_and_missing_uncertainties_are_clear_errors(registry) -> None:
    with pytest.raises(ConfigError, match="lo < hi"):
        _make(registry, "trust_window", lo=0.5, hi=0.1)
    no_std = [Candidate(bulk("Cu"))]
    with pytest.raises(ConfigError, match="UQ head"):
        _make(registry, "trust_window").select(no_std, 1)
    assert _make(registry, "random").select(no_std, 1).indices == (0,)


def test_top_k_takes_the_most_uncertain_below_hi(registry) -> None:
    selection = _make(registry, "top_k", hi=0.5).select(_candidates(), 3)
    assert [STDS[i] for i in selection.indices] == [0.49, 0.3, 0.2]
    assert [STDS[i] for i in _make(registry, "top_k").select(_candidates(), 2).indices] == [2.0, 0.9]


@pytest.mark.parametrize("method", ["kmeans", "farthest_point"])
def test_diversity_avoids_near_duplicates_inside_the_window(registry, method) -> None:
    # three tight clusters of candidates in latent space, all inside the window, plus one outside
    rng = np.random.default_rng(0)
    centres = [np.array([0.0, 0.0]), np.array([10.0, 0.0]), np.array([0.0, 10.0])]
    features = [centres[i % 3] + rng.normal(0, 0.01, 2) for i in range(12)] + [np.array([50.0, 50.0])]
    stds = [0.2] * 12 + [3.0]
    selection = _make(registry, "diversity", method=method, lo=0.1, hi=1.0).select(
        _candidates(stds, features), 3)
    assert 12 not in selection.indices  # beyond hi
    assert sorted(i % 3 for i in selection.indices) == [0, 1, 2]  # one per cluster


def test_diversity_shortlist_keeps_the_most_uncertain_then_spreads(registry) -> None:
    # two clusters; the uncertain one has 4 members; shortlist 2 × budget 2 = the 4 most uncertain
    features = [np.array([0.0, 0.0]), np.array([0.0, 0.1]), np.array([5.0, 0.0]), np.array([5.0, 0.1]),
                np.array([20.0, 0.0]), np.array([20.0, 0.1])]
    stds = [0.5, 0.6, 0.7, 0.8, 0.2, 0.25]  # the far cluster (4, 5) is the least uncertain
    selector = _make(registry, "diversity", lo=0.1, hi=1.0, shortlist=2)
    picked = selector.select(_candidates(stds, features), 2).indices
    assert len(picked) == 2 and set(picked) <= {0, 1, 2, 3} and len({i // 2 for i in picked}) == 2
    plain = _make(registry, "diversity", lo=0.1, hi=1.0).select(_candidates(stds, features), 2, seed=3).indices
    assert {i // 2 for i in plain} & {2}  # without a shortlist the spread reaches the far cluster
    for bad in (0.5, True):
        with pytest.raises(ConfigError, match="shortlist must be a number ≥ 1"):
            _make(registry, "diversity", shortlist=bad)
    with pytest.raises(ConfigError, match="needs window: true"):
        _make(registry, "diversity", shortlist=2, window=False)


def test_diversity_rejects_an_unknown_method(registry) -> None:
    with pytest.raises(ConfigError, match="farthest_point"):
        _make(registry, "diversity", method="dbscan")


def _hot_and_cold(per_group: int = 6) -> list[Candidate]:
    """Candidates at 300/900/1500 K whose σ grows with temperature (the hottest are most uncertain)."""
    out = []
    for t, temperature in enumerate((300.0, 900.0, 1500.0)):
        for k in range(per_group):
            atoms = bulk("Cu")
            atoms.info["temperature"] = temperature
            sigma = 0.1 * (t + 1) + 0.01 * k
            out.append(Candidate(atoms, sigma, None, np.array([sigma]), "md"))
    return out


def test_stratified_budget_spreads_labels_over_temperatures(registry) -> None:
    from atomforge.active_learning._stratify import stratified_select

    candidates, top_k = _hot_and_cold(), _make(registry, "top_k")
    plain = top_k.select(candidates, 6)
    assert {candidates[i].atoms.info["temperature"] for i in plain.indices} == {1500.0}  # σ-ranking: all hot
    selection, groups = stratified_select(top_k, candidates, 9, ("temperature",), seed=0)
    assert groups == {"temperature=1500.0": 3, "temperature=300.0": 3, "temperature=900.0": 3}
    assert len(set(selection.indices)) == 9
    for temperature in (300.0, 900.0, 1500.0):  # within each group, still the most uncertain
        sigmas = sorted((candidates[i].max_force_std for i in selection.indices
                         if candidates[i].atoms.info["temperature"] == temperature), reverse=True)
        pool = sorted((c.max_force_std for c in candidates if c.atoms.info["temperature"] == temperature), reverse=True)
        assert sigmas == pool[:3]
    # a budget smaller than the number of groups, and two keys (explorer × temperature)
    selection, groups = stratified_select(top_k, candidates, 2, ("explorer", "temperature"), seed=0)
    assert len(selection.indices) == 2 and sorted(groups.values()) == [0, 1, 1]
    assert all(g.startswith("explorer=md,temperature=") for g in groups)


def test_stratified_shares_a_group_cannot_fill_go_to_the_others(registry) -> None:
    from atomforge.active_learning._stratify import stratified_select

    candidates = _hot_and_cold()
    window = _make(registry, "trust_window", lo=0.0, hi=0.115)  # 300 K: 2 inside, 900/1500 K: none
    selection, groups = stratified_select(window, candidates, 9, ("temperature",), seed=0)
    assert groups == {"temperature=1500.0": 0, "temperature=300.0": 2, "temperature=900.0": 0}
    assert dict(selection.counts) == {"accurate": 0, "candidate": 2, "failed": 16}  # summed over groups
    window = _make(registry, "trust_window", lo=0.0, hi=0.29)  # 300 K: 6, 900 K: 6, 1500 K: none
    selection, groups = stratified_select(window, candidates, 11, ("temperature",), seed=0)
    assert groups["temperature=1500.0"] == 0 and sum(groups.values()) == 11 and len(set(selection.indices)) == 11
    assert sum(selection.counts.values()) == len(candidates)
    random = _make(registry, "random")  # no window: every share fills; a missing key is its own group
    candidates[0].atoms.info.pop("temperature")
    _, groups = stratified_select(random, candidates, 12, ("temperature",), seed=1)
    assert groups["temperature=-"] == 1 and sum(groups.values()) == 12
    from atomforge.active_learning._stratify import unknown_keys

    assert unknown_keys(candidates, ("temperature", "explorer", "temprature")) == ["temprature"]


def test_stratify_is_checked_in_the_campaign_config(al_files, tmp_path) -> None:
    from atomforge.active_learning import campaign_from_dict

    from conftest import campaign_raw

    raw = campaign_raw(al_files, tmp_path / "c", budget={"per_iteration": 3, "total": 6, "stratify": "temperature"})
    assert campaign_from_dict(raw).budget.stratify == ("temperature",)
    raw["budget"]["stratify"] = ["explorer", "temperature"]
    assert campaign_from_dict(raw).budget.stratify == ("explorer", "temperature")
    raw["budget"]["stratify"] = 3
    with pytest.raises(ConfigError, match="budget.stratify: expected a key or a list of keys"):
        campaign_from_dict(raw)


def test_top_k_density_puts_uncertain_outliers_after_uncertain_typical_ones(registry) -> None:
    # 20 typical candidates in a cluster (σ 0.2–0.39) and 2 far outliers with the highest σ (0.5, 0.6)
    rng = np.random.default_rng(0)
    features = [rng.normal(0, 0.1, 4) for _ in range(20)] + [np.full(4, 5.0), np.full(4, -5.0)]
    stds = [0.2 + 0.01 * k for k in range(20)] + [0.5, 0.6]
    candidates = _candidates(stds, features)
    plain = _make(registry, "top_k").select(candidates, 2)
    assert set(plain.indices) == {20, 21}  # σ alone: the outliers
    weighted = _make(registry, "top_k", density=1.0).select(candidates, 2)
    assert all(15 <= i < 20 for i in weighted.indices)  # σ · ρ: among the most uncertain typical ones
    with pytest.raises(ConfigError, match="density must be an exponent ≥ 0"):
        _make(registry, "top_k", density=-1)
    no_features = [Candidate(c.atoms, c.max_force_std, None, None) for c in candidates]
    with pytest.raises(ConfigError, match="needs latent features"):
        _make(registry, "top_k", density=1.0).select(no_features, 2)


def test_latent_density_of_a_large_pool_uses_a_reference_sample() -> None:
    from atomforge.plugins.selectors import latent_density

    rng = np.random.default_rng(1)
    features = np.vstack([rng.normal(0, 1, (3000, 8)), np.full((1, 8), 30.0)])
    full = latent_density(features)
    sampled = latent_density(features, max_reference=500)
    assert full.shape == sampled.shape == (3001,)
    assert full[-1] < 0.01 and sampled[-1] < 0.01  # the outlier
    assert np.corrcoef(full[:-1], sampled[:-1])[0, 1] > 0.95  # the bulk ranks alike
