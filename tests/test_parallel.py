"""Vocabulary-parallel heads with 2 gloo processes on CPU match the single-process full-vocabulary result."""
from __future__ import annotations

import contextlib
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastpref
from cases import require_backend
from fastpref.parallel import vocab_parallel_token_kl, vocab_parallel_token_stats

WORLD = 2
N, D, V = 29, 16, 83  # V odd: unequal slices


def _data():
    g = torch.Generator().manual_seed(7)
    h = torch.randn(N, D, generator=g)
    w = torch.randn(V, D, generator=g) / 3
    b = torch.randn(V, generator=g)
    rh = torch.randn(N, D + 4, generator=g)
    rw = torch.randn(V, D + 4, generator=g) / 3
    y = torch.randint(0, V, (N,), generator=g)
    y[::4] = -100
    ups = torch.randn(4, N, generator=g)
    return h, w, b, rh, rw, y, ups


@contextlib.contextmanager
def _gloo(rank: int, port: int):
    """This process as rank ``rank`` of a WORLD-process gloo group on localhost, destroyed on exit."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _bounds(rank):
    cut = V // 2 + 3
    return (0, cut) if rank == 0 else (cut, V)


def _stats_loss(st, ups):
    return (st.logp * ups[0] + st.lse * ups[1] + st.entropy * ups[2]).sum()


def _worker(rank, port, backend, results):
    with _gloo(rank, port):
        h, w, b, rh, rw, y, ups = _data()
        s, e = _bounds(rank)
        hh = h.clone().requires_grad_()
        ws, bs = w[s:e].clone().requires_grad_(), b[s:e].clone().requires_grad_()
        st = vocab_parallel_token_stats(hh, ws, y, vocab_range=(s, e), bias=bs, entropy=True, log_sum_p2=True,
                                        softcap=4.0, backend=backend)
        _stats_loss(st, ups).backward()
        out = {"logp": st.logp, "lse": st.lse, "entropy": st.entropy, "p2": st.log_sum_p2, "dh": hh.grad,
               "dw": ws.grad, "db": bs.grad}
        for direction in ("forward", "reverse"):
            hk = h.clone().requires_grad_()
            wk = w[s:e].clone().requires_grad_()
            kl = vocab_parallel_token_kl(hk, wk, rh, rw[s:e], y, vocab_range=(s, e), direction=direction,
                                         backend=backend)
            (kl.kl * ups[3] + kl.logp * ups[0]).sum().backward()
            out.update({f"kl_{direction}": kl.kl, f"kl_logp_{direction}": kl.logp,
                        f"kl_ref_logp_{direction}": kl.ref_logp, f"kl_dh_{direction}": hk.grad,
                        f"kl_dw_{direction}": wk.grad})
        results[rank] = {k: v.detach().clone() for k, v in out.items()}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("backend", ["torch"])
def test_vocab_parallel_matches_full(backend):
    ctx = mp.get_context("spawn")
    manager = ctx.Manager()
    results = manager.dict()
    mp.start_processes(_worker, args=(_free_port(), backend, results), nprocs=WORLD, start_method="spawn")
    h, w, b, rh, rw, y, ups = _data()
    hh, ww, bb = (x.clone().requires_grad_() for x in (h, w, b))
    st = fastpref.token_stats(hh, ww, y, bias=bb, entropy=True, log_sum_p2=True, softcap=4.0, backend="torch")
    _stats_loss(st, ups).backward()
    for rank in range(WORLD):
        r = results[rank]
        s, e = _bounds(rank)
        close = lambda a, b_: torch.testing.assert_close(a, b_, atol=2e-5, rtol=2e-5)  # noqa: E731
        close(r["logp"], st.logp), close(r["lse"], st.lse), close(r["entropy"], st.entropy)
        close(r["p2"], st.log_sum_p2), close(r["dh"], hh.grad)
        close(r["dw"], ww.grad[s:e]), close(r["db"], bb.grad[s:e])
        for direction in ("forward", "reverse"):
            hk, wk = h.clone().requires_grad_(), w.clone().requires_grad_()
            kl = fastpref.token_kl(hk, wk, rh, rw, y, direction=direction, backend="torch")
            (kl.kl * ups[3] + kl.logp * ups[0]).sum().backward()
            close(r[f"kl_{direction}"], kl.kl), close(r[f"kl_logp_{direction}"], kl.logp)
            close(r[f"kl_ref_logp_{direction}"], kl.ref_logp)
            close(r[f"kl_dh_{direction}"], hk.grad), close(r[f"kl_dw_{direction}"], wk.grad[s:e])


def _sums_worker(rank, port, names, results):
    """Every output's plain .sum(): autograd hands the backward expanded (stride-0) upstream gradients."""
    with _gloo(rank, port):
        h, w, b, rh, rw, y, _ = _data()
        y = y.clamp(min=0)  # no ignored rows: their scatter would hand the backward a contiguous gradient
        s, e = _bounds(rank)
        out = {}
        for name in names:
            hh = h.clone().requires_grad_()
            ws, bs = w[s:e].clone().requires_grad_(), b[s:e].clone().requires_grad_()
            st = vocab_parallel_token_stats(hh, ws, y, vocab_range=(s, e), bias=bs, entropy=True, log_sum_p2=True,
                                            backend=name)
            (st.logp.sum() + st.lse.sum() + st.entropy.sum() + st.log_sum_p2.sum()).backward()
            out.update({f"{name}_dh": hh.grad, f"{name}_dw": ws.grad, f"{name}_db": bs.grad})
            for direction in ("forward", "reverse"):
                hk, wk = h.clone().requires_grad_(), w[s:e].clone().requires_grad_()
                kl = vocab_parallel_token_kl(hk, wk, rh, rw[s:e], y, vocab_range=(s, e), direction=direction,
                                             backend=name)
                (kl.kl.sum() + kl.logp.sum() + kl.ref_logp.sum()).backward()
                out.update({f"{name}_kl_dh_{direction}": hk.grad, f"{name}_kl_dw_{direction}": wk.grad})
        results[rank] = {k: v.detach().clone() for k, v in out.items()}


