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


def neighbor_list(
    atoms: Atoms, cutoff: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Full neighbour list within ``cutoff`` (Å): centre ``i``, neighbour ``j``, shift, distance.

    Periodic along any subset of axes and any triclinic cell, including cells smaller than the
    cutoff (several images of one atom are then neighbours).
    """
    i, j, shifts, dist = _vesin(atoms, cutoff, "ijSd")
    return i.astype(np.int64), j.astype(np.int64), shifts.astype(np.float64), dist


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
    i, j, shifts, dist = neighbor_list(atoms, cutoff)
    _check_contacts(i, j, dist, where)
    graph = {
        K.POSITIONS: torch.as_tensor(atoms.positions, dtype=dtype),
        K.NUMBERS: torch.as_tensor(atoms.numbers, dtype=torch.long),
        K.CELL: torch.as_tensor(np.asarray(atoms.cell[:]), dtype=dtype).reshape(1, 3, 3),
        K.PBC: torch.as_tensor(np.asarray(atoms.pbc, dtype=bool)).reshape(1, 3),
        K.N_ATOMS: torch.tensor([len(atoms)], dtype=torch.long),
        K.EDGE_INDEX: torch.as_tensor(np.stack([i, j])),
        K.SHIFTS: torch.as_tensor(shifts, dtype=dtype),
    }
    graph.update(read_fields(atoms, DEFAULT_FIELDS if fields is None else fields, dtype=dtype, where=where))
    if labels is not None:
        if labels.energy is not None:
            graph[K.ENERGY] = torch.tensor([labels.energy], dtype=dtype)
        if labels.forces is not None:
            graph[K.FORCES] = torch.as_tensor(labels.forces, dtype=dtype)
        if labels.stress is not None:
            graph[K.STRESS] = torch.as_tensor(labels.stress, dtype=dtype).reshape(1, 3, 3)
    return graph


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
