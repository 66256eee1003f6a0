"""Built-in label oracles.

``emt`` and ``lj`` (ASE), ``xtb`` (GFN2-xTB via tblite, extra ``atomforge[xtb]``), ``pyscf`` (DFT
with a configurable functional and basis, extra ``atomforge[dft]``), the pretrained universal
potentials ``chgnet`` and ``sevenn`` (weights ship inside their wheels; extras
``atomforge[chgnet]``/``atomforge[sevenn]``) and ``ase_calculator`` (any ASE calculator by import
path). Heavy packages are imported when the oracle is built, with an error naming the extra.

Every factory takes plain keyword options, so an oracle can be rebuilt in a worker process from
``(name, options)``; time limits, retries and failure records are added by
:func:`atomforge.label_safely`, not here.
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np
from ase import Atoms, units

from atomforge import CalculatorOracle, ConfigError, OracleFailure, OracleSpec, attach_labels, hookimpl


def _require(module: str, oracle: str, extra: str) -> Any:
    """Import ``module`` or raise a ConfigError saying which extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ConfigError(f"the {oracle} oracle needs {module.split('.')[0]}: "
                          f"pip install 'atomforge[{extra}]' ({error})") from error


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
    tblite_ase = _require("tblite.ase", "xtb", "xtb")

    def make() -> Any:
        return tblite_ase.TBLite(method=method, accuracy=accuracy, electronic_temperature=electronic_temperature,
                                 max_iterations=max_iterations, verbosity=0)

    return CalculatorOracle("xtb", make, stress=False)


class PySCFOracle:
    """Kohn-Sham DFT (or Hartree-Fock with ``xc: HF``) for molecules with PySCF.

    Energy and analytic gradients; charge from ``atoms.info['charge']``, spin multiplicity from
    ``atoms.info['spin']`` (0 = lowest possible). Raises :class:`OracleFailure` when the SCF does
    not converge, so the campaign records the reason and skips the candidate.
    """

    def __init__(self, *, xc: str = "PBE", basis: str = "def2-SVP", max_cycle: int = 100,
                 conv_tol: float = 1e-9, density_fit: bool = False) -> None:
        self.name = f"pyscf:{xc}/{basis}"
        self.xc = xc  # exchange-correlation functional ("HF" for Hartree-Fock)
        self.basis = basis  # Gaussian basis set name
        self.max_cycle = max_cycle  # SCF iterations before giving up
        self.conv_tol = conv_tol  # SCF energy convergence (Hartree)
        self.density_fit = density_fit  # RI/density fitting: faster for larger molecules
        self._pyscf = _require("pyscf", "pyscf", "dft")
        for sub in ("gto", "scf", "dft", "grad"):
            _require(f"pyscf.{sub}", "pyscf", "dft")

    def _molecule(self, atoms: Atoms) -> Any:
        if atoms.pbc.any():
            raise OracleFailure("the pyscf oracle labels molecules only (pbc must be False)")
        charge = int(round(float(atoms.info.get("charge", 0))))
        multiplicity = int(atoms.info.get("spin", 0) or 0)
        electrons = int(atoms.numbers.sum()) - charge
        two_s = multiplicity - 1 if multiplicity > 0 else electrons % 2
        geometry = [(int(z), tuple(p)) for z, p in zip(atoms.numbers, atoms.positions)]
        return self._pyscf.gto.M(atom=geometry, unit="Angstrom", basis=self.basis, charge=charge,
                                 spin=two_s, verbose=0)

    def _mean_field(self, mol: Any) -> Any:
        scf, dft = self._pyscf.scf, self._pyscf.dft
        if self.xc.upper() == "HF":
            mf = scf.RHF(mol) if mol.spin == 0 else scf.UHF(mol)
        else:
            mf = dft.RKS(mol) if mol.spin == 0 else dft.UKS(mol)
            mf.xc = self.xc
        mf = mf.density_fit() if self.density_fit else mf
        mf.max_cycle, mf.conv_tol = self.max_cycle, self.conv_tol
        return mf

    def label(self, atoms: Atoms) -> Atoms:
        mf = self._mean_field(self._molecule(atoms))
        energy = mf.kernel()
        if not mf.converged:
            raise OracleFailure(f"SCF not converged in {self.max_cycle} cycles ({self.xc}/{self.basis})")
        gradient = np.asarray(mf.nuc_grad_method().kernel())  # Hartree/Bohr
        forces = -gradient * units.Hartree / units.Bohr
        return attach_labels(atoms, energy=float(energy) * units.Hartree, forces=forces)


def pyscf_oracle(**options: Any) -> PySCFOracle:
    """DFT with PySCF: ``xc`` (default PBE), ``basis`` (def2-SVP), ``max_cycle``, ``conv_tol``."""
    return PySCFOracle(**options)


def chgnet_oracle(*, model: str = "0.3.0", device: str = "cpu") -> CalculatorOracle:
    """CHGNet, a pretrained universal potential (weights ship with the ``chgnet`` wheel)."""
    dynamics = _require("chgnet.model.dynamics", "chgnet", "chgnet")
    chgnet_model = _require("chgnet.model", "chgnet", "chgnet")

    def make() -> Any:
        loaded = chgnet_model.CHGNet.load(model_name=model, use_device=device, verbose=False)
        return dynamics.CHGNetCalculator(model=loaded, use_device=device)

    return CalculatorOracle(f"chgnet:{model}", make, reuse=True)


def sevenn_oracle(*, model: str = "7net-0", device: str = "cpu", modal: str | None = None) -> CalculatorOracle:
    """SevenNet, a pretrained universal potential (weights ship with the ``sevenn`` wheel);
    ``modal`` selects the fidelity of multi-fidelity models such as ``7net-mf-0``."""
    calculator = _require("sevenn.calculator", "sevenn", "sevenn")
    extra = {"modal": modal} if modal else {}
    return CalculatorOracle(f"sevenn:{model}",
                            lambda: calculator.SevenNetCalculator(model=model, device=device, **extra),
                            reuse=True)


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
    register(OracleSpec("pyscf", pyscf_oracle, "DFT for molecules via PySCF; xc, basis (pip install 'atomforge[dft]')"))
    register(OracleSpec("chgnet", chgnet_oracle, "pretrained CHGNet (pip install 'atomforge[chgnet]')"))
    register(OracleSpec("sevenn", sevenn_oracle, "pretrained SevenNet (pip install 'atomforge[sevenn]')"))
    register(OracleSpec("ase_calculator", ase_calculator_oracle,
                        "any ASE calculator: calculator='module:Class' + kwargs"))
