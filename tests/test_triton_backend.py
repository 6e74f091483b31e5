"""Triton-specific checks under the interpreter (or on a GPU): vocabulary splits, odd shapes, presets."""
from __future__ import annotations

import pytest
import torch

from cases import DEVICE, Case, require_backend
from fastpref import backends
from fastpref.options import LogitOptions

pytest.importorskip("triton")


@pytest.fixture
def triton_backend():
    require_backend("triton")
    b = backends.resolve("triton", DEVICE, torch.float32)
    yield b
    b.splits = None


def _torch():
    return backends.resolve("torch", DEVICE, torch.float32)


def _close(a, b, tol=2e-5):
    for x, y in zip(a, b):
        if x is None or y is None:
            assert x is None and y is None
            continue
        torch.testing.assert_close(x.float(), y.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("splits", [2, 3, 5, 64])
def test_vocab_split_stats(triton_backend, splits):
    h, w, b, lab = Case(N=70, D=40, V=1037, bias=True, softcap=4.0, seed=40).make()
    opts = LogitOptions(temperature=0.9, softcap=4.0)
    triton_backend.splits = None
    one = triton_backend.stats_forward(h, w, b, lab, opts, True, True)
    triton_backend.splits = splits
    many = triton_backend.stats_forward(h, w, b, lab, opts, True, True)
    _close(one, many)
    _close(many, _torch().stats_forward(h, w, b, lab, opts, True, True))


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("splits", [3, 64])
def test_vocab_split_kl(triton_backend, splits, direction):
    c = Case(N=21, D=24, V=1037, scale=300.0, seed=41)
    h, w, b, lab = c.make()
    rh, rw, rb, _ = Case(N=21, D=40, V=1037, bias=True, scale=200.0, seed=42).make()
    args = (h, w, None, rh, rw, rb, lab, LogitOptions(), LogitOptions(softcap=50.0), direction)
    triton_backend.splits = None
    one = triton_backend.kl_forward(*args)
    triton_backend.splits = splits
    many = triton_backend.kl_forward(*args)
    _close(one, many, tol=1e-4)
    _close(many, _torch().kl_forward(*args), tol=1e-3)  # |z| up to ~1e4: float32 resolution 1e-3


@pytest.mark.parametrize("N,D,V", [(1, 70, 300), (3, 1, 5), (130, 65, 257), (1, 16, 1)])
def test_odd_shapes_match_torch(triton_backend, N, D, V):
    """D and V not multiples of the blocks, a single row, a one-word vocabulary."""
    h, w, b, lab = Case(N=N, D=D, V=V, bias=True, seed=43).make()
    opts = LogitOptions(temperature=1.3)
    ours = triton_backend.stats_forward(h, w, b, lab, opts, True, True)
    ref = _torch().stats_forward(h, w, b, lab, opts, True, True)
    _close(ours, ref)
    g = [torch.randn(N, generator=torch.Generator().manual_seed(i)).to(DEVICE) for i in range(3)]
    args = (h, w, b, lab, ref[1], ref[2], g[0], g[1], g[2], opts, (True, True, True))
    _close(triton_backend.stats_backward(*args), _torch().stats_backward(*args), tol=1e-4)


@pytest.mark.parametrize("needs", [(True, False, False), (False, True, False), (False, False, True)])
def test_partial_needs(triton_backend, needs):
    h, w, b, lab = Case(N=33, D=24, V=300, bias=True, seed=44).make()
    opts = LogitOptions()
    _, lse, _, _ = _torch().stats_forward(h, w, b, lab, opts, False, False)
    g = torch.ones(33, device=DEVICE)
    args = (h, w, b, lab, lse, None, g, None, None, opts, needs)
    ours, ref = triton_backend.stats_backward(*args), _torch().stats_backward(*args)
    for n, x, y in zip(needs, ours, ref):
        assert (x is None) == (not n)
        if n:
            torch.testing.assert_close(x.float(), y.float(), atol=1e-5, rtol=1e-5)


def test_supports():
    from fastpref.backends.triton_backend import load

    b = load()
    cpu = torch.device("cpu")
    if DEVICE.type == "cpu":
        assert b.supports(cpu, torch.float32) is None and b.supports(cpu, torch.float16) is None
        assert "bfloat16" in b.supports(cpu, torch.bfloat16)
        assert b.supports(torch.device("cuda"), torch.float16) is not None
    assert b.supports(cpu, torch.float64) is not None
    assert b.supports(torch.device("meta"), torch.float32) is not None


def test_presets_gpu_launch_configs_are_reported():
    """Every (kernel, GPU, dtype) launch picks a preset that the AOT report compiles."""
    from fastpref.kernels import presets

    reported = {(k, a, d, c) for k, a, d, c in presets.gpu_configs()}
    for kernel in presets.KERNELS:
        for cap in (80, 86, 89, 90, 100, 120):
            for dtype in presets.DTYPES:
                cfg = presets.gpu_config(kernel, cap, dtype)
                assert (kernel, presets.arch_class(cap), dtype, cfg) in reported


@pytest.mark.parametrize("cap,shared,want", [((9, 0), 232448, 90), ((10, 0), 232448, 90), ((12, 0), 101376, 90),
                                             ((12, 1), 90 << 10, 80), ((11, 0), 64 << 10, 80), ((8, 6), 101376, 80),
                                             ((9, 0), None, 90)])
def test_presets_by_measured_shared_memory(monkeypatch, cap, shared, want):
    """Class-90 tiles only where the device's opt-in shared memory per block holds their largest need (the AOT
    report's 96 KiB on sm_90); capability alone sent them to every newer GPU."""
    from types import SimpleNamespace

    from fastpref.kernels import presets

    monkeypatch.setattr(presets, "interpreting", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap)
    props = SimpleNamespace() if shared is None else SimpleNamespace(shared_memory_per_block_optin=shared)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    dev = torch.device("cuda")
    for kernel in presets.KERNELS:
        for dtype in presets.DTYPES:
            assert presets.select(kernel, dtype, dev) == presets._GPU[(kernel, want, presets.bits(dtype))]


def test_interpreter_preset_and_splits():
    from fastpref.kernels import launch, presets

    if not presets.interpreting():
        pytest.skip("interpreter only")
    cpu = torch.device("cpu")
    for kernel in presets.KERNELS:
        assert presets.select(kernel, torch.float32, cpu) == presets.INTERPRETER
    bv = presets.INTERPRETER.BV
    assert launch.vocab_splits(1, 1, cpu, torch.float32, "stats_forward") == (1, 1, 1)
    assert launch.vocab_splits(1, 5 * bv + 1, cpu, torch.float32, "stats_forward", splits=4) == (1, 3, 2)
    assert launch.vocab_splits(200, 3 * bv, cpu, torch.float32, "kl_forward", splits=99)[1:] == (3, 1)


def test_every_launch_is_guarded_with_the_tensors_device(monkeypatch):
    """Tensors on cuda:1 while cuda:0 is current: the launch must make cuda:1 current (and so its stream).
    Checked without a GPU: torch.cuda.device is replaced by a recorder and each kernel by a stub."""
    from fastpref.kernels import launch, presets

    entered = []

    class Guard:
        def __init__(self, device):
            self.index = torch.device(device).index

        def __enter__(self):
            entered.append(self.index)

        def __exit__(self, *exc):
            entered.append(None)

    class Kernel:
        def __init__(self):
            self.calls = []

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                self.calls.append(list(entered))
            return run

    monkeypatch.setattr(torch.cuda, "device", Guard)
    monkeypatch.setattr(presets, "select", lambda kernel, dtype, device: presets.INTERPRETER)
    for kernel in presets.KERNELS:
        mod = launch.module(kernel)
        stub = Kernel()
        monkeypatch.setattr(mod, "kernel", stub)
        entered.clear()
        launch.launch(kernel, lambda cfg: (1,), torch.float16, torch.device("cuda", 1),
                      {f: False for f in mod.FLAGS}, **{name: None for name, _ in mod.ARGS})
        assert stub.calls == [[1]], f"{kernel} launched outside a guard for cuda:1 ({stub.calls})"
        assert entered == [1, None]
