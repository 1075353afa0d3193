"""Test-wide setup: Triton runs through its CPU interpreter when there is no GPU.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, at
collection time. On a CUDA machine it is left alone and the Triton tests use the GPU.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield
