"""``example_morse``: ASE's Morse pair potential as a label oracle (a cheap stand-in for a
reference method when testing a campaign; any ASE calculator becomes an oracle the same way)."""

from __future__ import annotations

from functools import partial
from typing import Any

from ase.calculators.morse import MorsePotential

from atomforge import CalculatorOracle, ConfigError

__all__ = ["morse_oracle"]

_OPTIONS = ("epsilon", "r0", "rho0", "rcut1", "rcut2")


def morse_oracle(**options: Any) -> CalculatorOracle:
    """``epsilon`` (eV), ``r0`` (Å), ``rho0``, ``rcut1``/``rcut2`` (smooth cutoff, in units of r0):
    ASE's :class:`~ase.calculators.morse.MorsePotential` options."""
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise ConfigError(f"example_morse: unknown option(s) {unknown}; valid: {', '.join(_OPTIONS)}")
    # a partial of the class (not a lambda) so that campaigns can send the oracle to worker processes
    return CalculatorOracle("example_morse", partial(MorsePotential, **options))
