"""PaiNN backbone (Schütt, Unke & Gastegger, ICML 2021): equivariant message passing with
scalar and vector features.

Scalar features ``s`` [N, F] and vector features ``v`` [N, 3, F] are updated by a message block
(continuous filters on a radial basis times cutoff, plus the edge direction) and an update block
(gated mixing of ``v`` with itself). The per-atom energy is an MLP of the final scalars.

**Edge chunking at inference** (option ``edge_chunk``). PaiNN's memory is its edge-level
tensors — filters [E, 3F] and vector messages [E, 3, F] per layer — which autograd keeps for
the forces/stress backward pass: the default model (F = 128, 3 layers, 5 Å) held ~13 GB for
one call on a 10,000-atom Cu cell. Outside training mode (``model.eval()``: the calculator,
evaluation, MD) the message blocks instead run over the edges in chunks of C edges. Each
chunk's messages (radial basis, filters, directions, gathered neighbour features) are computed
under activation checkpointing (``torch.utils.checkpoint``, non-reentrant), summed into the
node tensors with ``index_add`` in edge order and dropped; the backward pass recomputes them one
chunk at a time. The node-level MLPs of each block are checkpointed too, so what stays alive
between the forward and the backward pass is a few [N, 3F] tensors per layer. Memory then grows
with the atoms, not edges × features (one calculator call on 10,000 Cu atoms, one thread:
peak resident memory 1.2 GB for the whole process instead of 13.2 GB, 19 s instead of 36 s;
``benchmarks/memory/calculator_memory.py``, ``docs/benchmarks/calculator-memory.json``), at the
price of one extra forward pass of the message blocks inside the backward pass. The chunk
buffers are fresh memory mappings, so page faults are a good part of the time; PyTorch's
``THP_MEM_ALLOC_ENABLE=1`` (transparent huge pages, set before starting Python) cut a 10,000-atom
call from ~20 s to ~15 s in one measurement. Energies, forces and
stress equal the unchunked computation up to floating-point rounding (≲1e-6 relative in
float32, ≲1e-13 in float64).

``edge_chunk`` (JSON: a string or an integer):

* ``"auto"`` (default; ``null`` means the same): with C the number of edges whose [C, 3, F]
  tensor takes :data:`AUTO_CHUNK_BYTES` (24,576 edges for F = 128 in float32), a batch of at
  most C edges takes the unchunked path; one of E > C edges runs in ``max(2, E // C)`` equal
  chunks (25,172 edges each for 10,000 Cu atoms at 5 Å, 2 × 21,403 for 1,000).
* a positive integer: chunks of that many edges (again only when the batch has more).
* ``0``: never chunk.

Training mode ignores the option and always takes the unchunked path (bit-identical numbers,
same speed), as do ``torch.func`` transforms (``vmap``: the vectorised deep ensemble), under
which checkpointing cannot recompute, and compiled code (TorchScript exports, ``atomforge export``;
``torch.compile``), which has no Python-level checkpointing. Model files written before the option existed have no
``edge_chunk`` and load with ``"auto"``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from atomforge import Backbone, BackboneSpec, ConfigError, hookimpl
from atomforge import keys as K

__all__ = ["PaiNN", "AUTO_CHUNK_BYTES"]

#: ``edge_chunk: auto``: chunks of at least C edges, C such that one [C, 3, F] message tensor
#: takes this many bytes (the transient peak of a chunk is about ten such tensors). It is above
#: glibc's 32 MiB cap on its dynamic mmap threshold, so these buffers are mapped and unmapped
#: rather than carved from the heap: smaller chunks (8-31 MiB per tensor) fragmented the heap
#: and, measured on 10,000 Cu atoms, kept 1-4 GB of freed memory resident, erratically,
#: depending on the size.
AUTO_CHUNK_BYTES = 36 * 2**20


def _check_edge_chunk(value: Any) -> int | None:
    """``edge_chunk`` as ``None`` (auto), ``0`` (off) or a positive chunk size; else ConfigError."""
    if value is None or (isinstance(value, str) and value == "auto"):
        return None
    integral = isinstance(value, int) or (isinstance(value, float) and math.isfinite(value) and value.is_integer())
    if isinstance(value, bool) or not integral or value < 0:
        raise ConfigError(f"painn edge_chunk must be 'auto', 0 (off) or a positive number of edges; got {value!r}")
    return int(value)


def _functorch_active() -> bool:
    """Whether a ``torch.func`` transform (``vmap``, as the vectorised deep ensemble uses) is
    running: checkpointing's recomputation in the backward pass cannot see its batched tensors."""
    probe = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(probe()) if probe is not None else False


