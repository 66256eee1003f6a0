"""MACE backbone (Batatia et al., NeurIPS 2022) built from ``mace-torch``'s own blocks.

``pip install 'atomforge[mace]'`` (mace-torch 0.3.14–0.3.x). mace-torch pins ``e3nn==0.4.4`` and
SevenNet (``atomforge[sevenn]``) needs ``e3nn>=0.5``: by pip's rules the two extras cannot share one
environment; use one virtual environment per family (CI runs the MACE tests in their own venv).

**What is MACE's and what is atomforge's.** The module holds a ``mace.modules.MACE`` (node
embedding, radial embedding, spherical harmonics, interaction, symmetric-contraction product and
readout blocks) and runs exactly MACE's forward pass over them, with two differences that keep
atomforge's contract (docs/architecture.md):

* the edge vectors come from :class:`atomforge.Potential` (one wrapper makes forces and stress by
  autograd through positions and strain; MACE's own ``get_outputs`` is not used). atomforge's edge
  ``(i, j)`` with vector ``r_j − r_i`` aggregating onto ``i`` is MACE's edge ``sender j → receiver
  i`` with vector ``r_i − r_j``; the plugin flips both, so an imported MACE model gives MACE's
  numbers (tested to float64 rounding against ``mace.calculators.MACECalculator``);
* the per-element reference energies (MACE's ``atomic_energies_fn``, "E0s") and the
  scale/shift (MACE's ``ScaleShiftBlock``) are atomforge's :class:`~atomforge.Potential`
  baseline, scale and shift, so the backbone returns the normalised interaction energy per atom
  (pair repulsion + readouts), like every atomforge backbone.

**Options** are MACE's constructor arguments under MACE's names (``num_bessel``,
``num_polynomial_cutoff``, ``max_ell``, ``interaction_cls``, ``interaction_cls_first``,
``num_interactions``, ``hidden_irreps``, ``MLP_irreps``, ``avg_num_neighbors``, ``correlation``,
``gate``, ``pair_repulsion``, ``distance_transform``, ``radial_MLP``, ``radial_type``,
``use_reduced_cg``, …), as JSON (class and gate names as strings, irreps as strings), plus
``num_channels``/``max_L`` as shorthand for ``hidden_irreps`` (``64``/``0`` → ``64x0e``) and
``head`` (which readout of a multi-head model to use). Defaults are ``mace_run_train``'s
(``64x0e`` hidden irreps here, ``max_ell 3``, ``correlation 3``, 2 ``RealAgnosticResidual``
interactions, 8 Bessel functions, p = 5, radial MLP [64, 64, 64], ``16x0e`` readout MLP, SiLU).
``avg_num_neighbors: auto`` (default) and ``atomic_numbers`` are fitted to the training set when
training from scratch (``BackboneSpec.fit_options``) and recorded in the model file.

**Importing a MACE model file** (``model.init_from: MACE.model`` with ``backbone: mace``, or
``atomforge import-model --backbone mace MACE.model out.pt``): the module's constructor arguments
(``mace.tools.scripts_utils.extract_config_mace_model``) become the options, its weights the
backbone's weights, the chosen head's E0s the per-element reference energies and its
scale/shift atomforge's scale and shift. Carried over: every weight of the interaction,
product, radial, embedding and readout blocks, ZBL pair repulsion, distance transforms, the
cutoff and avg_num_neighbors. Not carried over: models with extra embeddings (charge/spin
``embedding_specs``), LES/polar/dipole variants and cuEquivariance layouts (refused with a
clear error); the other heads of a multi-head model stay in the weights but only ``head`` is
evaluated (default: the one named ``Default``, else the last). MACE model files are pickled
modules: reading one runs ``torch.load(weights_only=False)``, i.e. code in the file — import
only files you trust (MACE's own calculator does the same). The atomforge file written from it
holds weights and JSON only.
"""

from __future__ import annotations

import importlib
import math
import os
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch.nn import functional as F

from atomforge import Backbone, BackboneSpec, ConfigError, DataStatistics, ModelFileError, hookimpl
from atomforge import keys as K

__all__ = ["MACEBackbone", "DEFAULTS", "fit_options", "import_mace_model"]

