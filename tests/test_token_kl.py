"""token_kl on every backend against float64 gold (values and policy gradients), three-way."""
from __future__ import annotations

import pytest
import torch

import fastpref
from cases import BACKENDS, DEVICE, Case, require_backend
from oracle import assert_three_way, grads_of, leaf, naive_kl

CASES = {
    "plain": (Case(), dict()),
    "labels_ignore_bias": (Case(bias=True, ignore_frac=0.3, seed=21), dict(labels=True, ref_bias=True)),
    "softcap_temp": (Case(softcap=3.0, temperature=0.8, seed=22), dict(labels=True, ref_softcap=5.0)),
    "ref_wider": (Case(seed=23), dict(labels=True, ref_D=80)),
    "peaked": (Case(peaked=True, seed=24), dict(labels=True)),
    "extreme": (Case(scale=2000.0, seed=25), dict(labels=True, ref_scale=1500.0)),
    "odd_vocab": (Case(N=13, D=40, V=1037, seed=26), dict(labels=True)),
    "fp16": (Case(dtype=torch.float16, bias=True, seed=27), dict(labels=True)),
    "bf16": (Case(dtype=torch.bfloat16, seed=28), dict(labels=True)),
}


def _reference_model(case: Case, ref_D=None, ref_scale=None, ref_bias=False):
    """A second head over the same vocabulary, with its own hidden states."""
    ref_case = Case(N=case.N, D=ref_D or case.D, V=case.V, dtype=case.dtype, bias=ref_bias,
                    scale=ref_scale or case.scale, seed=case.seed + 500)
    rh, rw, rb, _ = ref_case.make()
    return rh, rw, rb


def _check(backend, case: Case, direction, *, labels=False, ref_D=None, ref_scale=None, ref_bias=False,
           ref_softcap=None):
    require_backend(backend, case.dtype)
    h, w, b, lab = case.make()
    rh, rw, rb = _reference_model(case, ref_D, ref_scale, ref_bias)
    lab = lab if labels else None
    opts = dict(direction=direction, temperature=case.temperature, softcap=case.softcap, ref_softcap=ref_softcap)
    ups = case.upstream(2)
    ins = [leaf(h), leaf(w), leaf(b)]
    out = fastpref.token_kl(ins[0], ins[1], rh, rw, lab, bias=ins[2], ref_bias=rb, backend=backend, **opts)
    used = [out.kl] + ([out.logp] if labels else [])
    ours_g = grads_of(used, ups, ins)
    res = {}
    for tag, dt, xs in (("gold", torch.float64, [leaf(x, torch.float64) for x in (h, w, b)]),
                        ("ref", case.dtype, [leaf(x) for x in (h, w, b)])):
        vals = naive_kl(xs[0], xs[1], xs[2], rh, rw, rb, lab, dtype=dt, **opts)
        res[tag] = (vals, grads_of([v for v in vals[:2] if v is not None], ups, xs))
    (gold, gold_g), (ref, ref_g) = res["gold"], res["ref"]
    for i, name in enumerate(("kl", "logp", "ref_logp")):
        if gold[i] is None:
            assert out[i] is None
            continue
        assert out[i].dtype == torch.float32
        assert_three_way(name, out[i], ref[i], gold[i], case.dtype)
    assert (out.kl >= -1e-6 * (1 + gold[0].abs())).all(), "KL must be non-negative"
    for name, got, r, g, x in zip(("d_hidden", "d_weight", "d_bias"), ours_g, ref_g, gold_g, ins):
        if x is not None:
            assert got.dtype == x.dtype
            assert_three_way(name, got, r, g, case.dtype, grad=True)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_values_and_gradients(backend, case, direction):
    c, extra = CASES[case]
    if backend == "triton" and c.dtype == torch.bfloat16 and DEVICE.type != "cuda":
        pytest.skip("bf16 Triton arithmetic is unsupported by the interpreter; runs on GPUs")
    _check(backend, c, direction, **extra)


@pytest.mark.gpu
@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_bf16_large(backend, direction):
    _check(backend, Case(N=517, D=256, V=5003, dtype=torch.bfloat16, bias=True, ignore_frac=0.1, seed=29),
           direction, labels=True, ref_D=384)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_identical_models_give_zero(backend, direction):
    require_backend(backend)
    h, w, b, lab = Case(bias=True, softcap=10.0, seed=30).make()
    hh = leaf(h)
    out = fastpref.token_kl(hh, w, h, w, lab, bias=b, ref_bias=b, softcap=10.0, ref_softcap=10.0,
                            direction=direction, backend=backend)
    assert out.kl.abs().max() < 1e-5
    torch.testing.assert_close(out.logp, out.ref_logp)
    out.kl.sum().backward()
    assert hh.grad.abs().max() < 1e-5, "at the minimum the KL gradient vanishes"


@pytest.mark.parametrize("backend", BACKENDS)
def test_reference_gets_no_gradient(backend):
    require_backend(backend)
    h, w, _, lab = Case(seed=31).make()
    rh, rw = leaf(h * 0.5), leaf(w)
    hh = leaf(h)
    fastpref.token_kl(hh, w, rh, rw, backend=backend).kl.sum().backward()
    assert rh.grad is None and rw.grad is None and hh.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_shape_without_labels(backend):
    require_backend(backend)
    h, w, _, _ = Case(N=2 * 11, seed=32).make()
    rh, rw, _ = _reference_model(Case(N=2 * 11, seed=32), ref_D=24)
    out = fastpref.token_kl(h.reshape(2, 11, -1), w, rh.reshape(2, 11, -1), rw, backend=backend)
    assert out.kl.shape == (2, 11) and out.logp is None and out.ref_logp is None
    gold = naive_kl(h.double(), w.double(), None, rh.double(), rw.double(), None, None)[0]
    torch.testing.assert_close(out.kl.double().reshape(-1), gold, atol=1e-5, rtol=1e-4)
