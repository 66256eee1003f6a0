"""Built-in training engine ``torch`` (single process)."""

from __future__ import annotations

from atomforge import EngineSpec, TorchEngine, hookimpl


@hookimpl
def register_engines(register) -> None:  # noqa: ANN001
    register(EngineSpec("torch", TorchEngine, "single-process PyTorch engine (AdamW, EMA, checkpoints)"))
