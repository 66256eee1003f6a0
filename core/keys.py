"""Keys of the model-side data: a batch is a ``dict[str, Tensor]`` keyed by these constants.

Shapes use ``N`` atoms, ``B`` structures and ``E`` directed edges in the batch. Edges are
*full* neighbour lists: ``edge_index[0]`` is the centre atom ``i`` and ``edge_index[1]`` the
neighbour ``j``; the edge vector is ``r_j - r_i + shifts @ cell`` (pointing from ``i`` to ``j``).
"""

from __future__ import annotations

from typing import Final

# -- inputs (float tensors use the model's dtype) ---------------------------------------------
POSITIONS: Final = "positions"  # [N, 3] float, Å
NUMBERS: Final = "numbers"  # [N] long, atomic numbers
ELEMENT_INDEX: Final = "element_index"  # [N] long, index into the model's element list
CELL: Final = "cell"  # [B, 3, 3] float, Å, rows are lattice vectors (zeros if open)
PBC: Final = "pbc"  # [B, 3] bool
BATCH: Final = "batch"  # [N] long, structure index of each atom
N_ATOMS: Final = "n_atoms"  # [B] long
EDGE_INDEX: Final = "edge_index"  # [2, E] long, (centre i, neighbour j)
SHIFTS: Final = "shifts"  # [E, 3] float, integer cell shifts of the neighbour image
# -- per-structure metadata, carried from the start even before a model uses it -----------------
CHARGE: Final = "charge"  # [B] float, total charge (e)
SPIN: Final = "spin"  # [B] float, spin multiplicity (2S+1); 0 = unspecified
FIDELITY: Final = "fidelity"  # [B] long, level-of-theory index
WEIGHT: Final = "weight"  # [B] float, sample weight in the loss
# -- labels (reference values) --------------------------------------------------------------------
ENERGY: Final = "energy"  # [B] float, eV
FORCES: Final = "forces"  # [N, 3] float, eV/Å
STRESS: Final = "stress"  # [B, 3, 3] float, eV/Å^3, ASE sign convention
# -- derived inside the model ---------------------------------------------------------------------
EDGE_VECTORS: Final = "edge_vectors"  # [E, 3] float, Å
EDGE_LENGTHS: Final = "edge_lengths"  # [E] float, Å
NODE_ENERGY: Final = "node_energy"  # [N] float, eV, per-atom energy contributions
NODE_FEATURES: Final = "node_features"  # [N, F] float, latent per-atom features (for UQ heads)
NODE_VECTORS: Final = "node_vectors"  # [N, 3, F] float, optional equivariant per-atom vector features
DIRECT_FORCES: Final = "direct_forces"  # [N, 3] float, eV/Å, from a direct force head
VIRIAL: Final = "virial"  # [B, 3, 3] float, eV
# -- uncertainty (outputs of a UQ head, see docs/uq.md; calibrated when the model file holds a
#    calibration) ----------------------------------------------------------------------------------
ENERGY_STD: Final = "energy_std"  # [B] float, eV, predicted std of the structure's energy
FORCES_STD: Final = "forces_std"  # [N] float, eV/Å, predicted std of each force component of an atom
FORCES_STD_MAX: Final = "forces_std_max"  # [B] float, eV/Å, largest FORCES_STD in the structure

LABEL_KEYS: Final = (ENERGY, FORCES, STRESS)
METADATA_KEYS: Final = (CHARGE, SPIN, FIDELITY, WEIGHT)
STD_KEYS: Final = (ENERGY_STD, FORCES_STD, FORCES_STD_MAX)
