"""Conformance kits: the checks a plugin of each kind should pass, for plugin authors' own tests.

    from atomforge.testing import check_backbone
    check_backbone(MyNet, options={"hidden": 16})          # raises ConformanceError on failure

Every ``check_*`` takes the plugin's spec record (or its factory) and options, runs its checks
and raises :class:`atomforge.ConformanceError` listing every failed one (otherwise it returns the
list of :class:`CheckResult`):

* :func:`check_backbone` — finite-difference forces and stress, rotations, translations,
  permutations, batch vs single, periodic images, a smooth cutoff;
* :func:`check_uq_head` — std keys present, shaped, finite and non-negative; mean forces the
  gradient of the mean energy; stds invariant under rotation, translation and permutation;
  batch vs single; model-file round trip;
* :func:`check_oracle` — a labelled copy with finite labels of the right shapes, the input left
  untouched, deterministic, forces consistent with the energy, picklable;
* :func:`check_selector` — at most ``budget`` distinct valid indices, empty input and zero
  budget handled, deterministic for a seed, inputs not mutated;
* :func:`check_engine` — a backend that trains (the loss falls), is reproducible for a seed,
  resumes from a checkpoint to the uninterrupted result and exports a plain CPU module;
* :func:`check_data_source` — valid structures with well-shaped labels, unknown options and
  missing files rejected with atomforge errors.
"""

from __future__ import annotations

from ._backbone import CheckResult, check_backbone, make_test_potential, predict, sample_structures
from ._data_source import check_data_source
from ._engine import check_engine
from ._models import RadialTestBackbone, lj_clusters
from ._oracle import check_oracle
from ._selector import check_selector
from ._uq import check_uq_head

__all__ = [
    "CheckResult", "check_backbone", "check_uq_head", "check_oracle", "check_selector", "check_engine",
    "check_data_source", "make_test_potential", "sample_structures", "predict", "RadialTestBackbone", "lj_clusters",
]
