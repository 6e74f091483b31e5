"""Sequence reductions: padded sums, packed (cu_seqlens) segment sums, LD-DPO partial sums."""
import torch

from _ref import gen

import fastpref.losses as L


def test_masked_sums_ignores_masked_garbage():
    g = gen(1)
    lp = -torch.rand(3, 5, generator=g)
    m = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    lp_bad = torch.where(m.bool(), lp, torch.tensor(float("nan")))
    s, n = L.masked_sums(lp_bad.to(torch.bfloat16), m)
    assert s.dtype == torch.float32 and n.tolist() == [3, 5, 0]
    exp = [sum(float(lp.to(torch.bfloat16)[b, t]) for t in range(5) if m[b, t]) for b in range(3)]
    torch.testing.assert_close(s, torch.tensor(exp), rtol=1e-6, atol=1e-6)
    s2, n2 = L.masked_sums(lp)
    torch.testing.assert_close(s2, lp.sum(-1)) and None
    assert n2.tolist() == [5, 5, 5]


def test_packed_sums_match_padded_and_have_gradient():
    g = gen(2)
    lens = [3, 1, 0, 5, 2]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    n_tok = int(cu[-1]) + 2  # two trailing pad tokens must be ignored
    lp = (-torch.rand(n_tok, generator=g, dtype=torch.float64)).requires_grad_()
    mask = torch.rand(n_tok, generator=g) > 0.3
    s, n = L.packed_sums(lp, cu, mask)
    exp_s = [sum(lp[t] * mask[t] for t in range(int(cu[i]), int(cu[i + 1]))) for i in range(len(lens))]
    exp_n = [int(mask[int(cu[i]):int(cu[i + 1])].sum()) for i in range(len(lens))]
    torch.testing.assert_close(s, torch.stack([torch.as_tensor(e, dtype=torch.float64) for e in exp_s]))
    assert n.tolist() == exp_n
    (gr,) = torch.autograd.grad(s.sum(), lp)
    in_seq = torch.arange(n_tok) < int(cu[-1])
    torch.testing.assert_close(gr, (mask & in_seq).double())
    s1, n1 = L.packed_sums(lp.detach()[None], cu)  # [1, N] input, no mask
    assert n1.tolist() == lens


def test_ld_dpo_partial_sums_and_pipeline():
    g = gen(3)
    lp_w, lp_l = -torch.rand(4, 8, generator=g, dtype=torch.float64), -torch.rand(4, 8, generator=g, dtype=torch.float64)
    m_w = torch.tensor([[0, 1, 1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0], [0, 0, 1, 1, 1, 1, 1, 1], [1] * 8])
    m_l = torch.tensor([[1, 1, 0, 0, 0, 0, 0, 0], [0, 1, 1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1] + [0] * 5])
    s = L.ld_dpo_shared_lengths(m_w, m_l)
    assert s.tolist() == [2, 2, 6, 3]
    sh, tl = L.ld_dpo_partial_sums(lp_w, m_w, s)
    for b in range(4):
        idx = [t for t in range(8) if m_w[b, t]]
        torch.testing.assert_close(sh[b], sum(lp_w[b, t] for t in idx[: s[b]]) + 0.0 * lp_w[b, 0])
        torch.testing.assert_close(tl[b], sum((lp_w[b, t] for t in idx[s[b]:]), torch.tensor(0.0, dtype=torch.float64)))
    torch.testing.assert_close(sh + tl, L.masked_sums(lp_w, m_w)[0])
    # ld_alpha = 1 recovers DPO on the full sums
    parts = {}
    for name, lp, m in (("chosen", lp_w, m_w), ("rejected", lp_l, m_l)):
        for pre, x in (("", lp), ("ref_", lp * 0.9)):
            parts[f"{pre}{name}_shared_logps"], parts[f"{pre}{name}_tail_logps"] = L.ld_dpo_partial_sums(x, m, s)
    full = {f"{pre}{n}_logps": L.masked_sums(x, m)[0] for n, lp, m in (("chosen", lp_w, m_w), ("rejected", lp_l, m_l))
            for pre, x in (("", lp), ("ref_", lp * 0.9))}
    torch.testing.assert_close(L.ld_dpo(**parts, ld_alpha=1.0), L.sigmoid(**full))