#: ``mace_run_train``'s defaults (0.3.16), except hidden irreps 64x0e (MACE-MP "small" with 64
#: channels; its CLI default is 128x0e+128x1o) — the model of the ethanol benchmark.
DEFAULTS: dict[str, Any] = {
    "num_bessel": 8,
    "num_polynomial_cutoff": 5,
    "max_ell": 3,
    "interaction_cls": "RealAgnosticResidualInteractionBlock",
    "interaction_cls_first": "RealAgnosticResidualInteractionBlock",
    "num_interactions": 2,
    "num_channels": 64,
    "max_L": 0,
    "MLP_irreps": "16x0e",
    "avg_num_neighbors": "auto",
    "correlation": 3,
    "gate": "silu",
    "pair_repulsion": False,
    "distance_transform": "None",
    "radial_MLP": [64, 64, 64],
    "radial_type": "bessel",
    "use_reduced_cg": False,
    "heads": ["Default"],
}

# MACE keyword arguments passed through unchanged (JSON scalars or lists)
_PASSTHROUGH = ("num_bessel", "num_polynomial_cutoff", "max_ell", "num_interactions", "correlation",
                "pair_repulsion", "radial_MLP", "radial_type", "use_reduced_cg", "use_so3", "use_agnostic_product",
                "use_last_readout_only", "use_edge_irreps_first", "apply_cutoff", "keep_last_layer_irreps", "heads")
_NO_WEIGHTS_ONLY = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"
_UNSUPPORTED = ("embedding_specs", "cueq_config", "oeq_config", "lammps_mliap", "use_embedding_readout")


def _mace() -> tuple[Any, Any]:
    """``(mace.modules, e3nn.o3)`` or a ConfigError saying what to install."""
    previous = os.environ.get(_NO_WEIGHTS_ONLY)
    try:
        with warnings.catch_warnings():  # e3nn 0.4's TorchScript code generation under torch 2.13
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", UserWarning)
            modules = importlib.import_module("mace.modules")
            o3 = importlib.import_module("e3nn.o3")
    except ImportError as error:
        raise ConfigError(
            "the mace backbone needs mace-torch: pip install 'atomforge[mace]' (in an environment without "
            f"atomforge[sevenn]: mace-torch pins e3nn 0.4.4, SevenNet needs e3nn ≥ 0.5) ({error})") from error
    finally:
        # ``import mace`` sets TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 for the whole process (e3nn 0.4 needs
        # it while importing); put the variable back so that other torch.load calls keep their default
        if previous is None:
            os.environ.pop(_NO_WEIGHTS_ONLY, None)
        else:
            os.environ[_NO_WEIGHTS_ONLY] = previous
    return modules, o3


def _hidden_irreps(options: Mapping[str, Any]) -> str:
    if options.get("hidden_irreps"):
        return str(options["hidden_irreps"])
    channels, max_l = int(options.get("num_channels", 64)), int(options.get("max_L", 0))
    if channels < 1 or max_l < 0:
        raise ConfigError(f"mace: num_channels must be ≥ 1 and max_L ≥ 0, got {channels} and {max_l}")
    parity = ["0e", "1o", "2e", "3o"]
    if max_l >= len(parity):
        raise ConfigError(f"mace: max_L must be ≤ 3, got {max_l}")
    return "+".join(f"{channels}x{p}" for p in parity[: max_l + 1])


