"""Compile every GPU kernel configuration ahead of time and report registers, spills and shared memory.

    python -m fastpref.kernels.report [--arch 80,90] [--quick] [--kernels stats_forward,...] [--jobs N]

For each kernel × architecture × dtype (fp16/bf16/fp32) × constexpr flag combination (softcap on/off, and
for KL the reference's softcap; the bias is a runtime input, zeros when absent) × launch shape (``CASES``),
with the preset ``presets.select`` gives a GPU of that class, this compiles for GPUTarget("cuda", arch, 32)
(no GPU needed), reads REG / STACK / SHARED from ``cuobjdump --dump-resource-usage`` (the copy inside
Triton's nvidia backend) and prints one line per variant. Exits 1 on any compile failure or any spill
(STACK > 0); a variant at the 255-register ceiling is printed as a WARNING (no spill yet, but no headroom).
--quick: bf16 with no flags per kernel (both launch shapes) instead of all.

What is compiled is what runs: at launch Triton specializes every integer argument on being a multiple of 16
and every pointer on 16-byte alignment, so one configuration becomes several binaries. The report builds each
variant's signature with Triton's own launch binder from the arguments the backend passes for a launch shape
(``launch_args``). The default shapes are the two that real models launch: ``div16`` (every size a multiple of
16) and ``ragged`` (a ragged token count M and a vocabulary V off a multiple of 16, such as GPT-2's 50257; the
hidden size of every common model is a multiple of 16). ``--cases div16,ragged,odd`` adds ``odd``, whose hidden
size is not one either: test shapes launch it, and its spills cost speed only. Pointers are taken as 16-byte
aligned, as torch's allocations are.
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


# Launch shapes whose runtime specializations are compiled (Dr: the reference model's hidden size in KL).
CASES = {
    "div16": dict(M=8192, V=128256, D=4096, Dr=4096),
    "ragged": dict(M=4093, V=50257, D=4096, Dr=4096),
    "odd": dict(M=4093, V=50257, D=1000, Dr=1000),
}
DEFAULT_CASES = ("div16", "ragged")
REG_CEILING = 255  # registers per thread on sm_80/sm_90


def variants(kernels, archs, quick: bool, cases=DEFAULT_CASES):
    """(kernel, arch, dtype name, flags dict, case) for every configuration a GPU can run, each in every
    launch shape of ``cases`` (keys of CASES; --quick: bf16 without flags)."""
    for kernel in kernels:
        flag_names = launch.module(kernel).FLAGS
        for arch in archs:
            dts = ["bf16"] if quick else list(_DT)
            flag_sets = [(False,) * len(flag_names)] if quick else \
                list(itertools.product((False, True), repeat=len(flag_names)))
            for dt in dts:
                for values in flag_sets:
                    for case in cases:
                        yield kernel, arch, dt, dict(zip(flag_names, values)), case


def launch_args(kernel: str, dtype: torch.dtype, shape: dict) -> list:
    """The positional arguments a launch of ``kernel`` gets for a problem of ``shape`` (M, V, D, Dr), with
    stand-in tensors (Triton's MockTensor: a dtype and a 16-byte-aligned address). Sizes are the shape's;
    every other integer is one Triton does not specialize on (``do_not_specialize``), floats never are."""
    from triton.runtime.jit import MockTensor

    ptr = {"in": dtype, "f32*": torch.float32, "f64*": torch.float64, "i64*": torch.int64}
    args = []
    for name, kind in launch.module(kernel).ARGS:
        if kind in ptr:
            args.append(MockTensor(ptr[kind]))
        elif kind == "i32":
            args.append(shape.get(name, 1))
        else:
            args.append(1.0)
    return args


def runtime_specialization(kernel: str, arch: int, dtype: torch.dtype, consts: dict, options: dict,
                           shape: dict) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) that Triton's JIT builds when ``kernel`` is launched on a GPU of ``arch``
    for ``shape``: its own binder and argument packing, so the divisibility rules are Triton's."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.module(kernel).kernel
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = {**consts, **options}
    bound, spec, opts = binder(*launch_args(kernel, dtype, shape), **kwargs)
    _opts, sig, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
    return sig, constexprs, attrs


def divisible_args(kernel: str, attrs: dict) -> list[str]:
    """Names of the integer arguments that a variant's attrs mark as multiples of 16."""
    names = [name for name, _ in launch.module(kernel).ARGS]
    kinds = dict(launch.module(kernel).ARGS)
    return [names[i] for (i, *_), a in attrs.items()
            if i < len(names) and kinds[names[i]] == "i32" and ["tt.divisibility", 16] in a]


def compile_one(kernel: str, arch: int, dt: str, flags: dict, case: str = "div16") -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    t0 = time.time()
    cfg = presets.gpu_config(kernel, arch, _DT[dt])
    consts = launch.specialize(kernel, cfg, flags, interp=False)
    row = dict(kernel=kernel, arch=arch, dtype=dt, flags=flags, cfg=cfg, case=case)
    try:
        sig, constexprs, attrs = runtime_specialization(kernel, arch, _DT[dt], consts, cfg.options(), CASES[case])
        row["divisible"] = divisible_args(kernel, attrs)
        src = ASTSource(fn=launch.module(kernel).kernel, signature=sig, constexprs=constexprs, attrs=attrs)
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
    ap.add_argument("--cases", default=",".join(DEFAULT_CASES),
                    help=f"launch shapes to compile each configuration for, from {', '.join(CASES)}")
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
    cases = [c for c in args.cases.split(",") if c]
    for c in cases:
        if c not in CASES:
            ap.error(f"unknown case {c!r}; choose from {', '.join(CASES)}")
    todo = list(variants(kernels, archs, args.quick, cases))
    t0 = time.time()
    if args.jobs > 1 and len(todo) > 1:
        with ProcessPoolExecutor(args.jobs) as pool:
            rows = list(pool.map(compile_one, *zip(*todo)))
    else:
        rows = [compile_one(*v) for v in todo]
    head = f"{'kernel':<15} {'sm':>3} {'dtype':<5} {'flags':<22} {'shape':<6} {'x16':<10} {'BN':>4} {'BV':>4} " \
           f"{'BD':>4} {'BDG':>4} {'warps':>5} {'stg':>3} {'REG':>4} {'STACK':>5} {'SHARED':>7} {'wgmma':>5} {'s':>5}"
    print(head)
    print("-" * len(head))
    bad = warned = 0
    for r in rows:
        c = r["cfg"]
        x16 = ",".join(r.get("divisible", [])) or "-"
        lead = f"{r['kernel']:<15} {r['arch']:>3} {r['dtype']:<5} {_flags_text(r['flags']):<22} {r['case']:<6} " \
               f"{x16:<10} {c.BN:>4} {c.BV:>4} {c.BD:>4} {c.BDG:>4} {c.num_warps:>5} {c.num_stages:>3}"
        if "error" in r:
            bad += 1
            print(f"{lead} COMPILE FAILED: {r['error']}")
            continue
        spill = r["stack"] > 0
        ceiling = r["regs"] >= REG_CEILING
        bad += spill
        warned += ceiling and not spill
        print(f"{lead} {r['regs']:>4} {r['stack']:>5} {r['shared_meta']:>7} {('yes' if r['wgmma'] else 'no'):>5} "
              f"{r['seconds']:>5.1f}{'  SPILLS' if spill else '  WARNING: at the register ceiling' if ceiling else ''}")
    print("x16: the integer arguments this variant's code may assume to be multiples of 16 (as Triton specializes "
          "them at launch)")
    print("shapes: " + "; ".join(f"{case} = " + ", ".join(f"{k}={v}" for k, v in CASES[case].items())
                                 for case in cases))
    print(f"{len(rows)} configurations, {bad} failing (compile errors or spills), {warned} at the "
          f"{REG_CEILING}-register ceiling (warning), {time.time() - t0:.0f} s wall")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
