"""The native backend's build-level guarantees: CUDA kernels compile without spills, scratch memory stays
within its documented bound (and does not grow with V), and an unavailable extension says why."""
from __future__ import annotations

import importlib.util
import os
import runpy
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from cases import require_backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cpu_module():
    require_backend("native")  # skips (or fails under FASTPREF_REQUIRE_BACKENDS=native) when missing
    if torch.cuda.is_available():
        pytest.skip("scratch accounting is checked on the CPU module")
    import fastpref._native_cpu as mod

    return mod


def test_cuda_kernels_compile_without_spills():
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not on PATH: the CUDA compile check needs the CUDA toolkit (no GPU needed)")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "csrc", "check_cuda_compile.py")],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "no spills" in p.stdout
    for arch in ("sm_80", "sm_90"):
        assert arch in p.stdout


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"_fastpref_{name}", os.path.join(ROOT, "csrc", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _shipped_cuda_build(monkeypatch, tmp_path) -> tuple[list[str], str]:
    """(nvcc flags, TORCH_CUDA_ARCH_LIST) that setup.py gives the CUDA extension, recorded by running it
    with a stand-in CUDA build of torch, a stand-in toolkit and setuptools.setup stubbed out."""
    import setuptools
    import torch.utils.cpp_extension as cpp_ext

    recorded = {}

    def cuda_extension(name, sources, **kwargs):
        recorded.update(name=name, **kwargs)
        return cpp_ext.CppExtension(name, [])

    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").write_text("")
    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: None)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(cpp_ext, "CUDAExtension", cuda_extension)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    for var in ("TORCH_CUDA_ARCH_LIST", "FASTPREF_NO_NATIVE", "FASTPREF_NO_CUDA"):
        monkeypatch.setenv(var, "")  # recorded, so that the original state comes back after the test
        monkeypatch.delenv(var)
    runpy.run_path(os.path.join(ROOT, "setup.py"))
    assert recorded.get("name") == "fastpref._native_cuda", "setup.py did not declare the CUDA extension"
    return recorded["extra_compile_args"]["nvcc"], os.environ["TORCH_CUDA_ARCH_LIST"]


def test_cuda_compile_check_uses_exactly_the_shipped_flags(monkeypatch, tmp_path):
    """One definition of the nvcc flags (csrc/build_flags.py), without fast math (tanh.approx.f32 breaks the
    float32 tolerance of softcapped logits), used by setup.py and by csrc/check_cuda_compile.py."""
    nvcc_flags, arch_list = _shipped_cuda_build(monkeypatch, tmp_path)
    flags = _load_script("build_flags")
    bad = [f for f in nvcc_flags if f in flags.FAST_MATH_FLAGS or "fast_math" in f or "fast-math" in f]
    assert not bad, f"the shipped CUDA build uses fast-math flags {bad}"
    assert "+PTX" in arch_list, f"the CUDA build embeds no PTX for newer GPUs (TORCH_CUDA_ARCH_LIST={arch_list})"
    check = _load_script("check_cuda_compile")
    cmd = check.nvcc_command("nvcc", "k.cu", "90", "k.o")
    report_only = ["nvcc", "-arch=sm_90", *check.TORCH_ADDS, "-Xptxas", "-v", "-c", "k.cu", "-o", "k.o"]
    rest = list(cmd)
    for item in report_only:
        rest.remove(item)
    assert rest == nvcc_flags, f"the compile check uses {rest}, the build {nvcc_flags}"
    assert flags.sm_versions(arch_list) == ["80", "90"]


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def test_row_loops_use_avx2_where_the_cpu_has_it():
    """The vectorized row loops are picked at load time; a CPU with AVX2+FMA (Intel or AMD) must get them."""
    mod = _cpu_module()
    flags = _cpu_flags()
    if not {"avx2", "fma", "bmi2", "movbe"} <= flags:
        pytest.skip("this CPU lacks x86-64-v3 features (or /proc/cpuinfo is unreadable)")
    assert mod.simd_path() == "x86-64-v3"


