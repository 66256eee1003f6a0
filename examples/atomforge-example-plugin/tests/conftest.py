"""Test settings: the checks use a handful of atoms, where one torch thread is the fastest
(many threads on a busy machine make them tens of times slower)."""

import torch

torch.set_num_threads(1)
