"""Small forward+backward calls of the Triton and native backends, for compute-sanitizer (memcheck, racecheck).

    python bench/sanitize_smoke.py [--device cuda|cpu] [--smallest]

Odd shapes so that every boundary mask runs; a bias with -inf entries (banned tokens), softcap, ignored rows,
and upstream gradients that are expanded (stride 0, from ``.sum()``) as well as random; a trainable and a
frozen head (whose forwards also accumulate E_p[W]). Every multi-block path runs: the native backend with
small tiles (16 rows × 256 vocabulary entries: partial row blocks and several chunks), the Triton backend with
its forward split over the vocabulary (3 splits), a scratch floor that cuts the gemm backward into several row
blocks × vocabulary chunks (the float32 dW chunk accumulator carried over row blocks) and the frozen forward
into several row blocks × chunks (the accumulators' rescale as the running max moves), on 300 rows (more than
two 128-row blocks). --smallest: one dtype and a smaller shape, still both the Triton and the native backend
(racecheck is slow; the native epilogues' __syncthreads reductions are what it checks). On a CPU (the GPU
check's dry run) the Triton backend runs under the interpreter, in float32.
"""
from __future__ import annotations

import argparse

import torch

import fastpref
import fastpref.backends

# Scratch floors (bytes) that force several blocks at these shapes (budget = the floor: 1 % of the naive
# logits is smaller): the gemm backward (block ≥ BN × BV plus the dW accumulator's columns) gets about 128 rows,
# the frozen forward (block ≥ 128 × 256 of up to 16 bytes per element) 128 rows × 256 columns.
GEMM_FLOOR = 96 << 10
FROZEN_FLOOR = 512 << 10


def _force_blocks(impl, frozen: bool) -> None:
    """Triton: vocabulary splits and a small scratch floor, so multi-block offsets and rescales run."""
    impl.splits = 3
    impl.scratch_floor = FROZEN_FLOOR if frozen else GEMM_FLOOR


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
        impl = fastpref.backends.resolve(backend, device, dtype)
        if backend == "native":
            getattr(impl, device.type).set_tiling(16, 256)
        for weight, bias in ((w, b), (w.detach(), b.detach())):  # trainable, then frozen head
            if backend == "triton":
                _force_blocks(impl, frozen=not weight.requires_grad)
            st = fastpref.token_stats(h, weight, y, bias=bias, softcap=20.0, temperature=0.7, entropy=True,
                                      log_sum_p2=True, backend=backend)
            (st.logp.sum() + (st.lse * up).sum() + st.entropy.sum()).backward()
            for direction in ("forward", "reverse"):
                kl = fastpref.token_kl(h, weight, rh, rw, y, bias=bias, direction=direction, backend=backend)
                (kl.kl.sum() + (kl.logp * up).sum()).backward()
        if backend == "triton":
            impl.splits = impl.scratch_floor = None
        if device.type == "cuda":
            torch.cuda.synchronize()
        print(f"ok {backend} {dtype} N={N} D={D} V={V}", flush=True)


def device_and_flag(argv, doc: str, flag: str, help: str) -> tuple[torch.device, bool]:
    """The GPU check scripts' command line: --device cuda|cpu and one size flag."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument(flag, action="store_true", help=help)
    a = p.parse_args(argv)
    return torch.device(a.device), getattr(a, flag.lstrip("-"))


def main(argv=None) -> int:
    device, smallest = device_and_flag(argv, __doc__, "--smallest", "one dtype, a smaller shape (Triton and native)")
    backends = [b for b in fastpref.available_backends(device) if b in ("triton", "native")]
    cpu = device.type == "cpu"
    dtypes = [torch.float32] if cpu else [torch.bfloat16] if smallest else [torch.float32, torch.bfloat16]
    shape = (150, 24, 600) if cpu else (140, 40, 700) if smallest else (300, 72, 1001)
    for dtype in dtypes:
        run(device, dtype, backends, *shape)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
