"""Model side of the data model: neighbour lists (vesin), graphs and batches of tensors.

A *graph* is the ``dict[str, Tensor]`` of one structure; a *batch* concatenates graphs along
atoms and edges with an index vector (:data:`keys.BATCH`), never padding. How each key is
batched is declared once in the field table (:mod:`atomforge.data.fields`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from ase import Atoms
from vesin import NeighborList

from .. import keys as K
from .._errors import DataValidationError
from .fields import DEFAULT_FIELDS, FieldTable, collate, read_fields
from .structures import MIN_DISTANCE, Labels, validate_structure

__all__ = [
    "neighbor_list",
    "atoms_to_graph",
    "collate",
    "GraphDataset",
    "DataStatistics",
    "data_statistics",
    "iterate_batches",
]


#: open structures (no periodic axis) of at most this many atoms get their neighbour list from
#: all pairs in numpy instead of vesin: the same pairs, found faster at this size (9 atoms: ~8
#: instead of ~30 µs alone, ~55 instead of ~130 µs between two model calls of an MD run, where
#: vesin's Python-side set-up finds cold caches).
SMALL_OPEN_STRUCTURE = 32


def neighbor_list(
    atoms: Atoms, cutoff: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Full neighbour list within ``cutoff`` (Å): centre ``i``, neighbour ``j``, shift, distance.

    Periodic along any subset of axes and any triclinic cell, including cells smaller than the
    cutoff (several images of one atom are then neighbours).
    """
    if len(atoms) <= SMALL_OPEN_STRUCTURE and not np.any(atoms.pbc):
        return _all_pairs(np.asarray(atoms.positions, dtype=np.float64), cutoff)
    i, j, shifts, dist = _vesin(atoms, cutoff, "ijSd")
    return i.astype(np.int64), j.astype(np.int64), shifts.astype(np.float64), dist


