"""Batch-invariant variants of the torch ("torch+invariant") and native ("native+invariant") backends
(docs/batch-invariance.md).

Per-row outputs: every GEMM and reduction runs on tiles of one fixed shape, ``INVARIANT_ROWS`` rows (a call's
rows padded to a multiple of it) by the fixed vocabulary chunk, so the kernel, its blocking and its reduction
order do not depend on how many rows a call has (the torch backend tiles so itself,
``InvariantTorchBackend``; another backend is called on one such block at a time, ``BlockedInvariant``). With
position-independent fixed-shape kernels (what the tests check) a row's numbers depend on its own inputs only.

Weight and bias gradients are sums over rows. The backward keeps the rows that carry an upstream gradient,
puts them in a canonical order (sorted by a 64-bit hash of their bits: hidden state, label, upstream
gradients, the reference's hidden state; by the bits themselves, lexicographically, if two different rows
share a hash) and sums fixed-shape blocks of them in that order. Rows with equal bits make equal
contributions, so the order among them is immaterial: dW and db depend on the multiset of rows only.
"""
from __future__ import annotations

import torch

from .base import Tensor
from .torch_backend import VOCAB_CHUNK, TorchBackend

INVARIANT_ROWS = 64  # rows per logits tile; every tile has exactly this many
_HASH_SEED = 0x5EED


