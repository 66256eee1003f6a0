"""Built-in training engine ``deepspeed``: data-parallel, ZeRO-sharded training (stages 0–3).

A backend of the one training loop (:class:`atomforge.Trainer`), which keeps epochs, seeds,
EMA, validation, early stopping, ``max_time``, callbacks and checkpoints; this module supplies
only what is DeepSpeed's:

* **plan**: each epoch's shuffled order is the single-process order; every global batch of
  ``training.batch_size`` structures is split over the ranks so that each rank's atoms + edges
  are balanced (longest-processing-time first), then into ``gradient_accumulation_steps``
  micro-batches. With equal shares and equal-sized structures the gradient is exactly the
  single-process one. The load-imbalance ratio (max / mean of per-rank atoms + edges) is the
  step's ``load_imbalance`` metric.
* **ZeRO-3 and forces**: force training differentiates through ``-∂E/∂r``
  (``create_graph=True``), so the parameters must stay gathered from the forward until the
  outer backward has run; DeepSpeed would release them after each sub-module's forward. The
  backend gathers a ZeRO-3 model's parameters for one micro-step and partitions them again
  before the optimiser step, so at rest each rank holds 1/N of parameters, gradients and
  optimiser state.
* **local tensors** (what the loop averages into EMA and best weights): each rank's own copy of
  each parameter (its ZeRO-3 partition, else the full tensor), so EMA and best weights shard
  like the model.
* **state**: DeepSpeed's checkpoint files inside the loop's epoch folder; **export** gathers
  the best EMA weights into an ordinary CPU module (DeepSpeed is not needed to load it).

Options (the config's ``deepspeed:`` block, validated by :func:`parse_options`) are documented
in ``docs/config.md``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Mapping, Sequence

import numpy as np
import torch

from atomforge import (
    ConfigError,
    EngineSpec,
    GraphDataset,
    Step,
    TrainSettings,
    autocast_context,
    cast_outputs,
    dataset_edges,
    dataset_sizes,
    hookimpl,
    resolve_device,
    size_batches,
    swapped_weights,
)
from atomforge import distributed as dist
from atomforge import keys as K

__all__ = ["DeepSpeedOptions", "DeepSpeedBackend", "parse_options", "shard_batch", "plan_epoch", "imbalance",
           "deepspeed_config"]

@dataclass(frozen=True)
class DeepSpeedOptions:
    """The ``deepspeed:`` block of a run config."""

    zero_stage: int = 2  # ZeRO stage 0 (plain data parallel) … 3 (parameters sharded too)
    offload_optimizer: str = "none"  # none | cpu: optimiser state in CPU memory (GPU runs)
    offload_param: str = "none"  # none | cpu: ZeRO-3 parameters in CPU memory (GPU runs)
    precision: str | None = None  # fp32 | bf16 (autocast of the forward; fp32 master weights); default: training.precision
    gradient_accumulation_steps: int = 1  # micro-batches per optimiser step, per rank
    balance: bool = True  # balance per-rank atoms + edges in each step (else round-robin)
    balance_window: int = 8  # global batches regrouped together when one step is unbalanced
    backend: str = "auto"  # gloo | nccl | auto (nccl with CUDA, else gloo)
    shard_data: bool = False  # each rank reads only its own shard of the training set (positions ≡ rank mod N)
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
        (out.precision in (None, "fp32", "bf16"), f"deepspeed.precision: expected fp32 or bf16, got {out.precision!r}"),
        (isinstance(out.gradient_accumulation_steps, int) and out.gradient_accumulation_steps >= 1,
         f"deepspeed.gradient_accumulation_steps: expected an integer ≥ 1, got {out.gradient_accumulation_steps!r}"),
        (isinstance(out.balance, bool), f"deepspeed.balance: expected true or false, got {out.balance!r}"),
        (isinstance(out.shard_data, bool), f"deepspeed.shard_data: expected true or false, got {out.shard_data!r}"),
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


def dataset_costs(dataset: Any, rank: int = 0, world_size: int = 1) -> np.ndarray:
    """Every structure's work: atoms + edges from the graphs in memory; for a streaming dataset
    (graphs not built yet) atoms × (1 + mean neighbours of a sample of 64 structures, taken from
    this rank's shard — positions ≡ rank mod world_size — so no rank reads another's)."""
    if not getattr(dataset, "streaming", False):
        return np.asarray([graph_cost(g) for g in dataset.graphs])
    sizes = dataset_sizes(dataset).astype(float)
    own = np.arange(rank, len(dataset), world_size)
    sample = own[np.linspace(0, len(own) - 1, min(64, len(own))).astype(np.int64)]
    graphs = [dataset.graphs[int(k)] for k in sample]
    neighbours = sum(g[K.EDGE_INDEX].shape[1] for g in graphs) / max(sum(g[K.POSITIONS].shape[0] for g in graphs), 1)
    return sizes * (1.0 + neighbours)


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


class DeepSpeedBackend:
    """ZeRO-sharded data-parallel backend; see the module docstring. Construction joins the
    launcher's process group (a plain process is a world of one)."""

    def __init__(self, *, options: Mapping[str, Any] | None, settings: TrainSettings) -> None:
        self.options = parse_options(options)
        self.settings = settings
        self.precision = self.options.precision or settings.precision
        self.device = _device(settings.device)
        deepspeed = _import_deepspeed(self.device)
        _init_distributed(deepspeed, self.options.backend, self.device)
        self._deepspeed = deepspeed
        self.world_size, self.rank = dist.world_size(), dist.rank()
        self.engine: Any = None
        self._model: torch.nn.Module | None = None
        self._template: torch.nn.Module | None = None
        self._params: list[torch.nn.Parameter] = []
        self._costs: Sequence[float] | None = None

    # -- model ------------------------------------------------------------------------------------
    @property
    def model(self) -> torch.nn.Module:
        if self._model is None:
            raise RuntimeError("DeepSpeedBackend.setup(model, optimizer) has not been called")
        return self._model

    @property
    def zero3(self) -> bool:
        return self.options.zero_stage == 3

    def setup(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        if self.zero3 and dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ConfigError(f"deepspeed.zero_stage: 3 shards float32 (or bf16) models only; this model is {dtype}. "
                              "Set model.dtype: float32, or use zero_stage 0-2")
        config = deepspeed_config(self.options, self.settings, self.world_size,
                                  sum(p.numel() for p in model.parameters()))
        # an empty twin of the module to load gathered weights into at export (no memory)
        self._template = copy.deepcopy(model).to("meta")
        model.to(self.device)
        self.engine, *_ = self._deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        self._model = model
        self._params = list(model.parameters())
        self._dtype = next((p.dtype for p in self._params if p.is_floating_point()), torch.float32)

    def local_tensors(self) -> list[torch.Tensor]:
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

    # -- steps ------------------------------------------------------------------------------------
    def plan(self, order: Sequence[int], dataset: GraphDataset) -> Iterator[Step]:
        """For each global batch: this rank's micro-batches and the step's load imbalance.
        ``training.batch_atoms`` cuts global batches by atoms; ``shard_data`` gives each rank its
        own shard (see :meth:`_sharded_plan`)."""
        if self._costs is None or len(self._costs) != len(dataset):
            self._costs = dataset_costs(dataset, self.rank, self.world_size)
        accum = self.options.gradient_accumulation_steps
        if self.options.shard_data and self.world_size > 1:
            yield from self._sharded_plan(order, dataset, accum)
            return
        slots = self.world_size * accum
        atoms, edges = self.settings.batch_atoms, getattr(self.settings, "batch_edges", None)
        if atoms or edges:
            batches = size_batches(order, dataset_sizes(dataset) if atoms else np.zeros(0, np.int64),
                                   max_atoms=atoms, max_structures=self.settings.batch_size,
                                   edges=dataset_edges(dataset) if edges else None, max_edges=edges)
            plans = [shard_batch(_padded(list(b), order, slots), self._costs, slots, balance=self.options.balance)
                     for b in batches]
        else:
            plans = plan_epoch(order, self._costs, self.settings.batch_size, slots,
                               balance=self.options.balance, window=self.options.balance_window)
        for shards in plans:
            # ranks × accumulation slots: slot r + world·a is rank r's a-th micro-batch
            yield self._step([[shards[r + self.world_size * a] for a in range(accum)] for r in range(self.world_size)])

    def _step(self, per_rank: Sequence[Sequence[Sequence[int]]]) -> Step:
        loads = [sum(self._costs[int(i)] for micro in batches for i in micro) for batches in per_rank]
        return Step(per_rank[self.rank], {"load_imbalance": max(loads) / max(sum(loads) / len(loads), 1e-12)})

    def _sharded_plan(self, order: Sequence[int], dataset: GraphDataset, accum: int) -> Iterator[Step]:
        """Rank r trains on positions ≡ r (mod ranks) only, in the epoch's order, cut into
        micro-batches of ``batch_size / (ranks × accumulation)`` structures (or that share of
        ``batch_atoms`` / ``batch_edges``). Each rank cuts its own shard (edges are counted on the
        own shard only, so no rank reads another's); the ranks agree on the number of steps (the
        fewest any rank fills) with one all-reduce."""
        order = np.asarray(order, dtype=np.int64)
        slots = self.world_size * accum
        mine = order[order % self.world_size == self.rank]
        atoms = None if not self.settings.batch_atoms else max(1, self.settings.batch_atoms // slots)
        budget = getattr(self.settings, "batch_edges", None)
        edges = None if not budget else max(1, budget // slots)
        batches = size_batches(mine, dataset_sizes(dataset) if atoms else np.zeros(0, np.int64), max_atoms=atoms,
                               max_structures=max(1, self.settings.batch_size // slots),
                               edges=dataset_edges(dataset, mine) if edges else None, max_edges=edges)
        loads = [float(sum(self._costs[int(i)] for b in batches[s * accum : (s + 1) * accum] for i in b))
                 for s in range(len(batches) // accum)]
        every = dist.all_gather_objects(loads)  # one exchange per epoch: step counts and loads
        steps = min(len(rank_loads) for rank_loads in every)
        for s in range(steps):
            step_loads = [rank_loads[s] for rank_loads in every]
            yield Step(batches[s * accum : (s + 1) * accum],
                       {"load_imbalance": max(step_loads) / max(sum(step_loads) / len(step_loads), 1e-12)})

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device) for k, v in batch.items()} if self.device.type != "cpu" else batch

    def forward(self, batch: dict[str, torch.Tensor], *, compute_forces: bool,
                compute_stress: bool) -> dict[str, torch.Tensor]:
        with autocast_context(self.device, self.precision):
            outputs = self.engine(batch, compute_forces=compute_forces, compute_stress=compute_stress)
        return cast_outputs(outputs, self._dtype)

    def predict(self, batch: dict[str, torch.Tensor], *, compute_forces: bool,
                compute_stress: bool) -> dict[str, torch.Tensor]:
        with autocast_context(self.device, self.precision):
            outputs = self.model(batch, compute_forces=compute_forces, compute_stress=compute_stress)
        return cast_outputs(outputs, self._dtype)

    def step(self, batches: Sequence[dict[str, torch.Tensor]],
             loss_of: Callable[[dict[str, torch.Tensor]], torch.Tensor]) -> tuple[float, int]:
        total = 0.0
        for batch in batches:  # DeepSpeed counts micro-steps and updates at the accumulation boundary
            with self._gathered():
                loss = loss_of(batch)
                self.engine.backward(loss)
            self.engine.step()
            total += float(loss.detach())
        return total, len(batches)

    def train_mode(self, training: bool) -> None:
        self.engine.train(training)

    def evaluation(self) -> ContextManager[Any]:
        return self._gathered()

    # -- export and state -------------------------------------------------------------------------
    def export(self, tensors: Sequence[torch.Tensor] | None) -> torch.nn.Module:
        """An ordinary CPU module with ``tensors`` gathered from the shards (collective)."""
        with swapped_weights(self.local_tensors(), tensors), self._gathered():
            state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        model = copy.deepcopy(self._template)
        model.load_state_dict(state, assign=True)
        # buffers outside the state dict (non-persistent: e.g. the constants of e3nn's compiled
        # tensor products in SevenNet) are not sharded: take them from this rank's live module
        live = dict(self.model.named_buffers())
        for name, buffer in list(model.named_buffers()):
            if buffer.is_meta and name in live:
                owner, _, leaf = name.rpartition(".")
                module = model.get_submodule(owner) if owner else model
                module._buffers[leaf] = live[name].detach().to("cpu", copy=True)
        return model.eval()

    def save_state(self, folder: Path) -> None:
        self.engine.save_checkpoint(str(folder.parent), tag=folder.name, save_latest=False)

    def load_state(self, folder: Path) -> None:
        self.engine.load_checkpoint(str(folder.parent), tag=folder.name, load_optimizer_states=True,
                                    load_lr_scheduler_states=False)

    # -- collectives ------------------------------------------------------------------------------
    def all_reduce_mean(self, value: float) -> float:
        return dist.all_reduce_mean(value)

    def any(self, flag: bool) -> bool:
        return bool(dist.all_reduce_max(float(flag)))

    def broadcast(self, obj: Any) -> Any:
        return dist.broadcast_object(obj)

    def gather(self, obj: Any) -> list[Any]:
        return dist.all_gather_objects(obj)

    def barrier(self) -> None:
        dist.barrier()


def _import_deepspeed(device: torch.device) -> Any:
    # DeepSpeed picks its accelerator when first imported: CPU unless this backend trains on CUDA
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")
    try:
        import deepspeed
    except ImportError as error:
        raise ConfigError("training.engine: deepspeed needs the deepspeed package: "
                          "pip install 'atomforge[deepspeed]'") from error
    return deepspeed


def _device(spec: str) -> torch.device:
    """``training.device`` for this rank: ``auto``/``cuda`` mean the launcher's local GPU."""
    device = resolve_device(spec)
    if device.type == "cuda":
        index = device.index if device.index is not None and dist.world_size() == 1 else dist.local_rank()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return device


def _init_distributed(deepspeed: Any, backend: str, device: torch.device) -> None:
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if "RANK" not in os.environ:  # a plain single process: a world of one
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())})
    deepspeed.init_distributed(dist_backend=backend)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _factory(*, options: Mapping[str, Any] | None, settings: TrainSettings) -> DeepSpeedBackend:
    return DeepSpeedBackend(options=options, settings=settings)


@hookimpl
def register_engines(register) -> None:  # noqa: ANN001
    register(EngineSpec("deepspeed", _factory,
                        "DeepSpeed data-parallel engine, ZeRO stages 0-3 (torchrun / deepspeed launcher)",
                        check_options=parse_options, distributed=True))
