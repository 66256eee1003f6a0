"""Deployment: export a model file as a metatomic model (LAMMPS, ASE, torch-sim) or TorchScript.

``atomforge export MODEL --format torchscript|aot|metatomic`` (:func:`export_model`) turns a model
file into one self-contained file that runs without atomforge, its plugins or Python code
(``metatomic-torch`` and ``vesin-torch`` are needed only for their formats, imported lazily):

* ``torchscript`` (``.pt``): ``torch.jit.load`` in Python or C++ (libtorch). ``forward(positions,
  numbers, cell, pbc)`` builds its own neighbour list (vesin-torch, whose op library the host
  loads: ``import vesin_torch``), ``with_neighbors(...)`` takes the host's. For custom MD codes and
  any libtorch host.
* ``aot``: refused with an :class:`ExportError` saying why — ``torch.export`` (2.13) cannot
  trace the forces' backward pass (``torch.autograd.grad``) with a dynamic number of edges, so an
  AOTInductor package would accept only the traced edge count (docs/deploy.md).
* ``metatomic`` (``.pt``): a ``metatomic.torch.AtomisticModel`` (energy output; the host takes
  forces and stress by autograd and supplies the neighbour list): one file for LAMMPS
  (``pair_style metatomic``), ASE (``metatomic_ase``), torch-sim and i-PI. Needs the
  ``metatomic-torch`` package at export time only.

Every format holds one head (``head``) of one model in one dtype. The exported computation is
:class:`ExportedPotential`, written in the TorchScript/torch.export subset of Python: it repeats
what :class:`~atomforge.Potential` computes for one structure on one head (reference energies,
scale and shift, forces ``−∂E/∂r`` and the virial ``−∂E/∂ε`` of a symmetric strain, from the
position and cell gradients), and :func:`export_model` checks the exported file against the eager
model on two probe structures before it returns. UQ heads are not exported: a deep ensemble
becomes the mean of its members, a shallow ensemble its mean readout, latent distance its
Potential (its mean); other heads (MC dropout) their deterministic Potential. ``docs/deploy.md``
has the recipes (LAMMPS included) and the measured speeds.
"""

from __future__ import annotations

import json
import time
import zipfile
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes
from ase.stress import full_3x3_to_voigt_6_stress
from torch import nn

from .. import keys as K
from .._errors import AtomforgeError, ConfigError, ExportError, ModelFileError, UnseenElementError
from .potential import Potential

__all__ = [
    "ExportFormat", "ExportError", "ExportReport", "ExportedPotential", "ExportedCalculator", "export_model",
    "load_exported", "read_export_info",
]

#: name of the JSON record (format, backbone, head, elements, cutoff, dtype, …) in every exported file
INFO_NAME = "atomforge-export.json"
_MAX_Z = 119


class ExportFormat(str, Enum):
    """The deployment formats (see the module docstring for which host reads which)."""

    TORCHSCRIPT = "torchscript"
    AOT = "aot"
    METATOMIC = "metatomic"