def test_vocab_parallel_sums_of_outputs_on_triton_and_native():
    """``out.sum()`` gives stride-0 upstream gradients; the kernels must read them as [M] vectors."""
    names = ["triton", "native"]
    for name in names:
        require_backend(name)
    results = mp.get_context("spawn").Manager().dict()
    mp.start_processes(_sums_worker, args=(_free_port(), names, results), nprocs=WORLD, start_method="spawn")
    h, w, b, rh, rw, y, _ = _data()
    y = y.clamp(min=0)
    hh, ww, bb = (x.clone().requires_grad_() for x in (h, w, b))
    st = fastpref.token_stats(hh, ww, y, bias=bb, entropy=True, backend="torch")
    (st.logp.sum() + st.lse.sum() + st.entropy.sum()).backward()
    want = {"dh": hh.grad, "dw": ww.grad, "db": bb.grad}
    for direction in ("forward", "reverse"):
        hk, wk = h.clone().requires_grad_(), w.clone().requires_grad_()
        kl = fastpref.token_kl(hk, wk, rh, rw, y, direction=direction, backend="torch")
        (kl.kl.sum() + kl.logp.sum()).backward()
        want.update({f"kl_dh_{direction}": hk.grad, f"kl_dw_{direction}": wk.grad})
    for rank in range(WORLD):
        s, e = _bounds(rank)
        for name in names:
            for key, full in want.items():
                local = full if "dh" in key else full[s:e]
                torch.testing.assert_close(results[rank][f"{name}_{key}"], local, atol=1e-4, rtol=1e-4,
                                           msg=lambda m: f"{name} rank {rank} {key}: {m}")


