"""SevenNet backbone (Park et al., J. Chem. Theory Comput. 2024) built from ``sevenn``'s own modules,
with the pretrained SevenNet models that ship inside the ``sevenn`` wheel.

``pip install 'atomforge[sevenn]'`` (sevenn ≥ 0.10; it needs e3nn ≥ 0.5, so it cannot share an
environment with ``atomforge[mace]``).

**What is SevenNet's and what is atomforge's.** The backbone holds the modules that
``sevenn.model_build.build_E3_equivariant_model`` builds — edge embedding (Bessel basis × cutoff
envelope, spherical harmonics), the one-hot → feature linear layer, the NequIP-style interaction
blocks (self-connection, linear, convolution with a radial MLP, linear, gate) and the two-layer
linear (or MLP) readout — and runs them in SevenNet's order on SevenNet's data dict, except:

* the edge vectors come from :class:`atomforge.Potential` (forces and stress are made there, by
  autograd through positions and strain); SevenNet's own force/stress module is not built. The
  edge conventions agree: SevenNet's ``edge_index`` is ``[centre i, neighbour j]`` with vector
  ``r_j − r_i + shift·cell``, messages from ``x[j]`` summed onto ``i`` — atomforge's, unchanged;
* the one-hot element embedding is made here in the model's dtype (SevenNet's casts to float32),
  so the backbone also runs in float64;
* SevenNet's per-species rescale (``rescale_atomic_energy``: ``E_i = raw_i·scale[t] + shift[t]``)
  becomes the Potential's baseline and scale: ``atomic_energies`` = the per-species shift,
  ``scale`` = the species scale when it is the same for every species (true of every shipped
  model: 1.73 for SevenNet-0, 0.808 for l3i5), ``shift`` = 0. That is the same arithmetic, so the
  numbers agree to float32 rounding. A checkpoint whose scale differs between species keeps it
  inside the backbone (option ``species_scale``) with Potential ``scale = 1``, so that
  ``raw·scale[t]`` stays exact; atomforge's scale then only rescales the learnt part as a whole.

**Element order.** ``atomic_numbers`` lists the atomic number of SevenNet's type 0, 1, … (its
one-hot order — alphabetical by symbol for SevenNet-0); the backbone maps ``keys.NUMBERS`` through
it, so the model's ``elements`` (sorted) may be in any order. Training from scratch fits it to the
training set's elements.

**Options** are SevenNet's model-config keys under SevenNet's names (``channel``, ``lmax``,
``lmax_edge``, ``lmax_node``, ``is_parity``, ``num_convolution_layer``, ``irreps_manual``,
``radial_basis``, ``cutoff_function``, ``act_radial``, ``act_scalar``, ``act_gate``,
``weight_nn_hidden_neurons``, ``conv_denominator``, ``train_denominator``, ``use_bias_in_linear``,
``self_connection_type``, ``interaction_type``, ``readout_as_fcn``, ``readout_fcn_hidden_neurons``,
``readout_fcn_activation``, ``_normalize_sph``), defaults SevenNet's (32 channels, lmax 1, 3
layers), plus ``checkpoint``: the name of a shipped checkpoint (``7net-0``, ``7net-l3i5``, …) or a
SevenNet checkpoint file whose *architecture* is the starting point (explicit keys override it; its
weights are not used — for those, ``model.pretrained: 7net-0``). The model file records every key
explicitly (``checkpoint`` resolved), so it rebuilds offline without the checkpoint.
``conv_denominator: avg_num_neigh`` (or ``sqrt_avg_num_neigh``) is fitted to the training set.

**Pretrained models** (``model.pretrained: 7net-0``, ``atomforge import-model --backbone sevennet
pretrained:7net-0 out.pt``): SevenNet-0 (11 Jul 2024; ``7net-0``, ``sevennet-0``,
``7net-0_11Jul2024``), SevenNet-0 (22 May 2024; ``7net-0_22May2024``) and SevenNet-l3i5
(``7net-l3i5``), read from the checkpoints in ``sevenn/pretrained_potentials`` (nothing is
downloaded), float32, cutoff 5 Å, the 89 elements SevenNet-0 knows. Carried over: every weight,
with SevenNet's own compatibility patches for old checkpoints applied (``SevenNetCheckpoint.
build_model``). Not carried over: the multi-fidelity ``7net-mf-0`` (modality inputs; refused) and
models sevenn downloads on demand (``7net-omat``, ``7net-mf-ompa``, …). A user's SevenNet
checkpoint file (``checkpoint_best.pth``) imports the same way (``model.init_from: FILE`` with
``backbone: sevennet``); checkpoints are pickles: ``torch.load(weights_only=False)`` — import only
files you trust (SevenNet's calculator does the same). The atomforge file holds weights and JSON.
"""

