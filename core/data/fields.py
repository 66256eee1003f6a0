"""Batch fields by registry: how each key of a graph or batch is batched, replicated and sliced.

Every key a graph can carry is declared once by a :class:`FieldSpec`: whether it is per atom,
per edge, per structure or global, its dtype and trailing shape, and — for data that comes from
``ase.Atoms`` — how to read it. :func:`atomforge.collate`, :func:`replicate_batch` (ensembles,
MC dropout), :func:`split_batch` (per-structure slicing) and the per-rank sharding of distributed
engines read this table instead of hard-coding keys, so a plugin adds a field (magnetic moments,
a teacher's Hessian rows, a dataset id) through the ``register_fields`` hook and it travels
through batching like the built-ins. The built-in table is :data:`DEFAULT_FIELDS`; a registry's
table (built-ins plus every plugin's fields) is ``registry.fields``.

Shapes in a batch (``N`` atoms, ``E`` edges, ``B`` structures): ``atom`` → ``[N, *shape]``,
``edge`` → ``[E, *shape]`` (``edge_index`` is ``[2, E]``: concatenated along dimension 1),
``structure`` → ``[B, *shape]``, ``global`` → ``shape`` (one value every graph of a batch must
share).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from ase import Atoms

from .. import keys as K
from .._errors import DataValidationError, PluginError
from .._specs import PluginKind

__all__ = [
    "FieldKind", "FieldSpec", "FieldTable", "DEFAULT_FIELDS", "read_fields", "collate", "replicate_batch",
    "split_batch", "mask_key", "label_mask",
]

MASK_SUFFIX = "_mask"


def mask_key(label: str) -> str:
    """The batch key of a label's per-structure mask (``energy`` → ``energy_mask``)."""
    return label + MASK_SUFFIX


def label_mask(batch: Mapping[str, torch.Tensor], label: str) -> torch.Tensor | None:
    """[B] bool: which structures of ``batch`` carry ``label``; ``None`` when all of them do
    (the key is then batched without a mask) — and when none does (the key is absent)."""
    return batch.get(mask_key(label))


class FieldKind(str, enum.Enum):
    """What one entry of a field belongs to."""

    ATOM = "atom"  # [N, *shape], concatenated over structures
    EDGE = "edge"  # [E, *shape] (concatenated along ``concat_dim``)
    STRUCTURE = "structure"  # [B, *shape]
    GLOBAL = "global"  # one value for the whole batch; graphs must agree


_DTYPES = ("float", "long", "bool")


@dataclass(frozen=True)
class FieldSpec:
    """One batch key: how it is read, batched, replicated and sliced.

    ``register(FieldSpec("magmoms", per="atom", read=lambda atoms: atoms.arrays.get("magmoms")))``
    in a plugin's ``register_fields`` hook adds per-atom magnetic moments to every graph built
    from structures that carry them.
    """

    name: str  # the batch key
    per: FieldKind | str  # atom | edge | structure | global
    dtype: str = "float"  # float (the model's float dtype) | long | bool
    shape: tuple[int, ...] = ()  # trailing shape of one entry, e.g. (3,) for forces; -1 = any size (one per data set)
    description: str = ""  # one line for `atomforge plugins` and the docs
    label: bool = False  # a reference value (loss target); structures may lack it
    read: Callable[[Atoms], Any] | None = None  # value of one structure from ase.Atoms (None = absent)
    default: Any = None  # used when ``read`` gives None (metadata); None = the key is left out
    concat_dim: int = 0  # dimension along which graphs are concatenated (1 for edge_index)
    index_of: FieldKind | str | None = None  # entries index atoms/structures: offset when batching
    kind: PluginKind = field(default=PluginKind.FIELD, repr=False)  # plugin kind (do not pass)

    def __post_init__(self) -> None:
        object.__setattr__(self, "per", FieldKind(self.per))
        if self.index_of is not None:
            object.__setattr__(self, "index_of", FieldKind(self.index_of))
        if self.dtype not in _DTYPES:
            raise PluginError(f"field {self.name!r}: dtype must be one of {_DTYPES}; got {self.dtype!r}")
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))

    def torch_dtype(self, float_dtype: torch.dtype) -> torch.dtype:
        """The tensor dtype of this field for a model working in ``float_dtype``."""
        return {"float": float_dtype, "long": torch.long, "bool": torch.bool}[self.dtype]


