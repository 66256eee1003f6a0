"""Training data that does not fit in memory: a store's structures as graphs built on the fly.

:class:`StoreDataset` is the streaming twin of :class:`~atomforge.GraphDataset`: the same
interface (``len``, ``graphs[i]``, ``structures[i]``, ``numbers()``, ``sizes()``, ``fields``),
but it keeps only indices and per-structure sizes; a structure is read from the store and its
neighbour list built (vesin) when a batch needs it. :meth:`StoreDataset.batches` reads and
collates the batches of a step plan in worker processes (``data.loader.workers``), prefetching
``data.loader.prefetch`` batches per worker, in plan order. Memory stays flat in the number of
structures: the indices and sizes (12 bytes per structure) are all that grows.

:func:`size_batches` cuts an epoch's order into batches by a budget of atoms and/or edges (and
at most ``max_structures``), so a 2000-atom cell and 9-atom molecules never share a fixed batch
size, and a dense cell does not blow the memory a sparse one of the same size fits in.
:class:`MixedDataset` draws each epoch from several datasets with configured ratios.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from ase import Atoms

from .. import keys as K
from .._errors import ConfigError, DataValidationError
from .fields import DEFAULT_FIELDS, FieldTable, collate
from .graph import atoms_to_graph, edge_count
from .store import LABEL_BITS, StructureStore, close_readers
from .structures import get_labels, validate_structure

__all__ = ["StoreStructures", "StoreDataset", "MixedDataset", "normalization_sums", "normalization_from_sums", "add_sums", "size_batches", "epoch_batches", "dataset_sizes", "dataset_edges", "read_batches"]

Batch = dict[str, torch.Tensor]


class _Lazy(Sequence):
    """A read-only sequence whose items are computed on access."""

    def __init__(self, length: int, item: Callable[[int], Any]) -> None:
        self._length, self._item = length, item

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, k: Any) -> Any:
        if isinstance(k, slice):
            return [self._item(i) for i in range(*k.indices(self._length))]
        k = int(k)
        if k < 0:
            k += self._length
        if not 0 <= k < self._length:
            raise IndexError(k)
        return self._item(k)


class StoreStructures(Sequence[Atoms]):
    """Structures of a store as a lazy sequence (what the ``store`` data source returns):
    training streams them (:class:`StoreDataset`); anything else may index or list them."""

    def __init__(self, store: StructureStore, indices: np.ndarray | None = None,
                 info: dict[str, Any] | None = None) -> None:
        self.store = store
        self.indices = np.arange(len(store), dtype=np.int64) if indices is None else np.asarray(indices, np.int64)
        self.info = dict(info or {})  # set on every structure read (e.g. the fidelity of a source's head)

    def __len__(self) -> int:
        return len(self.indices)

    def _read(self, index: int) -> Atoms:
        atoms = self.store.get(index)
        atoms.info.update(self.info)
        return atoms

    def __getitem__(self, k: Any) -> Any:
        if isinstance(k, slice):
            return [self._read(int(i)) for i in self.indices[k]]
        return self._read(int(self.indices[k]))

    def take(self, positions: np.ndarray | Sequence[int]) -> "StoreStructures":
        """The structures at ``positions`` of this sequence (no structure is read)."""
        return StoreStructures(self.store, self.indices[np.asarray(positions, dtype=np.int64)], self.info)

    def with_info(self, info: dict[str, Any]) -> "StoreStructures":
        """The same structures with ``info`` set on each when read."""
        return StoreStructures(self.store, self.indices, {**self.info, **info})


class StoreDataset:
    """Structures ``indices`` of a store (default all), their graphs built when read.

    ``require``: labels every structure must carry (checked when it is read; the store's label
    column lets :meth:`check_labels` check all of them up front without reading structures).
    ``workers``/``prefetch``: how :meth:`batches` reads (0 workers: in this process).
    """

    streaming = True

    def __init__(self, store: StructureStore | str | os.PathLike, cutoff: float, *, dtype: torch.dtype = torch.float32,
                 require: Sequence[str] = (), source: str = "", fields: FieldTable | None = None,
                 indices: np.ndarray | Sequence[int] | None = None, workers: int = 0, prefetch: int = 4,
                 cache_gb: float = 0.0, info: dict[str, Any] | None = None) -> None:
        self.store = store if isinstance(store, StructureStore) else StructureStore(store)
        self.info = dict(info or {})  # set on every structure read (a source's head)
        self.indices = (np.arange(len(self.store), dtype=np.int64) if indices is None
                        else np.asarray(indices, dtype=np.int64))
        if len(self.indices) == 0:
            raise DataValidationError(f"data set {source or self.store.path} is empty; expected ≥ 1 structure.")
        if self.indices.min() < 0 or self.indices.max() >= len(self.store):
            raise DataValidationError(f"{source}: indices out of range for {self.store.path} "
                                      f"({len(self.store)} structures)")
        self.cutoff = float(cutoff)
        self.dtype = dtype
        self.require = tuple(require)
        self.source = source or str(self.store.path)
        self.fields = DEFAULT_FIELDS if fields is None else fields
        self.workers, self.prefetch = int(workers), int(prefetch)
        self.cache_bytes = int(float(cache_gb) * 2**30)
        self._cache: dict[int, Batch] | None = None  # graphs kept once built, when the data set fits the budget
        self._edges: np.ndarray | None = None  # edges per structure, -1 until counted (edge budget)
        self.check_labels()

    def __len__(self) -> int:
        return len(self.indices)

    def check_labels(self) -> None:
        """Every structure carries the required labels (from the store's label column)."""
        if not self.require:
            return
        bits = self.store.column("labels")[self.indices]
        for label in self.require:
            missing = np.flatnonzero((bits & LABEL_BITS.get(label, 0)) == 0) if label in LABEL_BITS else []
            if len(missing):
                first = int(self.indices[missing[0]])
                raise DataValidationError(
                    f"structure {first} of {self.source}: the loss needs a {label!r} label but {len(missing)} "
                    f"structure(s) of this set have none. Use a split without them, or remove the {label!r} loss term.")

    def structure(self, k: int) -> Atoms:
        """The ``k``-th structure of this dataset (store index ``indices[k]``)."""
        atoms = self.store.get(int(self.indices[k]))
        atoms.info.update(self.info)
        return atoms

    def graph(self, k: int) -> Batch:
        """The ``k``-th structure's graph (read, validated, neighbour list built now — or kept
        from an earlier epoch when the whole data set fits ``cache_gb``)."""
        k = int(k)
        if self._cache is not None and k in self._cache:
            return self._cache[k]
        graph = self._build(k)
        if self.cache_bytes and self._cache is None and self._fits(graph):
            self._cache = {}
        if self._cache is not None:
            self._cache[k] = graph
        return graph

    def _fits(self, graph: Batch) -> bool:
        """Whether every graph, estimated from one, fits the cache budget."""
        per_atom = sum(t.element_size() * t.nelement() for t in graph.values()) / max(int(graph[K.NUMBERS].shape[0]), 1)
        return per_atom * float(self.sizes().sum()) * 1.5 <= self.cache_bytes

    def _build(self, k: int) -> Batch:
        index = int(self.indices[k])
        atoms = self.structure(k)
        labels = validate_structure(atoms, require=self.require, index=index, source=self.source)
        return atoms_to_graph(atoms, self.cutoff, dtype=self.dtype, labels=labels,
                              where=f"structure {index} of {self.source}", fields=self.fields)

    @property
    def graphs(self) -> Sequence[Batch]:
        return _Lazy(len(self), self.graph)

    @property
    def structures(self) -> Sequence[Atoms]:
        return _Lazy(len(self), self.structure)

    def numbers(self) -> np.ndarray:
        """Atomic numbers present in this dataset, sorted (from the store's element column)."""
        if len(self.indices) == len(self.store):
            return np.asarray(self.store.elements, dtype=np.int64)
        return np.asarray(self.store.elements_of(self.indices), dtype=np.int64)

    def sizes(self) -> np.ndarray:
        """Atoms per structure (int64), without reading structures."""
        return self.store.column("n_atoms")[self.indices].astype(np.int64)

    def edges(self, positions: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """Directed edges per structure within the cutoff (the edge budget of size-aware batches).
        Counting reads the structure and runs vesin (~0.1 ms for a molecule), once per structure
        and dataset; ``positions`` limits the count to those (the others stay −1), so a rank
        counts only its own shard."""
        if self._edges is None:
            self._edges = np.full(len(self), -1, dtype=np.int64)
        wanted = np.arange(len(self)) if positions is None else np.asarray(positions, dtype=np.int64)
        for k in wanted[self._edges[wanted] < 0].tolist():
            self._edges[k] = (int(self._cache[k][K.EDGE_INDEX].shape[1]) if self._cache is not None and k in self._cache
                              else edge_count(self.structure(k), self.cutoff))
        return self._edges

    def subset(self, positions: np.ndarray | Sequence[int], source: str | None = None) -> "StoreDataset":
        """The dataset of ``indices[positions]`` (same store, settings)."""
        return StoreDataset(self.store, self.cutoff, dtype=self.dtype, require=self.require,
                            source=source or self.source, fields=self.fields,
                            indices=self.indices[np.asarray(positions, dtype=np.int64)],
                            workers=self.workers, prefetch=self.prefetch, cache_gb=self.cache_bytes / 2**30,
                            info=self.info)

    def batches(self, plan: Sequence[Sequence[int]]) -> Iterator[Batch]:
        """Collated batches of ``plan`` (lists of positions in this dataset), in order: in
        ``workers`` processes, or here when the graphs are cached (or will be: a data set that
        fits ``cache_gb`` is built here once and then read from memory, as fast as in memory)."""
        if self.cache_bytes and (self._cache is not None or (len(self) and self._fits(self._build(0)))):
            return read_batches(self, plan, workers=0)
        return read_batches(self, plan, workers=self.workers, prefetch=self.prefetch)


class _PlanReader(torch.utils.data.Dataset):
    """Item ``k`` is the collated batch of ``plan[k]`` (read in a loader worker)."""

    def __init__(self, dataset: Any, plan: Sequence[Sequence[int]]) -> None:
        self.dataset, self.plan = dataset, plan

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, k: int) -> Batch:
        graphs = self.dataset.graphs
        return collate([graphs[int(i)] for i in self.plan[k]], self.dataset.fields)


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)