from __future__ import annotations

import copy
import functools
import importlib
import json
import math
import re
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn
from torch.nn import functional as F

from atomforge import Backbone, BackboneSpec, ConfigError, DataStatistics, ModelFileError, Potential, hookimpl
from atomforge import keys as K

__all__ = ["SevenNetBackbone", "ARCHITECTURE_KEYS", "PRETRAINED", "fit_options", "pretrained_sevennet",
           "import_sevennet_checkpoint"]

#: SevenNet model-config keys the backbone takes as options (SevenNet's names)
ARCHITECTURE_KEYS = (
    "channel", "lmax", "lmax_edge", "lmax_node", "is_parity", "num_convolution_layer", "irreps_manual",
    "radial_basis", "cutoff_function", "act_radial", "act_scalar", "act_gate", "weight_nn_hidden_neurons",
    "conv_denominator", "train_denominator", "use_bias_in_linear", "self_connection_type", "interaction_type",
    "readout_as_fcn", "readout_fcn_hidden_neurons", "readout_fcn_activation", "_normalize_sph",
)
#: pretrained name (and the aliases sevenn accepts) → checkpoint constant in ``sevenn._const``
PRETRAINED: dict[str, str] = {
    "7net-0": "SEVENNET_0_11Jul2024",
    "sevennet-0": "SEVENNET_0_11Jul2024",
    "7net-0_11Jul2024": "SEVENNET_0_11Jul2024",
    "sevennet-0_11Jul2024": "SEVENNET_0_11Jul2024",
    "7net-0_22May2024": "SEVENNET_0_22May2024",
    "sevennet-0_22May2024": "SEVENNET_0_22May2024",
    "7net-l3i5": "SEVENNET_l3i5",
    "sevennet-l3i5": "SEVENNET_l3i5",
}
_READOUT = ("reduce_input_to_hidden", "reduce_hidden_to_energy", "readout_FCN")
# SevenNet modules atomforge does itself: one-hot embedding (dtype), rescale (Potential), sum, forces
_DROPPED = ("onehot_idx_to_onehot", "rescale_atomic_energy", "reduce_total_enegy", "force_output")
_READOUT_FCN_DEFAULTS = {"readout_fcn_hidden_neurons": [30, 30], "readout_fcn_activation": "relu"}


def _sevenn(module: str = "sevenn.model_build") -> Any:
    """A sevenn module, or a ConfigError saying what to install."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*TorchScript.*")
            return importlib.import_module(module)
    except ImportError as error:
        raise ConfigError("the sevennet backbone needs SevenNet: pip install 'atomforge[sevenn]' (in an environment "
                          "without atomforge[mace]: SevenNet needs e3nn ≥ 0.5, mace-torch pins 0.4.4) "
                          f"({error})") from error


def _jsonable(value: Any) -> Any:
    """``value`` with numpy/torch scalars and arrays made plain JSON (lists, floats, ints)."""
    return json.loads(json.dumps(value, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v)))


# -- the architecture ---------------------------------------------------------------------------
def _checkpoint_path(name: str) -> Path:
    """The file of a shipped checkpoint name (case-insensitive) or a checkpoint file path."""
    canonical = {k.lower(): v for k, v in PRETRAINED.items()}.get(str(name).lower())
    if canonical is None:
        if Path(name).is_file():
            return Path(name)
        raise ConfigError(f"sevennet: {name!r} is neither a pretrained model shipped with sevenn "
                          f"({', '.join(PRETRAINED)}) nor a SevenNet checkpoint file")
    path = Path(getattr(_sevenn("sevenn._const"), canonical))
    if not path.is_file():
        raise ConfigError(f"sevennet: the installed sevenn does not ship {name!r} ({path} is missing); atomforge does "
                          "not download checkpoints — install a sevenn version that ships it")
    return path


def _read_checkpoint(path: str) -> Any:
    """sevenn's ``SevenNetCheckpoint`` of ``path``, read once per process and file version (the
    files hold optimiser state and take seconds to read)."""
    return _read_checkpoint_version(path, _version(path))


def _version(path: str) -> tuple[int, int]:
    stat = Path(path).stat()
    return stat.st_mtime_ns, stat.st_size


@functools.lru_cache(maxsize=8)
def _read_checkpoint_version(path: str, version: tuple[int, int]) -> Any:  # noqa: ARG001 - the cache key
    checkpoint = _sevenn("sevenn.checkpoint").SevenNetCheckpoint(path)
    try:
        checkpoint.config  # noqa: B018 - reads the file now, so errors name it
    except Exception as error:  # noqa: BLE001 - any unreadable file: one message
        raise ModelFileError(f"{path} is neither an atomforge model file nor a readable SevenNet checkpoint "
                             f"({type(error).__name__}: {str(error)[:300]})") from error
    return checkpoint


def _checkpoint_architecture(name: str) -> dict[str, Any]:
    """The architecture keys of a shipped checkpoint (or checkpoint file), as JSON, with the
    convolution denominators its weights hold (old checkpoints' configs say 0.0)."""
    checkpoint = _read_checkpoint(str(_checkpoint_path(name)))
    config = checkpoint.config
    arch = _jsonable({key: config[key] for key in ARCHITECTURE_KEYS if key in config})
    found = {}
    for key, value in checkpoint.model_state_dict.items():
        match = re.fullmatch(r"(\d+)[ _]convolution\.(denominator|denumerator)", key)
        if match:
            found[int(match.group(1))] = float(value.reshape(-1)[0])
    if found:
        arch["conv_denominator"] = [found[k] for k in sorted(found)]
    return arch


def resolve_architecture(options: Mapping[str, Any]) -> dict[str, Any]:
    """Every architecture key explicit: SevenNet's defaults, then ``checkpoint``'s architecture,
    then the given keys; ``checkpoint`` itself is dropped. Unknown keys are a ConfigError."""
    given = dict(options)
    unknown = sorted(set(given) - set(ARCHITECTURE_KEYS) - {"checkpoint", "atomic_numbers", "species_scale"})
    if unknown:
        raise ConfigError(f"sevennet: unknown option(s) {unknown}; valid: "
                          f"{sorted({*ARCHITECTURE_KEYS, 'checkpoint', 'atomic_numbers', 'species_scale'})}")
    # sevenn's model_defaults() pops the readout-MLP keys from its global defaults once a checkpoint
    # with a linear readout is read: keep SevenNet's values for them here
    defaults = {**_READOUT_FCN_DEFAULTS, **_sevenn("sevenn._const").DEFAULT_E3_EQUIVARIANT_MODEL_CONFIG}
    resolved = _jsonable({key: copy.deepcopy(defaults[key]) for key in ARCHITECTURE_KEYS if key in defaults})
    checkpoint = given.pop("checkpoint", None)
    if checkpoint is not None:
        resolved.update(_checkpoint_architecture(str(checkpoint)))
    resolved.update(given)
    return resolved


def _sevenn_config(arch: Mapping[str, Any], *, cutoff: float, num_types: int) -> dict[str, Any]:
    """The config ``build_E3_equivariant_model`` reads (rescale neutral: it is not used here)."""
    denominator = arch["conv_denominator"]
    if isinstance(denominator, str) or (isinstance(denominator, list) and any(isinstance(d, str) for d in denominator)):
        raise ConfigError(f"sevennet: conv_denominator {denominator!r} is fitted to the training data by `atomforge "
                          "train`; when building the backbone directly, give a number (or one per layer)")
    if arch.get("interaction_type", "nequip") != "nequip":
        raise ConfigError(f"sevennet: interaction_type {arch['interaction_type']!r} is not supported (nequip only)")
    return {**copy.deepcopy(dict(arch)), "cutoff": float(cutoff), "_number_of_species": int(num_types),
            "_type_map": {z: z for z in range(num_types)}, "shift": 0.0, "scale": 1.0, "train_shift_scale": False,
            "use_modality": False, "cuequivariance_config": {}, "use_flash_tp": False, "use_oeq": False}


def _deepcopy_state(self: nn.Module, memo: dict[int, Any]) -> nn.Module:
    """``copy.deepcopy`` of a module by its ``__dict__``, as for any nn.Module."""
    new = type(self).__new__(type(self))
    memo[id(self)] = new
    new.__dict__.update(copy.deepcopy(self.__dict__, memo))
    return new


def _new_instance(cls: type) -> Any:
    return cls.__new__(cls)


def _reduce_as_base(self: nn.Module, protocol: int) -> Any:  # noqa: ARG001 - pickle's signature
    """Pickle as the e3nn class itself (importable), with e3nn's own state."""
    return _new_instance, (type(self).__mro__[1],), self.__getstate__()


@functools.lru_cache(maxsize=None)
def _plain_deepcopy(cls: type) -> type:
    """``cls`` with a plain ``__deepcopy__``. e3nn's CodeGenMixin deep-copies its generated
    ``fx.GraphModule`` by pickling it, and torch's fx unpickling re-traces the code and turns the
    Wigner-3j buffers into new ``_tensor_constant*`` buffers: the copy computes the same numbers
    but its state dict and buffer list grow (the training loop's EMA/best-weight copy is zipped
    against them, a saved copy no longer loads). ``GraphModule.__deepcopy__`` keeps the graph."""
    return type(cls.__name__, (cls,), {"__deepcopy__": _deepcopy_state, "__reduce_ex__": _reduce_as_base,
                                       "__module__": cls.__module__})


class SevenNetBackbone(Backbone):
    """SevenNet from sevenn's modules; energies only (forces and stress come from the Potential).

    Args:
        num_elements, cutoff: set by atomforge (``cutoff`` is SevenNet's ``cutoff``).
        atomic_numbers: the atomic number of each SevenNet type (its one-hot order); default: the
            model's element index is the type.
        species_scale: per-type energy scale kept inside the backbone (only for checkpoints whose
            per-species scale is not uniform; see the module docstring).
        checkpoint: a shipped checkpoint name or file whose architecture is the base.
        **options: SevenNet model-config keys (:data:`ARCHITECTURE_KEYS`).
    """

    vmap_safe = False  # sevenn's message_gather scatters in place into a fresh tensor

    def __init__(self, *, num_elements: int, cutoff: float, atomic_numbers: list[int] | None = None,
                 species_scale: list[float] | None = None, **options: Any) -> None:
        super().__init__(num_elements=num_elements, cutoff=cutoff)
        arch = resolve_architecture(options)
        self.options = arch
        if atomic_numbers is not None and not len(atomic_numbers) == len(set(atomic_numbers)) == num_elements:
            raise ConfigError(f"sevennet: atomic_numbers {atomic_numbers} must list the model's {num_elements} "
                              "elements once each (SevenNet's type order)")
        self.num_types = int(num_elements)
        z_to_type = torch.full((119,), -1, dtype=torch.long)
        if atomic_numbers is not None:
            z_to_type[torch.tensor([int(z) for z in atomic_numbers])] = torch.arange(num_elements)
        self.by_number = atomic_numbers is not None
        self.register_buffer("z_to_type", z_to_type, persistent=False)
        self.sevennet = self._build(arch)
        if species_scale is not None and len(species_scale) != num_elements:
            raise ConfigError(f"sevennet: species_scale needs one value per type ({num_elements}), "
                              f"got {len(species_scale)}")
        scale = None if species_scale is None else torch.tensor([float(s) for s in species_scale])
        self.register_buffer("species_scale", scale)

    def _build(self, arch: Mapping[str, Any]) -> nn.ModuleDict:
        model_build = _sevenn()
        config = _sevenn_config(arch, cutoff=self.cutoff, num_types=self.num_types)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*(TorchScript|cutoff is 0|type_map).*")
                model = model_build.build_E3_equivariant_model(config)
        except (KeyError, TypeError, ValueError, RuntimeError, AssertionError) as error:
            raise ConfigError(f"sevennet: SevenNet rejected the options ({type(error).__name__}: {error})") from error
        modules = nn.ModuleDict({name: module for name, module in model._modules.items() if name not in _DROPPED})
        for module in modules.modules():
            if hasattr(module, "_codegen_register"):  # e3nn's generated tensor products (CodeGenMixin)
                module.__class__ = _plain_deepcopy(type(module))
        return modules

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        vectors = batch[K.EDGE_VECTORS]
        types = self.z_to_type[batch[K.NUMBERS]] if self.by_number else batch[K.ELEMENT_INDEX]
        onehot = F.one_hot(types, self.num_types).to(vectors.dtype)
        data = {"edge_vec": vectors, "edge_index": batch[K.EDGE_INDEX], "x": onehot, "node_attr": onehot,
                "atom_type": types, "batch": batch[K.BATCH]}
        features = None
        for name, module in self.sevennet.items():
            if features is None and name in _READOUT:
                features = data["x"]  # the last interaction's invariant (0e) features
            data = module(data)
        energy = data["scaled_atomic_energy"].squeeze(-1)
        if self.species_scale is not None:
            energy = energy * self.species_scale.to(energy.dtype)[types]
        return {K.NODE_ENERGY: energy, K.NODE_FEATURES: features}

    def parameter_groups(self) -> dict[str, list[str]]:
        """``embedding``: the element one-hot → feature layer and the edge embedding (SevenNet's
        trainable Bessel frequencies); ``interaction.<k>``: SevenNet's layer ``k`` (self-connection,
        linears, convolution with its radial MLP); ``readout``: the layers that make the energy."""
        def named(names: list[str]) -> list[str]:
            return [f"sevennet.{n}" for n in names if any(True for _ in self.sevennet[n].parameters())]

        layers = int(self.options["num_convolution_layer"])
        groups = {"embedding": named([n for n in ("edge_embedding", "onehot_to_feature_x") if n in self.sevennet])}
        for k in range(layers):
            groups[f"interaction.{k}"] = named([n for n in self.sevennet if n.split("_", 1)[0] == str(k)])
        groups["readout"] = named([n for n in _READOUT if n in self.sevennet])
        return groups


def fit_options(options: dict[str, Any], statistics: DataStatistics) -> dict[str, Any]:
    """Training from scratch: every architecture key explicit (``checkpoint`` resolved),
    ``atomic_numbers`` → the training set's elements, ``conv_denominator: avg_num_neigh`` (or
    ``sqrt_avg_num_neigh``) → the training set's mean neighbour count (or its square root)."""
    fitted = resolve_architecture(options)
    fitted.pop("species_scale", None)
    fitted["atomic_numbers"] = [int(z) for z in statistics.elements]
    average = float(statistics.avg_num_neighbors)

    def fit(value: Any) -> Any:
        if value == "avg_num_neigh":
            return average
        return math.sqrt(average) if value == "sqrt_avg_num_neigh" else value

    denominator = fitted["conv_denominator"]
    fitted["conv_denominator"] = [fit(d) for d in denominator] if isinstance(denominator, list) else fit(denominator)
    return fitted


# -- SevenNet checkpoints as atomforge models ---------------------------------------------------
def _rescale(rescale: nn.Module, num_types: int) -> tuple[list[float], float, list[float] | None]:
    """SevenNet's rescale as (per-type reference energies, Potential scale, in-backbone
    per-type scale or None): uniform scale → the Potential's; otherwise kept in the backbone."""
    shift = rescale.shift.detach().double().reshape(-1).expand(num_types).tolist()
    scale = rescale.scale.detach().double().reshape(-1).expand(num_types).tolist()
    if all(s == scale[0] for s in scale):
        return shift, scale[0], None
    return shift, 1.0, scale


def _sevenn_model(path: Path) -> tuple[dict[str, Any], nn.Module]:
    """(sevenn config, model with the checkpoint's weights) — SevenNet's own loader, so its
    compatibility patches for old checkpoints apply."""
    checkpoint = _read_checkpoint(str(path))
    config = checkpoint.config
    if not {"_type_map", "num_convolution_layer", "cutoff"} <= set(config):
        raise ModelFileError(f"{path} holds no SevenNet model config (a checkpoint written by sevenn has one)")
    if config.get("use_modality"):
        raise ModelFileError(f"{path} is a multi-fidelity SevenNet model (modalities "
                             f"{list(config.get('_modal_map', {}))}); atomforge's sevennet backbone imports "
                             "single-fidelity models (7net-0, 7net-l3i5)")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(TorchScript|not used).*")
        model = checkpoint.build_model()  # e3nn layout (its default), whatever backend it was trained with
    return config, model


def _options_of(config: Mapping[str, Any], model: nn.Module) -> dict[str, Any]:
    """The backbone options of a loaded SevenNet: its architecture keys, the convolution
    denominators it holds and its type order (``atomic_numbers``), as JSON."""
    options = {key: config[key] for key in ARCHITECTURE_KEYS if key in config}
    layers = int(config["num_convolution_layer"])
    options["conv_denominator"] = [float(model._modules[f"{k}_convolution"].denominator) for k in range(layers)]
    type_map = {int(z): int(t) for z, t in config["_type_map"].items()}
    options["atomic_numbers"] = sorted(type_map, key=type_map.__getitem__)
    return _jsonable(options)


@functools.lru_cache(maxsize=4)
def _convert(path: str, version: tuple[int, int]) -> tuple[  # noqa: ARG001 - version: the cache key
        dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
    """The checkpoint at ``path`` as (model-file config, metadata, Potential state dict), cached
    per file ``version`` (mtime, size)."""
    config, model = _sevenn_model(Path(path))
    options = _options_of(config, model)
    types = options["atomic_numbers"]
    shifts, scale, species_scale = _rescale(model._modules["rescale_atomic_energy"], len(types))
    weights = {f"backbone.sevennet.{k}": v for k, v in model.state_dict().items() if k.split(".", 1)[0] not in _DROPPED}
    if species_scale is not None:
        options["species_scale"] = species_scale
        weights["backbone.species_scale"] = torch.tensor(species_scale, dtype=torch.float32)
    elements = sorted(types)
    model_config = {
        "backbone": "sevennet", "cutoff": float(config["cutoff"]),
        "dtype": "float64" if config.get("dtype") == "double" else "float32", "options": options,
        "elements": elements, "atomic_energies": [shifts[types.index(z)] for z in elements],
        "scale": float(scale), "shift": 0.0,
    }
    # the Potential's own buffers as the Potential makes them, around a weightless stand-in backbone
    # (building the real one would only copy the weights SevenNet has already loaded)
    stand_in = Backbone(num_elements=len(elements), cutoff=model_config["cutoff"])
    buffers = Potential(stand_in, elements=elements, atomic_energies=model_config["atomic_energies"],
                        scale=scale, shift=0.0).state_dict()
    metadata = {
        "imported": "sevennet", "sevenn_version": str(_sevenn("sevenn").__version__),
        "checkpoint_sevenn_version": str(config.get("version", "unknown")),
        "carried_over": "every weight (edge embedding, one-hot embedding, interaction blocks, readout); "
                        "per-species shift → atomic_energies, species scale → scale",
        "not_carried_over": "SevenNet's force/stress module (atomforge differentiates the energy itself)",
    }
    return model_config, metadata, {k: v.detach().clone() for k, v in {**weights, **buffers}.items()}


def _copy(path: Path, label: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
    """A fresh copy of the (cached) translation of the checkpoint at ``path``."""
    resolved = str(path.resolve())
    config, metadata, state = _convert(resolved, _version(resolved))
    return copy.deepcopy(config), {**metadata, "checkpoint": label}, {k: v.clone() for k, v in state.items()}


def pretrained_sevennet(name: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
    """A pretrained SevenNet shipped with sevenn (:data:`PRETRAINED`) as (model-file config,
    metadata, Potential state dict). Read once per process."""
    if str(name).lower() not in {k.lower() for k in PRETRAINED}:
        raise ConfigError(f"sevennet has no pretrained model {name!r}; it ships {', '.join(PRETRAINED)}")
    path = _checkpoint_path(name)
    return _copy(path, path.parent.name)


def import_sevennet_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
    """A SevenNet checkpoint file (``checkpoint_best.pth``) as (model-file config, metadata,
    Potential state dict). Runs ``torch.load(weights_only=False)``: trusted files only."""
    if not Path(path).is_file():
        raise ModelFileError(f"SevenNet checkpoint {str(path)!r} does not exist")
    return _copy(Path(path), str(path))


@hookimpl
def register_backbones(register) -> None:  # noqa: ANN001 - pluggy passes the registrar
    register(
        BackboneSpec(
            name="sevennet",
            factory=SevenNetBackbone,
            description="SevenNet (Park et al. 2024) from sevenn's modules, pretrained 7net-0/7net-l3i5; "
                        "pip install 'atomforge[sevenn]'",
            equivariant=True,
            fit_options=fit_options,
            importer=import_sevennet_checkpoint,
            pretrained=pretrained_sevennet,
            pretrained_names=tuple(PRETRAINED),
        )
    )
