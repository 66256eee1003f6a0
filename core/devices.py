"""Devices and precision: where a model runs (``auto``, ``cpu``, ``cuda``, ``cuda:N``) and bf16
autocast with fp32 weights — shared by the training backends, the calculator and the CLI."""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager, Mapping

import torch

from ._errors import ConfigError

__all__ = ["PRECISIONS", "resolve_device", "autocast_context", "cast_outputs"]

PRECISIONS = ("fp32", "bf16")


def resolve_device(spec: str | torch.device | None) -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N`` as a device;
    a device this machine lacks is a :class:`ConfigError` that says what is available."""
    if isinstance(spec, torch.device):
        return spec
    text = "auto" if spec is None else str(spec).strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ConfigError(f"device: expected auto, cpu, cuda or cuda:N; got {spec!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {spec!r}: this torch ({torch.__version__}) sees no CUDA device; use "
                              "device: cpu (or auto), or install a CUDA build of torch on a GPU machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {spec!r}: only {torch.cuda.device_count()} CUDA device(s) here "
                              f"(cuda:0 … cuda:{torch.cuda.device_count() - 1})")
    elif device.type != "cpu":
        raise ConfigError(f"device: expected auto, cpu, cuda or cuda:N; got {spec!r}")
    return device


def autocast_context(device: torch.device, precision: str) -> ContextManager[Any]:
    """bf16 autocast on ``device`` for ``precision: bf16`` (weights stay fp32), else nothing."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if precision != "fp32":
        raise ConfigError(f"precision: expected one of {PRECISIONS}; got {precision!r}")
    return contextlib.nullcontext()


def cast_outputs(outputs: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Floating outputs of an autocast forward back in the model's dtype (a no-op in fp32)."""
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in outputs.items()}
