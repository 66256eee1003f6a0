"""The conformance kit of data sources: what every ``register_data_sources`` plugin should pass.

    from atomforge.testing import check_data_source
    check_data_source(read_mine, options={"path": "train.mine"}, base_dir=tmp_path, require=("energy", "forces"))

Calls ``factory(dict(options), Path(base_dir))`` and checks: a non-empty list (or iterable) of
``ase.Atoms``; every structure passes :func:`atomforge.validate_structure` with ``require``
(geometry, label presence and shapes, finite values); metadata in ``info`` has the right type
when present (``charge``, ``spin``, ``weight`` finite numbers, ``weight`` ≥ 0, ``fidelity`` an
integer); an unknown option raises :class:`atomforge.ConfigError`; with a ``path`` (or
``paths``) option, a missing file raises an :class:`atomforge.AtomforgeError` (``ConfigError`` or
``DataValidationError``), not a bare ``OSError``; a relative ``path`` resolves against
``base_dir``, not the working directory (an absolute ``path`` inside ``base_dir`` is passed
relative, from another working directory, and must give the same structures).
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
from ase import Atoms

from .._errors import AtomforgeError, ConfigError
from .._specs import DataSourceSpec
from ..data.structures import validate_structure
from ._common import CheckResult, check, finish

__all__ = ["check_data_source"]

UNKNOWN_OPTION = "__not_an_option__"


def _failure(name: str, error: BaseException) -> CheckResult:
    return check(f"{name} — raised {type(error).__name__}: {error}", False)


def _is_number(value: Any) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return False
    if isinstance(value, np.ndarray) and value.shape == ():
        value = value.item()
    return isinstance(value, (int, float, np.integer, np.floating)) and math.isfinite(float(value))


def _is_integer(value: Any) -> bool:
    if isinstance(value, np.ndarray) and value.shape == ():
        value = value.item()
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _metadata_problems(atoms: Atoms) -> list[str]:
    problems = []
    for key in ("charge", "spin", "weight"):
        if key in atoms.info and not _is_number(atoms.info[key]):
            problems.append(f"info[{key!r}] = {atoms.info[key]!r} is not a finite number")
    if "weight" in atoms.info and _is_number(atoms.info["weight"]) and float(atoms.info["weight"]) < 0:
        problems.append(f"info['weight'] = {atoms.info['weight']!r} is negative")
    if "fidelity" in atoms.info and not _is_integer(atoms.info["fidelity"]):
        problems.append(f"info['fidelity'] = {atoms.info['fidelity']!r} is not an integer")
    return problems


@contextlib.contextmanager
def _working_directory(path: Path) -> Iterator[None]:
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def _read(factory: Callable[..., Any], options: Mapping[str, Any], base_dir: Path) -> list[Any]:
    return list(factory(dict(options), Path(base_dir)))


def _missing_file_options(options: Mapping[str, Any], base_dir: Path) -> dict[str, Any] | None:
    """``options`` with its (first) file replaced by a missing one of the same suffix."""
    if "path" in options:
        suffix = Path(str(options["path"])).suffix
        return {**options, "path": str(Path(base_dir) / f"__atomforge_missing_file__{suffix}")}
    paths = options.get("paths")
    if paths and not isinstance(paths, (str, Path)):
        paths = list(paths)
        paths[0] = str(Path(base_dir) / f"__atomforge_missing_file__{Path(str(paths[0])).suffix}")
        return {**options, "paths": paths}
    return None


def _relative_path_check(factory: Callable[..., Any], options: Mapping[str, Any], base_dir: Path,
                         structures: Sequence[Atoms], results: list[CheckResult]) -> None:
    raw = Path(str(options["path"])).expanduser()
    base = Path(base_dir).resolve()
    if raw.is_absolute():
        try:
            relative = raw.resolve().relative_to(base)
        except ValueError:
            return  # outside base_dir: nothing to compare
        reference, given = structures, str(relative)
    else:  # the path is already relative: compare with the absolute one
        try:
            reference = [a for a in _read(factory, {**options, "path": str(base / raw)}, base_dir)]
        except Exception as error:  # noqa: BLE001
            results.append(_failure("the absolute form of a relative path reads the same file", error))
            return
        given = str(raw)
    name = f"a relative path ({given!r}) resolves against base_dir, not the working directory"
    try:
        with tempfile.TemporaryDirectory() as elsewhere, _working_directory(Path(elsewhere)):
            found = _read(factory, {**options, "path": given}, base)
    except Exception as error:  # noqa: BLE001
        results.append(_failure(name, error))
        return
    same = len(found) == len(reference) and all(
        isinstance(a, Atoms) and len(a) == len(b) and np.array_equal(a.numbers, b.numbers)
        and np.allclose(a.positions, b.positions, rtol=0, atol=1e-10)
        for a, b in zip(found, reference))
    results.append(check(f"{name}: same structures and positions (found {len(found)}, expected {len(reference)})",
                         bool(same)))


def check_data_source(
    factory_or_spec: Callable[..., Any] | DataSourceSpec,
    *,
    options: Mapping[str, Any],
    base_dir: Path | str,
    require: Sequence[str] = (),
) -> list[CheckResult]:
    """Run every check on ``factory(dict(options), Path(base_dir))``; raise
    :class:`~atomforge.ConformanceError` listing the failures, else return the results."""
    factory = factory_or_spec.factory if isinstance(factory_or_spec, DataSourceSpec) else factory_or_spec
    options = dict(options)
    base_dir = Path(base_dir)
    require = tuple(require)
    results: list[CheckResult] = []
    try:
        structures = _read(factory, options, base_dir)
    except Exception as error:  # noqa: BLE001
        results.append(_failure(f"factory({options!r}, base_dir) reads structures", error))
        return finish(results)
    results.append(check(f"returns a non-empty list of structures (found {len(structures)})", len(structures) > 0))
    not_atoms = sorted({type(a).__name__ for a in structures if not isinstance(a, Atoms)})
    results.append(check(f"every structure is an ase.Atoms (found {not_atoms or 'only Atoms'})", not not_atoms))
    invalid: list[str] = []
    metadata: list[str] = []
    for index, atoms in enumerate(structures):
        if not isinstance(atoms, Atoms):
            continue
        try:
            validate_structure(atoms, require=require, index=index, source="check_data_source")
        except Exception as error:  # noqa: BLE001 - DataValidationError, or worse
            invalid.append(f"{type(error).__name__}: {error}")
        metadata.extend(f"structure {index}: {p}" for p in _metadata_problems(atoms))
    results.append(check(f"every structure passes validate_structure(require={require}) "
                         f"(first problems: {invalid[:3] or 'none'})", not invalid))
    results.append(check(f"metadata in info has the right types (charge/spin/weight numbers, fidelity int) "
                         f"(first problems: {metadata[:3] or 'none'})", not metadata))
    name = f"an unknown option ({UNKNOWN_OPTION!r}) raises ConfigError"
    try:
        _read(factory, {**options, UNKNOWN_OPTION: 1}, base_dir)
        results.append(check(f"{name} (it was accepted silently)", False))
    except ConfigError:
        results.append(check(name, True))
    except Exception as error:  # noqa: BLE001
        results.append(_failure(name, error))
    missing = _missing_file_options(options, base_dir)
    if missing is not None:
        name = "a missing file raises an AtomforgeError (ConfigError or DataValidationError), not OSError"
        try:
            found = _read(factory, missing, base_dir)
            results.append(check(f"{name} (it returned {len(found)} structures)", False))
        except AtomforgeError:
            results.append(check(name, True))
        except Exception as error:  # noqa: BLE001
            results.append(_failure(name, error))
    if "path" in options and not not_atoms:
        _relative_path_check(factory, options, base_dir, structures, results)
    return finish(results)
