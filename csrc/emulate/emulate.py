#!/usr/bin/env python3
"""Run the CUDA binding (csrc/cuda/native_cuda.cpp) and its epilogue kernels (csrc/cuda/epilogue.cu) on the CPU.

A development aid for machines without a GPU, not built into the package: the binding's host code (tiling, row and label
offsets, scratch buffers, GEMM operands, the frozen heads' accumulators) is compiled unchanged against CPU torch
with stand-in CUDA headers (csrc/emulate/include), and epilogue.cu as C++: each launch becomes a loop over the
blocks, each block's threads ucontext coroutines on one OS thread with real barrier semantics (see
include/cuda_runtime.h). Half GEMMs with float32 output (aten::mm.dtype_out, CUDA only in torch) get a CPU
kernel (mm_dtype_out.cpp). What it cannot show: timing, memory coalescing, real concurrency beyond barriers,
cuBLAS itself, launch limits (grid sizes), or the device's float rounding modes.

    python csrc/emulate/emulate.py [PYTEST ARGS]

runs pytest with the native backend's CPU module replaced by this build, by default on the native tests of
token_stats, token_kl, banned tokens and frozen heads (about 5 minutes on 2 cores; tests of the CPU module's
own scratch counter and threads are left out). Needs a C++20 compiler and ninja; builds in about 20 s.
"""
from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.dirname(HERE)
ROOT = os.path.dirname(CSRC)
DEFAULT_ARGS = ["tests/test_token_stats.py", "tests/test_token_kl.py", "tests/test_banned_tokens.py",
                "tests/test_frozen_head.py", "tests/test_frozen_kl.py", "tests/test_native_frozen_kl.py",
                "tests/test_native_frozen_tiles.py", "tests/test_frozen_precision.py", "-k", "native and not memory and not scratch and not threads"]


def _split_top(text: str) -> list[str]:
    """Split on the commas outside brackets."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return parts + [cur.strip()]


def kernels_as_cpp(source: str) -> str:
    """epilogue.cu with every `kernel<<<grid, block, 0, stream>>>(args)` as `emu_launch(kernel, grid, block, args)`
    and the emulator's globals defined."""
    out, i = [], 0
    while (j := source.find("<<<", i)) >= 0:
        k = j
        while k > 0 and (source[k - 1].isalnum() or source[k - 1] in "_<>"):
            k -= 1
        end = source.index(">>>", j)
        grid, block = _split_top(source[j + 3:end])[:2]
        assert source[end + 3] == "(", "a launch is followed by its argument list"
        out.append(f"{source[i:k]}emu_launch({source[k:j]}, {grid}, {block}, ")
        i = end + 4
    out.append(source[i:])
    text = "".join(out)
    return text.replace('#include "epilogue.h"',
                        '#include "epilogue.h"\nEmuIdx threadIdx, blockIdx, gridDim, blockDim;\nEmuScheduler emu;', 1)


def build(build_dir: str | None = None):
    """The emulated CUDA module (same functions as fastpref._native_cuda), built into build_dir."""
    from torch.utils.cpp_extension import load

    build_dir = build_dir or os.path.join(ROOT, "build", "cuda-emulated")
    os.makedirs(build_dir, exist_ok=True)
    kernels = os.path.join(build_dir, "epilogue_emulated.cpp")
    text = kernels_as_cpp(open(os.path.join(CSRC, "cuda", "epilogue.cu")).read())
    if not os.path.exists(kernels) or open(kernels).read() != text:
        with open(kernels, "w") as f:
            f.write(text)
    return load(name="fastpref_cuda_emulated", build_directory=build_dir, verbose=False,
                sources=[os.path.join(CSRC, "cuda", "native_cuda.cpp"), kernels,
                         os.path.join(HERE, "mm_dtype_out.cpp")],
                extra_include_paths=[os.path.join(HERE, "include"), os.path.join(CSRC, "cuda")],
                extra_cflags=["-std=c++20", "-O1"])


class SwapNativeCpuModule:
    """pytest plugin: the native backend's CPU module replaced by the emulated CUDA module."""

    def __init__(self, module):
        self.module = module

    def pytest_configure(self, config):
        import torch

        from fastpref import backends

        backends.resolve("native", torch.device("cpu"), torch.float32).cpu = self.module
        print(f"native backend on CPU tensors: the CUDA binding over emulated kernels ({self.module.__file__})")


def main(argv: list[str]) -> int:
    import pytest

    sys.path.insert(0, ROOT)
    os.chdir(ROOT)
    plugin = SwapNativeCpuModule(build())
    return pytest.main(["-q", "-p", "no:cacheprovider", *(argv or DEFAULT_ARGS)], plugins=[plugin])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
