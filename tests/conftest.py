"""Tests run single-threaded: they never time anything, their tensors are tiny, and extra
intra-op threads only spin when the machine is shared."""

import torch

torch.set_num_threads(1)
