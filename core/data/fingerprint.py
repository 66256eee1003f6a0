"""A short content hash of a training data set, so that a tracked run says exactly which data it
saw (two runs with the same hash trained on the same structures and labels).

- In-memory sets (:class:`~atomforge.GraphDataset`): SHA-256 over every structure's atomic
  numbers, positions, cell, periodicity, labels (energy, forces, stress) and metadata (charge,
  spin, fidelity, weight), in order. Reading them costs nothing: they are in memory already.
- Stores (:class:`~atomforge.data.streaming.StoreDataset`): SHA-256 over the store's header
  (format, count, sources, creation time) and the chosen indices, not over every record (that
  would be a full pass over a data set that may not fit in memory); a re-packed store therefore
  gets a new hash even if its content is unchanged.
- Mixtures: over their parts' hashes and ratios.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np

from .structures import get_labels, get_metadata

__all__ = ["data_fingerprint", "HASH_LENGTH"]

HASH_LENGTH = 16  # hex characters kept (64 bits: collisions are not a practical concern here)


def _update_array(digest: Any, value: Any) -> None:
    if value is None:
        digest.update(b"-")
        return
    array = np.ascontiguousarray(np.asarray(value, dtype=np.float64))
    digest.update(str(array.shape).encode())
    digest.update(array.tobytes())


def _structure_bytes(digest: Any, atoms: Any) -> None:
    labels, meta = get_labels(atoms), get_metadata(atoms)
    digest.update(np.ascontiguousarray(atoms.numbers, dtype=np.int64).tobytes())
    for value in (atoms.positions, atoms.cell[:], atoms.pbc, labels.energy, labels.forces, labels.stress):
        _update_array(digest, value)
    digest.update(repr((meta.charge, meta.spin, meta.fidelity, meta.weight)).encode())


def data_fingerprint(dataset: Any) -> str:
    """The data set's hash (:data:`HASH_LENGTH` hex characters); see the module docstring."""
    digest = hashlib.sha256()
    if hasattr(dataset, "parts"):  # a mixture of sources
        for part, ratio in zip(dataset.parts, dataset.ratios):
            digest.update(f"{data_fingerprint(part)}:{float(ratio):.12g};".encode())
    elif hasattr(dataset, "store"):  # streamed from a structure store
        digest.update(json.dumps(dataset.store.meta, sort_keys=True, default=str).encode())
        digest.update(np.ascontiguousarray(dataset.indices, dtype=np.int64).tobytes())
    else:
        for atoms in dataset.structures:
            _structure_bytes(digest, atoms)
    return digest.hexdigest()[:HASH_LENGTH]
