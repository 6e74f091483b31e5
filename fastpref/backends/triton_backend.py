"""Fused Triton kernels (kernels/), behind the backend interface."""
from __future__ import annotations

from .base import BackendUnavailable


def load():
    try:
        import triton  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the installation
        raise BackendUnavailable(f"triton is not installed ({e})") from e
    raise BackendUnavailable("the Triton kernels are not built yet")