def read_batches(dataset: Any, plan: Sequence[Sequence[int]], *, workers: int = 0,
                 prefetch: int = 4) -> Iterator[Batch]:
    """The collated batches of ``plan`` in order; ``workers`` > 0 reads them in that many
    processes, each keeping ``prefetch`` batches ready (torch's DataLoader, one thread each)."""
    reader = _PlanReader(dataset, plan)
    if workers <= 0 or len(plan) == 0:
        return (reader[k] for k in range(len(plan)))
    close_readers()  # LMDB handles must not cross the fork: the workers open their own
    loader = torch.utils.data.DataLoader(reader, batch_size=None, shuffle=False, num_workers=workers,
                                         prefetch_factor=max(1, prefetch), worker_init_fn=_one_thread,
                                         persistent_workers=False)
    return iter(loader)


def dataset_sizes(dataset: Any) -> np.ndarray:
    """Atoms per structure of any dataset (``sizes()`` if it has one, else from its graphs)."""
    if hasattr(dataset, "sizes"):
        return np.asarray(dataset.sizes(), dtype=np.int64)
    return np.asarray([int(g[K.NUMBERS].shape[0]) for g in dataset.graphs], dtype=np.int64)


def dataset_edges(dataset: Any, positions: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
    """Directed edges per structure of any dataset (``edges()`` if it has one, else from its
    graphs); only ``positions`` need be counted (a streaming dataset leaves the others −1)."""
    if hasattr(dataset, "edges"):
        return np.asarray(dataset.edges(positions), dtype=np.int64)
    return np.asarray([int(g[K.EDGE_INDEX].shape[1]) for g in dataset.graphs], dtype=np.int64)


def size_batches(order: Sequence[int] | np.ndarray, sizes: np.ndarray, *, max_atoms: int | None,
                 max_structures: int, edges: np.ndarray | None = None,
                 max_edges: int | None = None) -> list[np.ndarray]:
    """Cut ``order`` into consecutive batches of at most ``max_structures`` structures and (if
    given) ``max_atoms`` atoms and ``max_edges`` edges (``edges[i]`` per structure); a structure
    over a budget on its own gets a batch of its own."""
    order = np.asarray(order, dtype=np.int64)
    if max_atoms is None and max_edges is None:
        return [order[s : s + max_structures] for s in range(0, len(order), max_structures)]
    if max_edges is not None and edges is None:
        raise ValueError("size_batches: max_edges needs the edges per structure")
    atom_cap = np.inf if max_atoms is None else max_atoms
    edge_cap = np.inf if max_edges is None else max_edges
    n_atoms = sizes[order].tolist() if max_atoms is not None else [0] * len(order)
    n_edges = edges[order].tolist() if max_edges is not None else [0] * len(order)
    batches, start, atoms, pairs = [], 0, 0, 0
    for k, (n, e) in enumerate(zip(n_atoms, n_edges)):
        if k > start and (atoms + n > atom_cap or pairs + e > edge_cap or k - start >= max_structures):
            batches.append(order[start:k])
            start, atoms, pairs = k, 0, 0
        atoms += n
        pairs += e
    if start < len(order):
        batches.append(order[start:])
    return batches


def epoch_batches(dataset: Any, order: Sequence[int] | np.ndarray, *, batch_size: int,
                  batch_atoms: int | None, batch_edges: int | None = None) -> list[np.ndarray]:
    """One epoch's batches of ``dataset`` in ``order`` (see :func:`size_batches`)."""
    sizes = dataset_sizes(dataset) if batch_atoms is not None else np.zeros(0, np.int64)
    edges = dataset_edges(dataset) if batch_edges is not None else None
    return size_batches(order, sizes, max_atoms=batch_atoms, max_structures=batch_size,
                        edges=edges, max_edges=batch_edges)


class MixedDataset:
    """Several datasets drawn from with fixed ratios: each epoch holds ``epoch_size``
    structures (default: all parts' sizes summed), part ``k`` contributing ``ratio_k`` of them
    (sampled without replacement within an epoch while a part has enough, then with). The
    ratios are normalised. Position ``p`` of this dataset is structure ``p - offset_k`` of part
    ``k``; :meth:`epoch_order` gives an epoch's positions."""

    def __init__(self, parts: Sequence[Any], ratios: Sequence[float], *, epoch_size: int | None = None,
                 source: str = "data.train") -> None:
        if len(parts) != len(ratios) or not parts:
            raise ConfigError(f"{source}: give one ratio per data source")
        if any(r < 0 for r in ratios) or sum(ratios) <= 0:
            raise ConfigError(f"{source}: mixing ratios must be ≥ 0 and not all 0; got {list(ratios)}")
        self.parts, self.source = list(parts), source
        self.ratios = np.asarray(ratios, dtype=float) / float(sum(ratios))
        self.offsets = np.cumsum([0] + [len(p) for p in parts])
        self.fields = parts[0].fields  # one registry's table for all parts
        self.cutoff = parts[0].cutoff
        self.epoch_size = int(epoch_size or self.offsets[-1])
        self.streaming = any(getattr(p, "streaming", False) for p in parts)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _locate(self, position: int) -> tuple[Any, int]:
        k = int(np.searchsorted(self.offsets, position, side="right") - 1)
        return self.parts[k], position - int(self.offsets[k])

    @property
    def graphs(self) -> Sequence[Batch]:
        return _Lazy(len(self), lambda p: (lambda part, i: part.graphs[i])(*self._locate(p)))

    @property
    def structures(self) -> Sequence[Atoms]:
        return _Lazy(len(self), lambda p: (lambda part, i: part.structures[i])(*self._locate(p)))

    def numbers(self) -> np.ndarray:
        return np.unique(np.concatenate([np.asarray(p.numbers()) for p, r in zip(self.parts, self.ratios) if r > 0]))

    def sizes(self) -> np.ndarray:
        return np.concatenate([dataset_sizes(p) for p in self.parts])

    def edges(self, positions: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """Edges per structure of every part (only ``positions`` need be counted)."""
        wanted = None if positions is None else np.asarray(positions, dtype=np.int64)
        out = []
        for k, part in enumerate(self.parts):
            lo, hi = int(self.offsets[k]), int(self.offsets[k + 1])
            mine = None if wanted is None else wanted[(wanted >= lo) & (wanted < hi)] - lo
            out.append(dataset_edges(part, mine))
        return np.concatenate(out)

    def counts(self) -> np.ndarray:
        """Structures drawn from each part per epoch (sums to ``epoch_size``)."""
        raw = self.ratios * self.epoch_size
        counts = np.floor(raw).astype(np.int64)
        counts[np.argsort(-(raw - counts))[: self.epoch_size - counts.sum()]] += 1
        return counts

    def epoch_order(self, generator: np.random.Generator) -> np.ndarray:
        """One epoch's positions: each part's share drawn, then shuffled together."""
        chosen = []
        for k, (part, count) in enumerate(zip(self.parts, self.counts())):
            n, picks = len(part), []
            while count > 0:
                take = min(count, n)
                picks.append(generator.permutation(n)[:take])
                count -= take
            if picks:
                chosen.append(np.concatenate(picks) + self.offsets[k])
        order = np.concatenate(chosen) if chosen else np.zeros(0, np.int64)
        return order[generator.permutation(len(order))]

    def batches(self, plan: Sequence[Sequence[int]]) -> Iterator[Batch]:
        workers = max((getattr(p, "workers", 0) for p in self.parts), default=0)
        prefetch = max((getattr(p, "prefetch", 4) for p in self.parts), default=4)
        return read_batches(self, plan, workers=workers, prefetch=prefetch)


def normalization_sums(dataset: Any, elements: Sequence[int], positions: Sequence[int] | np.ndarray) -> dict[str, Any]:
    """Sums over the structures at ``positions`` from which :func:`normalization_from_sums` fits
    per-element reference energies and scale in one streaming pass (memory independent of the
    data size; sums of several processes' shards add up)."""
    index = {int(z): k for k, z in enumerate(elements)}
    n_el = len(elements)
    sums = {"n": 0, "AtA": np.zeros((n_el, n_el)), "Atb": np.zeros(n_el), "e2": 0.0, "ce_n2": np.zeros(n_el),
            "cc_n2": np.zeros((n_el, n_el)), "e_n": 0.0, "c_n": np.zeros(n_el), "f2": 0.0, "nf": 0,
            "energy_missing": 0, "forces_missing": 0}
    structures = dataset.structures
    for p in np.asarray(positions, dtype=np.int64):
        atoms = structures[int(p)]
        labels = get_labels(atoms)
        counts = np.bincount([index[int(z)] for z in atoms.numbers], minlength=n_el).astype(float)
        n = float(len(atoms))
        sums["n"] += 1
        if labels.energy is None:
            sums["energy_missing"] += 1
        else:
            e = float(labels.energy)
            sums["AtA"] += np.outer(counts, counts)
            sums["Atb"] += counts * e
            sums["e2"] += (e / n) ** 2
            sums["ce_n2"] += counts * e / n**2
            sums["cc_n2"] += np.outer(counts, counts) / n**2
            sums["e_n"] += e / n
            sums["c_n"] += counts / n
        if labels.energy is None:
            continue
        if labels.forces is None:
            sums["forces_missing"] += 1
        else:
            sums["f2"] += float(np.sum(labels.forces**2))
            sums["nf"] += labels.forces.size
    return sums


def add_sums(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Several shards' :func:`normalization_sums` added."""
    total = dict(parts[0])
    for part in parts[1:]:
        for key, value in part.items():
            total[key] = total[key] + value
    return total


def normalization_from_sums(sums: dict[str, Any]) -> tuple[np.ndarray, float, float]:
    """Reference energies, scale and shift as :func:`atomforge.model.potential.fit_normalization`
    fits them, over the structures with energies (least squares through the normal equations;
    force RMS as scale when each of them has forces, else the residual's std; zeros and scale 1
    when no structure has an energy)."""
    n_el = len(sums["Atb"])
    n = sums["n"] - sums["energy_missing"]  # structures with energies (the fit skips the others)
    if n <= 0:
        atomic, mean, var = np.zeros(n_el), 0.0, 0.0
    else:
        atomic, *_ = np.linalg.lstsq(sums["AtA"], sums["Atb"], rcond=None)
        mean = (sums["e_n"] - atomic @ sums["c_n"]) / n
        second = (sums["e2"] - 2 * atomic @ sums["ce_n2"] + atomic @ sums["cc_n2"] @ atomic) / n
        var = max(second - mean**2, 0.0)
    if not sums["forces_missing"] and sums["nf"]:
        scale = float(np.sqrt(sums["f2"] / sums["nf"]))
    else:
        scale = float(np.sqrt(var))
    return atomic, (scale if scale > 1e-8 else 1.0), float(mean)
