"""The conformance kit of selectors: what every ``register_selectors`` plugin should pass.

    from atomforge.testing import check_selector
    check_selector(MySelector, options={"lo": 0.05, "hi": 0.5})   # raises ConformanceError on failure

On 40 synthetic candidates (small molecules with known ``max_force_std`` spread over
0.005–2 eV/Å, ``energy_std``, 8-dimensional latent ``features``, distinct keys, three explorers)
the selector must return an :class:`atomforge.Selection` of at most ``budget`` distinct integer
indices into the candidates for budgets 0, 1, 5, 40 and 100, with and without a calibration
scale (``None``: it may instead raise an :class:`atomforge.AtomforgeError`, e.g. for adaptive
trust levels); an empty selection for no candidates; the same selection for the same seed; and
leave the candidate list, its Atoms (positions, numbers, info) and features untouched.
Candidates without uncertainties (``max_force_std``/``energy_std`` ``None``, a model without a UQ
head) must be handled or rejected with an :class:`atomforge.AtomforgeError`.
"""

from __future__ import annotations

import copy
import random
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from ase import Atoms

from .._errors import AtomforgeError
from .._specs import SelectorSpec
from ..exploration.records import Candidate, Selection
from ._common import CheckResult, check, finish

__all__ = ["check_selector", "synthetic_candidates"]

BUDGETS = (0, 1, 5, 40, 100)
CALIBRATION = 0.1  # eV/Å: the typical max force std of the synthetic model on its validation set
_EXPLORERS = ("md", "perturb", "minima_hopping")


