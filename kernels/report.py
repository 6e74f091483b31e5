"""Compile every GPU kernel configuration ahead of time and report registers, spills and shared memory.

    python -m fastpref.kernels.report [--arch 80,90] [--quick] [--kernels stats_forward,...] [--jobs N]

For each kernel × architecture × dtype (fp16/bf16/fp32) × constexpr flag combination (softcap on/off, and
for KL the reference's softcap; the bias is a runtime input, zeros when absent),
with the preset ``presets.select`` gives a GPU of that class, this compiles for GPUTarget("cuda", arch, 32)
(no GPU needed), reads REG / STACK / SHARED from ``cuobjdump --dump-resource-usage`` (the copy inside
Triton's nvidia backend) and prints one line per variant. Exits 1 on any compile failure or any spill
(STACK > 0). --quick: one variant per kernel (bf16, no flags) instead of all.
"""
from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import torch

from . import launch, presets

_DT = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_NAME = {v: k for k, v in _DT.items()}


def cuobjdump() -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(path):
        raise FileNotFoundError(f"cuobjdump not found at {path}")
    return path


def parse_usage(text: str) -> dict:
    """{'regs', 'stack', 'shared'} from cuobjdump --dump-resource-usage output (first kernel listed)."""
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)", text)
    if m is None:
        raise ValueError(f"no resource usage in cuobjdump output:\n{text}")
    return {"regs": int(m.group(1)), "stack": int(m.group(2)), "shared": int(m.group(3))}


def variants(kernels, archs, quick: bool):
    """(kernel, arch, dtype name, flags dict) for every configuration a GPU can run (or one per kernel)."""
    for kernel in kernels:
        flag_names = launch.module(kernel).FLAGS
        for arch in archs:
            if quick:
                yield kernel, arch, "bf16", {f: False for f in flag_names}
                continue
            for dt in _DT:
                for values in itertools.product((False, True), repeat=len(flag_names)):
                    yield kernel, arch, dt, dict(zip(flag_names, values))


def compile_one(kernel: str, arch: int, dt: str, flags: dict) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    t0 = time.time()
    cfg = presets.gpu_config(kernel, arch, _DT[dt])
    consts = launch.specialize(kernel, cfg, flags, interp=False)
    sig, attrs = launch.signature(kernel, _DT[dt], consts)
    row = dict(kernel=kernel, arch=arch, dtype=dt, flags=flags, cfg=cfg)
    try:
        src = ASTSource(fn=launch.module(kernel).kernel, signature=sig, constexprs=consts, attrs=attrs)
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=cfg.options())
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(k.asm["cubin"])
            f.flush()
            out = subprocess.run([cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True,
                                 check=True).stdout
        row.update(parse_usage(out))
        row["shared_meta"] = int(k.metadata.shared)
        row["wgmma"] = "wgmma" in k.asm.get("ptx", "")
    except Exception as e:  # noqa: BLE001 - reported, then the exit status fails
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
    row["seconds"] = time.time() - t0
    return row


def _flags_text(flags: dict) -> str:
    on = [k.lower() for k, v in flags.items() if v]
    return "+".join(on) if on else "-"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="80,90", help="comma-separated sm versions (default 80,90)")
    ap.add_argument("--quick", action="store_true", help="one variant per kernel and architecture")
    ap.add_argument("--kernels", default=",".join(presets.KERNELS))
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)
    # The kernels must be compiled, not interpreted: decided before any kernel module is imported
    # (launch.module imports them lazily; the worker processes inherit the environment).
    os.environ.pop("TRITON_INTERPRET", None)
    if any(f"{__package__}.{k}" in sys.modules for k in presets.KERNELS):
        print("kernel modules already imported in this process; run the report in a fresh one", file=sys.stderr)
        return 2
    archs = [int(a) for a in args.arch.split(",") if a]
    kernels = [k for k in args.kernels.split(",") if k]
    for k in kernels:
        if k not in presets.KERNELS:
            ap.error(f"unknown kernel {k!r}; choose from {presets.KERNELS}")
    for a in archs:
        if a not in presets.ARCHS:
            ap.error(f"unsupported arch {a}; presets exist for {presets.ARCHS}")
    todo = list(variants(kernels, archs, args.quick))
    t0 = time.time()
    if args.jobs > 1 and len(todo) > 1:
        with ProcessPoolExecutor(args.jobs) as pool:
            rows = list(pool.map(compile_one, *zip(*todo)))
    else:
        rows = [compile_one(*v) for v in todo]
    head = f"{'kernel':<15} {'sm':>3} {'dtype':<5} {'flags':<28} {'BN':>4} {'BV':>4} {'BD':>4} {'BDG':>4} " \
           f"{'warps':>5} {'stg':>3} {'REG':>4} {'STACK':>5} {'SHARED':>7} {'wgmma':>5} {'s':>5}"
    print(head)
    print("-" * len(head))
    bad = 0
    for r in rows:
        c = r["cfg"]
        lead = f"{r['kernel']:<15} {r['arch']:>3} {r['dtype']:<5} {_flags_text(r['flags']):<28} {c.BN:>4} {c.BV:>4} " \
               f"{c.BD:>4} {c.BDG:>4} {c.num_warps:>5} {c.num_stages:>3}"
        if "error" in r:
            bad += 1
            print(f"{lead} COMPILE FAILED: {r['error']}")
            continue
        spill = r["stack"] > 0
        bad += spill
        print(f"{lead} {r['regs']:>4} {r['stack']:>5} {r['shared_meta']:>7} {('yes' if r['wgmma'] else 'no'):>5} "
              f"{r['seconds']:>5.1f}{'  SPILLS' if spill else ''}")
    print(f"{len(rows)} configurations, {bad} failing (compile errors or spills), {time.time() - t0:.0f} s wall")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