class MACEBackbone(Backbone):
    """MACE from mace-torch's blocks; energies only (forces and stress come from the Potential).

    Args:
        num_elements, cutoff: set by atomforge (``cutoff`` is MACE's ``r_max``).
        avg_num_neighbors: a number, or ``"auto"`` — fitted to the training set by atomforge; a
            backbone built directly (not through training) needs a number.
        atomic_numbers: the model's elements in order (fitted by atomforge; only ZBL pair
            repulsion and distance transforms read them).
        head: the readout head evaluated (a name from ``heads``; default ``Default`` if present,
            else the last).
        **options: MACE's constructor arguments; see the module docstring and :data:`DEFAULTS`.
    """

    vmap_safe = False  # mace-torch's scatter_sum adds in place into a fresh tensor

    def __init__(self, *, num_elements: int, cutoff: float, head: str | None = None, **options: Any) -> None:
        super().__init__(num_elements=num_elements, cutoff=cutoff)
        modules, o3 = _mace()
        given = {**DEFAULTS, **options}
        unknown = sorted(set(options) - set(DEFAULTS) - set(_PASSTHROUGH)
                         - {"hidden_irreps", "atomic_numbers", "edge_irreps", "readout_cls"})
        bad = sorted(set(options) & set(_UNSUPPORTED))
        if bad:
            raise ConfigError(f"mace: {bad} are not supported by atomforge's mace backbone (charge/spin embeddings, "
                              "cuEquivariance/OpenEquivariance layouts, LAMMPS ML-IAP); use a plain MACE model")
        if unknown:
            raise ConfigError(f"mace: unknown option(s) {unknown}; valid: {sorted({*DEFAULTS, *_PASSTHROUGH, 'hidden_irreps', 'atomic_numbers', 'edge_irreps', 'readout_cls', 'head'})}")
        avg = given["avg_num_neighbors"]
        if isinstance(avg, str) or isinstance(avg, bool) or not isinstance(avg, (int, float)) or not math.isfinite(avg) or avg <= 0:
            raise ConfigError(
                f"mace: avg_num_neighbors must be a positive number (got {avg!r}); 'auto' is fitted to the training "
                "data by `atomforge train` — when building the backbone directly, pass a number")
        atomic_numbers = given.get("atomic_numbers") or list(range(1, num_elements + 1))
        if len(atomic_numbers) != num_elements:
            raise ConfigError(f"mace: atomic_numbers {atomic_numbers} must list the model's {num_elements} elements")
        for key, table in (("interaction_cls", modules.interaction_classes),
                           ("interaction_cls_first", modules.interaction_classes)):
            if given[key] not in table:
                raise ConfigError(f"mace: {key} {given[key]!r} is not one of {sorted(table)}")
        if str(given["gate"]) not in modules.gate_dict:
            raise ConfigError(f"mace: gate {given['gate']!r} is not one of {sorted(modules.gate_dict)}")
        heads = [str(h) for h in given["heads"]]
        self.head_name = head if head is not None else ("Default" if "Default" in heads else heads[-1])
        if self.head_name not in heads:
            raise ConfigError(f"mace: head {self.head_name!r} is not one of the model's heads {heads}")
        kwargs = {key: given[key] for key in _PASSTHROUGH if key in given}
        kwargs.update(
            r_max=float(cutoff), num_elements=int(num_elements), atomic_numbers=[int(z) for z in atomic_numbers],
            hidden_irreps=o3.Irreps(_hidden_irreps(given)), MLP_irreps=o3.Irreps(str(given["MLP_irreps"])),
            interaction_cls=modules.interaction_classes[given["interaction_cls"]],
            interaction_cls_first=modules.interaction_classes[given["interaction_cls_first"]],
            gate=modules.gate_dict[str(given["gate"])], avg_num_neighbors=float(avg),
            atomic_energies=np.zeros(num_elements) if len(heads) == 1 else np.zeros((len(heads), num_elements)),
            distance_transform=str(given["distance_transform"]), heads=heads)
        if given.get("edge_irreps"):
            kwargs["edge_irreps"] = o3.Irreps(str(given["edge_irreps"]))
        if given.get("readout_cls"):
            if given["readout_cls"] not in modules.readout_classes:
                raise ConfigError(f"mace: readout_cls {given['readout_cls']!r} is not one of {sorted(modules.readout_classes)}")
            kwargs["readout_cls"] = modules.readout_classes[given["readout_cls"]]
        e3nn = importlib.import_module("e3nn")
        defaults = e3nn.get_optimization_defaults()
        # e3nn's generated code as plain fx modules, not TorchScript: DeepSpeed ZeRO-3 puts hooks on
        # every submodule, which ScriptModules refuse; measured on the benchmark model, one thread:
        # training step and calculator call within 3 % of the scripted modules
        e3nn.set_optimization_defaults(jit_script_fx=False)
        try:
            with warnings.catch_warnings():  # e3nn 0.4's TorchScript code generation under torch 2.13
                warnings.filterwarnings("ignore", message=".*TorchScript.*")
                warnings.filterwarnings("ignore", category=DeprecationWarning)
                self.mace = modules.MACE(**kwargs)
        except (TypeError, ValueError, AssertionError) as error:
            raise ConfigError(f"mace: MACE rejected the options ({type(error).__name__}: {error})") from error
        finally:
            e3nn.set_optimization_defaults(**defaults)
        del self.mace.atomic_energies_fn  # atomforge's Potential holds the reference energies
        self.register_buffer("head_index", torch.tensor(heads.index(self.head_name)), persistent=False)
        # invariant (0e) channels of each layer's features, for UQ heads' latent features
        self._scalar_slices = [_scalar_slices(o3.Irreps(str(p.linear.irreps_out))) for p in self.mace.products]

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        mace = self.mace
        lengths = batch[K.EDGE_LENGTHS].unsqueeze(-1)
        node_attrs = F.one_hot(batch[K.ELEMENT_INDEX], self.num_elements).to(lengths.dtype)
        centre, neighbour = batch[K.EDGE_INDEX][0], batch[K.EDGE_INDEX][1]
        edge_index = torch.stack([neighbour, centre])  # MACE: [sender, receiver], messages j → i
        vectors = -batch[K.EDGE_VECTORS]  # MACE: r_receiver − r_sender = r_i − r_j
        node_feats = mace.node_embedding(node_attrs)
        edge_attrs = mace.spherical_harmonics(vectors)
        edge_feats, cutoff = mace.radial_embedding(lengths, node_attrs, edge_index, mace.atomic_numbers)
        num_atoms = node_attrs.shape[0]
        node_energy = lengths.new_zeros(num_atoms)
        if hasattr(mace, "pair_repulsion"):
            node_energy = node_energy + mace.pair_repulsion_fn(lengths, node_attrs, edge_index, mace.atomic_numbers)
        features: list[torch.Tensor] = []
        for index, (interaction, product) in enumerate(zip(mace.interactions, mace.products)):
            node_feats, sc = interaction(node_attrs=node_attrs, node_feats=node_feats, edge_attrs=edge_attrs,
                                         edge_feats=edge_feats, edge_index=edge_index, cutoff=cutoff,
                                         first_layer=(index == 0))
            node_feats = product(node_feats=node_feats, sc=sc, node_attrs=node_attrs)
            features.append(node_feats)
        rows = torch.arange(num_atoms, device=lengths.device)
        heads = self.head_index.expand(num_atoms)
        for index, readout in enumerate(mace.readouts):
            feats = features[-1 if len(mace.readouts) == 1 else index]
            node_energy = node_energy + readout(feats, heads)[rows, heads]
        scalars = torch.cat([f[:, s] for f, layer in zip(features, self._scalar_slices) for s in layer], dim=-1)
        return {K.NODE_ENERGY: node_energy, K.NODE_FEATURES: scalars}


