"""Batch-invariant mode: a row's numbers do not depend on the rest of the batch (docs/batch-invariance.md).

Property tests: a base batch is computed once; random subsets of its rows, in random orders, at random batch
sizes (1 to 300, so rows land at every position of the fixed-size tiles and in several tiles), inside larger
leading shapes with ignored positions, compacted or masked (``sync_free``), must reproduce the base batch's
per-token outputs and per-row hidden gradients bit for bit; the weight and bias gradients of one set of rows
must be bitwise equal whatever the rows' order and whatever ignored rows surround them. Two vocabulary chunks
(V > 4096) so that chunk boundaries are crossed.
"""
import pytest
import torch

import fastpref
from fastpref.backends import invariant
from fastpref.backends.torch_backend import TorchBackend

from cases import require_backend
from fastpref.backends.invariant import INVARIANT_ROWS, canonical_order

D, V, N = 32, 5000, 300
INVARIANT_BACKENDS = ["torch", "native"]
IGNORE = -100


def _base(seed: int = 0, bias: bool = True, dtype: torch.dtype = torch.float32) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(h=torch.randn(N, D, generator=g).to(dtype), w=(torch.randn(V, D, generator=g) * 0.3).to(dtype),
                b=torch.randn(V, generator=g).to(dtype) if bias else None, rh=torch.randn(N, D + 8, generator=g),
                rw=torch.randn(V, D + 8, generator=g) * 0.3, y=torch.randint(0, V, (N,), generator=g),
                up=torch.randn(3, N, generator=g))  # per-row upstream gradients, attached to each row