class _AddRows(torch.autograd.Function):
    """``target.index_add_(0, index, source)`` whose backward keeps only ``index``.

    Autograd's ``index_add`` saves ``source`` for its backward pass: summed chunk by chunk, that
    would keep every chunk's [C, 3, F] messages alive, the very memory chunking is meant to
    save. The gradient needs only ``index``: ``grad`` for ``target``, ``grad[index]`` for
    ``source``.
    """

    @staticmethod
    def forward(ctx, target: torch.Tensor, index: torch.Tensor, source: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ctx.save_for_backward(index)
        ctx.mark_dirty(target)
        return target.index_add_(0, index, source)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, torch.Tensor]:  # noqa: ANN001
        (index,) = ctx.saved_tensors
        return grad, None, grad.index_select(0, index)


class RadialBasis(nn.Module):
    """``sin(nπr/rc)/r`` for n = 1..num_rbf, times a cosine cutoff (smooth at ``rc``)."""

    def __init__(self, num_rbf: int, cutoff: float) -> None:
        super().__init__()
        self.cutoff = cutoff
        self.register_buffer("frequencies", torch.arange(1, num_rbf + 1) * math.pi / cutoff)

    def forward(self, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r = lengths.unsqueeze(-1)
        basis = torch.sin(self.frequencies.to(r.dtype) * r) / r
        envelope = 0.5 * (torch.cos(lengths * (math.pi / self.cutoff)) + 1.0)
        envelope = envelope * (lengths < self.cutoff).to(lengths.dtype)
        return basis, envelope


class PaiNNInteraction(nn.Module):
    """One message + update block."""

    def __init__(self, features: int, activation: type[nn.Module]) -> None:
        super().__init__()
        self.features = features
        self.context = nn.Sequential(
            nn.Linear(features, features), activation(), nn.Linear(features, 3 * features)
        )
        self.mix_vectors = nn.Linear(features, 2 * features, bias=False)
        self.update = nn.Sequential(
            nn.Linear(2 * features, features), activation(), nn.Linear(features, 3 * features)
        )

    def forward(
        self,
        s: torch.Tensor,
        v: torch.Tensor | None,
        filters: torch.Tensor,
        directions: torch.Tensor,
        centre: torch.Tensor,
        neighbour: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Updated ``s`` [N, F] and ``v`` [N, 3, F] (``None``: zeros) from this block's ``filters``
        [E, 3F] and the unit edge ``directions`` [E, 3, 1] of the edges ``centre`` ← ``neighbour``."""
        f = self.features
        # index_select, not indexing: the same values, and a backward pass (index_add) that is
        # cheaper than indexing's (index_put with accumulation)
        x = self.context(s).index_select(0, neighbour) * filters
        ds, dvv, dvs = x.split(f, dim=-1)
        dv = dvs.unsqueeze(1) * directions
        if v is None:  # first block: vector features start at zero, so skip the zero term
            v = s.new_zeros((s.shape[0], 3, f))
        else:
            dv = torch.addcmul(dv, dvv.unsqueeze(1), v.index_select(0, neighbour))
        s = s.index_add(0, centre, ds)
        v = v.index_add(0, centre, dv)
        return self.update_block(s, v)

    def update_block(self, s: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The gated update of ``s`` [N, F] and ``v`` [N, 3, F] after the messages are summed."""
        f = self.features
        uv, vv = self.mix_vectors(v).split(f, dim=-1)
        vv_norm = torch.sqrt((vv * vv).sum(1) + 1e-8)
        a_vv, a_sv, a_ss = self.update(torch.cat([s, vv_norm], -1)).split(f, dim=-1)
        s = s + a_sv * (uv * vv).sum(1) + a_ss
        v = v + a_vv.unsqueeze(1) * uv
        return s, v


class PaiNN(Backbone):
    """Polarizable atom interaction neural network (equivariant, energy-conserving via the wrapper).

    Args:
        num_elements: size of the element embedding (set by atomforge from the training data).
        cutoff: neighbour cutoff in Å.
        hidden_channels: feature width F.
        num_layers: number of interaction blocks.
        num_rbf: radial basis size.
        activation: ``silu`` or ``tanh``.
        edge_chunk: outside training, process the message blocks' edges in chunks of this many
            edges with activation checkpointing (bounded memory on large cells): ``"auto"``
            (default), a positive integer, or ``0`` for off. See the module docstring.
        readout_heads: readout heads (set by atomforge from ``model.heads``): the last readout layer
            gives one per-atom energy per head; the embedding and interactions are shared.
    """

    supports_heads = True
    head_parameters = ("readout.2.weight", "readout.2.bias")
    element_parameters = ("embedding.weight",)

    def __init__(
        self,
        *,
        num_elements: int,
        cutoff: float,
        hidden_channels: int = 128,
        num_layers: int = 3,
        num_rbf: int = 20,
        activation: str = "silu",
        edge_chunk: int | str | None = "auto",
        readout_heads: int = 1,
    ) -> None:
        super().__init__(num_elements=num_elements, cutoff=cutoff)
        activations = {"silu": nn.SiLU, "tanh": nn.Tanh}
        if activation not in activations:
            raise ConfigError(f"painn activation {activation!r} is not one of {sorted(activations)}")
        self.edge_chunk = _check_edge_chunk(edge_chunk)
        act = activations[activation]
        self.features = hidden_channels
        self.embedding = nn.Embedding(num_elements, hidden_channels)
        self.radial = RadialBasis(num_rbf, cutoff)
        self.filters = nn.Linear(num_rbf, num_layers * 3 * hidden_channels)
        self.layers = nn.ModuleList(PaiNNInteraction(hidden_channels, act) for _ in range(num_layers))
        self.readout = nn.Sequential(
            nn.Linear(hidden_channels, hidden_channels // 2), act(), nn.Linear(hidden_channels // 2, int(readout_heads))
        )
        self.num_heads = int(readout_heads)
        self.message_passing_steps = num_layers

    def parameter_groups(self) -> dict[str, list[str]]:
        """``embedding``, ``radial`` (the filter network all interactions share),
        ``interaction.<k>`` and ``readout``."""
        return {"embedding": ["embedding"], "radial": ["filters"],
                **{f"interaction.{k}": [f"layers.{k}"] for k in range(len(self.layers))}, "readout": ["readout"]}

    @torch.jit.unused
    def chunk_size(self, num_edges: int, dtype: torch.dtype) -> int | None:
        """Edges per chunk for a batch of ``num_edges`` edges outside training, or ``None`` when
        the message blocks run unchunked (off, in training mode, under ``vmap``, or one chunk).

        ``auto`` (C from :data:`AUTO_CHUNK_BYTES`): unchunked up to C edges, else
        ``max(2, num_edges // C)`` equal chunks — between C and 2C edges each from 2C edges on
        (no small remainder chunk), two halves below."""
        if self.training or self.edge_chunk == 0 or _functorch_active():
            return None
        if self.edge_chunk is not None:
            return self.edge_chunk if num_edges > self.edge_chunk else None
        itemsize = dtype.itemsize
        least = max(1, AUTO_CHUNK_BYTES // (3 * self.features * itemsize))
        return -(-num_edges // max(2, num_edges // least)) if num_edges > least else None

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        lengths = batch[K.EDGE_LENGTHS]
        s = self.embedding(batch[K.ELEMENT_INDEX])
        # exported models (TorchScript, torch.export: `atomforge export`) take the plain path:
        # checkpointing is Python-only, and the edge count is a symbolic size there
        if not torch.jit.is_scripting():
            if self.edge_chunk != 0 and not torch.compiler.is_compiling():
                chunk = self.chunk_size(int(lengths.shape[0]), lengths.dtype)
                if chunk is not None:
                    return self._outputs(*self._chunked_layers(s, batch, chunk))
        centre, neighbour = batch[K.EDGE_INDEX][0], batch[K.EDGE_INDEX][1]
        directions = (batch[K.EDGE_VECTORS] / lengths.unsqueeze(-1)).unsqueeze(-1)  # [E, 3, 1]
        basis, envelope = self.radial(lengths)
        all_filters = (self.filters(basis) * envelope.unsqueeze(-1)).split(3 * self.features, -1)
        v: torch.Tensor | None = None
        for index, layer in enumerate(self.layers):  # (enumerate, not zip: TorchScript)
            s, v = layer(s, v, all_filters[index], directions, centre, neighbour)
        return self._outputs(s, v)

    def _outputs(self, s: torch.Tensor, v: torch.Tensor | None) -> dict[str, torch.Tensor]:
        energy = self.readout(s)
        out = {K.NODE_ENERGY: energy.squeeze(-1) if self.num_heads == 1 else energy, K.NODE_FEATURES: s}
        if v is not None:
            out[K.NODE_VECTORS] = v
        return out

    # -- chunked inference path ---------------------------------------------------------------
    def _messages(
        self, index: int, context: torch.Tensor, v: torch.Tensor | None, vectors: torch.Tensor,
        lengths: torch.Tensor, neighbour: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``index``'s scalar [C, F] and vector [C, 3, F] messages of one chunk of edges:
        the unchunked path's operations on those edges (the energies came out bit-identical in
        every test), the vector message accumulated in place (one [C, 3, F] temporary fewer)."""
        f = self.features
        rows = slice(3 * f * index, 3 * f * (index + 1))
        directions = vectors / lengths.unsqueeze(-1)
        basis, envelope = self.radial(lengths)
        filters = F.linear(basis, self.filters.weight[rows], self.filters.bias[rows]) * envelope.unsqueeze(-1)
        x = context.index_select(0, neighbour) * filters
        ds, dvv, dvs = torch.split(x, f, dim=-1)
        dv = dvs.unsqueeze(1) * directions.unsqueeze(-1)
        if v is not None:
            dv = dv.addcmul_(dvv.unsqueeze(1), v.index_select(0, neighbour))
        return ds, dv

    @torch.jit.unused
    def _chunked_layers(
        self, s: torch.Tensor, batch: dict[str, torch.Tensor], chunk: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        centre, neighbour = batch[K.EDGE_INDEX][0], batch[K.EDGE_INDEX][1]
        vectors, lengths = batch[K.EDGE_VECTORS], batch[K.EDGE_LENGTHS]
        num_edges = int(lengths.shape[0])
        grad = torch.is_grad_enabled()

        def run(fn, *args):  # noqa: ANN001, ANN202 - keep only fn's inputs; recompute it in backward
            return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False) if grad else fn(*args)

        v: torch.Tensor | None = None
        for index, layer in enumerate(self.layers):
            context = run(layer.context, s)
            # the same sequential sums as ``index_add`` over all edges, one chunk after another
            s_sum = s.clone()
            v_sum = s.new_zeros((s.shape[0], 3, self.features)) if v is None else v.clone()
            for start in range(0, num_edges, chunk):
                edges = slice(start, start + chunk)
                ds, dv = run(self._messages, index, context, v, vectors[edges], lengths[edges], neighbour[edges])
                s_sum = _AddRows.apply(s_sum, centre[edges], ds)
                v_sum = _AddRows.apply(v_sum, centre[edges], dv)
                del ds, dv
            s, v = run(layer.update_block, s_sum, v_sum)
        return s, v


@hookimpl
def register_backbones(register) -> None:  # noqa: ANN001 - pluggy passes the registrar
    register(
        BackboneSpec(
            name="painn",
            factory=PaiNN,
            description="PaiNN (Schütt et al. 2021), equivariant message passing; forces by autograd",
            equivariant=True,
        )
    )