def _scalar_slices(irreps: Any) -> list[slice]:
    """Column slices of the 0e channels in a feature tensor laid out by ``irreps``."""
    out, start = [], 0
    for mul, ir in irreps:
        width = mul * ir.dim
        if ir.l == 0 and ir.p == 1:
            out.append(slice(start, start + width))
        start += width
    return out


def fit_options(options: dict[str, Any], statistics: DataStatistics) -> dict[str, Any]:
    """``avg_num_neighbors: auto`` → the training set's mean neighbour count; ``atomic_numbers`` →
    the training set's elements (the order of the model's element embedding)."""
    fitted = dict(options)
    if fitted.get("avg_num_neighbors", "auto") == "auto":
        fitted["avg_num_neighbors"] = float(statistics.avg_num_neighbors)
    fitted["atomic_numbers"] = [int(z) for z in statistics.elements]
    return fitted


# -- importing MACE's own model files ---------------------------------------------------------
def _json_options(config: Mapping[str, Any], head: str) -> dict[str, Any]:
    """MACE's constructor arguments (``extract_config_mace_model``) as JSON options."""
    for key in _UNSUPPORTED:
        if config.get(key):
            raise ModelFileError(f"this MACE model uses {key}, which atomforge's mace backbone does not support")
    gate = config.get("gate")
    options: dict[str, Any] = {key: config[key] for key in _PASSTHROUGH if key in config and config[key] is not None}
    options.update(
        interaction_cls=config["interaction_cls"].__name__, interaction_cls_first=config["interaction_cls_first"].__name__,
        hidden_irreps=str(config["hidden_irreps"]), MLP_irreps=str(config["MLP_irreps"]),
        gate="None" if gate is None else getattr(gate, "__name__", str(gate)),
        avg_num_neighbors=float(config["avg_num_neighbors"]),
        atomic_numbers=[int(z) for z in torch.as_tensor(config["atomic_numbers"]).tolist()],
        distance_transform=str(config.get("distance_transform") or "None"),
        correlation=int(config["correlation"]) if not isinstance(config["correlation"], list) else config["correlation"],
        readout_cls=config["readout_cls"].__name__, heads=[str(h) for h in config["heads"]], head=head,
        num_polynomial_cutoff=int(config["num_polynomial_cutoff"]), num_bessel=int(config["num_bessel"]),
        max_ell=int(config["max_ell"]), num_interactions=int(config["num_interactions"]))
    if config.get("edge_irreps") is not None:
        options["edge_irreps"] = str(config["edge_irreps"])
    options.pop("num_channels", None)
    options.pop("max_L", None)
    # keep the option set explicit: every default the model does not set is MACE's class default
    options.setdefault("use_reduced_cg", bool(config.get("use_reduced_cg", True)))
    return options


