"""Per-group label quotas (``budget.stratify``): split an iteration's budget evenly over groups of
candidates — by MD temperature, explorer, or any ``atoms.info`` key the explorers set — and let
the configured selector choose within each group.

Why: a σ-ranked selector sends nearly every label to the hottest, most distorted trajectories
(on GFN2-xTB ethanol explored at 300/900/1500 K, 150 of 180 labels came from 1500 K), so the
conditions the potential is used at go unlabelled. DP-GEN guards against the same with a label
quota per system (``fp_task_max``). A group that cannot fill its share (an empty trust window)
passes the rest on to the groups that can.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from atomforge import Candidate, Selection, Selector

__all__ = ["group_of", "stratified_select", "unknown_keys"]


def unknown_keys(candidates: Sequence[Candidate], keys: Sequence[str]) -> list[str]:
    """The keys no candidate carries (a typo, or a key no explorer of the campaign sets)."""
    return [k for k in keys if k != "explorer" and candidates and not any(k in c.atoms.info for c in candidates)]


def group_of(candidate: Candidate, keys: Sequence[str]) -> str:
    """The candidate's group label, e.g. ``"temperature=900.0"``; ``explorer`` is the explorer's
    name, any other key is read from ``atoms.info`` (``-`` where a candidate lacks it)."""
    values = []
    for key in keys:
        value: Any = candidate.explorer if key == "explorer" else candidate.atoms.info.get(key, "-")
        values.append(f"{key}={value}")
    return ",".join(values)


def _even_split(total: int, groups: list[str], rng: np.random.Generator) -> dict[str, int]:
    """``total`` spread over ``groups`` as evenly as possible; the remainder to random groups."""
    share, rest = divmod(total, len(groups))
    lucky = set(rng.permutation(len(groups))[:rest].tolist())
    return {g: share + (1 if i in lucky else 0) for i, g in enumerate(groups)}


def stratified_select(selector: Selector, candidates: Sequence[Candidate], budget: int, keys: Sequence[str], *,
                      calibration: float | None = None, seed: int = 0) -> tuple[Selection, dict[str, int]]:
    """The selector run per group with an even share of ``budget``; shares a group cannot fill
    go to the groups that filled theirs (re-selected with the larger share). Returns the merged
    selection (indices into ``candidates``; lo/hi from the selector; counts summed over groups)
    and how many each group got."""
    members: dict[str, list[int]] = {}
    for index, candidate in enumerate(candidates):
        members.setdefault(group_of(candidate, keys), []).append(index)
    groups = sorted(members)
    if not groups:
        return selector.select([], budget, calibration=calibration, seed=seed), {}
    rng = np.random.default_rng(seed)
    quota = _even_split(budget, groups, rng)

    def pick(group: str) -> Selection:
        return selector.select([candidates[i] for i in members[group]], quota[group], calibration=calibration,
                               seed=seed)

    chosen = {g: pick(g) for g in groups}
    for _ in groups:  # each round fills the budget or retires a group that fell short: ≤ len(groups) rounds
        got = {g: len(chosen[g].indices) for g in groups}
        short = budget - sum(got.values())
        growable = [g for g in groups if got[g] == quota[g] < len(members[g])]
        if short <= 0 or not growable:
            break
        quota = dict(got)  # the shares that stuck, plus the shortfall spread over the groups that can grow
        for g, extra in _even_split(short, growable, rng).items():
            quota[g] += extra
            chosen[g] = pick(g)
    merged = [members[g][i] for g in groups for i in chosen[g].indices]
    counts: dict[str, int] = {}
    for g in groups:
        for name, value in chosen[g].counts.items():
            counts[name] = counts.get(name, 0) + int(value)
    first = chosen[groups[0]]
    return Selection(tuple(merged), first.lo, first.hi, counts), {g: len(chosen[g].indices) for g in groups}
