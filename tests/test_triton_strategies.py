"""The Triton backend's two backward strategies ("gemm", "atomic"): float64 oracle, scratch budget, determinism;
its frozen-head forward (2 GEMMs, 3 with entropy): oracle with small blocks, scratch budget, GEMM count.

The "gemm" runs use a scratch floor of one interpreter tile so that every case is cut into several
row × vocabulary blocks (the accumulation across blocks is what is under test).
"""
from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import test_frozen_head
import test_frozen_kl
import test_token_kl
import test_token_stats
from cases import DEVICE, Case, require_backend
from fastpref import backends
from oracle import assert_three_way, grads_of, leaf, naive_stats

pytest.importorskip("triton")

STATS_CASES = ["bias_ignore", "softcap_temp", "extreme", "wide", "fp16"]
KL_CASES = ["labels_ignore_bias", "softcap_temp", "extreme"]


@pytest.fixture
def triton_backend():
    require_backend("triton")
    b = backends.resolve("triton", DEVICE, torch.float32)
    yield b
    b.backward, b.scratch_floor, b.grad_filter, b.splits = None, None, None, None


def _small_blocks(b, strategy, case: Case | None = None):
    """A scratch floor of one float32 interpreter tile, plus, for a half weight (``case``), the float32 dW
    accumulator of one tile's columns."""
    from fastpref.kernels import presets

    cfg = presets.select("stats_dlogits", torch.float32, DEVICE)
    b.backward = strategy
    extra = 0 if case is None or case.dtype == torch.float32 else cfg.BV * 4 * case.D
    b.scratch_floor = cfg.BN * cfg.BV * 4 + extra if DEVICE.type == "cpu" else None


@pytest.mark.parametrize("strategy,case", [("gemm", c) for c in STATS_CASES]
                         + [("atomic", c) for c in ("softcap_temp", "fp16")])
def test_stats_oracle(triton_backend, strategy, case):
    _small_blocks(triton_backend, strategy, test_token_stats.CASES[case])
    test_token_stats._check("triton", test_token_stats.CASES[case])


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("case", KL_CASES)
def test_kl_oracle_gemm(triton_backend, case, direction):
    c, extra = test_token_kl.CASES[case]
    _small_blocks(triton_backend, "gemm", c)
    test_token_kl._check("triton", c, direction, **extra)


class _Allocations(TorchDispatchMode):
    """Bytes of every tensor an aten op returns (factory functions included)."""

    def __init__(self):
        super().__init__()
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and not t._is_view():
                self.sizes.append(t.untyped_storage().nbytes())
        return out


def test_gemm_scratch_stays_within_budget(triton_backend):
    """Every allocation of the backward is below the stated budget, except the float32 outputs themselves."""
    from fastpref.kernels import gemm_backward
    from fastpref.options import LogitOptions

    _small_blocks(triton_backend, "gemm")
    M, D, V = 200, 24, 1037
    h, w, b, lab = Case(N=M, D=D, V=V, bias=True, seed=60).make()
    opts = LogitOptions()
    _, lse, ent, _ = triton_backend.stats_forward(h, w, b, lab, opts, True, False)
    g = Case(N=M, seed=61).upstream(3)
    g = [x.float() for x in g]
    budget = gemm_backward.scratch_budget(M, V, h.dtype, triton_backend.scratch_floor)
    assert budget == triton_backend.scratch_floor  # the floor dominates 1% of 200·1037·4 bytes
    with _Allocations() as rec:
        dh, dw, db = triton_backend.stats_backward(h, w, b, lab, lse, ent, *g, opts, (True, True, True))
    outputs = {dh.numel() * 4, dw.numel() * 4, db.numel() * 4}
    assert 0 < triton_backend.last_scratch_bytes <= budget
    over = [s for s in rec.sizes if s > budget and s not in outputs]
    assert not over, f"allocations above the {budget}-byte budget: {over}"
    assert max(rec.sizes) < M * V * 4 / 4, "nothing close to the naive logits may be allocated"


