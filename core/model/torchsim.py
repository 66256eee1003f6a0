"""Run atomforge models in torch-sim: batched MD and relaxations of many systems at once.

torch-sim (``pip install 'atomforge[torchsim]'``, torch-sim-atomistic 0.3.0) is optional, so this
module imports it only when asked: :func:`torchsim_model` builds the adapter
(:class:`AtomforgeModel`, a torch-sim ``ModelInterface``) or says which extra to install.
``from atomforge.model.torchsim import AtomforgeModel`` gives the class itself. See
``docs/torchsim.md``.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from .._errors import ConfigError

__all__ = ["TORCHSIM_EXTRA", "torchsim_available", "torchsim_model"]  # and AtomforgeModel, on demand

#: what to install for the adapter
TORCHSIM_EXTRA = "pip install 'atomforge[torchsim]'  (torch-sim-atomistic 0.3.0; Python ≥ 3.11)"


def _adapter() -> ModuleType:
    """The adapter module, or a :class:`ConfigError` naming the extra when torch-sim is missing."""
    try:
        return importlib.import_module("atomforge.model._torchsim")
    except ImportError as error:
        if "torch_sim" not in str(error) and getattr(error, "name", "") != "torch_sim":
            raise
        raise ConfigError(f"running atomforge models in torch-sim needs the torch-sim package, which is not "
                          f"installed here ({error}); install it with {TORCHSIM_EXTRA}") from error


def torchsim_available() -> bool:
    """Whether torch-sim can be imported (the ``torchsim`` extra is installed)."""
    try:
        _adapter()
    except ConfigError:
        return False
    return True


def torchsim_model(
    model: nn.Module | str | Path,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    head: str | int | None = None,
    compute_stress: bool = True,
    strict: bool = True,
    registry: Any = None,
) -> Any:
    """An atomforge model (loaded, or a model file path) as a torch-sim ``ModelInterface``
    (:class:`AtomforgeModel`; its docstring lists the options). Raises :class:`ConfigError`
    naming the ``torchsim`` extra when torch-sim is not installed."""
    return _adapter().AtomforgeModel(model, device=device, dtype=dtype, head=head, compute_stress=compute_stress,
                                     strict=strict, registry=registry)


def __getattr__(name: str) -> Any:  # PEP 562: the class exists only where torch-sim does
    if name == "AtomforgeModel":
        return getattr(_adapter(), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