class FieldTable(Mapping[str, FieldSpec]):
    """An immutable table of fields by name; :meth:`extended` adds plugin fields. Every label
    field brings its per-structure mask field (``<label>_mask``, bool), which :func:`collate`
    adds when only some structures of a batch carry the label."""

    def __init__(self, specs: Iterable[FieldSpec] = ()) -> None:
        self._specs: dict[str, FieldSpec] = {}
        for spec in specs:
            if spec.name in self._specs:
                raise PluginError(f"field {spec.name!r} is declared twice")
            self._specs[spec.name] = spec
        for spec in [s for s in self._specs.values() if s.label and mask_key(s.name) not in self._specs]:
            self._specs[mask_key(spec.name)] = FieldSpec(
                mask_key(spec.name), "structure", dtype="bool",
                description=f"which structures carry {spec.name!r} (present only when some do not)")

    def __getitem__(self, name: str) -> FieldSpec:
        return self._specs[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)

    def extended(self, specs: Iterable[FieldSpec], *, provider: Mapping[str, str] | None = None) -> "FieldTable":
        """A new table with ``specs`` added; a name already declared is a :class:`PluginError`
        naming both providers (``provider`` maps field name → who declared it)."""
        specs = list(specs)
        clash = [s.name for s in specs if s.name in self._specs or (s.label and mask_key(s.name) in self._specs)]
        if clash:
            who = provider or {}
            raise PluginError(
                "field(s) " + ", ".join(f"{n!r} (from {who.get(n, 'a plugin')})" for n in clash)
                + " are already declared by atomforge or another plugin; choose another name")
        return FieldTable([*(s for n, s in self._specs.items() if not n.endswith(MASK_SUFFIX)), *specs])

    def spec(self, key: str) -> FieldSpec:
        """The spec of ``key``; an unknown key is a clear error."""
        try:
            return self._specs[key]
        except KeyError:
            raise DataValidationError(
                f"batch key {key!r} is not a registered field (known: {', '.join(sorted(self._specs))}); a plugin "
                "that puts it into graphs must declare it with register_fields (docs/plugins.md)") from None


def _metadata_reader(key: str, cast: type) -> Callable[[Atoms], Any]:
    def read(atoms: Atoms) -> Any:
        if key in atoms.info:
            return cast(atoms.info[key])
        if key == K.CHARGE and "initial_charges" in atoms.arrays:  # how an ASE db stores a charge
            return float(atoms.arrays["initial_charges"].sum())
        return None

    read.__name__ = f"read_{key}"
    return read


DEFAULT_FIELDS = FieldTable([
    FieldSpec(K.POSITIONS, "atom", shape=(3,), description="Cartesian positions, Å"),
    FieldSpec(K.NUMBERS, "atom", dtype="long", description="atomic numbers"),
    FieldSpec(K.BATCH, "atom", dtype="long", index_of="structure", description="structure index of each atom"),
    FieldSpec(K.CELL, "structure", shape=(3, 3), description="cell vectors as rows, Å (zeros if open)"),
    FieldSpec(K.PBC, "structure", dtype="bool", shape=(3,), description="periodicity per axis"),
    FieldSpec(K.N_ATOMS, "structure", dtype="long", description="atoms per structure"),
    FieldSpec(K.EDGE_INDEX, "edge", dtype="long", shape=(2,), concat_dim=1, index_of="atom",
              description="(centre, neighbour) of each directed edge, [2, E]"),
    FieldSpec(K.SHIFTS, "edge", shape=(3,), description="integer cell shifts of the neighbour image"),
    FieldSpec(K.CHARGE, "structure", read=_metadata_reader(K.CHARGE, float), default=0.0,
              description="total charge, e (atoms.info['charge'])"),
    FieldSpec(K.SPIN, "structure", read=_metadata_reader(K.SPIN, float), default=0.0,
              description="spin multiplicity 2S+1, 0 = unspecified (atoms.info['spin'])"),
    FieldSpec(K.FIDELITY, "structure", dtype="long", read=_metadata_reader(K.FIDELITY, int), default=0,
              description="level-of-theory index (atoms.info['fidelity'])"),
    FieldSpec(K.WEIGHT, "structure", read=_metadata_reader(K.WEIGHT, float), default=1.0,
              description="sample weight in the loss (atoms.info['weight'])"),
    FieldSpec(K.ENERGY, "structure", label=True, description="reference energy, eV"),
    FieldSpec(K.FORCES, "atom", shape=(3,), label=True, description="reference forces, eV/Å"),
    FieldSpec(K.STRESS, "structure", shape=(3, 3), label=True, description="reference stress, eV/Å³ (ASE sign)"),
])
"""The fields atomforge itself puts into graphs (geometry, metadata and the built-in labels)."""


