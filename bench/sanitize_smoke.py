"""Small forward+backward calls of every backend, for compute-sanitizer (memcheck, racecheck).

    python bench/sanitize_smoke.py [--device cuda|cpu] [--smallest]

Odd shapes so that every boundary mask runs; a bias with -inf entries (banned tokens), softcap, ignored rows,
and upstream gradients that are expanded (stride 0, from ``.sum()``) as well as random; a trainable and a
frozen head (whose forwards also accumulate E_p[W]); the native backend with small tiles (16 rows × 256
vocabulary entries: partial row blocks and several chunks, not one whole tile). --smallest: one
dtype, one small shape and the Triton backend only (racecheck is slow). On a CPU (the GPU check's dry run)
the Triton backend runs under the interpreter, in float32.
"""
from __future__ import annotations

import argparse

import torch

import fastpref
import fastpref.backends


def run(device: torch.device, dtype: torch.dtype, backends: list[str], N: int, D: int, V: int) -> None:
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, D, generator=g).to(device, dtype).requires_grad_()
    w = (torch.randn(V, D, generator=g) / D ** 0.5).to(device, dtype).requires_grad_()
    b = torch.randn(V, generator=g)
    b[::97] = float("-inf")
    b = b.to(device, dtype).requires_grad_()
    rh = torch.randn(N, D - 8, generator=g).to(device, dtype)
    rw = torch.randn(V, D - 8, generator=g).to(device, dtype)
    y = torch.randint(0, V, (N,), generator=g).to(device)
    y[::5] = -100
    up = torch.randn(N, generator=g).to(device)
    for backend in backends:
        if backend == "native":
            getattr(fastpref.backends.resolve("native", device, dtype), device.type).set_tiling(16, 256)
        for weight, bias in ((w, b), (w.detach(), b.detach())):  # trainable, then frozen head
            st = fastpref.token_stats(h, weight, y, bias=bias, softcap=20.0, entropy=True, log_sum_p2=True,
                                      backend=backend)
            (st.logp.sum() + (st.lse * up).sum() + st.entropy.sum()).backward()
            for direction in ("forward", "reverse"):
                kl = fastpref.token_kl(h, weight, rh, rw, y, bias=bias, direction=direction, backend=backend)
                (kl.kl.sum() + (kl.logp * up).sum()).backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        print(f"ok {backend} {dtype} N={N} D={D} V={V}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--smallest", action="store_true", help="one dtype, one small shape, the Triton backend only")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    backends = fastpref.available_backends(device)
    if a.smallest:
        backends = [b for b in backends if b == "triton"] or backends[:1]
    cpu = device.type == "cpu"
    dtypes = [torch.float32] if cpu or a.smallest else [torch.float32, torch.bfloat16]
    shape = (11, 24, 100) if cpu else (19, 40, 300) if a.smallest else (37, 72, 1001)
    for dtype in dtypes:
        run(device, dtype, backends, *shape)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
