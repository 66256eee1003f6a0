"""CHGNet backbone (Deng et al., Nat. Mach. Intell. 2023) built from the ``chgnet`` package's own
layers, with its shipped pretrained weights.

``pip install 'atomforge[chgnet]'`` (chgnet 0.4.x; tested with 0.4.2). The pretrained checkpoints ship inside the
wheel, so ``model.pretrained: "0.3.0"`` (or ``atomforge import-model --backbone chgnet
pretrained:0.3.0 out.pt``) works offline.

**What is CHGNet's and what is atomforge's.** The module holds a ``chgnet.model.CHGNet`` (atom
embedding, radial Bessel and Fourier bases, bond/angle embeddings, atom/bond/angle convolutions,
readout norm and MLP) and runs CHGNet's forward pass (``CHGNet._compute``) over those layers, with
these differences that keep atomforge's contract (docs/architecture.md):

* the geometry comes from :class:`atomforge.Potential`'s edge vectors, never from CHGNet's graph
  converter (pymatgen neighbour list + C line graph): the plugin rebuilds in torch what the
  converter builds — CHGNet's *undirected* bonds (a directed edge ``i → j + S`` and its reverse
  ``j → i − S`` share one bond feature), and its bond graph, every ordered pair of distinct
  directed edges sharing a centre atom with both lengths below ``bond_graph_cutoff`` (3 Å), whose
  angle comes from the two edge vectors. Forces and stress are autograd through those vectors
  (CHGNet's own ``f``/``s`` outputs are not used);
* CHGNet's composition model (``AtomRef``, a per-element linear energy) is the Potential's
  per-element reference energies — exact, since CHGNet's is intensive (a per-atom mean of the
  per-element weights, times the atom count in CHGNet's calculator); scale 1 and shift 0;
* the backbone returns CHGNet's per-atom readout (``mlp_first`` models: the per-site energy, in
  eV) and the Potential sums it. CHGNet's ``is_intensive`` division by the atom count and its
  calculator's multiplication by it cancel; atomforge never does either.

Not carried over: the magnetic-moment head (``site_wise``, |linear(atom features)| after the
third interaction; a separate output that does not enter the energy) is dropped — fine-tuning
on magnetic moments is not supported. Models that pool before the readout (``mlp_first:
false``, ``read_out: attn``) are refused: their energy is not a sum of per-atom terms.

**Elements.** CHGNet embeds atoms by atomic number (Z = 1…94); the backbone reads
:data:`keys.NUMBERS`, not the Potential's element index, so any element list works. Pretrained
models list Z = 1…94 (the training data may hold any subset).

**Options**: ``checkpoint`` (``"0.3.0"`` default, ``"0.2.0"``, ``"r2scan"`` or ``None`` for
CHGNet's class defaults) names the shipped checkpoint whose *architecture* is rebuilt (read from
the wheel, so a saved atomforge file — weights only — rebuilds offline); any CHGNet constructor
argument from :data:`ARCHITECTURE_KEYS` overrides it (e.g. ``atom_fea_dim: 16`` for a small
untrained model). CHGNet's ``atom_graph_cutoff`` is atomforge's ``cutoff`` (6 Å for 0.3.0 and
r2scan, 5 Å for 0.2.0); ``bond_graph_cutoff`` must not exceed it.

Numbers: zero-shot, an imported checkpoint gives ``CHGNetCalculator``'s energy, forces and stress
to float32 rounding (``tests/test_chgnet_backbone.py``).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
from pathlib import Path
from typing import Any, Mapping

import torch

from atomforge import Backbone, BackboneSpec, ConfigError, ModelFileError, Potential, hookimpl
from atomforge import keys as K

__all__ = ["CHGNetBackbone", "ARCHITECTURE_KEYS", "CHECKPOINTS", "pretrained_chgnet", "line_graph"]

#: the checkpoints that ship in the chgnet wheel (``chgnet/pretrained/``), as ``CHGNet.load`` names them
CHECKPOINTS: dict[str, str] = {
    "0.3.0": "0.3.0/chgnet_0.3.0_e29f68s314m37.pth.tar",
    "0.2.0": "0.2.0/chgnet_0.2.0_e30f77s348m32.pth.tar",
    "r2scan": "r2scan/chgnet_r2scan_transfer_learning_e15f36s161m23.pth.tar",
}
DEFAULT_CHECKPOINT = "0.3.0"
#: CHGNet constructor arguments an option may set (they override the checkpoint's)
ARCHITECTURE_KEYS = (
    "atom_fea_dim", "bond_fea_dim", "angle_fea_dim", "num_radial", "num_angular", "n_conv",
    "atom_conv_hidden_dim", "update_bond", "bond_conv_hidden_dim", "update_angle", "angle_layer_hidden_dim",
    "conv_dropout", "mlp_hidden_dims", "mlp_dropout", "non_linearity", "bond_graph_cutoff", "cutoff_coeff",
    "learnable_rbf", "gMLP_norm", "readout_norm", "conv_norm", "mlp_out_bias", "final_mlp",
)
# checkpoint arguments that atomforge sets itself or that do not change the layers
_IGNORED = ("composition_model", "is_intensive", "atom_graph_cutoff", "graph_converter_algorithm", "version",
            "read_out", "mlp_first", "skip_connection", "cutofff_coeff")
_ELEMENTS = list(range(1, 95))  # CHGNet's atom embedding and AtomRef: Z = 1…94


def _chgnet_model() -> Any:
    """``chgnet.model.model`` or a ConfigError saying what to install."""
    try:
        return importlib.import_module("chgnet.model.model")
    except ImportError as error:
        raise ConfigError("the chgnet backbone needs the chgnet package: pip install 'atomforge[chgnet]' "
                          f"({error})") from error


def _checkpoint_path(name: str) -> Path:
    if name not in CHECKPOINTS:
        raise ConfigError(f"chgnet: unknown checkpoint {name!r}; the chgnet wheel ships {sorted(CHECKPOINTS)}")
    root = Path(_chgnet_model().__file__).resolve().parent.parent / "pretrained"
    path = root / CHECKPOINTS[name]
    if not path.is_file():
        raise ConfigError(f"chgnet: checkpoint {name!r} is not in this chgnet installation ({path} missing); "
                          "reinstall chgnet (pip install --force-reinstall chgnet)")
    return path


@functools.lru_cache(maxsize=4)
def _read_checkpoint(name: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(model_args, state_dict) of a shipped checkpoint: plain tensors and JSON-like values, so
    ``weights_only=True`` reads it (no pickled code)."""
    payload = torch.load(_checkpoint_path(name), map_location="cpu", weights_only=True)
    return dict(payload["model"]["model_args"]), dict(payload["model"]["state_dict"])


