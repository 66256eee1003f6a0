"""Built-in label oracles: ``emt`` and ``lj`` (ASE), ``xtb`` (GFN2-xTB via tblite, extra
``atomforge[xtb]``) and ``ase_calculator`` (any ASE calculator by import path)."""

from __future__ import annotations

import importlib
from typing import Any

from atomforge import CalculatorOracle, ConfigError, OracleSpec, hookimpl


def emt_oracle() -> CalculatorOracle:
    """ASE's effective-medium theory (Al, Cu, Ag, Au, Ni, Pd, Pt; H, C, N, O crudely)."""
    from ase.calculators.emt import EMT

    return CalculatorOracle("emt", EMT)


def lj_oracle(*, sigma: float = 1.0, epsilon: float = 1.0, rc: float | None = None,
              smooth: bool = True) -> CalculatorOracle:
    """Lennard-Jones (ASE), smoothly truncated at ``rc`` (default 3σ)."""
    from ase.calculators.lj import LennardJones

    return CalculatorOracle(
        "lj", lambda: LennardJones(sigma=sigma, epsilon=epsilon, rc=rc or 3 * sigma, smooth=smooth)
    )


def xtb_oracle(*, method: str = "GFN2-xTB", accuracy: float = 1.0,
               electronic_temperature: float = 300.0, max_iterations: int = 250) -> CalculatorOracle:
    """GFN2-xTB (or GFN1-xTB) from tblite; charge and spin from ``atoms.info``."""
    try:
        from tblite.ase import TBLite
    except ImportError as error:
        raise ConfigError("the xtb oracle needs tblite: pip install 'atomforge[xtb]'") from error

    def make() -> Any:
        return TBLite(method=method, accuracy=accuracy, electronic_temperature=electronic_temperature,
                      max_iterations=max_iterations, verbosity=0)

    return CalculatorOracle("xtb", make, stress=False)


def ase_calculator_oracle(*, calculator: str, **kwargs: Any) -> CalculatorOracle:
    """Any ASE calculator: ``calculator: "package.module:ClassName"`` plus its keyword arguments."""
    module_name, _, attr = calculator.partition(":")
    if not attr:
        raise ConfigError(f"calculator must look like 'package.module:ClassName'; got {calculator!r}")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as error:
        raise ConfigError(f"cannot import ASE calculator {calculator!r}: {error}") from error
    return CalculatorOracle(calculator, lambda: cls(**kwargs))


@hookimpl
def register_oracles(register) -> None:  # noqa: ANN001
    register(OracleSpec("emt", emt_oracle, "ASE effective-medium theory (Cu, Ag, Au, Ni, Pd, Pt, Al)"))
    register(OracleSpec("lj", lj_oracle, "ASE Lennard-Jones; sigma, epsilon, rc"))
    register(OracleSpec("xtb", xtb_oracle, "GFN2-xTB via tblite (pip install 'atomforge[xtb]')"))
    register(OracleSpec("ase_calculator", ase_calculator_oracle,
                        "any ASE calculator: calculator='module:Class' + kwargs"))
