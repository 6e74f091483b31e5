"""Test setup: the Triton interpreter on machines without a GPU, and the `gpu` marker."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before the Triton kernels are decorated (imported).
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped elsewhere)")
    config.addinivalue_line("markers", "aot: compiles Triton kernels ahead of time for sm_80/sm_90 (no GPU needed)")
    config.addinivalue_line("markers", "demo: runs the full `make train` demo once (about a minute of CPU time)")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