def _architecture(checkpoint: str | None, cutoff: float, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """CHGNet constructor arguments: the checkpoint's, then ``overrides``; no composition model."""
    base = {} if checkpoint is None else dict(_read_checkpoint(checkpoint)[0])
    if checkpoint == "0.2.0":  # CHGNet.load passes this for 0.2.0 (CHGNet issue #79), keep its layers
        base["mlp_out_bias"] = True
    for key in ("read_out", "mlp_first"):
        if key in overrides:
            raise ConfigError(f"chgnet: option {key} is fixed (per-atom readout, mlp_first); atomforge sums "
                              "per-atom energies, so pooled readouts are not supported")
    if base.get("mlp_first", True) is not True:
        raise ConfigError(f"chgnet: checkpoint {checkpoint!r} pools before its readout (mlp_first false); its energy "
                          "is not a sum of per-atom terms, which atomforge's Potential needs")
    args = {k: v for k, v in base.items() if k not in _IGNORED}
    args.update(overrides)
    bond_cutoff = float(args.get("bond_graph_cutoff", 3.0))
    if not 0 < bond_cutoff <= cutoff:
        raise ConfigError(f"chgnet: bond_graph_cutoff must be in (0, cutoff = {cutoff}] Å, got {bond_cutoff}")
    args.update(composition_model=None, atom_graph_cutoff=float(cutoff), bond_graph_cutoff=bond_cutoff,
                mlp_first=True, is_intensive=True)
    return args


class CHGNetBackbone(Backbone):
    """CHGNet from the chgnet package's layers; energies only (forces and stress come from the Potential).

    Args:
        num_elements, cutoff: set by atomforge (``cutoff`` is CHGNet's ``atom_graph_cutoff``).
        checkpoint: the shipped checkpoint whose architecture is rebuilt (weights are not loaded
            here: they come with the model file or ``pretrained``); ``None``: CHGNet's defaults.
        **options: CHGNet constructor arguments from :data:`ARCHITECTURE_KEYS`.
    """

    vmap_safe = False  # CHGNet's layers write in place (messages *= weights, index_add_)

    def __init__(self, *, num_elements: int, cutoff: float, checkpoint: str | None = DEFAULT_CHECKPOINT,
                 **options: Any) -> None:
        super().__init__(num_elements=num_elements, cutoff=cutoff)
        unknown = sorted(set(options) - set(ARCHITECTURE_KEYS) - {"read_out", "mlp_first"})
        if unknown:
            raise ConfigError(f"chgnet: unknown option(s) {unknown}; valid: checkpoint, {', '.join(ARCHITECTURE_KEYS)}")
        args = _architecture(checkpoint, float(cutoff), options)
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # CHGNet prints its parameter count
                self.chgnet = _chgnet_model().CHGNet(**args)
        except (TypeError, ValueError, NotImplementedError) as error:
            raise ConfigError(f"chgnet: CHGNet rejected the options ({type(error).__name__}: {error})") from error
        del self.chgnet.site_wise  # magnetic-moment head: not an energy term (module docstring)
        self.checkpoint = checkpoint
        self.bond_cutoff = float(args["bond_graph_cutoff"])

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        net = self.chgnet
        lengths, edge_index = batch[K.EDGE_LENGTHS], batch[K.EDGE_INDEX]
        graph = line_graph(edge_index, batch[K.SHIFTS], lengths.detach(), self.bond_cutoff,
                           int(batch[K.NUMBERS].shape[0]))
        bond_lengths = lengths[graph["undirected2directed"]]  # one bond feature per undirected bond
        basis_ag = net.bond_basis_expansion.rbf_expansion_ag(bond_lengths)
        basis_bg = net.bond_basis_expansion.rbf_expansion_bg(bond_lengths)
        atom_feas = net.atom_embedding(batch[K.NUMBERS] - 1)  # CHGNet: row Z − 1
        bond_feas = net.bond_embedding(basis_ag)
        weights_ag, weights_bg = net.bond_weights_ag(basis_ag), net.bond_weights_bg(basis_bg)
        atom_conv = functools.partial(_atom_conv, atom_graph=edge_index.t(), bond_weights=weights_ag,
                                      directed2undirected=graph["directed2undirected"])
        angles = self._angles(batch, graph)
        last = len(net.atom_conv_layers) - 2
        for index, (atom_layer, bond_layer, angle_layer) in enumerate(
                zip(net.atom_conv_layers[:-1], net.bond_conv_layers, net.angle_layers)):
            atom_feas = atom_conv(atom_layer, atom_feas, bond_feas)
            if angles is None or bond_layer is None:
                continue
            angle_feas, bond_graph, updated = angles
            new_bond_feas = bond_layer(atom_feas=atom_feas, bond_feas=bond_feas, bond_weights=weights_bg,
                                       angle_feas=angle_feas, bond_graph=bond_graph)
            bond_feas = torch.where(updated, new_bond_feas, bond_feas)
            # the last angle update feeds nothing (only an atom convolution follows): skipped
            if angle_layer is not None and index < last:
                angle_feas = angle_layer(atom_feas=atom_feas, bond_feas=bond_feas, angle_feas=angle_feas,
                                         bond_graph=bond_graph)
                angles = (angle_feas, bond_graph, updated)
        atom_feas = atom_conv(net.atom_conv_layers[-1], atom_feas, bond_feas)
        if net.readout_norm is not None:
            atom_feas = net.readout_norm(atom_feas)
        return {K.NODE_ENERGY: net.mlp(atom_feas).squeeze(-1), K.NODE_FEATURES: atom_feas}

    def _angles(self, batch: dict[str, torch.Tensor],
                graph: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(angle features [A, F], CHGNet's bond graph [A, 3] = (centre, bond 1, bond 2), [U, 1] mask
        of bonds in structures with angles), or ``None`` when the batch has no angle."""
        first, second = graph["angles"]
        if not first.numel():
            return None
        net, edge_index, d2u = self.chgnet, batch[K.EDGE_INDEX], graph["directed2undirected"]
        unit = batch[K.EDGE_VECTORS] / batch[K.EDGE_LENGTHS].unsqueeze(-1)
        angle_feas = net.angle_embedding(net.angle_basis_expansion(unit[first], unit[second]))
        bond_graph = torch.stack([edge_index[0, first], d2u[first], d2u[second]], dim=1)
        # CHGNet skips the bond and angle updates of a structure without angles (every bond longer
        # than the bond cutoff); masking per structure keeps that, and a batch gives each structure
        # its own numbers
        owner, centre = batch[K.BATCH], edge_index[0]
        has = torch.bincount(owner[centre[first]], minlength=int(batch[K.N_ATOMS].shape[0])) > 0
        updated = has[owner[centre[graph["undirected2directed"]]]].unsqueeze(-1)
        return angle_feas, bond_graph, updated

    def parameter_groups(self) -> dict[str, list[str]]:
        """``embedding`` (atom embedding, radial/angular bases, bond/angle embeddings and bond
        weights), ``interaction.<k>`` (atom, bond and angle convolution k; CHGNet's last block has
        only an atom convolution, and the angle update of the block before it feeds nothing, so its
        weights get no gradient) and ``readout`` (readout norm and MLP)."""
        names = {"embedding": ["atom_embedding", "bond_basis_expansion", "bond_embedding", "bond_weights_ag",
                               "bond_weights_bg", "angle_basis_expansion", "angle_embedding"]}
        for k in range(len(self.chgnet.atom_conv_layers)):
            names[f"interaction.{k}"] = [f"{layers}.{k}" for layers in ("atom_conv_layers", "bond_conv_layers",
                                                                      "angle_layers")]
        names["readout"] = ["readout_norm", "mlp"]
        return {group: [f"chgnet.{name}" for name in members if self._has_parameters(name)]
                for group, members in names.items()}

    def _has_parameters(self, dotted: str) -> bool:
        module: Any = self.chgnet
        for part in dotted.split("."):
            if isinstance(module, torch.nn.ModuleList):
                module = module[int(part)] if int(part) < len(module) else None
            else:
                module = getattr(module, part, None)
            if not isinstance(module, torch.nn.Module):
                return False
        return any(True for _ in module.parameters())


def _atom_conv(layer: torch.nn.Module, atom_feas: torch.Tensor, bond_feas: torch.Tensor, *, atom_graph: torch.Tensor,
               bond_weights: torch.Tensor, directed2undirected: torch.Tensor) -> torch.Tensor:
    return layer(atom_feas=atom_feas, bond_feas=bond_feas, bond_weights=bond_weights, atom_graph=atom_graph,
                 directed2undirected=directed2undirected)


def line_graph(edge_index: torch.Tensor, shifts: torch.Tensor, lengths: torch.Tensor, bond_cutoff: float,
               num_atoms: int) -> dict[str, Any]:
    """What CHGNet's graph converter builds, from atomforge's full neighbour list (indices only).

    Returns ``directed2undirected`` [E] (a directed edge ``(i, j, S)`` and its reverse ``(j, i, −S)``
    share one undirected bond), ``undirected2directed`` [U] (one directed edge per bond) and
    ``angles``: two [A] index tensors ``(first, second)`` of directed edges, every ordered pair
    of distinct edges with the same centre atom and both lengths < ``bond_cutoff``.
    """
    d2u, u2d = _undirected(edge_index, shifts.round().long(), num_atoms)
    return {"directed2undirected": d2u, "undirected2directed": u2d,
            "angles": _angle_pairs(edge_index[0], lengths, bond_cutoff, num_atoms)}


def _undirected(edge_index: torch.Tensor, shifts: torch.Tensor, num_atoms: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(directed2undirected [E], undirected2directed [U]): each edge keyed by its canonical
    orientation (lower atom index first; a self-image edge by the sign of its shift)."""
    i, j = edge_index[0], edge_index[1]
    num_edges = int(i.shape[0])
    if num_edges == 0:
        empty = edge_index.new_zeros(0)
        return empty, empty
    span = int(shifts.abs().max()) + 1
    base = 2 * span + 1
    sign = (shifts[:, 0] * base + shifts[:, 1]) * base + shifts[:, 2]  # sign of the first non-zero shift
    keep = (i < j) | ((i == j) & (sign > 0))
    lo, hi = torch.where(keep, i, j), torch.where(keep, j, i)
    shift = torch.where(keep.unsqueeze(-1), shifts, -shifts) + span
    if num_atoms * num_atoms * base**3 < 2**62:
        key = ((lo * num_atoms + hi) * base + shift[:, 0]) * base * base + shift[:, 1] * base + shift[:, 2]
        _, d2u = torch.unique(key, return_inverse=True)
    else:  # huge batches: compare rows instead of one integer key
        _, d2u = torch.unique(torch.cat([lo[:, None], hi[:, None], shift], 1), dim=0, return_inverse=True)
    count = int(d2u.max()) + 1
    u2d = torch.full((count,), num_edges, dtype=torch.long, device=i.device)
    u2d = u2d.scatter_reduce(0, d2u, torch.arange(num_edges, device=i.device), reduce="amin")
    return d2u, u2d


def _angle_pairs(centre: torch.Tensor, lengths: torch.Tensor, bond_cutoff: float,
                 num_atoms: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ordered pairs of distinct short edges (length < ``bond_cutoff``) sharing their centre."""
    short = torch.nonzero(lengths < bond_cutoff).squeeze(-1)
    short = short[torch.argsort(centre[short], stable=True)]
    owner = centre[short]
    counts = torch.bincount(owner, minlength=num_atoms)
    starts = torch.cumsum(counts, 0) - counts
    repeats = counts[owner]  # each short edge pairs with every short edge of its centre
    first = torch.repeat_interleave(torch.arange(short.shape[0], device=short.device), repeats)
    offsets = torch.cumsum(repeats, 0) - repeats
    second = starts[owner[first]] + torch.arange(first.shape[0], device=short.device) - offsets[first]
    distinct = first != second
    return short[first[distinct]], short[second[distinct]]


# -- the shipped pretrained models --------------------------------------------------------------
def pretrained_chgnet(name: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
    """A checkpoint shipped in the chgnet wheel as (model-file config, metadata, Potential state
    dict): CHGNet's weights under ``backbone.chgnet.``, its AtomRef as the reference energies."""
    if name not in CHECKPOINTS:
        raise ConfigError(f"chgnet has no pretrained model {name!r}; it ships {', '.join(CHECKPOINTS)}")
    args, weights = _read_checkpoint(name)
    if "composition_model.fc.weight" not in weights:
        raise ModelFileError(f"chgnet checkpoint {name!r} holds no AtomRef weights (composition_model.fc.weight)")
    atom_ref = weights["composition_model.fc.weight"].reshape(-1).double()
    skip = ("composition_model.", "site_wise.")
    state = {f"backbone.chgnet.{k}": v for k, v in weights.items() if not k.startswith(skip)}
    config = {"backbone": "chgnet", "cutoff": float(args["atom_graph_cutoff"]), "dtype": "float32",
              "options": {"checkpoint": name}, "elements": list(_ELEMENTS),
              "atomic_energies": [float(atom_ref[z - 1]) for z in _ELEMENTS], "scale": 1.0, "shift": 0.0}
    metadata = {
        "imported": "chgnet", "checkpoint": name, "chgnet_version": _chgnet_version(),
        "carried_over": "all embedding, basis, convolution, readout-norm and readout-MLP weights; AtomRef as "
                        "the per-element reference energies",
        "not_carried_over": "the magnetic-moment head (site_wise)",
    }
    return config, metadata, _with_potential_buffers(config, state)


def _chgnet_version() -> str:
    try:
        return importlib.import_module("importlib.metadata").version("chgnet")
    except Exception:  # noqa: BLE001 - metadata is informational only
        return "unknown"


def _with_potential_buffers(config: Mapping[str, Any], state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The Potential's own buffers (element map, reference energies, scale, shift), as the
    Potential makes them around a weightless stand-in backbone, added to the backbone weights."""
    stand_in = Backbone(num_elements=len(config["elements"]), cutoff=float(config["cutoff"]))
    buffers = Potential(stand_in, elements=config["elements"], atomic_energies=config["atomic_energies"],
                        scale=config["scale"], shift=config["shift"]).state_dict()
    return {k: v.detach().clone() for k, v in {**state, **buffers}.items()}


@hookimpl
def register_backbones(register) -> None:  # noqa: ANN001 - pluggy passes the registrar
    register(
        BackboneSpec(
            name="chgnet",
            factory=CHGNetBackbone,
            description="CHGNet (Deng et al. 2023) from the chgnet package's layers, with its shipped "
                        "pretrained weights (pretrained: 0.3.0, 0.2.0, r2scan); pip install 'atomforge[chgnet]'",
            equivariant=True,
            pretrained=pretrained_chgnet,
            pretrained_names=tuple(CHECKPOINTS),
        )
    )