def read_fields(atoms: Atoms, fields: FieldTable, *, dtype: torch.dtype, where: str) -> dict[str, torch.Tensor]:
    """Tensors of every field with a ``read`` function (metadata, plugin fields) for one
    structure, shaped ``[1, *shape]`` per structure or ``[N, *shape]`` per atom; a value of
    the wrong shape is a :class:`DataValidationError` naming the field and the structure."""
    out: dict[str, torch.Tensor] = {}
    for spec in fields.values():
        if spec.read is None:
            continue
        value = spec.read(atoms)
        if value is None:
            value = spec.default
        if value is None:
            continue
        expected = {FieldKind.ATOM: (len(atoms), *spec.shape), FieldKind.STRUCTURE: (1, *spec.shape),
                    FieldKind.GLOBAL: spec.shape}.get(spec.per)
        if expected is None:
            raise PluginError(f"field {spec.name!r}: per-edge fields cannot be read from ase.Atoms")
        array = np.asarray(value)
        if spec.per is FieldKind.STRUCTURE and _fits(array.shape, spec.shape):
            array = array.reshape((1, *array.shape))
        if not _fits(array.shape, expected):
            raise DataValidationError(f"{where}: field {spec.name!r} has shape {array.shape}; expected "
                                      f"{expected} ({spec.per.value} field of shape {spec.shape})")
        out[spec.name] = torch.as_tensor(array, dtype=spec.torch_dtype(dtype))
    return out


def _fits(shape: tuple[int, ...], expected: tuple[int, ...]) -> bool:
    """``shape`` matches ``expected``, where an expected size of -1 (a field declared with a free
    trailing size, e.g. a teacher's Hessian rows ``(-1, 3)``) matches any size."""
    return len(shape) == len(expected) and all(e == -1 or a == e for a, e in zip(shape, expected))


def _cat(key: str, values: list[torch.Tensor], dim: int) -> torch.Tensor:
    """``torch.cat`` with a clear error when the structures of a batch disagree on a free size."""
    try:
        return torch.cat(values, dim)
    except RuntimeError:
        shapes = sorted({tuple(v.shape[1:]) if dim == 0 else tuple(v.shape[:dim]) for v in values})
        raise DataValidationError(
            f"field {key!r}: the structures of one batch carry it with different trailing shapes {shapes}; "
            "every structure of a data set must carry the same number of entries (e.g. the same number of "
            "Hessian rows per structure)") from None


def _offsets(counts: torch.Tensor) -> list[int]:
    return (torch.cumsum(counts, 0) - counts).tolist()


def collate(graphs: Sequence[dict[str, torch.Tensor]], fields: FieldTable | None = None) -> dict[str, torch.Tensor]:
    """Concatenate graphs into one batch by the field table (default :data:`DEFAULT_FIELDS`):
    per-atom, per-edge and per-structure fields are concatenated, indices (``edge_index``) offset
    by the atoms before them, ``batch`` indexes structures, global fields must agree.

    A **label** (``FieldSpec.label``) carried by only some graphs is batched with zeros where it
    is missing plus its mask ``<label>_mask`` [B] (:func:`label_mask`), so losses and metrics
    score it per structure wherever it exists. Any other field is batched only when every graph
    carries it.
    """
    fields = DEFAULT_FIELDS if fields is None else fields
    if len(graphs) == 1:
        out = dict(graphs[0])
        out[K.BATCH] = torch.zeros(int(out[K.N_ATOMS][0]), dtype=torch.long)
        return out
    n_atoms = torch.cat([g[K.N_ATOMS] for g in graphs])
    out: dict[str, torch.Tensor] = {
        K.N_ATOMS: n_atoms,
        K.BATCH: torch.repeat_interleave(torch.arange(len(graphs)), n_atoms),
    }
    atom_offsets = _offsets(n_atoms)
    keys = list(dict.fromkeys(k for g in graphs for k in g))
    for key in keys:
        if key in out:
            continue
        spec = fields.spec(key)
        carried = [key in g for g in graphs]
        if not all(carried):
            if spec.label:
                out[key] = _cat(key, [g[key] if key in g else _zeros(spec, g, graphs, key) for g in graphs],
                                spec.concat_dim)
                out[mask_key(key)] = torch.tensor(carried, dtype=torch.bool)
            continue
        if spec.per is FieldKind.GLOBAL:
            out[key] = _agreed(key, [g[key] for g in graphs])
        elif spec.index_of is FieldKind.ATOM:
            out[key] = torch.cat([g[key] + o for g, o in zip(graphs, atom_offsets)], spec.concat_dim)
        else:
            out[key] = _cat(key, [g[key] for g in graphs], spec.concat_dim)
    return out


