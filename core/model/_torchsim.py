"""The torch-sim adapter itself (imports ``torch_sim``; reach it through :mod:`atomforge.model.torchsim`).

torch-sim integrates many systems at once: a :class:`torch_sim.SimState` holds every system's
atoms, concatenated, with a ``system_idx`` vector. :class:`AtomforgeModel` turns such a state
into one atomforge batch (a neighbour list per system, one backbone call for all of them) and
returns what torch-sim's integrators and optimisers read: ``energy`` [B], ``forces`` [N, 3] and,
for periodic states, ``stress`` [B, 3, 3] (eV/Å³, ASE sign convention, as torch-sim's own models).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch_sim as ts
from torch import nn
from torch_sim.models.interface import ModelInterface
from vesin import NeighborList

from .. import keys as K
from .._errors import ConfigError, DataValidationError
from ..data.fields import DEFAULT_FIELDS, FieldKind, FieldTable
from ..data.structures import MIN_DISTANCE
from ..devices import resolve_device
from .potential import check_finite_outputs, with_head

__all__ = ["AtomforgeModel"]

_STD_KEYS = (K.ENERGY_STD, K.FORCES_STD, K.FORCES_STD_MAX)


class AtomforgeModel(ModelInterface):
    """An atomforge model (a :class:`~atomforge.Potential`, a UQ head around one, or a model
    file) as a torch-sim ``ModelInterface``.

    ``model``: a loaded model or the path of an atomforge model file. ``device``: where the
    model runs (``auto``, ``cpu``, ``cuda``…; default the model's own device). ``dtype``: the
    model's float dtype (default the file's); states of another dtype or device are converted on
    the way in and the outputs converted back. ``head``: a multi-head model's readout for every
    system (default: head 0). ``strict``: refuse a state with two atoms closer than 0.1 Å
    (``DataValidationError``) and NaN/inf outputs (``ModelOutputError``), as the ASE calculator
    does; a driver that stops such systems itself while the others go on (the ``md`` explorer)
    switches it off and reads :attr:`last_outputs` instead.

    With a UQ head, ``energy`` and ``forces`` are the head's means and the outputs also hold the
    calibrated ``energy_std`` [B], ``forces_std`` [N] and ``forces_std_max`` [B].
    """

    def __init__(
        self,
        model: nn.Module | str | Path,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        head: str | int | None = None,
        compute_forces: bool = True,
        compute_stress: bool = True,
        strict: bool = True,
        registry: Any = None,
        fields: FieldTable | None = None,
    ) -> None:
        super().__init__()
        model, registry = _loaded(model, registry)
        potential = getattr(model, "potential", model)
        if not hasattr(potential, "head_number") or not hasattr(potential, "cutoff"):
            raise ConfigError(f"AtomforgeModel wraps an atomforge Potential (or a UQ head around one) or a model "
                              f"file path; got {type(model).__name__}")
        if head is not None:
            potential.head_number(head)  # an unknown head fails here, naming the heads
        model = copy.deepcopy(model).eval()  # the caller's model keeps its device, dtype and grads
        device = resolve_device(device) if device is not None else _first_parameter(model).device
        self.model = model.to(device=device, dtype=dtype or _first_parameter(model).dtype)
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)  # autograd tracks positions and strain only
        self.head = head
        self.cutoff = float(self.model.cutoff)
        self.strict = strict
        self.fields = fields if fields is not None else getattr(registry, "fields", DEFAULT_FIELDS)
        self._device, self._dtype = device, _first_parameter(self.model).dtype
        self._compute_forces, self._compute_stress = bool(compute_forces), bool(compute_stress)
        self._memory_scales_with = "n_atoms_x_density"  # a radial cutoff: neighbours grow with density
        #: the outputs of the latest :meth:`forward` (detached, the state's dtype and device): an
        #: integrator keeps only energy and forces, so a driver reads the uncertainty of the step
        #: it just made here, without a second model call
        self.last_outputs: dict[str, torch.Tensor] = {}
        #: per system of the latest call: why its numbers cannot be used (overlapping atoms, NaN/inf
        #: outputs), or None — what a non-strict driver checks after each step
        self.last_problems: list[str | None] = []

    @property
    def uncertainty(self) -> bool:
        """Whether the wrapped model has a UQ head (outputs carry the std keys)."""
        return getattr(self.model, "calibration", None) is not None

    # torch-sim's validate_model_outputs switches these on through their setters
    @ModelInterface.compute_stress.setter
    def compute_stress(self, value: bool) -> None:
        self._compute_stress = bool(value)

    @ModelInterface.compute_forces.setter
    def compute_forces(self, value: bool) -> None:
        self._compute_forces = bool(value)

    def forward(self, state: ts.SimState | Mapping[str, Any], **kwargs: Any) -> dict[str, torch.Tensor]:
        """Energy [B] (eV), forces [N, 3] (eV/Å) and, for a periodic state with
        ``compute_stress``, stress [B, 3, 3] (eV/Å³) of every system in ``state``."""
        positions, cell, system_idx, numbers, pbc = _state_tensors(state)
        batch, min_distance = self.batch(positions, cell, system_idx, numbers, pbc)
        want_stress = self.compute_stress and pbc
        with torch.enable_grad():  # forces are gradients, even when a caller is under no_grad
            out = self.model(batch, compute_forces=self.compute_forces, compute_stress=want_stress)
        if self.strict:
            check_finite_outputs(out, batch, where=f"torch-sim state of {int(cell.shape[0])} system(s)")
        keys = [K.ENERGY, *([K.FORCES] if self.compute_forces else []), *([K.STRESS] if want_stress else []),
                *(k for k in _STD_KEYS if k in out)]
        results = {key: out[key].detach().to(device=positions.device, dtype=positions.dtype) for key in keys}
        self.last_outputs = results
        self.last_problems = _problems(min_distance, out, batch)
        return results

    def batch(self, positions: torch.Tensor, cell: torch.Tensor, system_idx: torch.Tensor, numbers: torch.Tensor,
              pbc: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The atomforge batch of a state (``cell`` with lattice vectors as rows) on the model's
        device and dtype, and each system's shortest interatomic distance [B] (inf without neighbours)."""
        n_systems = int(cell.shape[0])
        n_atoms = torch.bincount(system_idx.long().cpu(), minlength=n_systems)
        edge_index, shifts, min_distance = _neighbour_lists(positions, cell, n_atoms, pbc, self.cutoff)
        if self.strict and bool((min_distance < MIN_DISTANCE).any()):
            bad = int(torch.argmin(min_distance))
            raise DataValidationError(
                f"torch-sim system {bad}: two atoms are {float(min_distance[bad]):.3g} Å apart, closer than "
                f"{MIN_DISTANCE} Å. Overlapping atoms: check the coordinates and units (Å expected), or a "
                "simulation that blew up (a smaller time step).")
        device, dtype = self._device, self._dtype
        batch = {
            K.POSITIONS: positions.detach().to(device=device, dtype=dtype),
            K.NUMBERS: numbers.to(device=device, dtype=torch.long),
            K.CELL: cell.detach().to(device=device, dtype=dtype),
            K.PBC: torch.full((n_systems, 3), pbc, dtype=torch.bool, device=device),
            K.N_ATOMS: n_atoms.to(device),
            K.BATCH: system_idx.to(device=device, dtype=torch.long),
            K.EDGE_INDEX: edge_index.to(device),
            K.SHIFTS: shifts.to(device=device, dtype=dtype),
        }
        batch.update(_default_fields(self.fields, n_systems, int(positions.shape[0]), dtype, device))
        return with_head(self.model, batch, self.head), min_distance