def test_gemm_weight_grad_stays_within_budget_at_large_vocab_times_hidden(triton_backend):
    """fp16 head whose float32 [V, D] (4 MiB) is over 10× the budget: the backward reports scratch within the budget,
    allocates nothing above it but the returned gradients, and returns dW in the weight's dtype (written chunk by
    chunk from a float32 [C, D] accumulator inside the scratch, not a float32 [V, D] and a copy)."""
    from fastpref.kernels import gemm_backward, presets
    from fastpref.options import LogitOptions

    if DEVICE.type != "cpu":
        pytest.skip("the interpreter's tile sizes")
    cfg = presets.select("stats_dlogits", torch.float16, DEVICE)
    M, D, V = 200, 256, 4096
    h, w, b, lab = Case(N=M, D=D, V=V, dtype=torch.float16, bias=True, seed=62).make()
    triton_backend.backward = "gemm"
    triton_backend.scratch_floor = (cfg.BN * 2 + 4 * D) * cfg.BV  # one fp16 tile and its columns' float32 dW
    budget = gemm_backward.scratch_budget(M, V, h.dtype, triton_backend.scratch_floor)
    assert budget == triton_backend.scratch_floor and V * D * 4 > 10 * budget
    opts = LogitOptions()
    _, lse, ent, _ = triton_backend.stats_forward(h, w, b, lab, opts, True, False)
    g = [x.float() for x in Case(N=M, seed=63).upstream(3)]
    with _Allocations() as rec:
        dh, dw, db = triton_backend.stats_backward(h, w, b, lab, lse, ent, *g, opts, (True, True, True))
    assert dw.dtype == torch.float16 and dw.shape == (V, D)
    assert 0 < triton_backend.last_scratch_bytes <= budget
    outputs = {dh.numel() * 4, dw.numel() * 2, db.numel() * 4}
    over = [s for s in rec.sizes if s > budget and s not in outputs]
    assert not over, f"allocations above the {budget}-byte budget: {over}"
    ups = Case(N=M, seed=63).upstream(3)
    gold_w, ref_w = leaf(w, torch.float64), leaf(w)
    gold = grads_of(naive_stats(h.double(), gold_w, b.double(), lab)[:3], ups, [gold_w])[0]
    ref = grads_of(naive_stats(h, ref_w, b, lab, dtype=torch.float16)[:3], ups, [ref_w])[0]
    assert_three_way("d_weight", dw, ref, gold, torch.float16, grad=True)


@pytest.mark.parametrize("rows,vocab,elems", [(200, 1037, 64 * 256), (5, 100000, 64 * 256), (100000, 300, 64 * 256),
                                              (10**6, 128256, 2**27), (16384, 128256, 2**27), (7, 9, 10**6)])
@pytest.mark.parametrize("col_extra", [0, 40, 16384])  # none, a small D, D = 8192 in bf16 (float32 dW chunk)
def test_block_shape_respects_budget(rows, vocab, elems, col_extra):
    from fastpref.kernels.gemm_backward import block_shape

    if elems < (64 + col_extra) * 256:
        with pytest.raises(ValueError, match="below one"):
            block_shape(rows, vocab, elems, 64, 256, col_extra)
        return
    r, c = block_shape(rows, vocab, elems, 64, 256, col_extra)
    assert (r + col_extra) * c <= elems and 1 <= r <= rows and 1 <= c <= vocab
    assert r == rows or r % 64 == 0
    assert c == vocab or c % 256 == 0
    with pytest.raises(ValueError, match="below one"):
        block_shape(rows, vocab, (64 + col_extra) * 256 - 1, 64, 256, col_extra)


def _grads(b, seed):
    from fastpref.options import LogitOptions

    h, w, bias, lab = Case(N=90, D=40, V=700, bias=True, softcap=5.0, seed=seed).make()
    opts = LogitOptions(softcap=5.0)
    _, lse, ent, _ = b.stats_forward(h, w, bias, lab, opts, True, False)
    g = [x.float() for x in Case(N=90, seed=seed).upstream(3)]
    return b.stats_backward(h, w, bias, lab, lse, ent, *g, opts, (True, True, True))


