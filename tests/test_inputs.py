"""Bad input gets a clear error naming the argument; never a crash or a silent wrong answer."""
from __future__ import annotations

import pytest
import torch

import fastpref

N, D, V = 6, 8, 11


def args():
    return torch.randn(N, D), torch.randn(V, D), torch.randint(0, V, (N,))


@pytest.mark.parametrize(
    "mutate, exc, words",
    [
        (lambda h, w, y: (h, torch.randn(V, D + 1), y), ValueError, ["weight", "D="]),
        (lambda h, w, y: (h, w, torch.randint(0, V, (N + 1,))), ValueError, ["labels", "leading shape"]),
        (lambda h, w, y: (h, w, y.float()), TypeError, ["labels", "integer"]),
        (lambda h, w, y: (h, w, y.bool()), TypeError, ["labels", "integer"]),
        (lambda h, w, y: (h, w, torch.full_like(y, V)), ValueError, ["labels", "[0, V=11)"]),
        (lambda h, w, y: (h, w, torch.full_like(y, -1)), ValueError, ["labels", "ignore_index"]),
        (lambda h, w, y: (h, w[0], y), ValueError, ["weight", "[V, D]"]),
        (lambda h, w, y: (h.long(), w, y), TypeError, ["hidden"]),
        (lambda h, w, y: (h.numpy(), w, y), TypeError, ["hidden", "torch.Tensor"]),
        (lambda h, w, y: (h, w.to("meta"), y), ValueError, ["weight", "meta"]),
    ],
)
def test_bad_tensors(mutate, exc, words):
    h, w, y = mutate(*args())
    with pytest.raises(exc) as info:
        fastpref.token_stats(h, w, y, backend="torch")
    for word in words:
        assert word in str(info.value), str(info.value)


@pytest.mark.parametrize(
    "kwargs, exc, word",
    [
        (dict(bias=torch.randn(V + 1)), ValueError, "bias"),
        (dict(bias=torch.randn(V).to("meta")), ValueError, "bias"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(temperature=-1.0), ValueError, "temperature"),
        (dict(temperature=float("nan")), ValueError, "temperature"),
        (dict(softcap=0.0), ValueError, "softcap"),
        (dict(softcap=-3.0), ValueError, "softcap"),
        (dict(ignore_index=1.5), TypeError, "ignore_index"),
        (dict(backend="cuda-magic"), ValueError, "backend"),
        (dict(backend=3), TypeError, "backend"),
        (dict(entropy="yes"), TypeError, "entropy"),
    ],
)
def test_bad_options(kwargs, exc, word):
    h, w, y = args()
    with pytest.raises(exc, match=word):
        fastpref.token_stats(h, w, y, **kwargs)


def test_unavailable_backend_names_the_available_ones(monkeypatch):
    from fastpref import backends
    from fastpref.backends.base import BackendUnavailable

    monkeypatch.setitem(backends._CACHE, "native", BackendUnavailable("not built here"))
    h, w, y = args()
    with pytest.raises(ValueError) as info:
        fastpref.token_stats(h, w, y, backend="native")
    assert "not built here" in str(info.value) and "'torch'" in str(info.value)


def test_env_override(monkeypatch):
    from fastpref import backends

    monkeypatch.setenv("FASTPREF_BACKEND", "torch")
    assert backends.resolve("auto", torch.device("cpu"), torch.float32).name == "torch"
    monkeypatch.setenv("FASTPREF_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="backend"):
        backends.resolve("auto", torch.device("cpu"), torch.float32)


def test_ignore_index_custom():
    h, w, y = args()
    y[2] = 7777
    out = fastpref.token_logprobs(h, w, y, ignore_index=7777, backend="torch")
    assert out[2] == 0 and (out[[0, 1, 3]] < 0).all()


@pytest.mark.parametrize(
    "kwargs, exc, word",
    [
        (dict(ref_weight=torch.randn(V + 2, D)), ValueError, "vocabularies"),
        (dict(ref_hidden=torch.randn(N + 1, D)), ValueError, "ref_hidden"),
        (dict(ref_hidden=torch.randn(N, D + 3)), ValueError, "ref_weight"),
        (dict(direction="sideways"), ValueError, "direction"),
        (dict(ref_bias=torch.randn(3)), ValueError, "ref_bias"),
        (dict(ref_softcap=-1.0), ValueError, "softcap"),
    ],
)
def test_kl_bad_input(kwargs, exc, word):
    h, w, y = args()
    base = dict(hidden=h, weight=w, ref_hidden=h.clone(), ref_weight=w.clone())
    extra = {k: v for k, v in kwargs.items() if k not in base}
    base.update({k: v for k, v in kwargs.items() if k in base})
    with pytest.raises(exc, match=word):
        fastpref.token_kl(**base, backend="torch", **extra)


def test_mixed_dtypes_compute_in_hidden_dtype():
    h, w, y = args()
    hh = h.double().requires_grad_()
    ww = w.clone().requires_grad_()
    fastpref.token_logprobs(hh, ww, y, backend="torch").sum().backward()
    assert ww.grad is not None and ww.grad.dtype == torch.float32 and hh.grad.dtype == torch.float64