def _layout(idx: torch.Tensor, gen: torch.Generator, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``idx`` scattered among ``pad`` ignored positions, as a [2, (len+pad)/2]-or-[1, len+pad] batch:
    (source row per position, −1 where ignored; keep mask)."""
    total = idx.numel() + pad
    where = torch.randperm(total, generator=gen)[:idx.numel()].sort().values
    src = torch.full((total,), -1, dtype=torch.long)
    src[where] = idx
    shape = (2, total // 2) if total % 2 == 0 else (1, total)
    return src.reshape(shape), (src >= 0).reshape(shape)


def _stats(base: dict, src: torch.Tensor, keep: torch.Tensor, sync_free: bool, frozen: bool = False,
           backend: str = "torch"):
    """token_stats on the rows ``src`` (a batch laid out by ``_layout``); returns outputs and gradients."""
    s = src.clamp(min=0)
    h = base["h"][s].requires_grad_()
    w = base["w"].clone().requires_grad_(not frozen)
    b = None if base["b"] is None else base["b"].clone().requires_grad_(not frozen)
    y = torch.where(keep, base["y"][s], torch.full_like(s, IGNORE))
    out = fastpref.token_stats(h, w, y, bias=b, softcap=20.0, temperature=0.9, entropy=True, log_sum_p2=True,
                               backend=backend, sync_free=sync_free, batch_invariant=True)
    up = [u[s] for u in base["up"]]
    (out.logp * up[0] + out.lse * up[1] + out.entropy * up[2]).sum().backward()
    return out, h.grad, None if frozen else w.grad, None if (frozen or b is None) else b.grad


def _assert_rows(src, keep, got: list, ref: list) -> None:
    """Each kept position's values equal the base row's bit for bit; ignored positions are 0."""
    for g, r in zip(got, ref):
        assert torch.equal(g[keep], r[src[keep]])
        assert not g[~keep].any()


@pytest.mark.parametrize("backend", INVARIANT_BACKENDS)
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("frozen", [False, True])
def test_stats_rows_do_not_depend_on_the_batch(backend: str, seed: int, frozen: bool) -> None:
    require_backend(backend)
    base = _base()
    all_rows = torch.arange(N).reshape(1, N)
    ref, ref_dh, _, _ = _stats(base, all_rows, torch.ones_like(all_rows, dtype=torch.bool), False, frozen, backend)
    gen = torch.Generator().manual_seed(100 + seed)
    for size in (1, 2, 3, INVARIANT_ROWS - 1, INVARIANT_ROWS + 1, int(torch.randint(4, N, (1,), generator=gen))):
        idx = torch.randperm(N, generator=gen)[:size]
        src, keep = _layout(idx, gen, int(torch.randint(0, 40, (1,), generator=gen)))
        for sync_free in (False, True):
            out, dh, _, _ = _stats(base, src, keep, sync_free, frozen, backend)
            _assert_rows(src, keep, [out.logp, out.lse, out.entropy, out.log_sum_p2],
                         [ref.logp[0], ref.lse[0], ref.entropy[0], ref.log_sum_p2[0]])
            _assert_rows(src, keep, [dh], [ref_dh[0]])


@pytest.mark.parametrize("backend", INVARIANT_BACKENDS)
@pytest.mark.parametrize("seed", range(3))
def test_weight_gradient_does_not_depend_on_order_or_ignored_rows(backend: str, seed: int) -> None:
    require_backend(backend)
    base = _base(seed)
    gen = torch.Generator().manual_seed(200 + seed)
    idx = torch.randperm(N, generator=gen)[:int(torch.randint(INVARIANT_ROWS + 1, N, (1,), generator=gen))]
    src, keep = _layout(idx, gen, 0)
    _, _, ref_dw, ref_db = _stats(base, src, keep, False, backend=backend)
    for pad in (0, 7, 90):
        src, keep = _layout(idx[torch.randperm(idx.numel(), generator=gen)], gen, pad)
        for sync_free in (False, True):
            _, _, dw, db = _stats(base, src, keep, sync_free, backend=backend)
            assert torch.equal(dw, ref_dw) and torch.equal(db, ref_db)


@pytest.mark.parametrize("backend", INVARIANT_BACKENDS)
def test_bfloat16_inputs(backend: str) -> None:
    require_backend(backend, torch.bfloat16)
    base = _base(3, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(3)
    idx = torch.randperm(N, generator=gen)[:INVARIANT_ROWS + 9]
    src, keep = _layout(idx, gen, 5)
    ref, ref_dh, ref_dw, ref_db = _stats(base, src, keep, False, backend=backend)
    assert ref_dh.dtype == ref_dw.dtype == torch.bfloat16
    for size in (1, idx.numel()):
        perm = torch.randperm(idx.numel(), generator=gen)[:size]
        src2, keep2 = _layout(idx[perm], gen, 3)
        out, dh, dw, db = _stats(base, src2, keep2, True, backend=backend)
        where = keep.flatten().nonzero().squeeze(1)[perm]  # base positions of the rows, in the new order
        flat = [t.flatten(0, len(src.shape) - 1) for t in (ref.logp, ref.entropy, ref_dh)]
        for got, want in zip((out.logp, out.entropy, dh), flat):
            assert torch.equal(got[keep2], want[where])
        if size == idx.numel():
            assert torch.equal(dw, ref_dw) and torch.equal(db, ref_db)


def test_weight_gradient_with_repeated_rows() -> None:
    """Equal rows (same hidden state, label and upstream gradients) may come in any order among themselves."""
    base = _base(5)
    gen = torch.Generator().manual_seed(5)
    idx = torch.cat([torch.arange(20), torch.arange(20), torch.tensor([3, 3, 3])])
    results = []
    for _ in range(3):
        src, keep = _layout(idx[torch.randperm(idx.numel(), generator=gen)], gen, 11)
        results.append(_stats(base, src, keep, False)[2:])
    assert all(torch.equal(a, results[0][0]) and torch.equal(b, results[0][1]) for a, b in results)


def _kl(base: dict, src: torch.Tensor, keep: torch.Tensor, direction: str, labels: bool, frozen: bool,
        backend: str):
    s = src.clamp(min=0)
    h = base["h"][s].requires_grad_()
    w = base["w"].clone().requires_grad_(not frozen)
    y = torch.where(keep, base["y"][s], torch.full_like(s, IGNORE)) if labels else None
    out = fastpref.token_kl(h, w, base["rh"][s], base["rw"], y, bias=base["b"], direction=direction,
                            softcap=15.0, backend=backend, batch_invariant=True)
    loss = out.kl * base["up"][0][s] * (keep if not labels else 1)
    if labels:
        loss = loss + out.logp * base["up"][1][s]
    loss.sum().backward()
    vals = [out.kl] + ([out.logp, out.ref_logp] if labels else [])
    return vals, h.grad, None if frozen else w.grad


@pytest.mark.parametrize("backend", INVARIANT_BACKENDS)
@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("labels", [True, False])
@pytest.mark.parametrize("frozen", [False, True])
def test_kl_rows_and_weight_gradient(backend: str, direction: str, labels: bool, frozen: bool) -> None:
    require_backend(backend)
    base = _base(7)
    all_rows = torch.arange(N).reshape(1, N)
    ones = torch.ones_like(all_rows, dtype=torch.bool)
    ref, ref_dh, _ = _kl(base, all_rows, ones, direction, labels, frozen, backend)
    gen = torch.Generator().manual_seed(300)
    idx = torch.randperm(N, generator=gen)[:150]
    src, keep = _layout(idx, gen, 30 if labels else 0)
    _, _, ref_dw = _kl(base, src, keep, direction, labels, frozen, backend)
    for size in (1, INVARIANT_ROWS + 3, 150):
        perm = idx[torch.randperm(150, generator=gen)][:size]
        src, keep = _layout(perm, gen, 13 if labels else 0)
        vals, dh, dw = _kl(base, src, keep, direction, labels, frozen, backend)
        _assert_rows(src, keep, vals + [dh], [r[0] for r in ref] + [ref_dh[0]])
        if size == 150 and not frozen:
            assert torch.equal(dw, ref_dw)


def test_canonical_order_is_by_content_even_when_hashes_collide(monkeypatch) -> None:
    gen = torch.Generator().manual_seed(1)
    words = torch.randint(-3, 3, (200, 4), generator=gen)  # many equal rows, many shared prefixes
    orders = [canonical_order(words)]
    monkeypatch.setattr(invariant, "row_hash", lambda w: torch.zeros(w.shape[0], dtype=torch.long))
    for _ in range(3):
        perm = torch.randperm(200, generator=gen)
        orders.append(perm[canonical_order(words[perm])])
    lexicographic = sorted(range(200), key=lambda i: tuple(words[i].tolist()))
    assert torch.equal(words[orders[1]], words[lexicographic])
    assert all(torch.equal(words[o], words[orders[1]]) for o in orders[2:])
    assert torch.equal(torch.sort(orders[0]).values, torch.arange(200))


def test_switches_and_default_mode(monkeypatch) -> None:
    """The keyword, the context manager and the environment variable select the mode (a backend without one
    refuses it); the default mode is the plain torch backend, bit for bit."""
    base = _base(2)
    h, w, y = base["h"][:37], base["w"], base["y"][:37]
    plain = TorchBackend().stats_forward(h, w, None, y, fastpref.LogitOptions(), False, False)[0]
    assert torch.equal(fastpref.token_logprobs(h, w, y, backend="torch"), plain)
    inv = fastpref.token_logprobs(h, w, y, backend="torch", batch_invariant=True)
    with pytest.raises(ValueError, match="no batch-invariant mode"):
        fastpref.token_logprobs(h, w, y, backend="triton", batch_invariant=True)
    with fastpref.batch_invariant():
        assert torch.equal(fastpref.token_logprobs(h, w, y), inv)
        with pytest.raises(ValueError, match="no batch-invariant mode"):
            fastpref.token_logprobs(h, w, y, backend="triton")
        assert torch.equal(fastpref.token_logprobs(h, w, y, backend="torch", batch_invariant=False), plain)
    monkeypatch.setenv("FASTPREF_BATCH_INVARIANT", "1")
    with pytest.raises(ValueError, match="no batch-invariant mode"):
        fastpref.token_kl(h, w, h, w, backend="triton")
    with fastpref.batch_invariant(False):
        assert torch.equal(fastpref.token_logprobs(h, w, y, backend="torch"), plain)
    with pytest.raises(TypeError):
        fastpref.token_logprobs(h, w, y, batch_invariant=1)
