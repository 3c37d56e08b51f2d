"""Test-wide settings: tiny models run fastest with one intra-op thread per pytest-xdist worker."""

import torch

torch.set_num_threads(1)
