"""Built-in training engine ``deepspeed``: data-parallel, ZeRO-sharded training (stages 0–3).

The engine keeps the single-process engine's contract (:class:`atomforge.TorchEngine`: same
epochs, EMA, validation, early stopping, ``max_time``, callbacks) and replaces the step:

* **data**: each epoch's shuffled order is the single-process order; every global batch of
  ``training.batch_size`` structures is split over the ranks so that each rank's atoms + edges
  are balanced (longest-processing-time first), then into ``gradient_accumulation_steps``
  micro-batches. With equal shares and equal-sized structures the gradient is exactly the
  single-process one. The load-imbalance ratio (max / mean of per-rank atoms + edges) is logged.
* **ZeRO-3 and forces**: force training differentiates through ``-∂E/∂r``
  (``create_graph=True``), so the parameters must stay gathered from the forward until the
  outer backward has run; DeepSpeed would release them after each sub-module's forward. The
  engine gathers a ZeRO-3 model's parameters for one micro-step and partitions them again
  before the optimiser step, so at rest each rank holds 1/N of parameters, gradients and
  optimiser state.
* **EMA, best weights**: kept per rank over the rank's own copy of each parameter (its ZeRO-3
  partition, else the full tensor), so they shard like the model.
* **checkpoints**: DeepSpeed checkpoints (``<run>/deepspeed_checkpoint/epoch<N>``) plus one
  small file per rank (EMA, best weights, RNG); a kill at any point resumes from the last
  complete one. :meth:`export_model` gathers the best EMA weights into an ordinary CPU module
  (saved by the workflow as the usual single-file model; DeepSpeed is not needed to load it).

Options (the config's ``deepspeed:`` block) are documented in ``docs/config.md``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch

from atomforge import ConfigError, EngineSpec, TorchEngine, hookimpl
from atomforge import distributed as dist
from atomforge import keys as K
from atomforge.graph import GraphDataset, collate
from atomforge.losses import CompositeLoss
from atomforge.metrics import ErrorAccumulator
from atomforge.training import _AUGMENT_SEED, TrainSettings, atomic_save

__all__ = ["DeepSpeedOptions", "DeepSpeedEngine", "parse_options", "shard_batch", "plan_epoch", "imbalance",
           "deepspeed_config"]

CHECKPOINT_DIR = "deepspeed_checkpoint"
_KEEP_CHECKPOINTS = 2


@dataclass(frozen=True)
class DeepSpeedOptions:
    """The ``deepspeed:`` block of a run config."""

    zero_stage: int = 2  # ZeRO stage 0 (plain data parallel) … 3 (parameters sharded too)
    offload_optimizer: str = "none"  # none | cpu: optimiser state in CPU memory (GPU runs)
    offload_param: str = "none"  # none | cpu: ZeRO-3 parameters in CPU memory (GPU runs)
    precision: str = "fp32"  # fp32 | bf16 (autocast of the forward; fp32 master weights)
    gradient_accumulation_steps: int = 1  # micro-batches per optimiser step, per rank
    balance: bool = True  # balance per-rank atoms + edges in each step (else round-robin)
    balance_window: int = 8  # global batches regrouped together when one step is unbalanced
    backend: str = "auto"  # gloo | nccl | auto (nccl with CUDA, else gloo)
    config: dict[str, Any] = field(default_factory=dict)  # raw DeepSpeed config keys, merged last


def parse_options(options: Mapping[str, Any] | None) -> DeepSpeedOptions:
    """Validated :class:`DeepSpeedOptions`; unknown keys and bad values are :class:`ConfigError`."""
    data = dict(options or {})
    names = [f.name for f in dataclasses.fields(DeepSpeedOptions)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"deepspeed: unknown key(s) {unknown}; valid keys: {sorted(names)}")
    out = DeepSpeedOptions(**data)
    checks = [
        (out.zero_stage in (0, 1, 2, 3) and not isinstance(out.zero_stage, bool),
         f"deepspeed.zero_stage: expected 0, 1, 2 or 3, got {out.zero_stage!r}"),
        (out.offload_optimizer in ("none", "cpu"), f"deepspeed.offload_optimizer: expected none or cpu, got {out.offload_optimizer!r}"),
        (out.offload_param in ("none", "cpu"), f"deepspeed.offload_param: expected none or cpu, got {out.offload_param!r}"),
        (out.offload_param == "none" or out.zero_stage == 3, "deepspeed.offload_param needs zero_stage: 3"),
        (out.offload_optimizer == "none" or out.zero_stage >= 1, "deepspeed.offload_optimizer needs zero_stage ≥ 1"),
        (out.precision in ("fp32", "bf16"), f"deepspeed.precision: expected fp32 or bf16, got {out.precision!r}"),
        (isinstance(out.gradient_accumulation_steps, int) and out.gradient_accumulation_steps >= 1,
         f"deepspeed.gradient_accumulation_steps: expected an integer ≥ 1, got {out.gradient_accumulation_steps!r}"),
        (isinstance(out.balance, bool), f"deepspeed.balance: expected true or false, got {out.balance!r}"),
        (isinstance(out.balance_window, int) and out.balance_window >= 1,
         f"deepspeed.balance_window: expected an integer ≥ 1, got {out.balance_window!r}"),
        (out.backend in ("auto", "gloo", "nccl"), f"deepspeed.backend: expected auto, gloo or nccl, got {out.backend!r}"),
        (isinstance(out.config, Mapping), f"deepspeed.config: expected a mapping of DeepSpeed keys, got {out.config!r}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    return out


def deepspeed_config(options: DeepSpeedOptions, settings: TrainSettings, world_size: int,
                     num_parameters: int | None = None) -> dict[str, Any]:
    """The DeepSpeed JSON config for ``options``: ``training.batch_size`` is the global batch
    (structures per optimiser step, as in single-process training). The gradient-reduction
    bucket is sized to the model (DeepSpeed's default, 5e8 elements, is a 2 GB buffer per rank
    for ZeRO-3 — far more than an interatomic potential needs)."""
    accum = options.gradient_accumulation_steps
    if settings.batch_size % (world_size * accum):
        raise ConfigError(
            f"training.batch_size={settings.batch_size} is the global batch; it must be a multiple of "
            f"processes × deepspeed.gradient_accumulation_steps = {world_size} × {accum}"
        )
    zero: dict[str, Any] = {"stage": options.zero_stage}
    if num_parameters is not None:
        zero["reduce_bucket_size"] = int(min(5e8, max(1e6, num_parameters // 10)))
    if options.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": options.offload_optimizer}
    if options.offload_param != "none":
        zero["offload_param"] = {"device": options.offload_param}
    config: dict[str, Any] = {
        "train_batch_size": settings.batch_size,
        "train_micro_batch_size_per_gpu": settings.batch_size // (world_size * accum),
        "gradient_accumulation_steps": accum,
        "gradient_clipping": float(settings.grad_clip or 0.0),
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # our AdamW param groups (no decay on biases)
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return _merge(config, options.config)


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, Mapping) and isinstance(out.get(key), dict) else value
    return out


def graph_cost(graph: Mapping[str, torch.Tensor]) -> float:
    """Work of one structure in a step, proportional to atoms + edges."""
    return float(graph[K.POSITIONS].shape[0] + graph[K.EDGE_INDEX].shape[1])


def shard_batch(indices: Sequence[int], costs: Sequence[float], world_size: int, *,
                balance: bool = True) -> list[list[int]]:
    """Split one global batch over ``world_size`` ranks. ``balance``: largest cost first to
    the least-loaded rank (ties: fewest structures, then lowest rank); else round-robin.
    Every rank gets at least one structure (the caller pads batches to ≥ ``world_size``)."""
    if len(indices) < world_size:
        raise ValueError(f"a batch of {len(indices)} structures cannot feed {world_size} ranks")
    if not balance:
        return [list(indices[r::world_size]) for r in range(world_size)]
    shards: list[list[int]] = [[] for _ in range(world_size)]
    loads = [0.0] * world_size
    for index in sorted(indices, key=lambda i: (-costs[i], i)):
        target = min(range(world_size), key=lambda r: (loads[r], len(shards[r]), r))
        shards[target].append(index)
        loads[target] += costs[index]
    empty = [r for r in range(world_size) if not shards[r]]
    for r in empty:  # more ranks than big structures: take one from the fullest shard
        donor = max(range(world_size), key=lambda q: len(shards[q]))
        shards[r].append(shards[donor].pop())
    position = {index: k for k, index in enumerate(indices)}
    return [sorted(shard, key=position.__getitem__) for shard in shards]


def imbalance(shards: Sequence[Sequence[int]], costs: Sequence[float]) -> float:
    """max / mean of the ranks' summed costs (1.0 = perfectly balanced)."""
    loads = [sum(costs[i] for i in shard) for shard in shards]
    mean = sum(loads) / len(loads)
    return max(loads) / mean if mean > 0 else 1.0


