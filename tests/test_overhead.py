"""Per-call overhead: nothing heavy imported on a plain first call; the sync-free (masking) row path."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fastpref
from fastpref import _rows

from cases import BACKENDS, DEVICE, Case, require_backend
from oracle import assert_three_way, grads_of, leaf, naive_kl, naive_stats

HERE = Path(__file__).resolve().parent

FIRST_CALL = textwrap.dedent("""
    import sys
    import torch
    import fastpref
    from fastpref.nn import PreferenceLoss
    h = torch.randn(4, 6, 8, requires_grad=True)
    w = torch.randn(50, 8, requires_grad=True)
    y = torch.randint(0, 50, (4, 6))
    y[:, :2] = -100
    st = fastpref.token_stats(h, w, y, entropy=True)
    kl = fastpref.token_kl(h, w, h.detach(), w.detach(), y)
    out = PreferenceLoss("sigmoid")(h, w, y, ref_logps=torch.zeros(4))
    (st.logp.sum() + st.entropy.sum() + kl.kl.sum() + out.loss).backward()
    print(fastpref.backends.name_for_op("auto", h.device, h.dtype))
    print(",".join(m for m in ("torch._dynamo", "torch.distributed.tensor", "deepspeed") if m in sys.modules))
""")


@pytest.mark.parametrize("backend", BACKENDS)
def test_first_call_imports_nothing_heavy(backend):
    """A fresh interpreter's first forward + backward on plain tensors loads neither torch._dynamo (torch's
    custom-op dispatch would import it) nor torch.distributed.tensor (the DTensor check) nor DeepSpeed."""
    require_backend(backend)
    env = dict(os.environ, FASTPREF_BACKEND=backend,
               PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", FIRST_CALL], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    used, loaded = proc.stdout.splitlines()[-2:]
    assert used == backend
    assert loaded == "", f"imported on the first call: {loaded}"


def _stats_both_paths(backend: str, c: Case):
    h, w, b, labels = c.make()
    ups = c.upstream(2)
    ups.append(torch.randn(1, dtype=torch.float64, device=DEVICE).expand(c.N))  # an expanded upstream gradient
    runs = {}
    for sync_free in (False, True):
        hh, ww, bb = leaf(h), leaf(w), leaf(b)
        st = fastpref.token_stats(hh, ww, labels, bias=bb, softcap=c.softcap, entropy=True, log_sum_p2=True,
                                  backend=backend, sync_free=sync_free)
        outs = (st.logp, st.lse, st.entropy)
        runs[sync_free] = (*outs, st.log_sum_p2, *grads_of(outs, ups, (hh, ww, bb)))
    return (h, w, b, labels, ups), runs


@pytest.mark.parametrize("backend", BACKENDS)
def test_sync_free_matches_compacting_stats(backend):
    require_backend(backend)
    c = Case(N=41, D=24, V=97, bias=True, softcap=6.0, ignore_frac=0.4, seed=31)
    (h, w, b, labels, ups), runs = _stats_both_paths(backend, c)
    for name, compact, masked in zip(("logp", "lse", "entropy", "p2", "dh", "dw", "db"), runs[False], runs[True]):
        torch.testing.assert_close(masked, compact, rtol=1e-5, atol=1e-6, msg=name)
    # and against the float64 gold, three-way as the other tests
    gold_in = [leaf(x, torch.float64) for x in (h, w, b)]
    ref_in = [leaf(x) for x in (h, w, b)]
    gold = naive_stats(*gold_in, labels, softcap=c.softcap)
    ref = naive_stats(*ref_in, labels, softcap=c.softcap, dtype=torch.float32)
    for i, name in enumerate(("logp", "lse", "entropy", "p2")):
        assert_three_way(name, runs[True][i], ref[i], gold[i], c.dtype)
    g_gold, g_ref = grads_of(gold[:3], ups, gold_in), grads_of(ref[:3], ups, ref_in)
    for name, out, r, g in zip(("dh", "dw", "db"), runs[True][4:], g_ref, g_gold):
        assert_three_way(name, out, r, g, c.dtype, grad=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sync_free_matches_compacting_kl(backend):
    require_backend(backend)
    c = Case(N=29, D=16, V=83, bias=True, ignore_frac=0.5, seed=32)
    h, w, b, labels = c.make()
    rh, rw, rb, _ = Case(N=29, D=20, V=83, bias=True, seed=33).make()
    ups = c.upstream(2)
    runs = {}
    for sync_free in (False, True):
        hh, ww, bb = leaf(h), leaf(w), leaf(b)
        out = fastpref.token_kl(hh, ww, rh, rw, labels, bias=bb, ref_bias=rb, direction="reverse",
                                backend=backend, sync_free=sync_free)
        runs[sync_free] = (out.kl, out.logp, out.ref_logp, *grads_of((out.kl, out.logp), ups, (hh, ww, bb)))
    for compact, masked in zip(runs[False], runs[True]):
        torch.testing.assert_close(masked, compact, rtol=1e-5, atol=1e-6)
    gold = naive_kl(*(x.double() for x in (h, w, b, rh, rw, rb)), labels, direction="reverse")
    ref = naive_kl(h, w, b, rh, rw, rb, labels, direction="reverse", dtype=torch.float32)
    for i in range(3):
        assert_three_way(f"kl[{i}]", runs[True][i], ref[i], gold[i], c.dtype)


def test_sync_free_never_counts_rows(monkeypatch):
    """The masking path does not call the host-synchronising compaction, and the env variable selects it."""
    def boom(*_):
        raise AssertionError("valid_rows synchronises with the device")

    h, w, _, labels = Case(N=12, D=8, V=30, ignore_frac=0.5, seed=34).make()
    expected = fastpref.token_logprobs(h, w, labels, backend="torch")
    monkeypatch.setattr(_rows, "valid_rows", boom)
    torch.testing.assert_close(fastpref.token_logprobs(h, w, labels, backend="torch", sync_free=True), expected)
    monkeypatch.setenv("FASTPREF_SYNC_FREE", "1")
    torch.testing.assert_close(fastpref.token_logprobs(h, w, labels, backend="torch"), expected)
    with pytest.raises(AssertionError, match="synchronises"):
        fastpref.token_logprobs(h, w, labels, backend="torch", sync_free=False)  # the argument wins
    with pytest.raises(TypeError, match="sync_free"):
        fastpref.token_logprobs(h, w, labels, sync_free="yes")


@pytest.mark.parametrize("backend", BACKENDS)
def test_sync_free_bad_labels(backend, monkeypatch):
    """Out-of-range labels: NaN in their rows only (no host check), or ValueError under FASTPREF_CHECK_LABELS=1."""
    require_backend(backend)
    h, w, _, labels = Case(N=10, D=8, V=30, seed=35).make()
    labels[2], labels[5], labels[7] = 30, -3, -100
    hh = leaf(h)
    st = fastpref.token_stats(hh, w, labels, entropy=True, backend=backend, sync_free=True)
    bad = torch.zeros(10, dtype=torch.bool, device=DEVICE)
    bad[[2, 5]] = True
    for t in (st.logp, st.lse, st.entropy):
        assert t[bad].isnan().all() and t[~bad].isfinite().all() and t[7] == 0
    ok = labels.clone()
    ok[bad] = -100
    good = fastpref.token_stats(h, w, ok, entropy=True, backend=backend)
    torch.testing.assert_close(st.logp[~bad], good.logp[~bad], rtol=1e-5, atol=1e-6)
    torch.where(bad, 0.0, st.logp).sum().backward()
    assert hh.grad[bad].eq(0).all() and hh.grad.isfinite().all()
    monkeypatch.setenv("FASTPREF_CHECK_LABELS", "1")
    with pytest.raises(ValueError, match=r"labels must lie in \[0, V=30\).*2 label"):
        fastpref.token_stats(h, w, labels, backend=backend, sync_free=True)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_graph_capture_and_replay(backend):
    """Forward and backward captured in a CUDA graph (sync-free chosen automatically), replayed on new data."""
    require_backend(backend)
    c = Case(N=300, D=64, V=1000, bias=True, ignore_frac=0.3, seed=36)
    h, w, b, labels = c.make()
    ups = c.upstream(2)
    static = [leaf(h), leaf(w), leaf(b)]
    static_labels = labels.clone()

    def step(sync_free=None):  # None: chosen automatically (masking while capturing)
        st = fastpref.token_stats(*static[:2], static_labels, bias=static[2], entropy=True, backend=backend,
                                  sync_free=sync_free)
        return [st.logp, st.entropy, *torch.autograd.grad((st.logp * ups[0] + st.entropy * ups[1]).sum(), static)]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm-up outside the capture, same shapes (kernel compilation, lazy initialisation)
            step(sync_free=True)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    h2, w2, b2, labels2 = Case(N=300, D=64, V=1000, bias=True, ignore_frac=0.3, seed=37).make()
    for x, new in zip((*static, static_labels), (h2, w2, b2, labels2)):
        with torch.no_grad():
            x.copy_(new)
    graph.replay()
    torch.cuda.synchronize()
    hh, ww, bb = leaf(h2), leaf(w2), leaf(b2)
    st = fastpref.token_stats(hh, ww, labels2, bias=bb, entropy=True, backend=backend, sync_free=False)
    ref = [st.logp, st.entropy, *torch.autograd.grad((st.logp * ups[0] + st.entropy * ups[1]).sum(), (hh, ww, bb))]
    for name, got, want in zip(("logp", "entropy", "dh", "dw", "db"), captured, ref):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=name)
