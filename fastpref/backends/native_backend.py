"""C++ (CPU) and CUDA kernels from csrc/, behind the backend interface."""
from __future__ import annotations

from .base import BackendUnavailable


def load():
    raise BackendUnavailable("the native extension is not built in this installation")
