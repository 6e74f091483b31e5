"""Float64 gold computed the naive way (full logits), and the three-way comparison.

gold: float64 end to end. ref: plain torch in the test dtype (logits in that dtype, softmax in float32).
A backend passes when |out − gold| ≤ |ref − gold| + tol elementwise (for gradients the tolerance
also includes 2·max |ref − gold|, since their rounding noise is spread over many summed terms).
"""
from __future__ import annotations

import torch

# (value atol, value rtol, gradient tol relative to max |gold|)
TOLERANCES = {
    torch.float32: (1e-5, 2e-6, 2e-5),
    torch.float16: (1e-3, 1e-3, 2e-3),
    torch.bfloat16: (1e-2, 1e-2, 2e-2),
    torch.float64: (1e-10, 1e-10, 1e-10),
}


def naive_logits(h, w, b, temperature=1.0, softcap=None, dtype=torch.float64):
    """[N, V] logits, computed in `dtype` and returned in float64 (gold) or float32 (ref)."""
    x = h.to(dtype) @ w.to(dtype).T
    if b is not None:
        x = x + b.to(dtype)
    x = x.double() if dtype == torch.float64 else x.float()
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    return x / temperature


def expect(log_w, x):
    """Σ_v exp(log_w_v)·x_v per row, with 0 where log_w = −inf (a banned token: 0·(±inf) counts as 0).

    The masked entries are replaced before the product, so the gradients stay NaN-free as well."""
    keep = log_w > float("-inf")
    zero = torch.zeros_like(x)
    return (torch.where(keep, log_w, zero).exp() * torch.where(keep, x, zero)).sum(-1)


def naive_stats(h, w, b, labels, *, temperature=1.0, softcap=None, ignore_index=-100, dtype=torch.float64):
    """(logp, lse, entropy, log_sum_p2) per row, 0 at ignored rows. h [N, D], labels [N]."""
    z = naive_logits(h, w, b, temperature, softcap, dtype)
    logprobs = torch.log_softmax(z, dim=-1)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    logp = logprobs.gather(1, safe[:, None]).squeeze(1)
    lse = torch.logsumexp(z, dim=-1)
    ent = -expect(logprobs, logprobs)
    p2 = torch.logsumexp(2 * logprobs, dim=-1)
    zero = torch.zeros_like(lse)
    return tuple(torch.where(valid, t, zero) for t in (logp, lse, ent, p2))


def naive_kl(h, w, b, rh, rw, rb, labels, *, direction="forward", temperature=1.0, softcap=None,
             ref_softcap=None, ignore_index=-100, dtype=torch.float64):
    """(kl, logp, ref_logp) per row; logp None without labels."""
    lp = torch.log_softmax(naive_logits(h, w, b, temperature, softcap, dtype), -1)
    lq = torch.log_softmax(naive_logits(rh, rw, rb, temperature, ref_softcap, dtype), -1)
    kl = expect(lq, lq - lp) if direction == "forward" else expect(lp, lp - lq)
    if labels is None:
        return kl, None, None
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    zero = torch.zeros_like(kl)
    pick = lambda t: torch.where(valid, t.gather(1, safe[:, None]).squeeze(1), zero)  # noqa: E731
    return torch.where(valid, kl, zero), pick(lp), pick(lq)


def leaf(x, dtype=None):
    return None if x is None else x.detach().to(dtype or x.dtype).requires_grad_(True)


def grads_of(outputs, upstream, inputs):
    """Gradients of Σ_k <outputs[k], upstream[k]> w.r.t. inputs (None for inputs that are None)."""
    total = sum((o.double() * u.double()).sum() for o, u in zip(outputs, upstream) if o is not None)
    present = [x for x in inputs if x is not None]
    got = iter(torch.autograd.grad(total, present, allow_unused=True))
    return [None if x is None else next(got) for x in inputs]


def assert_three_way(name, out, ref, gold, dtype, *, grad=False):
    atol, rtol, gtol = TOLERANCES[dtype]
    if out is None and gold is None:
        return
    assert out is not None and gold is not None, f"{name}: one of out/gold is None"
    out, ref, gold = out.double(), ref.double(), gold.double()
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    err = (out - gold).abs()
    ref_err = (ref - gold).abs()
    if grad:
        # Gradients sum many rounded terms, and a backend's saved float32 log-sum-exp carries its own
        # rounding (ulp(1e4) ≈ 1e-3 at extreme logits), so allow twice the reference's worst error on top.
        allowed = ref_err + 2 * ref_err.max() + gtol * gold.abs().max() + 1e-12
    else:
        allowed = ref_err + atol + rtol * gold.abs()
    bad = err > allowed
    assert not bad.any(), (
        f"{name}: {int(bad.sum())}/{bad.numel()} elements off; worst |out−gold|={float(err.max()):.3e}, "
        f"|ref−gold| there={float((ref - gold).abs().flatten()[err.argmax()]):.3e}, max|gold|={float(gold.abs().max()):.3e}"
    )