def test_deterministic_algorithms(triton_backend):
    """Under torch.use_deterministic_algorithms the gemm backward repeats bit for bit; atomic is refused."""
    _small_blocks(triton_backend, None)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first, second = _grads(triton_backend, 62), _grads(triton_backend, 62)
        for x, y in zip(first, second):
            assert torch.equal(x, y)
        triton_backend.backward = "atomic"
        with pytest.raises(RuntimeError, match="FASTPREF_TRITON_BACKWARD=gemm"):
            _grads(triton_backend, 62)
    finally:
        torch.use_deterministic_algorithms(before)


def test_strategy_from_environment(triton_backend, monkeypatch):
    from fastpref.backends.triton_backend import backward_strategy

    monkeypatch.setenv("FASTPREF_TRITON_BACKWARD", "atomic")
    assert backward_strategy() == "atomic" and backward_strategy("gemm") == "gemm"
    monkeypatch.setenv("FASTPREF_TRITON_BACKWARD", "")
    assert backward_strategy() == "gemm"
    monkeypatch.setenv("FASTPREF_TRITON_BACKWARD", "fast")
    with pytest.raises(ValueError, match="atomic"):
        backward_strategy()


@pytest.mark.parametrize("n_rows", [1, 4, 32, 128, 131, 1000, 1024])
def test_forward_splits_fill_whole_waves(n_rows):
    """The forward's program count on a 132-SM GPU: whole waves, or at least 90 % filled ones."""
    import math

    from fastpref.kernels.launch import whole_waves

    slots, max_splits = 132, 250
    s = whole_waves(n_rows, max_splits, slots)
    assert 1 <= s <= max_splits
    programs = n_rows * s
    fill = programs / (math.ceil(programs / slots) * slots)
    assert fill >= 0.9
    if n_rows * max_splits >= 2 * slots:
        assert programs >= 2 * slots
    smaller = [t for t in range(1, s) if n_rows * t >= 2 * slots
               and n_rows * t / (math.ceil(n_rows * t / slots) * slots) >= 0.9]
    assert not smaller, "the fewest splits that fill the waves"
    assert whole_waves(3, 0, slots) == 1


def test_grad_filter_bounded_and_off_by_default(triton_backend, monkeypatch):
    """CCE-style filtering (atomic strategy): off by default (bitwise the unfiltered result); when on, a
    skipped tile holds no label and only p < eps, so with g_lse = 1 each dropped |dL/dx| < eps:
    |Δ dH[:, d]| ≤ eps·Σ_v |W[v, d]| and |Δ dW[:, d]| ≤ eps·Σ_n |H[n, d]|; a threshold above the small
    probabilities does skip tiles."""
    from fastpref.backends.triton_backend import grad_filter_eps
    from fastpref.options import LogitOptions

    b = triton_backend
    b.backward = "atomic"
    h, w, _, lab = Case(N=64, D=32, V=1037, peaked=True, seed=63).make()
    lab = lab % 200  # labels in the first vocabulary tile: the others hold only small probabilities
    opts = LogitOptions()
    _, lse, _, _ = b.stats_forward(h, w, None, lab, opts, False, False)
    zero, g_lse = torch.zeros_like(lse), torch.ones_like(lse)

    def grads():
        return b.stats_backward(h, w, None, lab, lse, None, zero, g_lse, None, opts, (True, True, False))[:2]

    exact = grads()
    monkeypatch.setenv("FASTPREF_GRAD_FILTER", "off")
    assert all(torch.equal(x, y) for x, y in zip(grads(), exact))
    for eps in (2.0 ** -12, 2.0 ** -4):
        b.grad_filter = eps
        dh, dw = grads()
        assert ((dh - exact[0]).abs() <= eps * w.abs().sum(0) + 1e-6).all()
        assert ((dw - exact[1]).abs() <= eps * h.abs().sum(0) + 1e-6).all()
    assert not torch.equal(dw, exact[1]), "2^-4 is above every probability outside the peaked tile"
    assert grad_filter_eps("auto", torch.bfloat16) == 2.0 ** -12
    with pytest.raises(ValueError, match="auto"):
        grad_filter_eps("-1", torch.float32)
    b.backward = "gemm"
    with pytest.raises(ValueError, match="atomic"):
        grads()


