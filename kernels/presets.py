"""Block sizes, warps and pipeline stages for every kernel, in one place.

GPU presets are keyed by kernel, architecture class (80: Ampere sm_80/86/89, and newer GPUs whose shared
memory per block cannot hold the class-90 tiles; 90: Hopper and newer with that much shared memory, measured
on the device) and operand width (16: fp16/bf16, 32: fp32). ``python -m fastpref.kernels.report`` compiles exactly these
(``gpu_configs()``) and fails on any spill; ``select`` only ever returns one of them on a GPU.
Under TRITON_INTERPRET=1 every kernel uses the single ``INTERPRETER`` config: large blocks, because the
interpreter's cost grows with the number of programs × inner steps, not with the block size.

BN rows × BV vocabulary columns per logits tile; BD: hidden-size chunk of the logits product;
BDG: hidden-size chunk of the gradient products (backward); GROUP: row blocks sharing vocabulary blocks
in L2 (backward swizzle; in the forward, row blocks whose vocabulary splits run next to each other);
MIN_SPLIT_TILES: fewest vocabulary tiles per split in the forward V-split.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Config:
    BN: int
    BV: int
    BD: int
    BDG: int = 64
    GROUP: int = 8
    num_warps: int = 8
    num_stages: int = 3

    def blocks(self, names) -> dict:
        return {n: getattr(self, n) for n in names}

    def options(self) -> dict:
        return {"num_warps": self.num_warps, "num_stages": self.num_stages}


KERNELS = ("stats_forward", "stats_backward", "kl_forward", "kl_backward", "stats_dlogits", "kl_dlogits",
           "stats_frozen", "kl_frozen")
ARCHS = (80, 90)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)

INTERPRETER = Config(BN=64, BV=256, BD=64, BDG=64, GROUP=4, num_warps=4, num_stages=1)
MIN_SPLIT_TILES = 4
CTAS_PER_SM = 1  # forward programs resident per SM (8-warp CTAs near 255 registers: one fits)

_GPU: dict[tuple[str, int, int], Config] = {
    # (kernel, arch class, operand bits). Tuned with the report so that no variant spills (see report.py).
    ("stats_forward", 80, 16): Config(BN=64, BV=128, BD=32, num_warps=8, num_stages=3),
    ("stats_forward", 90, 16): Config(BN=128, BV=128, BD=64, num_warps=8, num_stages=3),
    ("stats_forward", 80, 32): Config(BN=64, BV=128, BD=32, BDG=32, num_warps=8, num_stages=2),
    ("stats_forward", 90, 32): Config(BN=64, BV=128, BD=32, BDG=32, num_warps=8, num_stages=2),
    ("stats_backward", 80, 16): Config(BN=64, BV=128, BD=32, BDG=64, num_warps=8, num_stages=3),
    ("stats_backward", 90, 16): Config(BN=64, BV=128, BD=32, BDG=64, num_warps=8, num_stages=3),
    ("stats_backward", 80, 32): Config(BN=32, BV=128, BD=32, BDG=16, num_warps=8, num_stages=2),
    ("stats_backward", 90, 32): Config(BN=32, BV=64, BD=32, BDG=16, num_warps=4, num_stages=2),
    ("kl_forward", 80, 16): Config(BN=64, BV=64, BD=32, num_warps=8, num_stages=2),
    ("kl_forward", 90, 16): Config(BN=64, BV=64, BD=32, num_warps=8, num_stages=3),
    ("kl_forward", 80, 32): Config(BN=64, BV=64, BD=32, BDG=32, num_warps=8, num_stages=2),
    ("kl_forward", 90, 32): Config(BN=64, BV=64, BD=32, BDG=32, num_warps=8, num_stages=2),
    ("kl_backward", 80, 16): Config(BN=64, BV=128, BD=32, BDG=64, num_warps=8, num_stages=3),
    ("kl_backward", 90, 16): Config(BN=64, BV=128, BD=32, BDG=64, num_warps=8, num_stages=3),
    ("kl_backward", 80, 32): Config(BN=32, BV=64, BD=16, BDG=16, num_warps=4, num_stages=2),
    ("kl_backward", 90, 32): Config(BN=32, BV=64, BD=32, BDG=16, num_warps=4, num_stages=2),
    # GEMM backward, stage 1 (dL/dx blocks into scratch): the forward's tiles plus a store.
    ("stats_dlogits", 80, 16): Config(BN=64, BV=128, BD=32, num_warps=8, num_stages=3),
    ("stats_dlogits", 90, 16): Config(BN=128, BV=128, BD=64, num_warps=8, num_stages=3),
    ("stats_dlogits", 80, 32): Config(BN=64, BV=128, BD=32, num_warps=8, num_stages=2),
    ("stats_dlogits", 90, 32): Config(BN=64, BV=128, BD=32, num_warps=8, num_stages=2),
    ("kl_dlogits", 80, 16): Config(BN=64, BV=64, BD=32, num_warps=8, num_stages=2),
    ("kl_dlogits", 90, 16): Config(BN=64, BV=64, BD=32, num_warps=8, num_stages=3),
    ("kl_dlogits", 80, 32): Config(BN=32, BV=64, BD=16, num_warps=4, num_stages=2),
    ("kl_dlogits", 90, 32): Config(BN=32, BV=64, BD=32, num_warps=4, num_stages=2),
    # Frozen-head forward epilogues (no product; BD unused): BN rows per program walk a vocabulary chunk in
    # BV-wide tiles. Memory-bound; few rows per program keep a program's two passes over its rows near L2.
    ("stats_frozen", 80, 16): Config(BN=4, BV=256, BD=16, num_warps=4, num_stages=1),
    ("stats_frozen", 90, 16): Config(BN=4, BV=256, BD=16, num_warps=4, num_stages=1),
    ("stats_frozen", 80, 32): Config(BN=4, BV=256, BD=16, num_warps=4, num_stages=1),
    ("stats_frozen", 90, 32): Config(BN=4, BV=256, BD=16, num_warps=4, num_stages=1),
    ("kl_frozen", 80, 16): Config(BN=4, BV=256, BD=16, num_warps=8, num_stages=1),
    ("kl_frozen", 90, 16): Config(BN=4, BV=256, BD=16, num_warps=8, num_stages=1),
    ("kl_frozen", 80, 32): Config(BN=4, BV=256, BD=16, num_warps=8, num_stages=1),
    ("kl_frozen", 90, 32): Config(BN=4, BV=256, BD=16, num_warps=8, num_stages=1),
}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# Shared memory per program (bytes) that the largest preset of a class needs: the AOT report's SHARED for sm_90
# (class 90: stats_forward / stats_dlogits, 128 × 128 × 64 tiles, 3 stages) and sm_80 (class 80: stats_backward).
SHARED_NEEDED = {80: 64 << 10, 90: 96 << 10}


def arch_class(capability: int, shared: int | None = None) -> int:
    """sm_XY as XY (e.g. 86) → the preset class the kernels were tuned and AOT-checked for.

    shared: the device's opt-in shared memory per block in bytes (None: not known, assumed enough). Class 90
    needs capability ≥ 9.0 and room for its largest preset (``SHARED_NEEDED``), so a newer GPU with less shared
    memory than Hopper gets the class-80 tiles instead of failing to launch."""
    return 90 if capability >= 90 and (shared is None or shared >= SHARED_NEEDED[90]) else 80


def bits(dtype: torch.dtype) -> int:
    return 32 if dtype == torch.float32 else 16


def gpu_config(kernel: str, arch: int, dtype: torch.dtype, shared: int | None = None) -> Config:
    return _GPU[(kernel, arch_class(arch, shared), bits(dtype))]


def device_shared(device: torch.device) -> int | None:
    """The device's opt-in shared memory per block in bytes (None where torch does not report it)."""
    return getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", None)


def select(kernel: str, dtype: torch.dtype, device: torch.device) -> Config:
    if kernel not in KERNELS:
        raise KeyError(kernel)
    if interpreting() and device.type == "cpu":
        return INTERPRETER
    major, minor = torch.cuda.get_device_capability(device)
    return gpu_config(kernel, 10 * major + minor, dtype, device_shared(device))


def gpu_configs():
    """(kernel, arch, dtype, Config) for every configuration a GPU can run."""
    for kernel in KERNELS:
        for arch in ARCHS:
            for dtype in DTYPES:
                yield kernel, arch, dtype, gpu_config(kernel, arch, dtype)