#: the file suffix each format is written with
SUFFIXES = {ExportFormat.TORCHSCRIPT: ".pt", ExportFormat.AOT: ".pt2", ExportFormat.METATOMIC: ".pt"}


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_model` wrote: the file, its format, the head, how long the export took
    (s) and the largest relative deviation from the eager model on the probe structure."""

    path: Path
    format: ExportFormat
    head: str
    seconds: float
    max_deviation: float
    note: str = ""


# -- the exported computation -----------------------------------------------------------------------
class ExportedPotential(nn.Module):
    """One head of a Potential (or the mean of an ensemble of them) for one structure, in code that
    TorchScript compiles and torch.export traces.

    ``members`` are the backbones of the Potentials averaged (one for a plain model);
    ``atomic_energies`` [K, elements], ``scale`` and ``shift`` [K] are each member's on the chosen
    head; ``offset`` is a shallow ensemble's mean readout on the node features (or ``None``).
    """

    def __init__(self, potentials: List[Potential], head: int, offset: Optional[nn.Linear] = None) -> None:
        super().__init__()
        first = potentials[0]
        self.members = nn.ModuleList([p.backbone for p in potentials])
        self.offset = offset
        self.cutoff = float(first.cutoff)
        self.head = int(head)
        self.direct_forces = bool(first.backbone.direct_forces)
        self.elements: List[int] = list(first.elements)
        self.register_buffer("z_to_index", first.z_to_index.detach().clone())
        self.register_buffer("atomic_energies", torch.stack([p.atomic_energies[head].detach() for p in potentials]))
        self.register_buffer("scale", torch.stack([p.scale[head].detach() for p in potentials]))
        self.register_buffer("shift", torch.stack([p.shift[head].detach() for p in potentials]))

    def check_elements(self, numbers: torch.Tensor) -> None:
        """Raise when ``numbers`` holds an element the model was not trained on (hosts that can
        raise call this; the AOT graph cannot branch on data, its loader checks instead)."""
        top = self.z_to_index.shape[0]
        outside = bool(((numbers < 1) | (numbers >= top)).any())
        if outside or bool((self.z_to_index[numbers.clamp(0, top - 1)] < 0).any()):
            raise ValueError("the structure contains an element this model was never trained on; it knows Z="
                             + str(self.elements))

    def atom_energies(self, positions: torch.Tensor, numbers: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor,
                      edge_index: torch.Tensor, shifts: torch.Tensor,
                      vectors: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Per-atom energies [N] (eV) and, for a direct-force backbone, its forces [N, 3] (eV/Å),
        from the edge ``vectors`` [E, 3] (r_j − r_i + shift·cell), averaged over the members."""
        element = self.z_to_index[numbers]
        inputs: Dict[str, torch.Tensor] = {
            K.POSITIONS: positions, K.NUMBERS: numbers, K.CELL: cell.unsqueeze(0), K.PBC: pbc.unsqueeze(0),
            K.BATCH: torch.zeros_like(numbers), K.N_ATOMS: torch.zeros_like(numbers[:1]) + numbers.shape[0],
            K.EDGE_INDEX: edge_index, K.SHIFTS: shifts, K.EDGE_VECTORS: vectors,
            K.EDGE_LENGTHS: torch.linalg.vector_norm(vectors, dim=-1), K.ELEMENT_INDEX: element,
        }
        total = torch.zeros_like(positions[:, 0])
        forces = torch.zeros_like(positions)
        for k, backbone in enumerate(self.members):
            out = backbone(inputs)
            raw = out[K.NODE_ENERGY]
            if raw.dim() == 2:
                raw = raw[:, self.head]
            if self.offset is not None:  # a shallow ensemble's mean readout, in the same normalised units
                raw = raw + self.offset(out[K.NODE_FEATURES]).squeeze(-1)
            total = total + (raw * self.scale[k] + self.shift[k] + self.atomic_energies[k][element])
            if self.direct_forces:
                forces = forces + out[K.DIRECT_FORCES] * self.scale[k]
        count = len(self.members)
        node = total if count == 1 else total / count
        if self.direct_forces:
            return node, (forces if count == 1 else forces / count)
        return node, None

    def forward(self, positions: torch.Tensor, numbers: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor,
                edge_index: torch.Tensor, shifts: torch.Tensor, compute_virial: bool) -> Dict[str, torch.Tensor]:
        """``energy`` [1], ``energies`` [N] (eV), ``forces`` [N, 3] (eV/Å) and, with
        ``compute_virial``, ``virial`` [3, 3] (−∂E/∂ε, eV) of one structure: positions [N, 3] Å,
        numbers [N], cell [3, 3] (rows), pbc [3], a full neighbour list ``edge_index`` [2, E]
        (centre, neighbour) with integer cell ``shifts`` [E, 3]."""
        # the virial −∂E/∂ε of a symmetric strain ε applied to positions and cell, from their
        # gradients: ∂E/∂ε = sym(rᵀ ∂E/∂r + hᵀ ∂E/∂h) — no strain leaf inside the graph, which
        # torch.export cannot trace
        positions = positions.detach().requires_grad_(compute_virial or not self.direct_forces)
        cell = cell.detach().requires_grad_(compute_virial)
        centre, neighbour = edge_index[0], edge_index[1]
        vectors = positions.index_select(0, neighbour) - positions.index_select(0, centre) + shifts @ cell
        node, direct = self.atom_energies(positions, numbers, cell, pbc, edge_index, shifts, vectors)
        energy = node.sum().reshape(1)
        results: Dict[str, torch.Tensor] = {"energy": energy, "energies": node}
        wrt: List[torch.Tensor] = [positions]
        if compute_virial:
            wrt.append(cell)
        grads: List[Optional[torch.Tensor]] = [None, None]
        if compute_virial or direct is None:
            grads = torch.autograd.grad([energy.sum()], wrt, allow_unused=True)
        position_grad = grads[0]
        if position_grad is None:
            position_grad = torch.zeros_like(positions)
        results["forces"] = -position_grad if direct is None else direct
        if compute_virial:
            cell_grad = grads[-1]
            if cell_grad is None:
                cell_grad = torch.zeros_like(cell)
            strain_grad = positions.detach().transpose(0, 1) @ position_grad + cell.detach().transpose(0, 1) @ cell_grad
            results["virial"] = -0.5 * (strain_grad + strain_grad.transpose(0, 1))
        return results


# -- export ---------------------------------------------------------------------------------------------
def export_model(
    path: str | Path,
    out: str | Path | None = None,
    *,
    format: str | ExportFormat = ExportFormat.METATOMIC,  # noqa: A002 - the CLI's word
    head: str | int | None = None,
    dtype: str | torch.dtype | None = None,
    registry: Any = None,
    verify: bool = True,
) -> ExportReport:
    """Export the model file ``path`` to ``out`` (default: next to it, ``<stem>.<format><suffix>``).

    ``format``: ``metatomic`` (default, as the CLI), ``torchscript`` or ``aot`` (refused, see
    the module docstring); ``head``: the head to export (required when the model has several);
    ``dtype``: ``float32`` or ``float64`` (default: the model's). With ``verify`` (default) the
    exported file is loaded back and its energy, forces and stress on two probe structures are
    compared with the eager model's; a deviation above 1e-4 (float32) or 1e-8 (float64) relative is an
    :class:`ExportError`. Returns an :class:`ExportReport`.
    """
    from ..registry import make_registry
    from .modelfile import load_model, read_model_file

    fmt = _parse_format(format)
    registry = registry or make_registry()
    config, _, _ = read_model_file(path, mmap=True)
    model = load_model(path, registry=registry)
    if dtype is not None:
        model = model.to(_parse_dtype(dtype))
    potentials, offset, reference, note = _exportable(model, config)
    number = _head_number(potentials[0], head)
    core = ExportedPotential(potentials, number, offset).eval()
    for parameter in core.parameters():
        parameter.requires_grad_(False)
    target = Path(out) if out is not None else _default_out(Path(path), fmt)
    info = _info(config, potentials[0], number, fmt, core, note)
    start = time.perf_counter()
    _WRITERS[fmt](core, target, info)
    seconds = time.perf_counter() - start
    deviation = _verify(target, reference, potentials[0].heads[number], core) if verify else float("nan")
    return ExportReport(path=target, format=fmt, head=potentials[0].heads[number], seconds=seconds,
                        max_deviation=deviation, note=note)


def _parse_format(value: str | ExportFormat) -> ExportFormat:
    try:
        return ExportFormat(value)
    except ValueError:
        raise ConfigError(f"export format {value!r} is not one of {[f.value for f in ExportFormat]} "
                          "(metatomic: LAMMPS/ASE/torch-sim; torchscript: any libtorch host)") from None


def _parse_dtype(value: str | torch.dtype) -> torch.dtype:
    choices = {"float32": torch.float32, "float64": torch.float64}
    chosen = choices.get(value) if isinstance(value, str) else value
    if chosen not in choices.values():
        raise ConfigError(f"export dtype {value!r} is not one of {sorted(choices)}")
    return chosen


def _default_out(path: Path, fmt: ExportFormat) -> Path:
    return path.with_name(f"{path.stem}.{fmt.value}{SUFFIXES[fmt]}")


def _head_number(potential: Potential, head: str | int | None) -> int:
    """The head to export: ``head`` (a name or index), or the only one."""
    if head is None:
        if potential.num_heads > 1:
            raise ConfigError(f"this model has {potential.num_heads} heads {potential.heads}; an exported file "
                              "holds one: choose it with --head NAME (export_model(..., head=NAME))")
        return 0
    if isinstance(head, str) and head.isdigit() and head not in potential.heads:
        head = int(head)
    return potential.head_number(head)


def _exportable(model: nn.Module, config: dict[str, Any]) -> tuple[list[Potential], nn.Linear | None, nn.Module, str]:
    """(the Potentials to average, a shallow ensemble's mean readout, the eager model the export
    must equal, a note on what happened to a UQ head)."""
    if isinstance(model, Potential):
        return [model], None, model, ""
    name = (config.get("uq") or {}).get("name", type(model).__name__)
    potential = getattr(model, "potential", None)
    if not isinstance(potential, Potential):
        raise ExportError(f"the model file holds a {type(model).__name__} without a Potential inside; "
                          "nothing to export")
    if name == "deep_ensemble":
        members = list(model.members)
        return members, None, model, f"UQ head {name}: exported the mean of its {len(members)} members (no std)"
    if name == "shallow_ensemble":
        heads = model.heads
        mean = nn.Linear(heads.in_features, 1).to(heads.weight.dtype)
        with torch.no_grad():
            mean.weight.copy_(heads.weight.mean(0, keepdim=True))
            mean.bias.copy_(heads.bias.mean(0, keepdim=True))
        return [potential], mean, model, f"UQ head {name}: exported its mean readout (no std)"
    if name == "latent_distance":
        return [potential], None, model, f"UQ head {name}: exported the Potential it wraps (the mean; no std)"
    return [potential], None, potential, (f"UQ head {name}: exported the deterministic Potential it wraps (not a "
                                          "sampled mean; no std)")


def _info(config: dict[str, Any], potential: Potential, head: int, fmt: ExportFormat, core: ExportedPotential,
          note: str) -> dict[str, str]:
    """The export record stored in the file (all values strings: metatomic's metadata takes only strings)."""
    from .. import __version__

    record = {"format": fmt.value, "backbone": str(config["backbone"]), "head": potential.heads[head],
              "elements": json.dumps(core.elements), "cutoff": repr(core.cutoff),
              "dtype": str(core.atomic_energies.dtype).replace("torch.", ""), "atomforge": __version__,
              "torch": torch.__version__, "note": note}
    return {INFO_NAME: json.dumps(record)}


def _compile_error(kind: str, backbone: str, error: Exception, advice: str) -> ExportError:
    first = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
    return ExportError(f"backbone {backbone!r} cannot be compiled by {kind} ({first[:300]}). The export needs "
                       f"TorchScript-compatible forward code (docs/deploy.md, 'Backbones'); {advice}")


def _write_torchscript(core: ExportedPotential, target: Path, info: dict[str, str]) -> None:
    try:
        from ._torchscript import TorchScriptPotential
    except ImportError as error:
        raise ExportError(f"--format torchscript needs vesin-torch (its TorchScript neighbour list): pip install "
                          f"vesin-torch ({error})") from error
    backbone = json.loads(info[INFO_NAME])["backbone"]
    try:
        scripted = torch.jit.script(TorchScriptPotential(core))
    except Exception as error:  # noqa: BLE001 - TorchScript raises many kinds; one clear message
        raise _compile_error("TorchScript", backbone, error, "use the Python calculator (atomforge.load_calculator) "
                             "for this backbone") from error
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(scripted, str(target), _extra_files=info)


def _write_metatomic(core: ExportedPotential, target: Path, info: dict[str, str]) -> None:
    record = json.loads(info[INFO_NAME])
    if core.direct_forces:
        raise ExportError(f"backbone {record['backbone']!r} predicts forces directly (forces: direct); metatomic hosts "
                          "take forces from the energy. Export it with --format torchscript, or train it with "
                          "forces: conservative")
    steps = getattr(core.members[0], "message_passing_steps", None)
    if steps is None:
        try:  # a backbone TorchScript cannot compile: say that first, it is the bigger obstacle
            torch.jit.script(core)
        except Exception as error:  # noqa: BLE001 - TorchScript raises many kinds; one clear message
            raise _compile_error("TorchScript (metatomic)", record["backbone"], error,
                                 "use the Python calculator (atomforge.load_calculator) for this backbone") from error
        raise ExportError(f"backbone {record['backbone']!r} does not declare message_passing_steps, which sets the "
                          "interaction range LAMMPS needs for ghost atoms; set it on the backbone (docs/plugins.md)")
    try:
        from ._metatomic import save_metatomic
    except ImportError as error:
        raise ExportError(f"--format metatomic needs metatomic-torch: pip install metatomic-torch ({error}); or "
                          "export --format torchscript") from error
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        save_metatomic(core, target, steps=int(steps), dtype=record["dtype"], info=info)
    except Exception as error:  # noqa: BLE001 - TorchScript raises many kinds; one clear message
        if isinstance(error, AtomforgeError):
            raise
        raise _compile_error("TorchScript (metatomic)", record["backbone"], error,
                             "use the Python calculator (atomforge.load_calculator) for this backbone") from error


def _write_aot(core: ExportedPotential, target: Path, info: dict[str, str]) -> None:
    raise ExportError(
        "--format aot is not available with this torch: torch.export cannot trace the force/stress backward pass "
        "(torch.autograd.grad) of atomforge's message-passing backbones with a dynamic number of edges — "
        "backward formulas (index_add's among them) bake the traced edge count into the graph, so the package "
        "would accept only that many edges (pytorch/pytorch#125984, #146719). Use --format torchscript (compiled "
        "by the TorchScript JIT, any libtorch host) or --format metatomic (LAMMPS, ASE, torch-sim); docs/deploy.md")


_WRITERS = {ExportFormat.TORCHSCRIPT: _write_torchscript, ExportFormat.METATOMIC: _write_metatomic,
            ExportFormat.AOT: _write_aot}


# -- loading and checking ------------------------------------------------------------------------------
def read_export_info(path: str | Path) -> dict[str, Any]:
    """The export record of an exported file (format, backbone, head, elements, cutoff, dtype,
    versions, note), read from the archive without loading the model."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"exported model {str(path)!r} does not exist")
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            own = [n for n in names if n.endswith("extra/" + INFO_NAME)]
            if own:
                return json.loads(archive.read(own[0]))
            meta = [n for n in names if n.endswith("extra/model-metadata")]
            if meta:
                extra = json.loads(archive.read(meta[0])).get("extra", {})
                if INFO_NAME in extra:
                    return json.loads(extra[INFO_NAME])
    except (zipfile.BadZipFile, ValueError, KeyError) as error:
        raise ModelFileError(f"{path} is not an exported atomforge model ({error})") from error
    raise ModelFileError(f"{path} is not an exported atomforge model (no {INFO_NAME} record); export one with "
                         "`atomforge export MODEL`")


def load_exported(path: str | Path, **kwargs: Any) -> Calculator:
    """An ASE calculator for an exported file: :class:`ExportedCalculator` for ``torchscript``,
    metatomic's own ``MetatomicCalculator`` for ``metatomic`` (what other hosts will run)."""
    info = read_export_info(path)
    if info["format"] == ExportFormat.METATOMIC.value:
        try:
            from metatomic_ase import MetatomicCalculator
        except ImportError as error:
            raise ExportError(f"{path} is a metatomic model; reading it needs metatomic-ase: pip install "
                              f"metatomic-torch ({error})") from error
        return MetatomicCalculator(str(path), **kwargs)
    return ExportedCalculator(path, **kwargs)


class ExportedCalculator(Calculator):
    """ASE calculator for a ``torchscript`` export: energy, free energy, per-atom energies,
    forces and (cells periodic along all three axes) stress — the same properties and units as
    :class:`~atomforge.AtomforgeCalculator`, without atomforge's model code."""

    implemented_properties = ["energy", "free_energy", "energies", "forces", "stress"]

    def __init__(self, path: str | Path, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.info = read_export_info(path)
        if self.info["format"] != ExportFormat.TORCHSCRIPT.value:
            raise ConfigError(f"{path} is a {self.info['format']} export; load it with atomforge.load_exported")
        import vesin_torch  # noqa: F401 - registers the neighbour-list op the scripted model calls

        self.model = torch.jit.load(str(path), map_location="cpu")
        self.dtype = getattr(torch, self.info["dtype"])
        self.elements = set(json.loads(self.info["elements"]))

    def calculate(self, atoms: Atoms | None = None, properties: list[str] | None = None,
                  system_changes: list[str] = all_changes) -> None:
        super().calculate(atoms, properties or ["energy"], system_changes)
        unseen = sorted(set(int(z) for z in self.atoms.numbers) - self.elements)
        if unseen:
            raise UnseenElementError(f"the structure contains element(s) Z={unseen} that the exported model was never "
                                     f"trained on; it knows Z={sorted(self.elements)}")
        periodic = bool(np.all(self.atoms.pbc))
        out = self.model(torch.as_tensor(self.atoms.positions, dtype=self.dtype),
                         torch.as_tensor(self.atoms.numbers, dtype=torch.long),
                         torch.as_tensor(np.asarray(self.atoms.cell[:]), dtype=self.dtype),
                         torch.as_tensor(np.asarray(self.atoms.pbc, dtype=bool)))
        energy = float(out["energy"].detach()[0])
        self.results = {"energy": energy, "free_energy": energy,
                        "energies": out["energies"].detach().double().numpy(),
                        "forces": out["forces"].detach().double().numpy()}
        if periodic:
            self.results["stress"] = full_3x3_to_voigt_6_stress(out["stress"].detach().double().numpy())


def probe_structures(elements: List[int], cutoff: float, seed: int = 0) -> list[Atoms]:
    """A small molecule-like cluster and a triclinic periodic cell of the model's elements (atoms
    ≥ 1.2 Å apart, several within the cutoff): what :func:`export_model` checks the export on."""
    rng = np.random.default_rng(seed)
    out = []
    for periodic, count in ((False, 6), (True, 12)):
        side = max(cutoff, 1.6 * count ** (1 / 3))
        cell = np.eye(3) * side + rng.uniform(-0.1, 0.1, (3, 3)) * side * periodic
        points: list[np.ndarray] = []
        while len(points) < count:
            trial = rng.uniform(0, 1, 3) @ cell
            if all(np.linalg.norm(trial - p) > 1.2 for p in points):
                points.append(trial)
        numbers = [elements[k % len(elements)] for k in range(count)]
        out.append(Atoms(numbers=numbers, positions=points, cell=cell if periodic else None, pbc=periodic))
    return out


def _verify(target: Path, reference: nn.Module, head: str, core: ExportedPotential) -> float:
    """The largest relative deviation of the exported file from ``reference`` on the probe
    structures; an :class:`ExportError` above the dtype's tolerance."""
    from .calculator import AtomforgeCalculator

    several = getattr(reference, "potential", reference).num_heads > 1
    eager = AtomforgeCalculator(reference, head=head if several else None)
    exported = load_exported(target)
    worst = 0.0
    for atoms in probe_structures(core.elements, core.cutoff):
        keys = ("energy", "forces", "stress") if atoms.pbc.all() else ("energy", "forces")
        expected = {k: np.asarray(eager.get_property(k, atoms)) for k in keys}
        actual = {k: np.asarray(exported.get_property(k, atoms)) for k in keys}
        worst = max(worst, max(relative_deviation(actual[k], expected[k]) for k in keys))
    tolerance = 1e-4 if core.atomic_energies.dtype == torch.float32 else 1e-8
    if not worst <= tolerance:
        raise ExportError(f"the exported model deviates from the eager model by {worst:.2e} (relative) on a probe "
                          f"structure, more than {tolerance:g}; {target} is not trustworthy — please report it")
    return worst


def relative_deviation(actual: np.ndarray, expected: np.ndarray) -> float:
    """max |actual − expected| / max |expected| (a floor of 1e-6 keeps zeros finite)."""
    return float(np.max(np.abs(actual - expected)) / max(float(np.max(np.abs(expected))), 1e-6))
