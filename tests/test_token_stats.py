"""token_stats on every backend against float64 gold (values and gradients), three-way."""
from __future__ import annotations

import pytest
import torch

import fastpref
from cases import BACKENDS, DEVICE, Case, require_backend
from oracle import assert_three_way, grads_of, leaf, naive_stats

CASES = {
    "plain": Case(),
    "bias_ignore": Case(bias=True, ignore_frac=0.3, seed=1),
    "softcap_temp": Case(bias=True, softcap=3.0, temperature=0.7, seed=2),
    "peaked": Case(peaked=True, ignore_frac=0.2, seed=3),
    "extreme": Case(scale=2000.0, bias=True, seed=4),  # |z| up to ~1e4
    "extreme_softcap": Case(scale=2000.0, softcap=30.0, seed=5),
    "tiny_vocab": Case(N=5, D=16, V=1, seed=6),
    "wide": Case(N=9, D=130, V=1037, temperature=1.3, seed=7),
    "fp16": Case(dtype=torch.float16, bias=True, ignore_frac=0.25, seed=8),
    "bf16": Case(dtype=torch.bfloat16, softcap=20.0, seed=9),
}


def _check(backend, case: Case, want_entropy=True, want_p2=True):
    require_backend(backend, case.dtype)
    h, w, b, labels = case.make()
    opts = dict(temperature=case.temperature, softcap=case.softcap)
    ups = case.upstream(3 if want_entropy else 2)
    # ours
    ins = [leaf(h), leaf(w), leaf(b)]
    st = fastpref.token_stats(ins[0], ins[1], labels, bias=ins[2], entropy=want_entropy,
                              log_sum_p2=want_p2, backend=backend, **opts)
    outs = [st.logp, st.lse] + ([st.entropy] if want_entropy else [])
    ours_g = grads_of(outs, ups, ins)
    # gold (float64) and ref (test dtype)
    results = {}
    for tag, dt, xs in (("gold", torch.float64, [leaf(x, torch.float64) for x in (h, w, b)]),
                        ("ref", case.dtype, [leaf(x) for x in (h, w, b)])):
        vals = naive_stats(xs[0], xs[1], xs[2], labels, dtype=dt, **opts)
        results[tag] = (vals, grads_of(list(vals[:len(outs)]), ups, xs))
    (gold, gold_g), (ref, ref_g) = results["gold"], results["ref"]
    for i, name in enumerate(["logp", "lse", "entropy", "log_sum_p2"]):
        got = st[i]
        if got is None:
            assert (name == "entropy" and not want_entropy) or (name == "log_sum_p2" and not want_p2)
            continue
        assert got.dtype == torch.float32 and got.shape == labels.shape
        assert_three_way(name, got, ref[i], gold[i], case.dtype)
    for name, got, r, g, x in zip(("d_hidden", "d_weight", "d_bias"), ours_g, ref_g, gold_g, ins):
        if x is None:
            continue
        assert got.dtype == x.dtype, f"{name} dtype {got.dtype} != input dtype {x.dtype}"
        assert_three_way(name, got, r, g, case.dtype, grad=True)
    ignored = labels == -100
    if ignored.any():
        assert (st.logp[ignored] == 0).all() and (st.lse[ignored] == 0).all()
        assert (ours_g[0][ignored] == 0).all(), "ignored rows must get no gradient"


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_values_and_gradients(backend, case):
    c = CASES[case]
    if backend == "triton" and c.dtype == torch.bfloat16 and DEVICE.type != "cuda":
        pytest.skip("bf16 Triton arithmetic is unsupported by the interpreter; runs on GPUs")
    _check(backend, c)


@pytest.mark.parametrize("backend", BACKENDS)
def test_logp_only(backend):
    _check(backend, Case(bias=True, ignore_frac=0.2, seed=11), want_entropy=False, want_p2=False)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_low_precision_large(backend, dtype):
    _check(backend, Case(N=1031, D=256, V=5003, dtype=dtype, bias=True, softcap=30.0, ignore_frac=0.1, seed=12))


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_shape_and_views(backend):
    require_backend(backend)
    h, w, b, labels = Case(N=3 * 18, seed=13).make()
    h3 = h.reshape(3, 18, -1)[:, :-1]  # non-contiguous view, as in h[:, :-1]
    lab = labels.reshape(3, 18)[:, 1:]
    out = fastpref.token_logprobs(h3, w, lab, backend=backend)
    assert out.shape == (3, 17)
    flat = naive_stats(h3.reshape(-1, h.shape[1]).double(), w.double(), None, lab.reshape(-1))[0]
    torch.testing.assert_close(out.double(), flat.reshape(3, 17), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_and_all_ignored(backend):
    require_backend(backend)
    h, w, _, labels = Case(N=6, seed=14).make()
    empty = fastpref.token_stats(h[:0], w, labels[:0], entropy=True, backend=backend)
    assert empty.logp.shape == (0,) and empty.entropy.shape == (0,)
    hh, ww = leaf(h), leaf(w)
    st = fastpref.token_stats(hh, ww, torch.full_like(labels, -100), entropy=True, backend=backend)
    assert (st.logp == 0).all() and (st.lse == 0).all() and (st.entropy == 0).all()
    (st.logp.sum() + st.lse.sum() + st.entropy.sum()).backward()
    assert (hh.grad == 0).all() and (ww.grad == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_needed_for_weight(backend):
    require_backend(backend)
    h, w, _, labels = Case(seed=15).make()
    hh = leaf(h)
    fastpref.token_logprobs(hh, w, labels, backend=backend).sum().backward()
    hg = leaf(h, torch.float64)
    naive_stats(hg, w.double(), None, labels)[0].sum().backward()
    torch.testing.assert_close(hh.grad.double(), hg.grad, atol=1e-5, rtol=1e-4)