# ---- frozen head: stats_forward_frozen ------------------------------------------------------------------
FROZEN_CASES = {**{k: test_frozen_head.CASES[k] for k in ("bias_ignore", "softcap_temp", "extreme", "odd", "fp16")},
                "row_blocks": Case(N=300, D=40, V=700, bias=True, softcap=5.0, ignore_frac=0.2, seed=90)}


def _small_frozen_blocks(b):
    """Blocks of ROW_ALIGN rows × one interpreter tile of columns (fp32, two products and two weight tiles: the
    KL's, and the stats' with entropy), and at least three chunks."""
    from fastpref.kernels import frozen_forward, presets

    cfg = presets.select("stats_frozen", torch.float32, DEVICE)
    if DEVICE.type == "cpu":
        b.scratch_floor = max(cfg.BN, frozen_forward.ROW_ALIGN) * cfg.BV * frozen_forward.element_bytes(
            torch.float32, 2, 2)
        b.splits = 3


@pytest.mark.parametrize("case", list(FROZEN_CASES))
def test_frozen_oracle_small_blocks(triton_backend, case, monkeypatch):
    """Values and hidden-state gradients against float64 gold, the accumulators carried across row blocks and
    vocabulary chunks (rescaled as the running max moves), no vocabulary backward."""
    _small_frozen_blocks(triton_backend)
    test_frozen_head._no_vocabulary_backward(monkeypatch, "triton")
    test_frozen_head._check("triton", FROZEN_CASES[case], ("logp", "lse", "entropy"))


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("case", ["plain", "labels_ignore_bias", "softcap_temp", "ref_wider", "extreme", "odd_vocab",
                                  "fp16", "row_blocks"])
def test_frozen_kl_oracle_small_blocks(triton_backend, case, direction, monkeypatch):
    """token_kl with a frozen policy head: test_frozen_kl's oracle check with several row blocks and chunks."""
    _small_frozen_blocks(triton_backend)
    monkeypatch.setitem(test_token_kl.CASES, "row_blocks", (
        Case(N=300, D=40, V=700, bias=True, softcap=5.0, ignore_frac=0.2, seed=93),
        dict(labels=True, ref_D=56, ref_softcap=4.0, ref_bias=True)))
    test_frozen_kl.test_frozen_policy_head_hidden_grad("triton", case, direction, monkeypatch)


@pytest.mark.parametrize("op", ["stats", "kl_forward", "kl_reverse"])
def test_frozen_scratch_stays_within_budget(triton_backend, op):
    """Every allocation of a frozen forward is within the stated budget, far below the naive logits."""
    from fastpref.kernels import gemm_backward
    from fastpref.options import LogitOptions

    _small_frozen_blocks(triton_backend)
    M, D, V = 300, 24, 3000
    h, w, b, lab = Case(N=M, D=D, V=V, bias=True, seed=91).make()
    rh, rw, rb, _ = Case(N=M, D=D + 8, V=V, bias=True, seed=92).make()
    budget = gemm_backward.scratch_budget(M, V, h.dtype, triton_backend.scratch_floor)
    assert budget == triton_backend.scratch_floor  # the floor dominates 1% of 300·3000·4 bytes
    opts = LogitOptions()
    with _Allocations() as rec:
        if op == "stats":
            out = triton_backend.stats_forward_frozen(h, w, b, lab, opts, True, True)
        else:
            out = triton_backend.kl_forward_frozen(h, w, b, rh, rw, rb, lab, opts, opts, op[3:])
    assert 0 < triton_backend.last_scratch_bytes <= budget
    over = [s for s in rec.sizes if s > budget]
    assert not over, f"allocations above the {budget}-byte budget: {over}"
    assert max(rec.sizes) < M * V * 4 / 4, "nothing close to the naive logits may be allocated"
    assert all(torch.isfinite(x).all() for x in out)


