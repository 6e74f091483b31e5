"""fastpref's own cuBLAS products (kernels/gemm_backward.py, kernels/frozen_forward.py): IEEE float32 whatever the
user set globally for TF32, and the probe of fp16/bf16 products with a float32 output (no cached transient
failure, never during CUDA-graph capture, each fallback said once).

On the CPU TF32 does not exist: a function mode records, at every float32 product the Triton backend runs,
the precision cuBLAS would be told to use. The real products with TF32 on are checked by the GPU check
(test_float32_with_tf32_on_matches_float64_on_gpu, marked gpu).
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch.overrides import TorchFunctionMode

import fastpref
from cases import DEVICE, Case, require_backend
from fastpref import backends
from fastpref.options import LogitOptions

MATMUL = torch.backends.cuda.matmul
# How users turn TF32 on (HF Trainer's tf32=True sets the first), and how each is turned off again.
USER_TF32 = {
    "allow_tf32": (lambda: setattr(MATMUL, "allow_tf32", True), lambda: setattr(MATMUL, "allow_tf32", False)),
    "precision_high": (lambda: torch.set_float32_matmul_precision("high"),
                       lambda: torch.set_float32_matmul_precision("highest")),
    "fp32_precision": (lambda: setattr(MATMUL, "fp32_precision", "tf32"),
                       lambda: setattr(MATMUL, "fp32_precision", "none")),
}


def _settings() -> tuple:
    """What each API reads back ("raises" where torch refuses a read after the other API was used)."""
    out = []
    for read in (lambda: MATMUL.allow_tf32, lambda: MATMUL.fp32_precision, torch.get_float32_matmul_precision):
        try:
            out.append(read())
        except RuntimeError:
            out.append("raises")
    return tuple(out)


class _Float32Products(TorchFunctionMode):
    """The cuBLAS float32 precision setting at every float32 mm/addmm."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "").rstrip("_")
        if name in ("mm", "addmm"):
            a = args[0] if name == "mm" else args[1]
            if a.dtype == torch.float32:
                self.seen.append(MATMUL.fp32_precision)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("user", list(USER_TF32))
def test_float32_products_ignore_global_tf32(user):
    """gemm backward, frozen token_stats and frozen token_kl with float32 inputs and TF32 on globally: every
    product fastpref runs is IEEE float32, and the user's setting reads back unchanged afterwards."""
    require_backend("triton")
    impl = backends.resolve("triton", DEVICE, torch.float32)
    impl.backward = "gemm"
    h, w, b, lab = Case(N=40, D=24, V=300, bias=True, seed=5).make()
    rh, rw, rb, _ = Case(N=40, D=16, V=300, seed=6).make()
    opts = LogitOptions(temperature=0.7)
    g = [x.float() for x in Case(N=40, seed=7).upstream(3)]
    initial = _settings()
    enable, disable = USER_TF32[user]
    enable()
    try:
        user_view = _settings()
        with _Float32Products() as rec:
            _, lse, ent, _ = impl.stats_forward(h, w, b, lab, opts, True, False)
            impl.stats_backward(h, w, b, lab, lse, ent, *g, opts, (True, True, True))
            impl.stats_forward_frozen(h, w, b, lab, opts, True, False)
            impl.kl_forward_frozen(h, w, b, rh, rw, rb, lab, opts, opts, "forward")
        after = _settings()
    finally:
        disable()
        MATMUL.fp32_precision = initial[1]  # turning the legacy flag off leaves "ieee", not the initial value
        impl.backward = None
    assert user_view[1] == "tf32", "the user's choice is TF32"
    assert rec.seen and set(rec.seen) == {"ieee"}, f"float32 products under {set(rec.seen)}"
    assert after == user_view, "the user's TF32 setting must read back as it was"
    assert _settings() == initial, "nothing leaks into later tests"


