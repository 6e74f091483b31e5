"""Bias entries of −inf (banned tokens) on every backend, against float64 gold with random upstream gradients.

The banned set covers the whole first vocabulary tile (so the running max is still −inf after it: the
exp(−inf − (−inf)) case), and with the Triton backend's forced vocabulary splits a whole split, plus
scattered entries (0·(−inf) in the entropy and KL sums). With a softcap a banned logit is −cap/T, finite.
"""
from __future__ import annotations

import pytest
import torch

import fastpref
from cases import BACKENDS, DEVICE, Case, require_backend
from fastpref import backends
from fastpref.backends import torch_backend
from oracle import assert_three_way, grads_of, leaf, naive_kl, naive_stats

# The Triton interpreter evaluates both branches of tl.where with numpy, which warns on the discarded 0·(−inf).
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

TILE = 256  # the vocabulary tile the torch and native backends are set to below (the Triton interpreter's BV)
V = 3 * TILE - 60  # three tiles, the last one partial


def _banned(more: bool = False) -> torch.Tensor:
    banned = torch.zeros(V, dtype=torch.bool, device=DEVICE)
    banned[:TILE] = True  # the whole first tile (and, with three splits, the whole first split)
    banned[TILE + 3::7] = True  # scattered inside the other tiles
    if more:
        banned[TILE + 1::11] = True
    return banned


@pytest.fixture
def tiled(monkeypatch, request):
    """The backend, with every tiling set so that the first vocabulary tile is exactly the banned block."""
    name = request.param
    require_backend(name)
    impl = backends.resolve(name, DEVICE, torch.float32)
    monkeypatch.setattr(torch_backend, "VOCAB_CHUNK", TILE)
    if name == "triton":
        # the banned block holds the whole first tile, and (3 splits of at most 708 columns) the first split
        assert impl._k.presets.select("stats_forward", torch.float32, DEVICE).BV <= TILE
        impl.splits = 3
    mod = getattr(impl, DEVICE.type) if name == "native" else None  # the CPU or CUDA module
    old = mod.get_tiling() if mod is not None else None
    if mod is not None:
        mod.set_tiling(32, TILE)
    yield name
    if name == "triton":
        impl.splits = None
    if mod is not None:
        mod.set_tiling(*old)


def _head(seed: int, softcap: float | None, more: bool = False):
    case = Case(N=37, D=24, V=V, bias=True, softcap=softcap, seed=seed)
    h, w, b, labels = case.make()
    b = b.masked_fill(_banned(more), float("-inf"))
    allowed = (~_banned(more=True)).nonzero().squeeze(1)
    labels = allowed[labels % allowed.numel()]  # labels on allowed tokens only (a banned label has logp −inf)
    labels[::5] = -100
    return case, h, w, b, labels


def _gold_and_ref(fn, xs, ups, n_used):
    out = {}
    for tag, dt in (("gold", torch.float64), ("ref", torch.float32)):
        ins = [leaf(x, dt) for x in xs]
        vals = fn(ins, dt)
        out[tag] = (vals, grads_of([v for v in vals[:n_used]], ups, ins))
    return out["gold"], out["ref"]


def _check_grads(ours_g, ref_g, gold_g):
    for name, got, r, g in zip(("d_hidden", "d_weight", "d_bias"), ours_g, ref_g, gold_g):
        assert_three_way(name, got, r, g, torch.float32, grad=True)


@pytest.mark.parametrize("softcap", [None, 3.0], ids=["plain", "softcap"])
@pytest.mark.parametrize("tiled", BACKENDS, indirect=True)
def test_token_stats_with_banned_tokens(tiled, softcap):
    case, h, w, b, labels = _head(60, softcap)
    opts = dict(temperature=0.8, softcap=softcap)
    ups = case.upstream(3)
    ins = [leaf(h), leaf(w), leaf(b)]
    st = fastpref.token_stats(ins[0], ins[1], labels, bias=ins[2], entropy=True, log_sum_p2=True,
                              backend=tiled, **opts)
    ours_g = grads_of([st.logp, st.lse, st.entropy], ups, ins)
    (gold, gold_g), (ref, ref_g) = _gold_and_ref(
        lambda xs, dt: naive_stats(*xs, labels, dtype=dt, **opts), (h, w, b), ups, 3)
    for i, name in enumerate(("logp", "lse", "entropy", "log_sum_p2")):
        assert_three_way(name, st[i], ref[i], gold[i], torch.float32)
    _check_grads(ours_g, ref_g, gold_g)
    if softcap is None:
        assert (ours_g[2][_banned()] == 0).all(), "a banned token's bias gets no gradient"


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("softcap", [None, 3.0], ids=["plain", "softcap"])
@pytest.mark.parametrize("tiled", BACKENDS, indirect=True)
def test_token_kl_with_banned_tokens(tiled, softcap, direction):
    """Both heads ban the same tokens (the KL is finite); the reference bans a few more, so that its
    −inf meets the policy's finite logits in the sums (allowed in the direction where the KL stays finite)."""
    # KL(ref‖θ) stays finite where q vanishes and p does not; KL(θ‖ref) where p vanishes and q does not
    case, h, w, b, labels = _head(61, softcap, more=direction == "reverse")
    _, rh, rw, rb, _ = _head(62, softcap, more=direction == "forward")
    opts = dict(direction=direction, temperature=0.8, softcap=softcap, ref_softcap=softcap)
    ups = case.upstream(2)
    ins = [leaf(h), leaf(w), leaf(b)]
    out = fastpref.token_kl(ins[0], ins[1], rh, rw, labels, bias=ins[2], ref_bias=rb, backend=tiled, **opts)
    ours_g = grads_of([out.kl, out.logp], ups, ins)
    (gold, gold_g), (ref, ref_g) = _gold_and_ref(
        lambda xs, dt: naive_kl(*xs, rh, rw, rb, labels, dtype=dt, **opts), (h, w, b), ups, 2)
    for i, name in enumerate(("kl", "logp", "ref_logp")):
        assert_three_way(name, out[i], ref[i], gold[i], torch.float32)
    _check_grads(ours_g, ref_g, gold_g)