def _loaded(model: nn.Module | str | Path, registry: Any) -> tuple[nn.Module, Any]:
    """The model itself (loading a model file path) and the registry that built it."""
    if isinstance(model, (str, Path)):
        from ..registry import make_registry
        from .modelfile import load_model

        registry = registry or make_registry()
        return load_model(model, registry=registry), registry
    if not isinstance(model, nn.Module):
        raise ConfigError(f"AtomforgeModel wraps a model (an atomforge Potential or UQ head) or a model file path; "
                          f"got {type(model).__name__}")
    return model, registry


def _first_parameter(model: nn.Module) -> torch.Tensor:
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.is_floating_point():
            return tensor
    return torch.zeros(())


def _state_tensors(state: ts.SimState | Mapping[str, Any]) -> tuple[torch.Tensor, ...]:
    """(positions [N, 3], cell [B, 3, 3] with rows as lattice vectors, system_idx [N], numbers [N],
    pbc) of a SimState or a state dict (torch-sim's ``StateDict``: cell in column convention)."""
    get = state.get if isinstance(state, Mapping) else (lambda key, default=None: getattr(state, key, default))
    positions, cell, numbers = get("positions"), get("cell"), get("atomic_numbers")
    if positions is None or cell is None or numbers is None:
        missing = [k for k, v in (("positions", positions), ("cell", cell), ("atomic_numbers", numbers)) if v is None]
        raise ConfigError(f"AtomforgeModel needs a state with positions, cell and atomic_numbers; {missing} missing")
    cell = cell if cell.dim() == 3 else cell.unsqueeze(0)
    system_idx = get("system_idx")
    if system_idx is None:
        system_idx = torch.zeros(positions.shape[0], dtype=torch.long, device=positions.device)
    periodic = torch.as_tensor(get("pbc", True), dtype=torch.bool)
    if bool(periodic.any()) != bool(periodic.all()):
        raise ConfigError(f"AtomforgeModel: a state is periodic along all axes or none; got pbc={periodic.tolist()}")
    pbc = bool(periodic.all())
    return positions, cell.transpose(-1, -2), system_idx, numbers, pbc