class _Products(TorchFunctionMode):
    """FLOPs (2·m·n·k) of every matrix product called through torch (a function mode, not a dispatch mode: the
    eager path runs under it, and its products inside the backend's forward are seen)."""

    NAMES = {"mm", "addmm", "bmm", "baddbmm", "addbmm", "matmul", "__matmul__", "__rmatmul__", "mv", "addmv", "dot",
             "linear", "einsum", "tensordot", "inner", "outer", "_scaled_mm"}

    def __init__(self):
        super().__init__()
        self.flops: list[int] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        name = name[:-1] if name.endswith("_") and not name.endswith("__") else name  # addmm_ → addmm
        if name in self.NAMES:
            assert name in ("mm", "addmm"), f"an unexpected product: {name}"
            a, b = (args[0], args[1]) if name == "mm" else (args[1], args[2])
            self.flops.append(2 * a.shape[0] * a.shape[1] * b.shape[1])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("op", ["stats", "stats_entropy", "kl_forward", "kl_reverse"])
def test_frozen_forward_backward_is_two_gemms(triton_backend, op, monkeypatch):
    """Forward + backward of a frozen head: matrix products of exactly 2·(2·N·D·V) FLOPs (3· with entropy),
    2 (3) per block of rows × vocabulary chunk, one epilogue launch per block and no other Triton kernel.
    token_kl with a frozen policy head: 2 per model, 2·N·V·(3·D + Dr) FLOPs (Dr: the reference's hidden size)."""
    import fastpref
    from fastpref.kernels import launch

    _small_frozen_blocks(triton_backend)
    if DEVICE.type != "cpu":
        pytest.skip("the interpreter's small blocks")
    M, D, Dr, V = 300, 24, 40, 1037
    h, w, b, lab = Case(N=M, D=D, V=V, bias=True, softcap=4.0, seed=92).make()
    rh, rw, rb, _ = Case(N=M, D=Dr, V=V, bias=True, seed=94).make()
    entropy = op == "stats_entropy"
    launches = []
    real = launch.launch
    monkeypatch.setattr(launch, "launch", lambda kernel, *a, **k: (
        launches.append((kernel, k.get("r0"), k.get("c0"), k.get("R", 0) * k.get("C", 0))), real(kernel, *a, **k)))
    hh = h.clone().requires_grad_()
    with _Products() as rec:
        if op.startswith("stats"):
            st = fastpref.token_stats(hh, w, lab, bias=b, softcap=4.0, entropy=entropy, backend="triton")
            loss = st.logp.sum() + 0.5 * st.lse.sum() + (st.entropy.sum() if entropy else 0.0)
        else:
            out = fastpref.token_kl(hh, w, rh, rw, lab, bias=b, ref_bias=rb, softcap=4.0, direction=op[3:],
                                    backend="triton")
            loss = out.kl.sum() + 0.5 * out.logp.sum()
        loss.backward()
    kernel = "stats_frozen" if op.startswith("stats") else "kl_frozen"
    products = {"stats": 2, "stats_entropy": 3}.get(op, 4)
    flops = {"stats": 2 * 2 * M * D * V, "stats_entropy": 3 * 2 * M * D * V}.get(op, 2 * M * V * (3 * D + Dr))
    assert {k for k, *_ in launches} == {kernel}
    assert sum(n for *_, n in launches) == M * V, "the epilogue launches tile the rows × vocabulary once"
    assert len({r0 for _, r0, _, _ in launches}) > 1 and len({c0 for _, _, c0, _ in launches}) > 2
    assert len(rec.flops) == products * len(launches)
    assert sum(rec.flops) == flops
    assert torch.isfinite(hh.grad).all()