@pytest.fixture
def small_tiles():
    mod = _cpu_module()
    old = mod.get_tiling()
    mod.set_tiling(32, 128)  # many row blocks and vocabulary chunks at a small size
    yield mod
    mod.set_tiling(*old)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scratch_within_documented_bound(small_tiles, dtype):
    mod = small_tiles
    g = torch.Generator().manual_seed(0)
    N, D, Dr = 200, 24, 40
    bounds = []
    for V in (700, 2900):
        h = torch.randn(N, D, generator=g).to(dtype)
        w = torch.randn(V, D, generator=g).to(dtype)
        b = torch.randn(V, generator=g).to(dtype)
        rh = torch.randn(N, Dr, generator=g).to(dtype)
        rw = torch.randn(V, Dr, generator=g).to(dtype)
        lab = torch.randint(0, V, (N,), generator=g)
        one = torch.ones(N)
        stats_bound = mod.scratch_bound_bytes(N, D, 0, V)
        kl_bound = mod.scratch_bound_bytes(N, D, Dr, V)
        logp, lse, ent, _ = mod.stats_forward(h, w, b, lab, 1.0, 0.0, True, True)
        assert 0 < mod.last_scratch_bytes() <= stats_bound
        mod.stats_backward(h, w, b, lab, lse, ent, one, one, one, 1.0, 0.0, True, True, True)
        assert 0 < mod.last_scratch_bytes() <= stats_bound
        kl, lse, rlse, _, _ = mod.kl_forward(h, w, b, rh, rw, None, lab, 1.0, 0.0, 0.0, False)
        assert 0 < mod.last_scratch_bytes() <= kl_bound
        for frozen_labels in (lab, None):  # without labels the frozen forward adds its [R, D] accumulator
            mod.kl_forward_frozen(h, w, b, rh, rw, None, frozen_labels, 1.0, 0.0, 0.0, True)
            assert 0 < mod.last_scratch_bytes() <= kl_bound
        mod.kl_backward(h, w, b, rh, rw, None, lab, lse, rlse, kl, one, one, 1.0, 0.0, 0.0, True, True, True, True)
        assert 0 < mod.last_scratch_bytes() <= kl_bound
        bounds.append((stats_bound, kl_bound))
    assert bounds[0] == bounds[1], "the scratch bound must not depend on V"
    # the documented formula, for the tiling the module reports
    R, C, T = mod.tiling(N, 700)
    assert bounds[0][0] == 4 * T * (2 * R * C + R * D + C * 2 * D + 3 * C)
    assert bounds[0][1] == 4 * T * (2 * R * C + R * (D + Dr + D) + C * (2 * D + Dr) + 3 * C)


_PEAK_SCRIPT = textwrap.dedent("""
    import resource, sys, torch, fastpref
    torch.manual_seed(0)
    N, D, V = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    small = torch.randn(64, D, requires_grad=True)
    fastpref.token_logprobs(small, torch.randn(256, D), torch.zeros(64, dtype=torch.long), backend="native").sum().backward()
    h = torch.randn(N, D).requires_grad_()
    w = torch.randn(V, D).div_(D ** 0.5).requires_grad_()
    lab = torch.randint(0, V, (N,))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fastpref.token_logprobs(h, w, lab, backend="native").sum().backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    import fastpref._native_cpu as mod
    print((peak - base) * 1024, mod.scratch_bound_bytes(N, D, 0, V))
""")


def test_peak_memory_of_a_training_step():
    """Peak RSS growth of forward+backward ≤ gradients + dH accumulator + scratch bound + slack,
    far below the [N, V] float32 logits that plain torch materializes (measured in a child process)."""
    _cpu_module()
    N, D, V = 1024, 64, 32768
    p = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(N), str(D), str(V)], capture_output=True,
                       text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    grown, bound = map(int, p.stdout.split()[-2:])
    grads = 4 * (V * D + N * D)  # dW and dH
    accum = 4 * N * D  # the float32 dH accumulator (cast copy for the autograd output)
    slack = 24 << 20  # allocator and library overheads
    assert grown <= grads + accum + bound + slack, (grown, grads, bound)
    assert grown < 4 * N * V / 2, "must stay far below the materialized logits"


def test_unavailable_reasons():
    from fastpref.backends import native_backend as nb

    mod, why = nb._import("_native_does_not_exist", "CPU")
    assert mod is None and "CPU extension" in why
    b = nb.NativeBackend(None, "the CPU extension was not built: no compiler", None,
                         "the CUDA extension was not built: torch is not a CUDA build")
    assert "no compiler" in b.supports(torch.device("cpu"))
    assert "CUDA extension was not built" in b.supports(torch.device("cuda"))
    assert "meta" in b.supports(torch.device("meta"))
    ok = nb.NativeBackend(object(), None, None, "x")
    assert ok.supports(torch.device("cpu"), torch.float32) is None
    assert ok.supports(torch.device("cpu"), torch.bfloat16) is None
    assert "float64" in ok.supports(torch.device("cpu"), torch.float64)


def test_cuda_support_is_probed_per_device(monkeypatch):
    """supports() asks the extension whether each GPU can run its kernels (once per device): a build for
    sm_80/sm_90 without usable PTX imports on sm_120 and then fails at every launch. Fake devices here."""
    from fastpref.backends.native_backend import NativeBackend

    class FakeCudaModule:
        def __init__(self):
            self.probed = []

        def kernel_image_error(self, index):
            self.probed.append(index)
            return "" if index == 0 else "no kernel image is available for execution on the device"

    caps = {0: (9, 0), 1: (12, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: caps[index])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    mod = FakeCudaModule()
    backend = NativeBackend(None, "no CPU module", mod, None)
    assert backend.supports(torch.device("cuda", 0), torch.float16) is None
    why = backend.supports(torch.device("cuda", 1), torch.float32)
    assert why is not None and "sm_120" in why and "no kernel image" in why and "rebuild" in why
    assert backend.supports(torch.device("cuda"), torch.float32) == why  # the current device, cuda:1
    backend.supports(torch.device("cuda", 0))
    assert mod.probed == [0, 1], "each device is probed once and the answer cached"