def _neighbour_lists(positions: torch.Tensor, cell: torch.Tensor, n_atoms: torch.Tensor, pbc: bool,
                     cutoff: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Full neighbour lists of every system (vesin, on the CPU in float64), concatenated with
    atom offsets: edge_index [2, E], integer shifts [E, 3], shortest distance per system [B]."""
    points = positions.detach().cpu().double().numpy()
    boxes = cell.detach().cpu().double().numpy()
    calculator = NeighborList(cutoff=cutoff, full_list=True)
    edges, shifts, shortest, start = [], [], [], 0
    for b, count in enumerate(n_atoms.tolist()):
        box = boxes[b] if pbc else np.zeros((3, 3))
        i, j, s, d = calculator.compute(points=points[start:start + count], box=box, periodic=[pbc] * 3,
                                        quantities="ijSd")
        edges.append(np.stack([i, j]).astype(np.int64) + start)
        shifts.append(np.asarray(s, dtype=np.float64).reshape(-1, 3))
        shortest.append(float(d.min()) if len(d) else float("inf"))
        start += count
    return (torch.from_numpy(np.concatenate(edges, axis=1)), torch.from_numpy(np.concatenate(shifts)),
            torch.tensor(shortest, dtype=torch.float64))


def _default_fields(fields: FieldTable, n_systems: int, n_atoms: int, dtype: torch.dtype,
                    device: torch.device) -> dict[str, torch.Tensor]:
    """The metadata fields a SimState cannot carry (charge, spin, fidelity, weight, plugin fields
    with a default), at their defaults — what an ``ase.Atoms`` without those ``info`` keys gets."""
    out = {}
    for spec in fields.values():
        if spec.read is None or spec.default is None or spec.per not in (FieldKind.STRUCTURE, FieldKind.ATOM):
            continue
        rows = n_systems if spec.per is FieldKind.STRUCTURE else n_atoms
        value = torch.as_tensor(np.asarray(spec.default), dtype=spec.torch_dtype(dtype))
        out[spec.name] = value.expand(rows, *spec.shape).clone().to(device)
    return out


def _problems(min_distance: torch.Tensor, out: Mapping[str, torch.Tensor],
              batch: Mapping[str, torch.Tensor]) -> list[str | None]:
    """Why each system's outputs cannot be used (overlapping atoms, NaN/inf outputs), or None."""
    n = int(min_distance.shape[0])
    bad = torch.zeros(n, dtype=torch.bool, device=batch[K.BATCH].device)
    for key in (K.ENERGY, K.FORCES, K.ENERGY_STD, K.FORCES_STD):
        if key in out:
            value = out[key].detach()
            broken = ~torch.isfinite(value.reshape(value.shape[0], -1)).all(-1)
            owner = batch[K.BATCH] if key in (K.FORCES, K.FORCES_STD) else torch.arange(n, device=bad.device)
            bad.index_fill_(0, owner[broken], True)
    reasons: list[str | None] = [None] * n
    for b in torch.nonzero(bad.cpu()).flatten().tolist():
        reasons[b] = "the model returned NaN/inf energy or forces"
    for b in torch.nonzero(min_distance < MIN_DISTANCE).flatten().tolist():
        reasons[b] = (f"two atoms are {float(min_distance[b]):.3g} Å apart, closer than {MIN_DISTANCE} Å "
                      "(overlapping atoms)")
    return reasons