def synthetic_candidates(count: int = 40, seed: int = 0) -> list[Candidate]:
    """``count`` candidates: small distinct molecules, ``max_force_std`` log-uniform in
    [0.005, 2] eV/Å, ``energy_std``, 8-dimensional features in a few clusters, distinct keys."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3.0, (4, 8))
    out = []
    for i in range(count):
        positions = np.array([[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.0]]) + rng.normal(0, 0.05, (3, 3))
        atoms = Atoms("OH2", positions=positions, info={"step": i, "explorer": _EXPLORERS[i % 3]})
        std = float(np.exp(rng.uniform(np.log(0.005), np.log(2.0))))
        out.append(Candidate(atoms=atoms, max_force_std=std, energy_std=float(std * rng.uniform(0.5, 3.0)),
                             features=centres[i % 4] + rng.normal(0, 0.5, 8), explorer=_EXPLORERS[i % 3],
                             key=f"candidate-{i:03d}"))
    return out


def _failure(name: str, error: BaseException) -> CheckResult:
    return check(f"{name} — raised {type(error).__name__}: {error}", False)


def _problems(selection: Any, n: int, budget: int) -> list[str]:
    """What is wrong with ``selection`` for ``n`` candidates and ``budget`` (empty if nothing)."""
    if not isinstance(selection, Selection):
        return [f"returned {type(selection).__name__}, not an atomforge.Selection"]
    try:
        indices = list(selection.indices)
    except TypeError:
        return [f"indices is {type(selection.indices).__name__}, not a sequence"]
    problems = []
    bad_type = [i for i in indices if isinstance(i, bool) or not isinstance(i, (int, np.integer))]
    if bad_type:
        problems.append(f"non-integer indices {bad_type[:5]!r}")
    ints = [int(i) for i in indices if not isinstance(i, bool) and isinstance(i, (int, np.integer))]
    if len(set(ints)) != len(ints):
        duplicated = sorted({i for i in ints if ints.count(i) > 1})
        problems.append(f"duplicate indices {duplicated[:10]}")
    outside = [i for i in ints if not 0 <= i < n]
    if outside:
        problems.append(f"indices outside [0, {n}): {outside[:10]}")
    if len(indices) > budget:
        problems.append(f"{len(indices)} indices for a budget of {budget}")
    return problems


def _snapshot(candidates: Sequence[Candidate]) -> list[tuple[Any, ...]]:
    return [(id(c), id(c.atoms), c.atoms.positions.copy(), c.atoms.numbers.copy(), copy.deepcopy(c.atoms.info),
             None if c.features is None else np.array(c.features, copy=True), c.max_force_std, c.energy_std, c.key)
            for c in candidates]


def _same_snapshot(a: list[tuple[Any, ...]], b: list[tuple[Any, ...]]) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x[:2] != y[:2] or not np.array_equal(x[2], y[2]) or not np.array_equal(x[3], y[3]):
            return False
        if x[4] != y[4] or x[6:] != y[6:]:
            return False
        if (x[5] is None) != (y[5] is None) or (x[5] is not None and not np.array_equal(x[5], y[5])):
            return False
    return True


def _select_checks(selector: Any, candidates: list[Candidate], seed: int, results: list[CheckResult]) -> None:
    n = len(candidates)
    before = _snapshot(candidates)
    listed = list(candidates)
    for calibration in (CALIBRATION, None):
        for budget in BUDGETS:
            name = f"select({n} candidates, budget={budget}, calibration={calibration})"
            try:
                selection = selector.select(candidates, budget, calibration=calibration, seed=seed)
            except AtomforgeError as error:
                if calibration is None:  # e.g. adaptive trust levels need the scale: a clear refusal is fine
                    results.append(check(f"{name}: a Selection or an AtomforgeError ({type(error).__name__})", True))
                    continue
                results.append(_failure(f"{name} returns a Selection", error))
                continue
            except Exception as error:  # noqa: BLE001
                results.append(_failure(f"{name} returns a Selection", error))
                continue
            problems = _problems(selection, n, budget)
            results.append(check(f"{name}: a Selection of ≤ budget distinct indices in range "
                                 f"(problems: {'; '.join(problems) or 'none'})", not problems))
    same = _same_snapshot(before, _snapshot(candidates)) and all(a is b for a, b in zip(listed, candidates))
    results.append(check("candidates list, their Atoms (positions, numbers, info) and features not mutated", same))


def _determinism_check(selector: Any, candidates: list[Candidate], seed: int, results: list[CheckResult]) -> None:
    name = "same seed gives the same selection (budget 5, calibration given; global RNGs reseeded in between)"
    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:
        np.random.seed(seed + 1)
        random.seed(seed + 1)
        first = selector.select(candidates, 5, calibration=CALIBRATION, seed=seed)
        np.random.seed(seed + 2)
        random.seed(seed + 2)
        again = selector.select(candidates, 5, calibration=CALIBRATION, seed=seed)
        found = f"{tuple(getattr(first, 'indices', ()))} then {tuple(getattr(again, 'indices', ()))}"
        results.append(check(f"{name}: found {found}",
                             tuple(getattr(first, "indices", ())) == tuple(getattr(again, "indices", ()))))
    except Exception as error:  # noqa: BLE001
        results.append(_failure(name, error))
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)


def _empty_checks(selector: Any, seed: int, results: list[CheckResult]) -> None:
    for budget in (0, 5):
        name = f"no candidates (budget {budget}) gives an empty Selection"
        try:
            selection = selector.select([], budget, calibration=CALIBRATION, seed=seed)
        except Exception as error:  # noqa: BLE001
            results.append(_failure(name, error))
            continue
        ok = isinstance(selection, Selection) and len(tuple(selection.indices)) == 0
        found = (f"{type(selection).__name__} with indices {tuple(selection.indices)}"
                 if isinstance(selection, Selection) else type(selection).__name__)
        results.append(check(f"{name} (found {found})", ok))


def _no_uq_check(selector: Any, candidates: list[Candidate], seed: int, results: list[CheckResult]) -> None:
    blind = [Candidate(atoms=c.atoms, max_force_std=None, energy_std=None, features=c.features,
                       explorer=c.explorer, key=c.key) for c in candidates]
    name = "candidates without uncertainties (max_force_std=None): handled or an AtomforgeError"
    try:
        selection = selector.select(blind, 5, calibration=None, seed=seed)
    except AtomforgeError as error:
        results.append(check(f"{name} (rejected: {type(error).__name__})", True))
        return
    except Exception as error:  # noqa: BLE001
        results.append(_failure(f"{name}: expected an AtomforgeError", error))
        return
    problems = _problems(selection, len(blind), 5)
    results.append(check(f"{name} (problems: {'; '.join(problems) or 'none'})", not problems))


def check_selector(
    factory_or_spec: Callable[..., Any] | SelectorSpec,
    *,
    options: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> list[CheckResult]:
    """Run every check on ``factory(**options)``; raise :class:`~atomforge.ConformanceError`
    listing the failures, else return the results."""
    factory = factory_or_spec.factory if isinstance(factory_or_spec, SelectorSpec) else factory_or_spec
    options = dict(options or {})
    results: list[CheckResult] = []
    try:
        selector = factory(**options)
    except Exception as error:  # noqa: BLE001
        results.append(_failure(f"factory(**{options!r}) builds a selector", error))
        return finish(results)
    has_select = callable(getattr(selector, "select", None))
    results.append(check(f"factory returns an object with select() (found {type(selector).__name__})", has_select))
    if not has_select:
        return finish(results)
    candidates = synthetic_candidates(40, seed)
    _select_checks(selector, candidates, seed, results)
    _empty_checks(selector, seed, results)
    _determinism_check(selector, candidates, seed, results)
    _no_uq_check(selector, candidates, seed, results)
    return finish(results)
