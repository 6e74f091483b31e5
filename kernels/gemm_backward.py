"""GEMM backward (strategy "gemm"), host side: the scratch plan and the float32-accumulating products.

Stage 1 (a Triton kernel, ``stats_dlogits`` or ``kl_dlogits``) writes dL/dx of one block of rows × vocabulary
into a scratch buffer in the input dtype; stage 2 runs
    dH[r] += dZ·W[c],   dW[c] += dZᵀ·H[r],   db[c] += Σ_rows dZ
as GEMMs (cuBLAS through torch.addmm, float32 output and accumulation; tensor cores for fp16/bf16).
No atomics: the result is the same bit for bit on every run (cuBLAS itself is deterministic given the
workspace setting torch.use_deterministic_algorithms asks for). float32 products run in IEEE float32 even
where the user enabled TF32 globally (``ieee_float32``), as the Triton kernels' dots do.

Scratch memory: one [R, C] block in the input dtype and, for a half weight, a float32 [C, D] accumulator of
the vocabulary chunk's dW (written to dW, in the weight's dtype, once per chunk),
(R·itemsize + 4·D)·C ≤ budget, where
    budget = max(256 MiB, 1% of the naive logits M·V·itemsize)
so the scratch stays a fixed, small fraction of what materialized logits would take, at any V·D (no float32
[V, D] weight gradient is formed). The block keeps whole
rows (R = M) when M·min(V, √E) fits (E = budget / itemsize elements), otherwise it is about √E × √E;
the accumulated output is read and written once per block along the other axis.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import Callable, Iterator

import torch

SCRATCH_FLOOR = 256 << 20  # bytes
SCRATCH_FRACTION = 100  # the budget is at least 1/SCRATCH_FRACTION of the naive logits


def scratch_budget(rows: int, vocab: int, dtype: torch.dtype, floor: int | None = None) -> int:
    """Bytes the scratch block may take: max(floor (256 MiB), rows·vocab·itemsize / 100)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return max(SCRATCH_FLOOR if floor is None else floor, rows * vocab * itemsize // SCRATCH_FRACTION)


def block_shape(rows: int, vocab: int, elems: int, bn: int, bv: int, col_extra: int = 0) -> tuple[int, int]:
    """(R, C) with (R + col_extra)·C ≤ elems: R a multiple of bn (or all rows), C a multiple of bv (or the whole
    vocabulary). col_extra: elements per vocabulary column that the scratch holds besides the block (the gemm
    backward's float32 dW chunk accumulator, D·4/itemsize).

    Raises ValueError when elems cannot hold one bn × bv tile (with its extra)."""
    if elems < (bn + col_extra) * bv:
        raise ValueError(f"scratch budget of {elems} elements is below one {bn}x{bv} tile"
                         + (f" plus {col_extra} elements per column" if col_extra else ""))
    side = math.isqrt(elems)
    r = min(rows, max(side, elems // vocab))
    r = rows if r == rows else max(bn, r // bn * bn)
    if (r + col_extra) * bv > elems:  # leave room for at least one bv-wide column block
        r = max(bn, (elems // bv - col_extra) // bn * bn)
    c = min(vocab, elems // (r + col_extra))
    c = vocab if c == vocab else max(bv, c // bv * bv)
    while (r + col_extra) * c > elems:  # rounding up to one tile can overshoot only through r = rows
        r = max(bn, (r - 1) // bn * bn)
    return r, c


_DTYPE_OUT_OK: dict[tuple[str, torch.dtype], bool] = {}
_WARNED: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def _probe_dtype_out(device: torch.device, dtype: torch.dtype) -> bool:
    """Run mm and addmm with out_dtype=float32 (aten::mm.dtype_out / addmm.dtype_out, CUDA in torch ≥ 2.9) on
    tiny operands, addmm into its own input, and compare with float32 products (exact at these sizes)."""
    a = torch.arange(12, device=device, dtype=torch.float32).reshape(3, 4).to(dtype)
    b = torch.ones(4, 2, device=device, dtype=dtype)
    acc = torch.ones(3, 2, device=device, dtype=torch.float32)
    torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    prod = torch.empty(3, 2, device=device, dtype=torch.float32)
    torch.mm(a, b.t().contiguous().t(), out_dtype=torch.float32, out=prod)  # as w[c]ᵀ: a transposed view
    want = a.float() @ b.float()
    return bool(torch.equal(acc, 1 + want)) and bool(torch.equal(prod, want))


def _dtype_out_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether fp16/bf16 products may go to cuBLAS with a float32 output (else their operands are upcast).

    The probe's verdict is kept only when it is final: it ran and was right (True), or torch lacks the overload
    or gave a wrong result (False). A failure that may pass later (out of memory, a deterministic-mode cuBLAS
    workspace error, …) falls back for this call only and probes again next time. Never probed during CUDA-graph
    capture (its comparison would synchronise and break the capture): the call falls back and the next eager call
    probes. Each fallback is said once per reason."""
    key = (device.type, dtype)
    if key in _DTYPE_OUT_OK:
        return _DTYPE_OUT_OK[key]
    if device.type != "cuda":
        _DTYPE_OUT_OK[key] = False  # a CUDA-only overload: CPU products upcast
        return False
    where = f"{dtype} products with a float32 output"
    if torch.cuda.is_current_stream_capturing():
        _warn_once(f"capture:{dtype}", f"fastpref: {where} were not probed during CUDA-graph capture; this capture "
                   "upcasts them to float32 (slower, above the scratch budget); run one step eagerly first")
        return False
    try:
        ok = _probe_dtype_out(device, dtype)
    except (TypeError, NotImplementedError) as e:  # torch without the dtype_out overloads
        ok, why = False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    except RuntimeError as e:  # maybe transient: not cached
        _warn_once(f"transient:{dtype}:{type(e).__name__}", f"fastpref: probing {where} failed ({type(e).__name__}: "
                   f"{str(e).splitlines()[0] if str(e) else ''}); this call upcasts them to float32 (slower, above "
                   "the scratch budget) and the next call probes again")
        return False
    else:
        why = "wrong result"
    _DTYPE_OUT_OK[key] = ok
    if not ok:
        _warn_once(f"final:{dtype}", f"fastpref: this torch cannot run {where} ({why}); they are upcast to float32 "
                   "(slower, above the scratch budget)")
    return ok


@contextlib.contextmanager
def ieee_float32() -> Iterator[None]:
    """Exact (IEEE) float32 cuBLAS products inside, whatever the user chose globally (TF32 through
    torch.backends.cuda.matmul.allow_tf32, set_float32_matmul_precision("high"), HF Trainer's tf32=True): the
    Triton kernels use IEEE float32 dots, and TF32 logits would cost float32 inputs about 1e-2 in log-probs.
    The user's setting is restored on exit, through the same API as it reads (the per-backend
    ``fp32_precision`` where torch has it, so that no legacy/new API mix is created). The setting is
    process-wide: another thread's float32 matmuls during the call run without TF32 too."""
    matmul = torch.backends.cuda.matmul
    new_api = hasattr(matmul, "fp32_precision")
    prev = matmul.fp32_precision if new_api else torch._C._get_cublas_allow_tf32()
    if prev in ("ieee", False):
        yield
        return
    if new_api:
        matmul.fp32_precision = "ieee"
    else:
        torch._C._set_cublas_allow_tf32(False)
    try:
        yield
    finally:
        if new_api:
            matmul.fp32_precision = prev
        else:
            torch._C._set_cublas_allow_tf32(prev)


def mm_accumulate(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a·b; acc float32 [m, n], a [m, k] and b [k, n] of one dtype; float32 accumulation.

    fp16/bf16 go through cuBLAS with a float32 output (aten::addmm.dtype_out) where torch has it, else are
    upcast first (CPU, older torch)."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif _dtype_out_works(a.device, a.dtype):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.float(), b.float())


def mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out = a·b; out float32 [m, n], a [m, k] and b [k, n] of one dtype; float32 accumulation (as mm_accumulate,
    through aten::mm.dtype_out for fp16/bf16 where torch has it)."""
    if a.dtype == torch.float32:
        torch.mm(a, b, out=out)
    elif _dtype_out_works(a.device, a.dtype):
        torch.mm(a, b, out_dtype=torch.float32, out=out)
    else:
        torch.mm(a.float(), b.float(), out=out)


def run(stage1: Callable[[torch.Tensor, int, int, int, int], None], hidden: torch.Tensor, weight: torch.Tensor,
        dh: torch.Tensor | None, dw: torch.Tensor | None, db: torch.Tensor | None, budget: int,
        bn: int, bv: int) -> int:
    """Accumulate into dh [M, D] and db [V] (float32) and write dw [V, D] (the weight's dtype), each may be None,
    block by block.

    stage1(dz, r0, c0, R, C) fills dz [R, C] (input dtype) with dL/dx of rows r0.. and columns c0...
    The weight gradient is formed one vocabulary chunk at a time: over the chunk's row blocks into a float32
    [C, D] accumulator (dw's own rows when dw is float32), then rounded once into dw. The accumulator is part of
    the scratch, so no [V, D] float32 tensor exists at any V·D. Returns the scratch size in bytes (≤ budget)."""
    M, V, D = hidden.shape[0], weight.shape[0], hidden.shape[1]
    itemsize = hidden.element_size()
    chunk_acc = dw is not None and dw.dtype != torch.float32
    R, C = block_shape(M, V, budget // itemsize, bn, bv, -(-4 * D // itemsize) if chunk_acc else 0)
    scratch = torch.empty(R * C, device=hidden.device, dtype=hidden.dtype)
    acc = torch.empty(C * D, device=hidden.device, dtype=torch.float32) if chunk_acc else None
    with ieee_float32():
        _run_blocks(stage1, hidden, weight, dh, dw, db, scratch, acc, R, C)
    return scratch.numel() * itemsize + (0 if acc is None else acc.numel() * 4)


def _run_blocks(stage1: Callable[[torch.Tensor, int, int, int, int], None], hidden: torch.Tensor,
                weight: torch.Tensor, dh: torch.Tensor | None, dw: torch.Tensor | None, db: torch.Tensor | None,
                scratch: torch.Tensor, acc: torch.Tensor | None, R: int, C: int) -> None:
    """``run``'s loop over vocabulary chunks × row blocks: scratch [R·C] in the input dtype, acc the float32
    [C·D] dW chunk accumulator (None when dw is float32 or absent)."""
    M, V, D = hidden.shape[0], weight.shape[0], hidden.shape[1]
    chunk_acc = acc is not None
    for c0 in range(0, V, C):
        cn = min(C, V - c0)
        dw_c = None if dw is None else acc[: cn * D].view(cn, D) if chunk_acc else dw[c0:c0 + cn]
        for r0 in range(0, M, R):
            rn = min(R, M - r0)
            dz = scratch[: rn * cn].view(rn, cn)
            stage1(dz, r0, c0, rn, cn)
            if dh is not None:
                mm_accumulate(dh[r0:r0 + rn], dz, weight[c0:c0 + cn])
            if dw_c is not None:
                (mm_into if r0 == 0 else mm_accumulate)(dw_c, dz.t(), hidden[r0:r0 + rn])
            if db is not None:
                db[c0:c0 + cn] += dz.sum(0, dtype=torch.float32)
        if chunk_acc:
            dw[c0:c0 + cn].copy_(dw_c)
