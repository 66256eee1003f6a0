"""Built-in training engine ``torch``: one process on any device (``training.device``), fp32 or
bf16 autocast (``training.precision``). It has no options block of its own."""

from __future__ import annotations

from typing import Any, Mapping

from atomforge import ConfigError, EngineSpec, TorchBackend, TrainSettings, hookimpl


def check_options(options: Mapping[str, Any] | None) -> None:
    """The ``torch`` engine takes no options block."""
    if options:
        raise ConfigError(f"engine torch has no options block; got torch: {dict(options)!r}. Its settings are "
                          "training.device (auto | cpu | cuda | cuda:N) and training.precision (fp32 | bf16)")


def make_backend(*, options: Mapping[str, Any] | None, settings: TrainSettings) -> TorchBackend:
    check_options(options)
    return TorchBackend.from_settings(settings)


@hookimpl
def register_engines(register) -> None:  # noqa: ANN001
    register(EngineSpec("torch", make_backend, "one process on any device (training.device), fp32 or bf16 "
                        "autocast (training.precision)", check_options=check_options))
