"""Upstream gradients reach every backend's backward as contiguous float32 [M] vectors (backends.row_vector).

The gradient of ``out.sum()`` is expanded (stride 0); the Triton and CUDA kernels read ``G[row]`` from the
storage, so an expanded gradient handed through as it is would be read past its end.
"""
from __future__ import annotations

import pytest
import torch

from cases import BACKENDS, DEVICE, Case, require_backend
from fastpref import backends
from fastpref.options import LogitOptions

M = 37
NEEDS = (True, True, True)


def _expanded(value: float) -> torch.Tensor:
    g = torch.tensor([value], device=DEVICE).expand(M)
    assert g.stride() == (0,)
    return g


def _close(a, b):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_expanded_gradients_stats(backend):
    require_backend(backend)
    impl = backends.resolve(backend, DEVICE, torch.float32)
    h, w, b, lab = Case(N=M, D=24, V=300, bias=True, seed=70).make()
    opts = LogitOptions(softcap=5.0)
    _, lse, ent, _ = impl.stats_forward(h, w, b, lab, opts, True, False)
    gs = [_expanded(v) for v in (0.7, -0.3, 1.1)]
    got = backends.stats_backward(impl, h, w, b, lab, lse, ent, *gs, opts, NEEDS)
    want = backends.stats_backward(impl, h, w, b, lab, lse, ent, *(g.contiguous() for g in gs), opts, NEEDS)
    _close(got, want)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_expanded_gradients_kl(backend, direction):
    require_backend(backend)
    impl = backends.resolve(backend, DEVICE, torch.float32)
    h, w, b, lab = Case(N=M, D=24, V=300, bias=True, seed=71).make()
    rh, rw, rb, _ = Case(N=M, D=16, V=300, bias=True, seed=72).make()
    opts = LogitOptions()
    kl, lse, ref_lse, _, _ = impl.kl_forward(h, w, b, rh, rw, rb, lab, opts, opts, direction)
    gs = [_expanded(v) for v in (0.9, -0.4)]
    args = (h, w, b, rh, rw, rb, lab, lse, ref_lse, kl)
    got = backends.kl_backward(impl, *args, *gs, opts, opts, direction, NEEDS)
    want = backends.kl_backward(impl, *args, *(g.contiguous() for g in gs), opts, opts, direction, NEEDS)
    _close(got, want)


def test_row_vector_checks_the_shape():
    g = backends.row_vector(torch.ones(1, dtype=torch.float64).expand(5), 5, "grad_kl")
    assert g.dtype == torch.float32 and g.is_contiguous() and g.stride() == (1,)
    assert backends.row_vector(None, 5, "grad_kl") is None
    with pytest.raises(ValueError, match=r"grad_kl must have shape \[5\]"):
        backends.row_vector(torch.ones(4), 5, "grad_kl")
