"""One bf16 problem with N·V ≥ 2^31 on the GPU backends, checked on sampled rows and columns against float64.

    python bench/large_case.py [--device cuda|cpu] [--tiny]

N = 16384 tokens, V = 131072, D = 4096 (N·V = 2^31): any int32 offset over [N, V] (a row times the vocabulary,
a block base, a program id) overflows here and nowhere in the test suite. For each backend (Triton, native;
trainable and frozen head) forward and backward of Σ g·logp run on the whole problem; then
- logp and lse of 64 sampled rows, and dL/dh of those rows (it depends on its own row only), against float64
  gold on those rows and against plain torch in bf16 (three-way: |ours − gold| ≤ |torch − gold| + tol);
- dL/dW at 64 sampled vocabulary columns (a sum over every row) against float64 gold, whose log-sum-exp is
  formed over all rows in chunks.
--tiny: the same plumbing at N = 300, V = 1001, D = 40 in float32 (the GPU check's dry run on a CPU).
Prints one line per check; exits 1 when any fails.
"""
from __future__ import annotations

import os
import sys

import torch

import fastpref

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sanitize_smoke import device_and_flag  # noqa: E402 (a sibling script, run as a file)

SAMPLES = 64


def _gold_lse(h: torch.Tensor, w: torch.Tensor, rows: int = 1024) -> torch.Tensor:
    """Float64 log-sum-exp of every row of h·wᵀ [N], in row chunks (never [N, V] at once)."""
    w64 = w.double()
    return torch.cat([torch.logsumexp(h[r:r + rows].double() @ w64.T, dim=1) for r in range(0, h.shape[0], rows)])


def _three_way(name: str, ours: torch.Tensor, ref: torch.Tensor, gold: torch.Tensor, rel_tol: float) -> bool:
    err, ref_err = (ours.detach().double() - gold).abs(), (ref.detach().double() - gold).abs()
    allowed = ref_err + 2 * ref_err.max() + rel_tol * gold.abs().max()
    ok = bool(torch.isfinite(ours).all()) and bool((err <= allowed).all())
    print(f"{'ok' if ok else 'FAILED'} {name}: max|ours-gold| {float(err.max()):.3e}, "
          f"max|torch-gold| {float(ref_err.max()):.3e}, max|gold| {float(gold.abs().max()):.3e}", flush=True)
    return ok


def check(backend: str, frozen: bool, h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, g: torch.Tensor,
          rows: torch.Tensor, cols: torch.Tensor, gold_lse: torch.Tensor) -> bool:
    """One backend on the whole problem (h [N, D], w [V, D] in the test dtype, labels y [N], upstream g [N]
    float64); its values and gradients at the sampled rows / columns (int64 [64] each) against float64 gold and
    torch in the input dtype. gold_lse: float64 [N]."""
    hh = h.detach().clone().requires_grad_()
    ww = w.detach().clone().requires_grad_(not frozen)
    st = fastpref.token_stats(hh, ww, y, backend=backend)
    (st.logp.double() * g).sum().backward()
    tag = f"{backend}{' frozen' if frozen else ''} N={h.shape[0]} V={w.shape[0]} D={h.shape[1]} {h.dtype}"
    w64 = w.double()
    z = h[rows].double() @ w64.T  # gold on the sampled rows [S, V]
    lse = torch.logsumexp(z, 1)
    p = torch.exp(z - lse[:, None])
    logp = z.gather(1, y[rows, None]).squeeze(1) - lse
    dh = g[rows, None] * (w64[y[rows]] - p @ w64)
    zr = (h[rows] @ w.T).float()  # plain torch in the input dtype, softmax in float32
    ref_lse = torch.logsumexp(zr, 1)
    ref_logp = zr.gather(1, y[rows, None]).squeeze(1) - ref_lse
    ref_dh = (g[rows, None] * (w[y[rows]].double() - torch.softmax(zr, 1).double() @ w64)).to(h.dtype)
    ok = _three_way(f"{tag} logp", st.logp[rows], ref_logp, logp, 1e-6)
    ok &= _three_way(f"{tag} lse", st.lse[rows], ref_lse, lse, 1e-6)
    ok &= _three_way(f"{tag} dL/dh", hh.grad[rows], ref_dh, dh, 2e-2 if h.dtype != torch.float32 else 2e-5)
    if not frozen:  # dW[c] = Σ_n g_n·([c = y_n] − p_nc)·h_n over every row
        pc = torch.exp(h.double() @ w64[cols].T - gold_lse[:, None])
        dz = g[:, None] * ((y[:, None] == cols[None, :]).double() - pc)
        dw = dz.T @ h.double()
        ref_dw = (dz.T.to(h.dtype) @ h).double()  # the same dL/dx rounded to the input dtype, bf16 product
        ok &= _three_way(f"{tag} dL/dW", ww.grad[cols], ref_dw, dw, 2e-2 if h.dtype != torch.float32 else 2e-5)
    return ok


def main(argv=None) -> int:
    device, tiny = device_and_flag(argv, __doc__, "--tiny", "N=300, V=1001, D=40, float32 (dry run)")
    N, V, D, dtype = (300, 1001, 40, torch.float32) if tiny else (16384, 131072, 4096, torch.bfloat16)
    gen = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(N, D, device=device, generator=gen).to(dtype)
    w = (torch.randn(V, D, device=device, generator=gen) / D ** 0.5 * 4).to(dtype)  # logits of std 4
    y = torch.randint(0, V, (N,), device=device, generator=gen)
    g = torch.randn(N, device=device, generator=gen, dtype=torch.float64)
    rows = torch.randperm(N, device=device, generator=gen)[:SAMPLES]
    rows[0] = N - 1  # the last row: the largest offsets
    cols = torch.randperm(V, device=device, generator=gen)[:SAMPLES]
    cols[0], cols[1] = V - 1, y[N - 1]  # the last column, and a label column
    gold_lse = _gold_lse(h, w)
    ok = True
    for backend in [b for b in fastpref.available_backends(device) if b in ("triton", "native")]:
        for frozen in (False, True):
            ok &= check(backend, frozen, h, w, y, g, rows, cols, gold_lse)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