def import_mace_model(path: Path, head: str | None = None) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
    """Read a MACE model file (``torch.save`` of a ``ScaleShiftMACE``) as (model-file config,
    metadata, Potential state dict). Runs ``torch.load(weights_only=False)``: trusted files only."""
    modules, _ = _mace()
    from mace.tools.scripts_utils import extract_config_mace_model

    try:
        model = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001 - any unreadable file: one message
        raise ModelFileError(f"{path} is neither an atomforge nor a readable MACE model file "
                             f"({type(error).__name__}: {str(error)[:300]})") from error
    if not isinstance(model, torch.nn.Module) or type(model).__name__ != "ScaleShiftMACE":
        raise ModelFileError(f"{path} holds a {type(model).__name__}, not a MACE ScaleShiftMACE model; atomforge's "
                             "mace backbone imports ScaleShiftMACE models (MACE-MP, MACE-OFF, mace_run_train output)")
    config = extract_config_mace_model(model)
    heads = [str(h) for h in config["heads"]]
    head = head if head is not None else ("Default" if "Default" in heads else heads[-1])
    if head not in heads:
        raise ModelFileError(f"{path}: head {head!r} is not one of the model's heads {heads}")
    h = heads.index(head)
    options = _json_options(config, head)
    e0s = np.atleast_2d(np.asarray(config["atomic_energies"], dtype=float))
    scale = np.atleast_1d(np.asarray(config["atomic_inter_scale"], dtype=float))
    shift = np.atleast_1d(np.asarray(config["atomic_inter_shift"], dtype=float))
    dtype = next(model.parameters()).dtype
    model_config = {
        "backbone": "mace", "cutoff": float(config["r_max"]),
        "dtype": "float64" if dtype == torch.float64 else "float32", "options": options,
        "elements": options["atomic_numbers"], "atomic_energies": [float(e) for e in e0s[min(h, len(e0s) - 1)]],
        "scale": float(scale[min(h, len(scale) - 1)]), "shift": float(shift[min(h, len(shift) - 1)]),
    }
    skip = ("atomic_energies_fn.", "scale_shift.")
    state = {f"backbone.mace.{k}": v for k, v in model.state_dict().items() if not k.startswith(skip)}
    metadata = {
        "imported": "mace", "mace_heads": heads, "head": head,
        "carried_over": "all interaction/product/radial/embedding/readout weights, E0s and scale/shift of the head",
        "not_carried_over": "other heads' E0s and scale/shift (their readout weights stay, unused)",
    }
    return model_config, metadata, _with_potential_buffers(model_config, state)


def _with_potential_buffers(config: Mapping[str, Any], state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The Potential's own buffers (element map, reference energies, scale, shift) added to the
    backbone weights, so the state dict loads strictly."""
    elements = [int(z) for z in config["elements"]]
    z_to_index = torch.full((119,), -1, dtype=torch.long)
    z_to_index[torch.tensor(elements)] = torch.arange(len(elements))
    return {**state, "z_to_index": z_to_index,
            "atomic_energies": torch.tensor(config["atomic_energies"], dtype=torch.float64),
            "scale": torch.tensor(float(config["scale"]), dtype=torch.float64),
            "shift": torch.tensor(float(config["shift"]), dtype=torch.float64)}


@hookimpl
def register_backbones(register) -> None:  # noqa: ANN001 - pluggy passes the registrar
    register(
        BackboneSpec(
            name="mace",
            factory=MACEBackbone,
            description="MACE (Batatia et al. 2022) from mace-torch's blocks; pip install 'atomforge[mace]'",
            equivariant=True,
            fit_options=fit_options,
            importer=import_mace_model,
        )
    )