def _padded(rows: int) -> int:
    """``rows`` rounded up to a positive multiple of INVARIANT_ROWS."""
    return max(1, -(-rows // INVARIANT_ROWS)) * INVARIANT_ROWS


def _pad(x: Tensor | None, rows: int, zero: bool = False) -> Tensor | None:
    """x [M, ...] extended to ``rows`` rows: copies of row 0 (whose values are finite and consistent with the
    other per-row inputs), or zeros (``zero``, for upstream gradients: padded rows then contribute nothing)."""
    if x is None or x.shape[0] == rows:
        return x
    fill = x.new_zeros((rows - x.shape[0], *x.shape[1:])) if zero else x[:1].expand(rows - x.shape[0], *x.shape[1:])
    return torch.cat([x, fill])


def _cut(outputs: tuple, rows: int) -> tuple:
    """The first ``rows`` rows of each output (None stays None)."""
    return tuple(None if t is None else t[:rows] for t in outputs)


def _words(columns: list[Tensor | None]) -> Tensor:
    """Each row's inputs as int64 [M, K]: bit patterns of floats (via float32, exact for 16-bit floats),
    values of integers."""
    parts = []
    for c in columns:
        if c is None:
            continue
        c = c.reshape(c.shape[0], -1)
        parts.append((c.float().view(torch.int32) if c.dtype.is_floating_point else c).to(torch.int64))
    return torch.cat(parts, 1)


def row_hash(words: Tensor) -> Tensor:
    """int64 [M]: Σ_k words[:, k]·c_k with fixed odd 64-bit constants c_k, wrapping: integer sums are exact in
    any order, so the hash of a row does not depend on the other rows or on the reduction's order."""
    gen = torch.Generator().manual_seed(_HASH_SEED)
    coef = torch.randint(0, 1 << 62, (words.shape[1],), generator=gen, dtype=torch.int64) * 2 + 1
    return (words * coef.to(words.device)).sum(1)


def canonical_order(words: Tensor) -> Tensor:
    """int64 [M]: the permutation sorting rows by their content ``words`` [M, K] (by hash; lexicographically
    by the words themselves when two different rows share a hash). Equal rows keep their relative order."""
    hashes = row_hash(words)
    order = torch.sort(hashes, stable=True).indices
    key, w = hashes[order], words[order]
    if bool(((key[1:] == key[:-1]) & (w[1:] != w[:-1]).any(1)).any()):
        order = torch.arange(words.shape[0], device=words.device)
        for k in range(words.shape[1] - 1, -1, -1):
            order = order[torch.sort(words[order, k], stable=True).indices]
    return order


def gradient_rows(content: list[Tensor | None], grads: list[Tensor | None]) -> Tensor:
    """int64 [K]: the rows with a nonzero upstream gradient (grads: float32 [M] or None), in canonical order of
    their ``content`` and gradients (each [M, ...] or None)."""
    live = None
    for g in grads:
        if g is not None:
            live = (g != 0) if live is None else live | (g != 0)
    if live is None:
        return torch.zeros(0, dtype=torch.long, device=content[0].device)
    rows = live.nonzero().squeeze(1)
    return rows[canonical_order(_words([None if c is None else c[rows] for c in content + grads]))]


class _Reordered:
    """A backward over the rows ``order`` (canonical) only, padded to whole tiles; dh scattered back."""

    def __init__(self, order: Tensor, rows: int):
        self.order, self.rows, self.size = order, rows, _padded(order.shape[0])

    def take(self, *xs: Tensor | None, zero: bool = False) -> list[Tensor | None]:
        return [None if x is None else _pad(x.index_select(0, self.order), self.size, zero) for x in xs]

    def put(self, grads: tuple, hidden: Tensor) -> tuple:
        dh, dw, db = grads
        if dh is not None:
            dh = torch.zeros(hidden.shape, device=dh.device, dtype=dh.dtype).index_copy_(
                0, self.order, dh[:self.order.shape[0]])
        return dh, dw, db


def _zero_grads(hidden: Tensor, weight: Tensor, bias: Tensor | None, needs: tuple[bool, bool, bool]) -> tuple:
    """The gradients when no row carries an upstream gradient (dh float32, dW / db in the weights' dtype)."""
    return (torch.zeros(hidden.shape, device=hidden.device, dtype=torch.float32) if needs[0] else None,
            torch.zeros_like(weight) if needs[1] else None,
            torch.zeros_like(bias) if (needs[2] and bias is not None) else None)


class _CanonicalBackward:
    """stats_backward / kl_backward over the rows with a nonzero upstream gradient only, in canonical order
    (``gradient_rows``), padded to whole tiles; ``_ordered`` runs a backward of the plain backend on them."""

    def _plain(self, name: str):
        """The plain backend's method ``name``."""
        raise NotImplementedError

    def _ordered(self, fn, r: _Reordered, args: list, row_args: set[int]) -> tuple:
        """(dh [K', D], dW, db) of ``fn`` on ``args`` whose ``row_args`` are already reordered and padded."""
        return fn(*args)

    def _run(self, name: str, order: Tensor, args: list, row_args: set[int], grad_args: set[int]) -> tuple:
        hidden, weight, bias, needs = args[0], args[1], args[2], args[-1]
        if order.shape[0] == 0:
            return _zero_grads(hidden, weight, bias, needs)
        r = _Reordered(order, hidden.shape[0])
        args = [r.take(a, zero=i in grad_args)[0] if i in row_args | grad_args else a for i, a in enumerate(args)]
        return r.put(self._ordered(self._plain(name), r, args, row_args | grad_args), hidden)

    def stats_backward(self, hidden, weight, bias, labels, lse, entropy, grad_logp, grad_lse, grad_entropy,
                       opts, needs):
        order = gradient_rows([hidden, labels], [grad_logp, grad_lse, grad_entropy])
        return self._run("stats_backward", order, [hidden, weight, bias, labels, lse, entropy, grad_logp, grad_lse,
                                                   grad_entropy, opts, needs], {0, 3, 4, 5}, {6, 7, 8})

    def kl_backward(self, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, lse, ref_lse, kl,
                    grad_kl, grad_logp, opts, ref_opts, direction, needs):
        grad_logp = None if labels is None else grad_logp
        order = gradient_rows([hidden, ref_hidden, labels], [grad_kl, grad_logp])
        return self._run("kl_backward", order, [hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, lse,
                                                ref_lse, kl, grad_kl, grad_logp, opts, ref_opts, direction, needs],
                         {0, 3, 6, 7, 8, 9}, {10, 11})


class InvariantTorchBackend(_CanonicalBackward, TorchBackend):
    """TorchBackend on fixed-shape tiles, with a canonical row order for the weight and bias gradients."""

    name = "torch+invariant"

    def _plain(self, name: str):
        return getattr(TorchBackend, name).__get__(self)

    def tiling(self, rows: int, vocab: int) -> tuple[int, int]:
        """Always INVARIANT_ROWS rows (callers pad to a multiple) by the fixed vocabulary chunk."""
        return INVARIANT_ROWS, min(vocab, VOCAB_CHUNK)

    def _stats_forward(self, hidden, weight, bias, labels, opts, entropy, log_sum_p2, frozen_head):
        m, size = hidden.shape[0], _padded(hidden.shape[0])
        return _cut(super()._stats_forward(_pad(hidden, size), weight, bias, _pad(labels, size), opts, entropy,
                                           log_sum_p2, frozen_head), m)

    def _kl_forward(self, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, opts, ref_opts,
                    direction, frozen_head):
        m, size = hidden.shape[0], _padded(hidden.shape[0])
        return _cut(super()._kl_forward(_pad(hidden, size), weight, bias, _pad(ref_hidden, size), ref_weight,
                                        ref_bias, _pad(labels, size), opts, ref_opts, direction, frozen_head), m)


def _blocked(fn, size: int, args: list, row_args: set[int]) -> list[tuple]:
    """``fn`` on each block of exactly INVARIANT_ROWS rows: the arguments at ``row_args`` (padded to ``size``
    rows) sliced to the block, the others as they are. Returns each call's outputs, in block order."""
    return [fn(*[a[s:s + INVARIANT_ROWS] if (i in row_args and a is not None) else a for i, a in enumerate(args)])
            for s in range(0, size, INVARIANT_ROWS)]


def _blocked_forward(fn, args: list, row_args: set[int]) -> tuple:
    """A forward's outputs (each [M, ...] or None) computed block by block (see ``_blocked``)."""
    m = args[0].shape[0]
    size = _padded(m)
    args = [_pad(a, size) if i in row_args else a for i, a in enumerate(args)]
    return tuple(None if parts[0] is None else torch.cat(parts)[:m]
                 for parts in zip(*_blocked(fn, size, args, row_args)))


def _sum_blocks(parts: list[Tensor | None], like: Tensor | None) -> Tensor | None:
    """Σ parts in float32, in block order, cast to ``like``'s dtype (None when the gradient is not needed)."""
    if like is None or parts[0] is None:
        return None
    total = torch.zeros(parts[0].shape, device=parts[0].device, dtype=torch.float32)
    for p in parts:
        total += p.float()
    return total.to(like.dtype)


class BlockedInvariant(_CanonicalBackward):
    """Another backend made batch-invariant from outside: it only ever sees blocks of exactly INVARIANT_ROWS
    rows (so its own tiling cannot depend on a call's size), and the backward's blocks hold the rows with an
    upstream gradient in canonical order, their weight / bias gradients summed in float32 in that order."""

    def __init__(self, inner):
        self.inner, self.name = inner, inner.name + "+invariant"

    def supports(self, device: torch.device, dtype: torch.dtype | None = None) -> str | None:
        return self.inner.supports(device, dtype)

    def stats_forward(self, hidden, weight, bias, labels, opts, entropy, log_sum_p2):
        return _blocked_forward(self.inner.stats_forward, [hidden, weight, bias, labels, opts, entropy,
                                                           log_sum_p2], {0, 3})

    def stats_forward_frozen(self, hidden, weight, bias, labels, opts, entropy, log_sum_p2):
        return _blocked_forward(self.inner.stats_forward_frozen, [hidden, weight, bias, labels, opts, entropy,
                                                                  log_sum_p2], {0, 3})

    def kl_forward(self, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, opts, ref_opts, direction):
        return _blocked_forward(self.inner.kl_forward, [hidden, weight, bias, ref_hidden, ref_weight, ref_bias,
                                                        labels, opts, ref_opts, direction], {0, 3, 6})

    def kl_forward_frozen(self, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, opts, ref_opts,
                          direction):
        return _blocked_forward(self.inner.kl_forward_frozen, [hidden, weight, bias, ref_hidden, ref_weight,
                                                               ref_bias, labels, opts, ref_opts, direction],
                                {0, 3, 6})

    def _plain(self, name: str):
        return getattr(self.inner, name)

    def _ordered(self, fn, r: _Reordered, args: list, row_args: set[int]) -> tuple:
        """``fn`` block by block: dh concatenated, dW and db summed in float32 in block order."""
        parts = list(zip(*_blocked(fn, r.size, args, row_args)))
        dh = None if parts[0][0] is None else torch.cat(parts[0])
        return dh, _sum_blocks(list(parts[1]), args[1]), _sum_blocks(list(parts[2]), args[2])