def _fill_bins(indices: Sequence[int], costs: Sequence[float], sizes: Sequence[int]) -> list[list[int]]:
    """Largest cost first into the least-loaded bin that still has room (bin k holds ``sizes[k]``)."""
    bins: list[list[int]] = [[] for _ in sizes]
    loads = [0.0] * len(sizes)
    for index in sorted(indices, key=lambda i: (-costs[i], i)):
        open_bins = [k for k in range(len(sizes)) if len(bins[k]) < sizes[k]]
        target = min(open_bins, key=lambda k: (loads[k], k))
        bins[target].append(index)
        loads[target] += costs[index]
    return bins


def plan_epoch(order: Sequence[int], costs: Sequence[float], batch_size: int, world_size: int, *,
               balance: bool = True, window: int = 8, tolerance: float = 1.05) -> list[list[list[int]]]:
    """The epoch's steps, each a list of per-rank index lists.

    Steps follow the shuffled ``order`` in global batches of ``batch_size``, split per step with
    :func:`shard_batch` — exactly the single-process batches. Where that leaves a step's ranks
    more than ``tolerance`` apart (mixed molecule and cell sizes), the ``window`` global batches
    around it are regrouped: the same structures and number of steps, each (step, rank) slot
    keeping its structure count, filled largest-first into the least-loaded slot; slots of
    similar load then share a step. A step's structure count may then differ from
    ``batch_size`` (its work does not)."""
    steps: list[list[list[int]]] = []
    span = batch_size * max(1, window)
    for start in range(0, len(order), span):
        chunk = list(order[start : start + span])
        plain = [shard_batch(_padded(chunk[k : k + batch_size], chunk, world_size), costs, world_size,
                             balance=balance) for k in range(0, len(chunk), batch_size)]
        if not balance or max(imbalance(step, costs) for step in plain) <= tolerance:
            steps.extend(plain)
            continue
        sizes = [len(shard) for step in plain for shard in step]
        members = [i for step in plain for shard in step for i in shard]
        bins = _fill_bins(members, costs, sizes)
        # neighbours in load share a step, so each step's ranks end up alike
        by_load = sorted(range(len(bins)), key=lambda k: (sum(costs[i] for i in bins[k]), k))
        steps.extend([[bins[by_load[s * world_size + r]] for r in range(world_size)] for s in range(len(plain))])
    return steps


