"""Frozen heads on the native module of this device (the CPU extension, or on a GPU the CUDA one, whose
fp16/bf16 cases run half GEMMs) with small tiles: several row blocks and vocabulary chunks, so the
accumulators are rescaled as the running maxima move, and reverse token_kl's is re-centred, between chunks.
Float64 gold, three-way (the helpers of test_frozen_head / test_frozen_kl); the vocabulary backwards refuse."""
from __future__ import annotations

import pytest
import torch

from cases import DEVICE, require_backend
from fastpref import backends
from test_frozen_head import CASES as STATS_CASES
from test_frozen_head import _check
from test_frozen_kl import _compare
from test_frozen_kl import test_frozen_policy_head_near_reference as near_reference
from test_token_kl import CASES as KL_CASES
from test_token_kl import _reference_model


@pytest.fixture
def small_tiles():
    """The native backend, its module for DEVICE set to tiles of 16 rows × 64 vocabulary entries."""
    require_backend("native")
    impl = backends.resolve("native", DEVICE, torch.float32)
    mod = getattr(impl, DEVICE.type)
    old = mod.get_tiling()
    mod.set_tiling(16, 64)
    yield impl
    mod.set_tiling(*old)


def _refuse_backwards(monkeypatch, impl):
    def refuse(*a, **k):
        raise AssertionError("a frozen head must not run the backend's backward")

    monkeypatch.setattr(impl, "stats_backward", refuse)
    monkeypatch.setattr(impl, "kl_backward", refuse)


@pytest.mark.parametrize("case", list(STATS_CASES), ids=list(STATS_CASES))
def test_frozen_stats_small_tiles(small_tiles, case, monkeypatch):
    """test_frozen_head's cases (softcap, extreme logits, V = 1, fp16, ...) across many tiles."""
    _refuse_backwards(monkeypatch, small_tiles)
    c = STATS_CASES[case]
    require_backend("native", c.dtype)
    _check("native", c, ("logp", "lse", "entropy"))


@pytest.mark.gpu
@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("case", list(KL_CASES), ids=list(KL_CASES))
def test_frozen_kl_small_tiles(small_tiles, case, direction, monkeypatch):
    """test_token_kl's cases across many tiles, on a GPU (the CPU module's: test_native_frozen_kl.py; the gpu
    marker also puts this file in bench/gpu_check.sh's tests)."""
    _refuse_backwards(monkeypatch, small_tiles)
    c, extra = KL_CASES[case]
    require_backend("native", c.dtype)
    h, w, b, labels = c.make()
    rh, rw, rb = _reference_model(c, extra.get("ref_D"), extra.get("ref_scale"), extra.get("ref_bias", False))
    opts = dict(direction=direction, temperature=c.temperature, softcap=c.softcap,
                ref_softcap=extra.get("ref_softcap"))
    _compare("native", h, w, b, rh, rw, rb, labels if extra.get("labels") else None, c.upstream(2), c.dtype, opts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_frozen_kl_near_reference_small_tiles(small_tiles, direction, dtype, monkeypatch):
    """test_frozen_kl's policy near its reference (p ≈ q: the frozen d_hidden as accurate as the vocabulary
    backward's) across many chunks, where the normalised accumulators are rescaled between chunks."""
    near_reference("native", direction, dtype, monkeypatch)