def _banned_worker(rank, port, results):
    """Rank 1's whole vocabulary slice is banned (−inf bias in both models): its partials are −inf/NaN."""
    with _gloo(rank, port):
        h, w, b, rh, rw, y, ups = _banned_data()
        s, e = _bounds(rank)
        hh = h.clone().requires_grad_()
        st = vocab_parallel_token_stats(hh, w[s:e], y, vocab_range=(s, e), bias=b[s:e], entropy=True,
                                        log_sum_p2=True, backend="torch")
        _stats_loss(st, ups).backward()
        out = {"logp": st.logp, "lse": st.lse, "entropy": st.entropy, "p2": st.log_sum_p2, "dh": hh.grad}
        for direction in ("forward", "reverse"):
            hk = h.clone().requires_grad_()
            kl = vocab_parallel_token_kl(hk, w[s:e], rh, rw[s:e], y, vocab_range=(s, e), bias=b[s:e],
                                         ref_bias=b[s:e], direction=direction, backend="torch")
            (kl.kl * ups[3] + kl.logp * ups[0]).sum().backward()
            out.update({f"kl_{direction}": kl.kl, f"kl_dh_{direction}": hk.grad})
        results[rank] = {k: v.detach().clone() for k, v in out.items()}


def _banned_data():
    h, w, b, rh, rw, y, ups = _data()
    cut = _bounds(1)[0]
    b = b.clone()
    b[cut:] = float("-inf")
    return h, w, b, rh, rw, torch.where(y >= cut, y % cut, y), ups


def test_vocab_parallel_rank_with_every_token_banned():
    """A slice with no probability mass contributes nothing (not NaN) to the combined results."""
    results = mp.get_context("spawn").Manager().dict()
    mp.start_processes(_banned_worker, args=(_free_port(), results), nprocs=WORLD, start_method="spawn")
    h, w, b, rh, rw, y, ups = _banned_data()
    hh = h.clone().requires_grad_()
    st = fastpref.token_stats(hh, w, y, bias=b, entropy=True, log_sum_p2=True, backend="torch")
    _stats_loss(st, ups).backward()
    want = {"logp": st.logp, "lse": st.lse, "entropy": st.entropy, "p2": st.log_sum_p2, "dh": hh.grad}
    for direction in ("forward", "reverse"):
        hk = h.clone().requires_grad_()
        kl = fastpref.token_kl(hk, w, rh, rw, y, bias=b, ref_bias=b, direction=direction, backend="torch")
        (kl.kl * ups[3] + kl.logp * ups[0]).sum().backward()
        want.update({f"kl_{direction}": kl.kl, f"kl_dh_{direction}": hk.grad})
    for rank in range(WORLD):
        for key, full in want.items():
            assert torch.isfinite(results[rank][key]).all(), f"rank {rank} {key}"
            torch.testing.assert_close(results[rank][key], full.detach(), atol=2e-5, rtol=2e-5)


def _fsdp_worker(rank, port, results):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    with _gloo(rank, port):
        h, w, _, _, _, y, ups = _data()
        head = torch.nn.Linear(D, V, bias=False)
        with torch.no_grad():
            head.weight.copy_(w)
        fully_shard(head, mesh=init_device_mesh("cpu", (WORLD,)))
        assert type(head.weight).__name__ == "DTensor"
        hh = h.clone().requires_grad_()
        logp = fastpref.token_logprobs(hh, head.weight, y, backend="torch")  # the DTensor goes in as it is
        (logp * ups[0]).sum().backward()
        results[rank] = {"logp": logp.detach(), "dh": hh.grad, "dw": head.weight.grad.full_tensor()}


def test_fsdp2_sharded_head_is_gathered_inside_the_op():
    ctx = mp.get_context("spawn")
    results = ctx.Manager().dict()
    mp.start_processes(_fsdp_worker, args=(_free_port(), results), nprocs=WORLD, start_method="spawn")
    h, w, _, _, _, y, ups = _data()
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    logp = fastpref.token_logprobs(hh, ww, y, backend="torch")
    (logp * ups[0]).sum().backward()
    for rank in range(WORLD):
        r = results[rank]
        torch.testing.assert_close(r["logp"], logp.detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(r["dh"], hh.grad, atol=1e-5, rtol=1e-5)
        # FSDP2 averages gradients over ranks; both ranks saw the same batch, so the mean equals one rank's
        torch.testing.assert_close(r["dw"], ww.grad, atol=1e-5, rtol=1e-5)