def _padded(batch: list[int], pool: list[int], need: int) -> list[int]:
    """A short last batch borrows structures from the start of ``pool`` until it has ``need``."""
    out, k = list(batch), 0
    while len(out) < need:
        out.append(pool[k % len(pool)])
        k += 1
    return out


class DeepSpeedEngine(TorchEngine):
    """ZeRO-sharded data-parallel engine; see the module docstring."""

    def __init__(
        self,
        *,
        model: torch.nn.Module,
        loss: CompositeLoss,
        optimizer: torch.optim.Optimizer,
        settings: TrainSettings,
        scheduler: Any = None,
        callbacks: Sequence[Any] = (),
        checkpoint_path: Path | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        self.options = parse_options(options)
        deepspeed = _import_deepspeed()
        _init_distributed(deepspeed, self.options.backend)
        self.world_size, self.rank = dist.world_size(), dist.rank()
        self.ds_config = deepspeed_config(self.options, settings, self.world_size,
                                          sum(p.numel() for p in model.parameters()))
        device = _device()
        # an empty twin of the module to load gathered weights into at export (no memory)
        self._template = copy.deepcopy(model).to("meta")
        model.to(device)
        super().__init__(model=model, loss=loss, optimizer=optimizer, settings=dataclasses.replace(
            settings, ema_decay=None), scheduler=scheduler, callbacks=callbacks, checkpoint_path=None)
        self.settings = settings
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.ds_config)
        self.device = device
        self.checkpoint_dir = Path(checkpoint_path).with_name(CHECKPOINT_DIR) if checkpoint_path else None
        self._params = list(self.model.parameters())
        self._ema_decay = settings.ema_decay
        self._ema: list[torch.Tensor] | None = None
        self._ema_updates = 0
        self._best_local: list[torch.Tensor] | None = None
        self._costs: list[float] | None = None
        self.last_imbalance = 1.0

    # -- the rank's own copy of each parameter ---------------------------------------------------
    @property
    def zero3(self) -> bool:
        return self.options.zero_stage == 3

    def _local(self) -> list[torch.Tensor]:
        """This rank's tensor of each parameter: its ZeRO-3 partition, else the full tensor."""
        return [p.ds_tensor.data if self.zero3 else p.data for p in self._params]

    @contextlib.contextmanager
    def _gathered(self) -> Iterator[None]:
        """Keep a ZeRO-3 model's parameters whole on every rank inside the block (needed when
        forces are differentiated through; see the module docstring); no-op below stage 3."""
        if not self.zero3:
            yield
            return
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        stale = [p for p in self._params if p.ds_status == ZeroParamStatus.AVAILABLE]
        if stale:  # left whole by DeepSpeed (e.g. a checkpoint save): the partitions are the truth
            stale[0].partition(param_list=stale)
        for p in self._params:
            p.ds_persist = True
            p.is_external_param = True  # DeepSpeed's sub-module release skips these
        self._params[0].all_gather(param_list=self._params)
        try:
            yield
        finally:
            for p in self._params:
                p.ds_persist = False
                p.is_external_param = False
            available = [p for p in self._params if p.ds_status == ZeroParamStatus.AVAILABLE]
            if available:
                available[0].partition(param_list=available)

    @contextlib.contextmanager
    def _swapped(self, tensors: list[torch.Tensor] | None) -> Iterator[None]:
        """Temporarily put ``tensors`` (EMA or best weights, this rank's copies) into the model."""
        if tensors is None:
            yield
            return
        local = self._local()
        saved = [t.clone() for t in local]
        with torch.no_grad():
            for dst, src in zip(local, tensors):
                dst.copy_(src)
        try:
            yield
        finally:
            with torch.no_grad():
                for dst, src in zip(local, saved):
                    dst.copy_(src)

    def _update_ema(self) -> None:
        if not self._ema_decay:
            return
        local = self._local()
        if self._ema is None:
            self._ema = [t.detach().clone() for t in local]
        else:
            n = float(self._ema_updates)
            d = min(self._ema_decay, (1.0 + n) / (10.0 + n))
            torch._foreach_lerp_(self._ema, [t.detach() for t in local], 1.0 - d)
        self._ema_updates += 1

    # -- training --------------------------------------------------------------------------------
    def _autocast(self) -> Any:
        if self.options.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device) for k, v in batch.items()} if self.device.type != "cpu" else batch

    def _steps(self, dataset: GraphDataset, order: list[int]) -> Iterator[tuple[list[list[int]], float]]:
        """For each global batch: this rank's micro-batches and the step's load imbalance."""
        if self._costs is None or len(self._costs) != len(dataset):
            self._costs = [graph_cost(g) for g in dataset.graphs]
        accum = self.options.gradient_accumulation_steps
        for shards in plan_epoch(order, self._costs, self.settings.batch_size, self.world_size * accum,
                                 balance=self.options.balance, window=self.options.balance_window):
            # ranks × accumulation slots: slot r + world·a is rank r's a-th micro-batch
            mine = [shards[self.rank + self.world_size * a] for a in range(accum)]
            loads = [sum(sum(self._costs[i] for i in shards[r + self.world_size * a]) for a in range(accum))
                     for r in range(self.world_size)]
            yield mine, max(loads) / (sum(loads) / len(loads))

    def _train_epoch(self, train: GraphDataset, started: float) -> tuple[float, int, bool]:
        self.engine.train()
        base = self.settings.seed * 100_003 + self.epoch
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(base)).tolist()
        augment = torch.Generator().manual_seed(base + _AUGMENT_SEED + 7_919 * self.rank)
        want_forces = K.FORCES in self.loss.outputs
        total, micro, steps, timed_out, ratios = 0.0, 0, 0, False, []
        for micro_batches, ratio in self._steps(train, order):
            ratios.append(ratio)
            for indices in micro_batches:
                batch = self._to_device(collate([train.graphs[i] for i in indices]))
                batch = self.loss.augment(batch, augment)
                with self._gathered(), self._autocast():
                    outputs = self.engine(batch, compute_forces=want_forces,
                                          compute_stress=self.settings.compute_stress)
                    outputs = {k: v.float() for k, v in outputs.items()}
                    loss, _ = self.loss(batch, outputs, self.model)
                    self.engine.backward(loss)
                self.engine.step()
                total += float(loss.detach())
                micro += 1
            steps += 1
            self._update_ema()
            if hasattr(self.scheduler, "update_time"):
                self.scheduler.update_time(self.elapsed + time.perf_counter() - started)
            if self.settings.max_time is not None and dist.all_reduce_max(float(self._out_of_time(started))):
                timed_out = True
                break
        self.last_imbalance = sum(ratios) / max(len(ratios), 1)
        self.epoch_train_metrics = {"load_imbalance": self.last_imbalance}
        return dist.all_reduce_mean(total / max(micro, 1)), steps, timed_out

    def validate(self, valid: GraphDataset) -> tuple[float, dict[str, float]]:
        """Loss and errors of the EMA weights on ``valid``, each rank on its share, reduced."""
        self.engine.eval()
        acc = ErrorAccumulator()
        total, count = 0.0, 0
        mine = list(range(self.rank, len(valid), self.world_size))
        size = self.settings.valid_batch_size
        with self._swapped(self._ema), self._gathered():
            for start in range(0, len(mine), size):
                batch = self._to_device(collate([valid.graphs[i] for i in mine[start : start + size]]))
                with self._autocast():
                    outputs = self.model(batch, compute_forces=True, compute_stress=self.settings.compute_stress)
                outputs = {k: v.float() for k, v in outputs.items()}
                loss, _ = self.loss(batch, outputs, self.model)
                n = int(batch[K.N_ATOMS].shape[0])
                total += float(loss.detach()) * n
                count += n
                acc.add(batch, {k: v.detach() for k, v in outputs.items()})
        merged, loss_sum, n_sum = ErrorAccumulator(), 0.0, 0
        for rank_total, rank_count, pairs in dist.all_gather_objects((total, count, acc.pairs)):
            loss_sum, n_sum = loss_sum + rank_total, n_sum + rank_count
            for name, (preds, refs) in pairs.items():
                dst = merged.pairs.setdefault(name, ([], []))
                dst[0].extend(preds)
                dst[1].extend(refs)
        return loss_sum / max(n_sum, 1), merged.metrics()

    def _update_best(self, valid_loss: float) -> None:
        if valid_loss < self.best_valid_loss:
            self.best_valid_loss = valid_loss
            self.best_epoch = self.epoch
            self._best_local = [t.detach().clone() for t in (self._ema or self._local())]
            self.bad_epochs = 0
        else:
            self.bad_epochs += 1

    def _stop_reason(self, timed_out: bool) -> str | None:
        # elapsed time differs slightly per rank: rank 0 decides for everybody
        return dist.broadcast_object(super()._stop_reason(timed_out))

    # -- export ----------------------------------------------------------------------------------
    def _full_state(self, tensors: list[torch.Tensor] | None) -> dict[str, torch.Tensor]:
        with self._swapped(tensors), self._gathered():
            return {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}

    def export_model(self) -> torch.nn.Module:
        """An ordinary CPU module with the best EMA weights, gathered from the shards (collective:
        every rank calls it)."""
        state = self._full_state(self._best_local or self._ema)
        model = copy.deepcopy(self._template)
        model.load_state_dict(state, assign=True)
        return model.eval()

    # -- checkpoints -----------------------------------------------------------------------------
    def _common_state(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch, "elapsed": self.elapsed, "best_valid_loss": self.best_valid_loss,
            "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs,
            "history": [dataclasses.asdict(r) for r in self.history],
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "extra": self.extra_state, "world_size": self.world_size, "ema_updates": self._ema_updates,
        }

    def _rank_state(self) -> dict[str, Any]:
        return {"ema": self._ema, "best": self._best_local, "rng": torch.get_rng_state(),
                "world_size": self.world_size}

    def _save_checkpoint(self) -> None:
        if self.checkpoint_dir is None:
            return
        tag = f"epoch{self.epoch}"
        atomic_save(self._rank_state(), self.checkpoint_dir / tag / f"atomforge_rank{self.rank}.pt")
        # DeepSpeed writes ``latest`` last: a kill before that leaves the previous tag current
        self.engine.save_checkpoint(str(self.checkpoint_dir), tag=tag, client_state=self._common_state())
        dist.barrier()
        if dist.is_main():
            tags = sorted((p for p in self.checkpoint_dir.glob("epoch*") if p.is_dir()),
                          key=lambda p: int(p.name[5:]) if p.name[5:].isdigit() else -1)
            for old in tags[:-_KEEP_CHECKPOINTS]:
                shutil.rmtree(old, ignore_errors=True)

    def try_resume(self) -> bool:
        if self.checkpoint_dir is None or not (self.checkpoint_dir / "latest").exists():
            return False
        tag = (self.checkpoint_dir / "latest").read_text().strip()
        mine = self.checkpoint_dir / tag / f"atomforge_rank{self.rank}.pt"
        if not mine.exists():
            raise ConfigError(f"{self.checkpoint_dir / tag} has no state for rank {self.rank}; it was "
                              "written by a different number of processes — resume with the same --nproc")
        rank_state = torch.load(mine, weights_only=True)
        if int(rank_state["world_size"]) != self.world_size:
            raise ConfigError(f"{self.checkpoint_dir} was written by {rank_state['world_size']} processes; "
                              f"this job has {self.world_size}. Resume with the same number of processes.")
        _, state = self.engine.load_checkpoint(str(self.checkpoint_dir), tag=tag, load_optimizer_states=True,
                                               load_lr_scheduler_states=False)
        from atomforge.training import EpochRecord

        self.epoch, self.elapsed = int(state["epoch"]), float(state["elapsed"])
        self.best_valid_loss, self.best_epoch = float(state["best_valid_loss"]), int(state["best_epoch"])
        self.bad_epochs = int(state["bad_epochs"])
        self.history = [EpochRecord(**r) for r in state["history"]]
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.extra_state = dict(state.get("extra") or {})
        self._ema_updates = int(state.get("ema_updates", 0))
        self._ema, self._best_local = rank_state["ema"], rank_state["best"]
        torch.set_rng_state(rank_state["rng"])
        return True


def _import_deepspeed() -> Any:
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    try:
        import deepspeed
    except ImportError as error:
        raise ConfigError("training.engine: deepspeed needs the deepspeed package: "
                          "pip install 'atomforge[deepspeed]'") from error
    return deepspeed


def _device() -> torch.device:
    if torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu":
        torch.cuda.set_device(dist.local_rank())
        return torch.device("cuda", dist.local_rank())
    return torch.device("cpu")


def _init_distributed(deepspeed: Any, backend: str) -> None:
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR") != "cpu" else "gloo"
    if "RANK" not in os.environ:  # a plain single process: a world of one
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())})
    deepspeed.init_distributed(dist_backend=backend)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _factory(*, options: Mapping[str, Any] | None = None, **kwargs: Any) -> DeepSpeedEngine:
    return DeepSpeedEngine(options=options, **kwargs)


@hookimpl
def register_engines(register) -> None:  # noqa: ANN001
    register(EngineSpec("deepspeed", _factory,
                        "DeepSpeed data-parallel engine, ZeRO stages 0-3 (torchrun / deepspeed launcher)",
                        check_options=parse_options, distributed=True))