def _all_pairs(positions: np.ndarray, cutoff: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """vesin's neighbour list of an open structure, by testing all pairs: the pairs whose squared
    distance is below ``cutoff²`` (vesin's test and arithmetic), ordered by (i, j), which is also
    vesin's order for a structure less than two cutoffs across (one cell of its cell list)."""
    vectors = positions[None, :, :] - positions[:, None, :]  # [i, j]: r_j - r_i
    squared = (vectors * vectors).sum(-1)
    within = squared < cutoff * cutoff
    np.fill_diagonal(within, False)
    i, j = np.nonzero(within)
    return i, j, np.zeros((len(i), 3)), np.sqrt(squared[i, j])


def _vesin(atoms: Atoms, cutoff: float, quantities: str) -> tuple[np.ndarray, ...]:
    """vesin's full neighbour list of ``atoms`` (periodic along its pbc axes), the given quantities."""
    pbc = np.asarray(atoms.pbc, dtype=bool)
    box = np.asarray(atoms.cell[:], dtype=np.float64) if pbc.any() else np.zeros((3, 3))
    return tuple(NeighborList(cutoff=float(cutoff), full_list=True).compute(
        points=np.asarray(atoms.positions, dtype=np.float64), box=box, periodic=pbc.tolist(),
        quantities=quantities))


def edge_count(atoms: Atoms, cutoff: float) -> int:
    """Number of directed edges (neighbour pairs, both directions, all periodic images) within
    ``cutoff`` — what a batch's edge budget counts, without building the graph."""
    (i,) = _vesin(atoms, cutoff, "i")
    return int(len(i))


def _check_contacts(i: np.ndarray, j: np.ndarray, dist: np.ndarray, where: str) -> None:
    if dist.size and dist.min() < MIN_DISTANCE:
        k = int(np.argmin(dist))
        raise DataValidationError(
            f"{where}: atoms {int(i[k])} and {int(j[k])} are {dist[k]:.3g} Å apart, closer than "
            f"{MIN_DISTANCE} Å. Overlapping atoms: check the coordinates and units (Å expected)."
        )


def _edge_tensors(atoms: Atoms, cutoff: float, dtype: torch.dtype, where: str) -> dict[str, torch.Tensor]:
    """Edge index [2, E] and cell shifts [E, 3] of the neighbour list (close contacts raise)."""
    i, j, shifts, dist = neighbor_list(atoms, cutoff)
    _check_contacts(i, j, dist, where)
    return {K.EDGE_INDEX: torch.as_tensor(np.stack([i, j])), K.SHIFTS: torch.as_tensor(shifts, dtype=dtype)}


def _structure_tensors(atoms: Atoms, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Numbers, cell, periodicity and atom count: what moving the atoms leaves unchanged."""
    return {
        K.NUMBERS: torch.as_tensor(atoms.numbers, dtype=torch.long),
        K.CELL: torch.as_tensor(np.asarray(atoms.cell[:]), dtype=dtype).reshape(1, 3, 3),
        K.PBC: torch.as_tensor(np.asarray(atoms.pbc, dtype=bool)).reshape(1, 3),
        K.N_ATOMS: torch.tensor([len(atoms)], dtype=torch.long),
    }


def atoms_to_graph(
    atoms: Atoms,
    cutoff: float,
    *,
    dtype: torch.dtype = torch.float32,
    labels: Labels | None = None,
    where: str = "structure",
    fields: FieldTable | None = None,
) -> dict[str, torch.Tensor]:
    """Build one structure's graph: geometry and neighbour list, its labels where present, and
    every field of ``fields`` (default :data:`~atomforge.DEFAULT_FIELDS`) that reads
    itself from ``ase.Atoms`` (metadata such as charge and spin, plugin fields)."""
    edges = _edge_tensors(atoms, cutoff, dtype, where)
    structure = _structure_tensors(atoms, dtype)
    graph = {K.POSITIONS: torch.as_tensor(atoms.positions, dtype=dtype), **structure, **edges}
    graph.update(read_fields(atoms, DEFAULT_FIELDS if fields is None else fields, dtype=dtype, where=where))
    if labels is not None:
        if labels.energy is not None:
            graph[K.ENERGY] = torch.tensor([labels.energy], dtype=dtype)
        if labels.forces is not None:
            graph[K.FORCES] = torch.as_tensor(labels.forces, dtype=dtype)
        if labels.stress is not None:
            graph[K.STRESS] = torch.as_tensor(labels.stress, dtype=dtype).reshape(1, 3, 3)
    return graph


class StructureBatcher:
    """Batches of one structure, call after call, for a calculator that follows one system as it
    moves (MD, relaxation, exploration): equal, tensor for tensor, to
    ``collate([atoms_to_graph(atoms, cutoff, dtype=dtype, fields=fields)], fields)`` on ``device``.

    Positions and the neighbour list are rebuilt on every call. What depends only on things that
    did not change since the previous call is reused instead of rebuilt: the atomic numbers, cell,
    periodicity, atom count and batch vector (while numbers, cell and pbc are equal) and the
    fields read from ``ase.Atoms`` (metadata such as charge and spin: while every reader returns
    the same scalar as before). Reused tensors are shared between batches, so a model must not
    write into its inputs (none does: forces and stress differentiate fresh leaves).
    """

    def __init__(self, cutoff: float, *, dtype: torch.dtype, fields: FieldTable | None = None,
                 device: torch.device | str = "cpu") -> None:
        self.cutoff = float(cutoff)
        self.dtype = dtype
        self.fields = DEFAULT_FIELDS if fields is None else fields
        self.device = torch.device(device)
        self._readers = [spec.read for spec in self.fields.values() if spec.read is not None]
        # numbers, cell and pbc of the previous call, then their tensors and the batch vector
        self._structure: tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, torch.Tensor], torch.Tensor] | None = None
        self._read: tuple[list, dict[str, torch.Tensor]] | None = None  # the values read, their tensors

    def __call__(self, atoms: Atoms, where: str = "structure") -> dict[str, torch.Tensor]:
        """The batch of ``atoms`` alone (close contacts and malformed fields raise, naming ``where``)."""
        edges = _edge_tensors(atoms, self.cutoff, self.dtype, where)
        structure, batch_vector = self._structure_of(atoms)
        batch = {K.POSITIONS: torch.as_tensor(atoms.positions, dtype=self.dtype, device=self.device), **structure}
        batch.update((key, value.to(self.device)) for key, value in edges.items())
        batch.update(self._fields_of(atoms, where))
        batch[K.BATCH] = batch_vector  # the key collate adds last
        return batch

    def _structure_of(self, atoms: Atoms) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Numbers, cell, pbc and atom count, and the batch vector: reused while numbers, cell and
        pbc are equal to the previous call's."""
        numbers, cell, pbc = atoms.numbers, atoms.cell.array, atoms.pbc
        cached = self._structure
        if cached is not None and np.array_equal(cached[0], numbers) and np.array_equal(cached[1], cell) \
                and np.array_equal(cached[2], pbc):
            return cached[3], cached[4]
        tensors = {key: value.to(self.device) for key, value in _structure_tensors(atoms, self.dtype).items()}
        batch_vector = torch.zeros(len(atoms), dtype=torch.long, device=self.device)
        self._structure = (numbers.copy(), cell.copy(), pbc.copy(), tensors, batch_vector)
        return tensors, batch_vector

    def _fields_of(self, atoms: Atoms, where: str) -> dict[str, torch.Tensor]:
        """:func:`read_fields`' tensors, reused while every reader returns the scalar it returned
        the previous call (an array value, e.g. a plugin's per-atom field, is read afresh)."""
        values = [read(atoms) for read in self._readers]
        if self._read is not None and _same_scalars(values, self._read[0]):
            return self._read[1]
        tensors = {key: value.to(self.device) for key, value in
                   read_fields(atoms, self.fields, dtype=self.dtype, where=where).items()}
        self._read = (values, tensors) if all(_is_scalar(v) for v in values) else None
        return tensors


def _is_scalar(value: object) -> bool:
    return value is None or isinstance(value, (bool, int, float, str, np.generic))


def _same_scalars(values: list, before: list) -> bool:
    """Whether ``values`` are the scalars read before (same types, equal; NaN never is)."""
    return all(type(a) is type(b) and a == b for a, b in zip(values, before))


class GraphDataset:
    """Validated structures with their precomputed graphs (neighbour lists built once)."""

    def __init__(
        self,
        structures: Sequence[Atoms],
        cutoff: float,
        *,
        dtype: torch.dtype = torch.float32,
        require: Sequence[str] = (),
        source: str = "",
        fields: FieldTable | None = None,
    ) -> None:
        if len(structures) == 0:
            raise DataValidationError(f"data set {source!r} is empty; expected ≥ 1 structure.")
        self.structures = list(structures)
        self.cutoff = float(cutoff)
        self.fields = DEFAULT_FIELDS if fields is None else fields  # how the graphs' keys are batched
        self.graphs: list[dict[str, torch.Tensor]] = []
        for index, atoms in enumerate(self.structures):
            where = f"structure {index}" + (f" of {source}" if source else "")
            labels = validate_structure(atoms, require=require, index=index, source=source)
            self.graphs.append(atoms_to_graph(atoms, cutoff, dtype=dtype, labels=labels, where=where,
                                              fields=self.fields))

    def __len__(self) -> int:
        return len(self.graphs)

    def numbers(self) -> np.ndarray:
        """All atomic numbers occurring in the data set, sorted."""
        return np.unique(np.concatenate([a.numbers for a in self.structures]))

    def sizes(self) -> np.ndarray:
        """Atoms per structure (size-aware batching)."""
        return np.asarray([len(a) for a in self.structures], dtype=np.int64)

    def edges(self, positions: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """Directed edges per structure (the edge budget of size-aware batching), from the graphs."""
        return np.asarray([int(g[K.EDGE_INDEX].shape[1]) for g in self.graphs], dtype=np.int64)

    def batches(self, plan: Sequence[Sequence[int]]) -> Iterator[dict[str, torch.Tensor]]:
        """Collated batches of ``plan`` (lists of indices), in order (the graphs are in memory)."""
        return (collate([self.graphs[int(i)] for i in chosen], self.fields) for chosen in plan)


@dataclass(frozen=True)
class DataStatistics:
    """Statistics of a training set that a backbone may fit options to (``BackboneSpec.fit_options``).

    ``elements``: the atomic numbers present, sorted (the model's element order);
    ``avg_num_neighbors``: mean number of neighbours within the cutoff per atom (edges / atoms);
    ``num_structures`` and ``num_atoms``: sizes.
    """

    elements: tuple[int, ...]
    avg_num_neighbors: float
    num_structures: int
    num_atoms: int


def data_statistics(dataset: GraphDataset, *, sample: int = 2000) -> DataStatistics:
    """:class:`DataStatistics` of ``dataset``. In memory its graphs are already built (exact, no
    new neighbour lists); a streamed dataset estimates ``avg_num_neighbors`` from ``sample``
    structures spread evenly over it (their neighbour lists built now)."""
    elements = tuple(int(z) for z in dataset.numbers())
    if isinstance(dataset, GraphDataset):
        atoms = sum(int(g[K.NUMBERS].shape[0]) for g in dataset.graphs)
        edges = sum(int(g[K.EDGE_INDEX].shape[1]) for g in dataset.graphs)
        return DataStatistics(elements=elements, avg_num_neighbors=edges / max(atoms, 1),
                              num_structures=len(dataset), num_atoms=atoms)
    chosen = np.unique(np.linspace(0, len(dataset) - 1, min(sample, len(dataset))).astype(np.int64))
    graphs = [dataset.graphs[int(k)] for k in chosen]
    atoms = sum(int(g[K.NUMBERS].shape[0]) for g in graphs)
    edges = sum(int(g[K.EDGE_INDEX].shape[1]) for g in graphs)
    return DataStatistics(elements=elements, avg_num_neighbors=edges / max(atoms, 1), num_structures=len(dataset),
                          num_atoms=int(np.sum(dataset.sizes())))


def iterate_batches(
    dataset: GraphDataset,
    batch_size: int,
    *,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield collated batches of ``batch_size`` structures (the last one may be smaller)."""
    n = len(dataset)
    order = torch.randperm(n, generator=generator).tolist() if shuffle else list(range(n))
    for start in range(0, n, batch_size):
        yield collate([dataset.graphs[k] for k in order[start : start + batch_size]], dataset.fields)