def _zeros(spec: FieldSpec, graph: Mapping[str, torch.Tensor], graphs: Sequence[Mapping[str, torch.Tensor]],
           key: str) -> torch.Tensor:
    """Zeros standing in for a label ``graph`` lacks (shape of its atoms or its one structure)."""
    like = next(g[key] for g in graphs if key in g)
    rows = int(graph[K.N_ATOMS][0]) if spec.per is FieldKind.ATOM else 1
    return like.new_zeros((rows, *like.shape[1:]))


def _agreed(key: str, values: list[torch.Tensor]) -> torch.Tensor:
    if any(not torch.equal(values[0], v) for v in values[1:]):
        raise DataValidationError(f"global field {key!r} differs between the structures of one batch")
    return values[0]


def _count(batch: Mapping[str, torch.Tensor], kind: FieldKind) -> int:
    if kind is FieldKind.ATOM:
        return int(batch[K.POSITIONS].shape[0])
    if kind is FieldKind.STRUCTURE:
        return int(batch[K.N_ATOMS].shape[0])
    return int(batch[K.EDGE_INDEX].shape[1])


def replicate_batch(batch: dict[str, torch.Tensor], copies: int, fields: FieldTable | None = None) -> dict[str, torch.Tensor]:
    """``copies`` disjoint copies of a batch in one batch (atoms, edges and structures tiled,
    indices offset), so stochastic samples run as one pass. Global fields stay as they are."""
    fields = DEFAULT_FIELDS if fields is None else fields
    out: dict[str, torch.Tensor] = {}
    for key, value in batch.items():
        spec = fields.spec(key)
        if spec.per is FieldKind.GLOBAL:
            out[key] = value
            continue
        reps = [1] * value.dim()
        reps[spec.concat_dim] = copies
        tiled = value.repeat(*reps)
        if spec.index_of is not None:
            per_copy = value.shape[spec.concat_dim]
            step = torch.arange(copies, device=value.device).repeat_interleave(per_copy) * _count(batch, spec.index_of)
            shape = [1] * value.dim()
            shape[spec.concat_dim] = -1
            tiled = tiled + step.reshape(shape)
        out[key] = tiled
    return out


def split_batch(batch: Mapping[str, torch.Tensor], fields: FieldTable | None = None) -> list[dict[str, torch.Tensor]]:
    """The graphs of a batch (the inverse of :func:`collate`): per-atom, per-edge and
    per-structure entries sliced per structure, indices shifted back, ``batch`` dropped; a masked
    label only where its mask says the structure carries it."""
    fields = DEFAULT_FIELDS if fields is None else fields
    n_atoms = batch[K.N_ATOMS]
    atom_offsets = _offsets(n_atoms)
    edge_owner = batch[K.BATCH][batch[K.EDGE_INDEX][0]]
    graphs: list[dict[str, torch.Tensor]] = [{} for _ in range(int(n_atoms.shape[0]))]
    for key, value in batch.items():
        if key == K.BATCH or key.endswith(MASK_SUFFIX) and key[: -len(MASK_SUFFIX)] in batch:
            continue
        spec = fields.spec(key)
        mask = batch.get(mask_key(key)) if spec.label else None
        for b, graph in enumerate(graphs):
            if mask is None or bool(mask[b]):
                graph[key] = _slice(spec, value, b, batch[K.BATCH], edge_owner, atom_offsets[b])
    return graphs


def _slice(spec: FieldSpec, value: torch.Tensor, b: int, atom_owner: torch.Tensor, edge_owner: torch.Tensor,
           atom_offset: int) -> torch.Tensor:
    if spec.per is FieldKind.GLOBAL:
        return value
    if spec.per is FieldKind.STRUCTURE:
        return value.narrow(spec.concat_dim, b, 1)
    owner = atom_owner if spec.per is FieldKind.ATOM else edge_owner
    picked = value.index_select(spec.concat_dim, torch.nonzero(owner == b).reshape(-1))
    return picked - atom_offset if spec.index_of is FieldKind.ATOM else picked
