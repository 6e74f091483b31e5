"""The readable specification: vocabulary-chunked PyTorch with an online log-sum-exp.

Logits exist only one [rows × chunk] tile at a time (float32); the backward recomputes tiles.
Extra memory: a few tiles plus float32 copies of hidden and of the gradients' accumulators.
"""
from __future__ import annotations

import torch

from ..options import LogitOptions
from .base import Tensor

TILE_ELEMENTS = 1 << 22  # float32 elements per logits tile (16 MiB)
VOCAB_CHUNK = 4096


def _blocks(total: int, size: int):
    for start in range(0, total, size):
        yield start, min(start + size, total)


def _tiling(rows: int, vocab: int) -> tuple[int, int]:
    chunk = min(vocab, VOCAB_CHUNK)
    return max(1, min(rows, TILE_ELEMENTS // chunk)), chunk


def logits_tile(h: Tensor, w: Tensor, b: Tensor | None, opts: LogitOptions) -> tuple[Tensor, Tensor | None]:
    """z = cap(h·wᵀ + b)/T in float32 for one tile, and dz/dx (None when it is the constant 1/T)."""
    x = h @ w.float().T
    if b is not None:
        x = x + b.float()
    if opts.softcap is None:
        return (x / opts.temperature if opts.temperature != 1.0 else x), None
    c = torch.tanh(x / opts.softcap)
    return c * (opts.softcap / opts.temperature), (1.0 - c * c) / opts.temperature


def weighted(e: Tensor, x: Tensor) -> Tensor:
    """e·x with 0 where e = 0: a banned token (−inf bias) has e = 0 and x = ±inf or NaN there."""
    return torch.where(e > 0, e * x, torch.zeros_like(x))


class OnlineLogSumExp:
    """Running max m and s = Σ exp(z − m) per row, over vocabulary tiles.

    With ``entropy``: t = Σ exp(z − m)·(z − m), so H = log s − t/s.
    With ``square``: s2 = Σ exp(2(z − m)), so log Σ p² = log s2 − 2·log s.
    """

    def __init__(self, rows: int, device: torch.device, entropy: bool = False, square: bool = False):
        f32 = dict(device=device, dtype=torch.float32)
        self.m = torch.full((rows,), -float("inf"), **f32)
        self.s = torch.zeros(rows, **f32)
        self.t = torch.zeros(rows, **f32) if entropy else None
        self.s2 = torch.zeros(rows, **f32) if square else None

    def update(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Fold in a tile z [rows, chunk]; returns exp(z − m_new) and the rescale factor exp(m_old − m_new)
        for callers that accumulate further sums weighted by this softmax."""
        m_new = torch.maximum(self.m, z.amax(dim=1))
        first = torch.isinf(self.m)
        shift = torch.where(first, torch.zeros_like(m_new), self.m - m_new)  # ≤ 0
        scale = torch.exp(shift)
        # while every logit so far is −inf (banned tokens) subtract 0, not −inf: exp(−inf − (−inf)) is NaN
        base = torch.where(torch.isneginf(m_new), torch.zeros_like(m_new), m_new)[:, None]
        e = torch.exp(z - base)
        if self.t is not None:
            self.t = (self.t + shift * self.s) * scale + weighted(e, z - base).sum(1)
        if self.s2 is not None:
            self.s2 = self.s2 * scale * scale + (e * e).sum(1)
        self.s = self.s * scale + e.sum(1)
        self.m = m_new
        self.shift = shift
        return e, scale

    def lse(self) -> Tensor:
        return self.m + torch.log(self.s)

    def entropy(self) -> Tensor:
        return torch.log(self.s) - self.t / self.s

    def log_sum_p2(self) -> Tensor:
        return torch.log(self.s2) - 2.0 * torch.log(self.s)


class ExpectedWeight:
    """Frozen heads (fastpref._frozen): per row A = Σ e^{z−m}·(dz/dx)·W and, with ``entropy``,
    T = Σ e^{z−m}·(z − m)·(dz/dx)·W, float32 [rows, D], rescaled as the running max m of an OnlineLogSumExp moves."""

    def __init__(self, rows: int, dim: int, device: torch.device, entropy: bool):
        self.a = torch.zeros(rows, dim, device=device, dtype=torch.float32)
        self.t = torch.zeros(rows, dim, device=device, dtype=torch.float32) if entropy else None

    def update(self, lse: OnlineLogSumExp, e: Tensor, scale: Tensor, z: Tensor, dzdx: Tensor | float,
               w: Tensor) -> None:
        """After lse.update(z) returned (e, scale): fold in the tile with weight rows w [chunk, D] (float32)."""
        ed = e * dzdx
        if self.t is not None:
            d = torch.where(e > 0, z - lse.m[:, None], torch.zeros_like(z))  # 0 where z = −inf
            self.t = (self.t + lse.shift[:, None] * self.a) * scale[:, None] + (ed * d) @ w
        self.a = self.a * scale[:, None] + ed @ w

    def expectations(self, lse: OnlineLogSumExp) -> tuple[Tensor, Tensor | None]:
        """(EA, EC): E_p[(dz/dx)·W] and E_p[(log p + H)·(dz/dx)·W] = (T − (t/s)·A)/s."""
        inv_s = (1.0 / lse.s)[:, None]
        ec = None if self.t is None else (self.t - (lse.t / lse.s)[:, None] * self.a) * inv_s
        return self.a * inv_s, ec


class KLExpectations:
    """token_kl with a frozen policy head (fastpref._frozen), per row, float32 [rows, D], with s = dz/dx:
    A = Σ e^{z−m}·s·W; direction "forward": Aq = Σ e^{z_ref−m_ref}·s·W; "reverse": B = Σ e^{z−m}·(d − μ)·s·W
    with d = z − z_ref and μ = cross/Σe^{z−m} the running mean of d under p, re-centred as μ moves
    (B gains (μ_old − μ_new)·A), so that E_p[(d − E_p[d])·s·W] is never a difference of large terms."""

    def __init__(self, rows: int, dim: int, device: torch.device, direction: str):
        f32 = dict(device=device, dtype=torch.float32)
        self.a = torch.zeros(rows, dim, **f32)
        self.aq = torch.zeros(rows, dim, **f32) if direction == "forward" else None
        self.b = torch.zeros(rows, dim, **f32) if direction == "reverse" else None
        self.mu = torch.zeros(rows, **f32)

    def update(self, pol: OnlineLogSumExp, e_pol: Tensor, scale_pol: Tensor, e_ref: Tensor, scale_ref: Tensor,
               cross: Tensor, d: Tensor, dzdx: Tensor | float, w: Tensor) -> None:
        """After both models' OnlineLogSumExp.update and the cross term's update: fold in one tile
        (e_* [rows, chunk], d = z − z_ref [rows, chunk], w the policy's weight rows [chunk, D] float32)."""
        ed = e_pol * dzdx
        self.a = self.a * scale_pol[:, None]
        if self.b is not None:
            mu = torch.where(pol.s > 0, cross / pol.s, torch.zeros_like(cross))
            self.b = self.b * scale_pol[:, None] + (self.mu - mu)[:, None] * self.a + weighted(ed, d - mu[:, None]) @ w
            self.mu = mu
        self.a = self.a + ed @ w
        if self.aq is not None:
            self.aq = self.aq * scale_ref[:, None] + (e_ref * dzdx) @ w

    def results(self, pol: OnlineLogSumExp, ref: OnlineLogSumExp) -> tuple[Tensor, Tensor]:
        """(dKL, EA): ∂KL/∂h and E_p[s·W]."""
        ea = self.a / pol.s[:, None]
        dkl = ea - self.aq / ref.s[:, None] if self.aq is not None else self.b / pol.s[:, None]
        return dkl, ea


def _gather_label(z: Tensor, labels: Tensor, start: int) -> Tensor:
    """z[row, labels[row] − start] where the label falls inside this tile, else 0."""
    local = labels - start
    inside = (local >= 0) & (local < z.shape[1])
    picked = z.gather(1, local.clamp(0, z.shape[1] - 1)[:, None]).squeeze(1)
    return torch.where(inside, picked, torch.zeros_like(picked))


def _add_label(dz: Tensor, labels: Tensor, start: int, grad: Tensor) -> None:
    """dz[row, labels[row] − start] += grad[row] where the label falls inside this tile (no host sync)."""
    local = labels - start
    inside = (local >= 0) & (local < dz.shape[1])
    dz.scatter_add_(1, local.clamp(0, dz.shape[1] - 1)[:, None],
                    torch.where(inside, grad, torch.zeros_like(grad))[:, None])


class _GradAccumulator:
    """float32 accumulators for dH [M, D], and per vocabulary chunk dW [chunk, D] and db [chunk]."""

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Tensor | None, needs: tuple[bool, bool, bool]):
        self.needs = needs
        self.dh = torch.zeros(hidden.shape, device=hidden.device, dtype=torch.float32) if needs[0] else None
        self.dw = torch.empty_like(weight) if needs[1] else None
        self.db = torch.empty_like(bias) if (needs[2] and bias is not None) else None

    def start_chunk(self, w: Tensor) -> None:
        self.dw_c = torch.zeros(w.shape, device=w.device, dtype=torch.float32) if self.dw is not None else None
        self.db_c = torch.zeros(w.shape[0], device=w.device, dtype=torch.float32) if self.db is not None else None

    def add(self, dx: Tensor, h: Tensor, w: Tensor, r0: int, r1: int) -> None:
        """Fold in one tile: dx [rows, chunk], h [rows, D] and w [chunk, D], all float32."""
        if self.dh is not None:
            self.dh[r0:r1] += dx @ w
        if self.dw_c is not None:
            self.dw_c += dx.T @ h
        if self.db_c is not None:
            self.db_c += dx.sum(0)

    def end_chunk(self, c0: int, c1: int) -> None:
        if self.dw is not None:
            self.dw[c0:c1] = self.dw_c
        if self.db is not None:
            self.db[c0:c1] = self.db_c

    def result(self) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        return self.dh, self.dw, self.db


class TorchBackend:
    name = "torch"

    def supports(self, device: torch.device, dtype: torch.dtype | None = None) -> str | None:
        return None

    def tiling(self, rows: int, vocab: int) -> tuple[int, int]:
        """(rows per block, vocabulary chunk) of the logits tiles for ``rows`` rows and ``vocab`` entries."""
        return _tiling(rows, vocab)

    # ---- single model: log-prob, log-sum-exp, entropy, log Σp² -------------------------------
    def stats_forward(self, hidden, weight, bias, labels, opts, entropy, log_sum_p2):
        return self._stats_forward(hidden, weight, bias, labels, opts, entropy, log_sum_p2, False)[:4]

    def stats_forward_frozen(self, hidden, weight, bias, labels, opts, entropy, log_sum_p2):
        return self._stats_forward(hidden, weight, bias, labels, opts, entropy, log_sum_p2, True)

    def _stats_forward(self, hidden, weight, bias, labels, opts, entropy, log_sum_p2, frozen_head):
        M, V = hidden.shape[0], weight.shape[0]
        rows, chunk = self.tiling(M, V)
        h32 = hidden.float()
        out = {k: torch.empty(M, device=hidden.device, dtype=torch.float32) for k in ("logp", "lse", "ent", "p2")}
        f32 = dict(device=hidden.device, dtype=torch.float32)
        ea = torch.empty(M, hidden.shape[1], **f32) if frozen_head else None
        ec = torch.empty(M, hidden.shape[1], **f32) if frozen_head and entropy else None
        for r0, r1 in _blocks(M, rows):
            acc = OnlineLogSumExp(r1 - r0, hidden.device, entropy=entropy, square=log_sum_p2)
            expect = ExpectedWeight(r1 - r0, hidden.shape[1], hidden.device, entropy) if frozen_head else None
            z_label = torch.zeros(r1 - r0, **f32)
            for c0, c1 in _blocks(V, chunk):
                w = weight[c0:c1]
                z, dzdx = logits_tile(h32[r0:r1], w, None if bias is None else bias[c0:c1], opts)
                e, scale = acc.update(z)
                if expect is not None:
                    expect.update(acc, e, scale, z, 1.0 / opts.temperature if dzdx is None else dzdx, w.float())
                z_label += _gather_label(z, labels[r0:r1], c0)
            lse = acc.lse()
            out["lse"][r0:r1] = lse
            out["logp"][r0:r1] = z_label - lse
            if entropy:
                out["ent"][r0:r1] = acc.entropy()
            if log_sum_p2:
                out["p2"][r0:r1] = acc.log_sum_p2()
            if expect is not None:
                a, c = expect.expectations(acc)
                ea[r0:r1] = a
                if ec is not None:
                    ec[r0:r1] = c
        return (out["logp"], out["lse"], out["ent"] if entropy else None, out["p2"] if log_sum_p2 else None,
                ea, ec)

    def stats_backward(self, hidden, weight, bias, labels, lse, entropy, grad_logp, grad_lse, grad_entropy,
                       opts, needs):
        M, V = hidden.shape[0], weight.shape[0]
        rows, chunk = self.tiling(M, V)
        zero = torch.zeros(M, device=hidden.device, dtype=torch.float32)
        g_logp = zero if grad_logp is None else grad_logp
        coef = (zero if grad_lse is None else grad_lse) - g_logp
        h32 = hidden.float()
        grads = _GradAccumulator(hidden, weight, bias, needs)
        for c0, c1 in _blocks(V, chunk):
            w = weight[c0:c1].float()  # once per chunk, not per row block
            b = None if bias is None else bias[c0:c1]
            grads.start_chunk(w)
            for r0, r1 in _blocks(M, rows):
                z, dzdx = logits_tile(h32[r0:r1], w, b, opts)
                logp_all = z - lse[r0:r1, None]
                p = torch.exp(logp_all)
                dz = p * coef[r0:r1, None]
                if grad_entropy is not None:
                    dz -= grad_entropy[r0:r1, None] * weighted(p, logp_all + entropy[r0:r1, None])
                _add_label(dz, labels[r0:r1], c0, g_logp[r0:r1])
                dx = dz * dzdx if dzdx is not None else dz / opts.temperature
                grads.add(dx, h32[r0:r1], w, r0, r1)
            grads.end_chunk(c0, c1)
        return grads.result()

    # ---- two models: full-vocabulary KL ---------------------------------------------------------
    def kl_forward(self, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, opts, ref_opts,
                   direction):
        return self._kl_forward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, opts, ref_opts,
                                direction, False)[:5]

    def kl_forward_frozen(self, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, opts, ref_opts,
                          direction):
        return self._kl_forward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, opts, ref_opts,
                                direction, True)

    def _kl_forward(self, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, opts, ref_opts,
                    direction, frozen_head):
        M, V, D = hidden.shape[0], weight.shape[0], hidden.shape[1]
        rows, chunk = self.tiling(M, V)
        h32, rh32 = hidden.float(), ref_hidden.float()
        f32 = dict(device=hidden.device, dtype=torch.float32)
        kl, lse_out, ref_lse_out = (torch.empty(M, **f32) for _ in range(3))
        logp = torch.empty(M, **f32) if labels is not None else None
        ref_logp = torch.empty(M, **f32) if labels is not None else None
        dkl = torch.empty(M, D, **f32) if frozen_head else None
        ea = torch.empty(M, D, **f32) if frozen_head and labels is not None else None
        for r0, r1 in _blocks(M, rows):
            pol = OnlineLogSumExp(r1 - r0, hidden.device)
            ref = OnlineLogSumExp(r1 - r0, hidden.device)
            cross = torch.zeros(r1 - r0, **f32)  # Σ e^{z_src − m_src}(z_src − z_other), src = weighting model
            expect = KLExpectations(r1 - r0, D, hidden.device, direction) if frozen_head else None
            z_label = torch.zeros(r1 - r0, **f32)
            rz_label = torch.zeros(r1 - r0, **f32)
            for c0, c1 in _blocks(V, chunk):
                w = weight[c0:c1]
                z, dzdx = logits_tile(h32[r0:r1], w, None if bias is None else bias[c0:c1], opts)
                rz, _ = logits_tile(rh32[r0:r1], ref_weight[c0:c1],
                                    None if ref_bias is None else ref_bias[c0:c1], ref_opts)
                e_pol, scale_pol = pol.update(z)
                e_ref, scale_ref = ref.update(rz)
                if direction == "forward":
                    cross = cross * scale_ref + weighted(e_ref, rz - z).sum(1)
                else:
                    cross = cross * scale_pol + weighted(e_pol, z - rz).sum(1)
                if expect is not None:
                    expect.update(pol, e_pol, scale_pol, e_ref, scale_ref, cross, z - rz,
                                  1.0 / opts.temperature if dzdx is None else dzdx, w.float())
                if labels is not None:
                    z_label += _gather_label(z, labels[r0:r1], c0)
                    rz_label += _gather_label(rz, labels[r0:r1], c0)
            lse, ref_lse = pol.lse(), ref.lse()
            # KL(a‖b) = Σ a (z_a − z_b)/Σ a − lse_a + lse_b; the lse difference is formed from the maxima first.
            if direction == "forward":
                kl[r0:r1] = cross / ref.s - (ref.m - pol.m) - (torch.log(ref.s) - torch.log(pol.s))
            else:
                kl[r0:r1] = cross / pol.s - (pol.m - ref.m) - (torch.log(pol.s) - torch.log(ref.s))
            lse_out[r0:r1], ref_lse_out[r0:r1] = lse, ref_lse
            if labels is not None:
                logp[r0:r1] = z_label - lse
                ref_logp[r0:r1] = rz_label - ref_lse
            if expect is not None:
                dkl[r0:r1], a = expect.results(pol, ref)
                if ea is not None:
                    ea[r0:r1] = a
        return kl, lse_out, ref_lse_out, logp, ref_logp, dkl, ea

    def kl_backward(self, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, lse, ref_lse, kl,
                    grad_kl, grad_logp, opts, ref_opts, direction, needs):
        M, V = hidden.shape[0], weight.shape[0]
        rows, chunk = self.tiling(M, V)
        h32, rh32 = hidden.float(), ref_hidden.float()
        zero = torch.zeros(M, device=hidden.device, dtype=torch.float32)
        g_kl = zero if grad_kl is None else grad_kl
        g_logp = zero if (grad_logp is None or labels is None) else grad_logp
        grads = _GradAccumulator(hidden, weight, bias, needs)
        for c0, c1 in _blocks(V, chunk):
            w = weight[c0:c1].float()  # once per chunk, not per row block
            grads.start_chunk(w)
            for r0, r1 in _blocks(M, rows):
                z, dzdx = logits_tile(h32[r0:r1], w, None if bias is None else bias[c0:c1], opts)
                rz, _ = logits_tile(rh32[r0:r1], ref_weight[c0:c1],
                                    None if ref_bias is None else ref_bias[c0:c1], ref_opts)
                logp_all = z - lse[r0:r1, None]
                ref_logp_all = rz - ref_lse[r0:r1, None]
                p = torch.exp(logp_all)
                if direction == "forward":
                    dz = g_kl[r0:r1, None] * (p - torch.exp(ref_logp_all))
                else:
                    dz = g_kl[r0:r1, None] * weighted(p, logp_all - ref_logp_all - kl[r0:r1, None])
                dz -= g_logp[r0:r1, None] * p
                if labels is not None:
                    _add_label(dz, labels[r0:r1], c0, g_logp[r0:r1])
                dx = dz * dzdx if dzdx is not None else dz / opts.temperature
                grads.add(dx, h32[r0:r1], w, r0, r1)
            grads.end_chunk(c0, c1)
        return grads.result()