# ---- the fp16/bf16 float32-output probe ---------------------------------------------------------------------
@pytest.fixture
def probe(monkeypatch):
    """gemm_backward's probe on a stand-in CUDA device: returns the list the fake probe pops its outcomes from
    (an exception is raised, a bool returned) and counts calls in."""
    from fastpref.kernels import gemm_backward

    outcomes: list = []
    calls: list = []

    def fake(device, dtype):
        calls.append(dtype)
        out = outcomes.pop(0)
        if isinstance(out, BaseException):
            raise out
        return out

    monkeypatch.setattr(gemm_backward, "_DTYPE_OUT_OK", {})
    monkeypatch.setattr(gemm_backward, "_WARNED", set())
    monkeypatch.setattr(gemm_backward, "_probe_dtype_out", fake)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    return gemm_backward, outcomes, calls


CUDA = torch.device("cuda")


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB"),
                                   RuntimeError("CUBLAS_STATUS_NOT_SUPPORTED: set CUBLAS_WORKSPACE_CONFIG=:4096:8")],
                         ids=["oom", "workspace_config"])
def test_probe_does_not_cache_a_transient_failure(probe, error):
    gb, outcomes, calls = probe
    outcomes += [error, True]
    with pytest.warns(RuntimeWarning, match="probes again"):
        assert gb._dtype_out_works(CUDA, torch.bfloat16) is False
    assert gb._dtype_out_works(CUDA, torch.bfloat16) is True
    assert gb._dtype_out_works(CUDA, torch.bfloat16) is True
    assert len(calls) == 2, "probed again after the transient failure, then cached the success"


def test_probe_caches_a_final_failure_and_says_it_once(probe):
    gb, outcomes, calls = probe
    outcomes += [TypeError("mm() got an unexpected keyword argument 'out_dtype'")]
    with pytest.warns(RuntimeWarning, match="cannot run"):
        assert gb._dtype_out_works(CUDA, torch.float16) is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert gb._dtype_out_works(CUDA, torch.float16) is False
    assert len(calls) == 1


def test_probe_never_runs_during_graph_capture(probe, monkeypatch):
    gb, outcomes, calls = probe
    outcomes += [True]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.warns(RuntimeWarning, match="capture"):
        assert gb._dtype_out_works(CUDA, torch.bfloat16) is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        assert gb._dtype_out_works(CUDA, torch.bfloat16) is False
    assert not calls, "no probe inside a capture"
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert gb._dtype_out_works(CUDA, torch.bfloat16) is True
    assert len(calls) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
@pytest.mark.parametrize("backend", ["triton", "native"])
def test_float32_with_tf32_on_matches_float64_on_gpu(backend, frozen):
    """The real cuBLAS products: float32 inputs with TF32 on globally (HF Trainer's tf32=True) give log-probs
    and gradients at float32 accuracy (TF32 logits would be ~1e-2 off), and the setting reads back unchanged."""
    from oracle import assert_three_way, grads_of, leaf, naive_stats

    require_backend(backend)
    h, w, b, lab = Case(N=257, D=1024, V=8192, bias=True, seed=9, scale=2.0).make()
    up = Case(N=257, seed=10).upstream(2)
    MATMUL.allow_tf32 = True
    try:
        hh, ww = leaf(h), w.detach().clone().requires_grad_(not frozen)
        st = fastpref.token_stats(hh, ww, lab, bias=b, temperature=0.7, backend=backend)
        got = grads_of([st.logp, st.lse], up, [hh, ww if not frozen else None])
        assert MATMUL.allow_tf32 is True
    finally:
        MATMUL.allow_tf32 = False
    gh, gw = leaf(h, torch.float64), leaf(w, torch.float64)
    gold = naive_stats(gh, gw, b.double(), lab, temperature=0.7)
    rh, rw = leaf(h), leaf(w)
    ref = naive_stats(rh, rw, b, lab, temperature=0.7, dtype=torch.float32)  # IEEE: TF32 is off again here
    assert_three_way("logp", st.logp, ref[0], gold[0], torch.float32)
    gold_g = grads_of(gold[:2], up, [gh, gw])
    ref_g = grads_of(ref[:2], up, [rh, rw])
    assert_three_way("d_hidden", got[0], ref_g[0], gold_g[0], torch.float32, grad=True)
    if not frozen:
        assert_three_way("d_weight", got[1], ref_g[1], gold_g[1], torch.float32, grad=True)
