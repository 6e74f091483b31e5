#!/usr/bin/env python3
"""Compile every csrc/cuda/*.cu for sm_80 and sm_90 with `nvcc -Xptxas -v`; fail on errors or spills.

The nvcc flags and the architectures are those of the shipped build (csrc/build_flags.py, which setup.py
builds with), so that what is checked here is what runs.

The .cu files include no torch headers, so this needs only nvcc (no GPU, no CUDA build of torch) and
runs in seconds. It prints registers / shared memory / stack / spills per kernel and exits 1 when a file
does not compile, or when any kernel spills (spill stores/loads > 0) or has a stack frame (> 0 bytes:
with no local arrays or recursion in these kernels, a stack frame means spilled registers).

    python csrc/check_cuda_compile.py [--arch 80,90] [--json out.json]   (default: the build's arch list)
Exit codes: 0 ok, 1 compile error or spill, 2 nvcc not found.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)
from build_flags import CUDA_ARCH_LIST, NVCC_FLAGS, sm_versions  # noqa: E402  (the shipped build's flags)

# What torch's CUDAExtension adds to NVCC_FLAGS besides its defines; -Xptxas -v makes ptxas report usage.
TORCH_ADDS = ["-std=c++17"]
ENTRY = re.compile(r"Compiling entry function '(?P<name>[^']+)' for '(?P<arch>sm_\d+)'")
FRAME = re.compile(r"(?P<stack>\d+) bytes stack frame, (?P<st>\d+) bytes spill stores, (?P<ld>\d+) bytes spill loads")
USED = re.compile(r"Used (?P<regs>\d+) registers(?:.*?(?P<smem>\d+) bytes smem)?")


def demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("c++filt") or shutil.which("cu++filt")
    if not tool or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    short = {}
    for n, d in zip(names, out):
        d = re.sub(r"\(.*", "", d.replace("(anonymous namespace)::", ""))  # drop the parameter list
        short[n] = d.split("::")[-1]
    return short


def parse(text: str) -> list[dict]:
    kernels, cur = [], None
    for line in text.splitlines():
        m = ENTRY.search(line)
        if m:
            cur = {"kernel": m["name"], "arch": m["arch"], "regs": None, "smem": 0, "stack": 0, "spill_st": 0,
                   "spill_ld": 0}
            kernels.append(cur)
            continue
        if cur is None:
            continue
        m = FRAME.search(line)
        if m:
            cur.update(stack=int(m["stack"]), spill_st=int(m["st"]), spill_ld=int(m["ld"]))
        m = USED.search(line)
        if m:
            cur["regs"] = int(m["regs"])
            cur["smem"] = int(m["smem"] or 0)
    return kernels


def nvcc_command(nvcc: str, src: str, arch: str, obj: str) -> list[str]:
    """The compile command: the shipped NVCC_FLAGS, the architecture, and -Xptxas -v for the report."""
    return [nvcc, f"-arch=sm_{arch}", *NVCC_FLAGS, *TORCH_ADDS, "-Xptxas", "-v", "-c", src, "-o", obj]


def compile_one(nvcc: str, src: str, arch: str, tmp: str) -> tuple[int, str, list[dict]]:
    obj = os.path.join(tmp, f"{os.path.basename(src)}.{arch}.o")
    p = subprocess.run(nvcc_command(nvcc, src, arch, obj), capture_output=True, text=True)
    return p.returncode, p.stdout + p.stderr, parse(p.stdout + p.stderr)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default=",".join(sm_versions()),
                    help=f"comma-separated SM versions (default: those of {CUDA_ARCH_LIST!r})")
    ap.add_argument("--json", help="also write the per-kernel table as JSON here")
    args = ap.parse_args(argv)
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        print("nvcc not found on PATH", file=sys.stderr)
        return 2
    sources = sorted(glob.glob(os.path.join(HERE, "cuda", "*.cu")))
    if not sources:
        print("no .cu files under csrc/cuda", file=sys.stderr)
        return 1
    archs = [a.strip() for a in args.arch.split(",") if a.strip()]
    failed, rows = False, []
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        jobs = {(s, a): pool.submit(compile_one, nvcc, s, a, tmp) for s in sources for a in archs}
        for (src, arch), job in jobs.items():
            rc, text, kernels = job.result()
            rel = os.path.relpath(src, os.path.dirname(HERE))
            if rc != 0:
                failed = True
                print(f"FAIL {rel} sm_{arch}: nvcc exited {rc}\n{text}")
                continue
            names = demangle([k["kernel"] for k in kernels])
            for k in kernels:
                k["file"], k["name"] = rel, names[k["kernel"]]
                bad = k["spill_st"] or k["spill_ld"] or k["stack"]
                failed |= bool(bad)
                rows.append(k)
    print(f"{'file':28} {'arch':6} {'kernel':22} {'regs':>4} {'smem':>5} {'stack':>5} {'spill st/ld':>11}")
    for k in rows:
        flag = "  <-- SPILL" if (k["spill_st"] or k["spill_ld"] or k["stack"]) else ""
        print(f"{k['file']:28} {k['arch']:6} {k['name']:22} {k['regs']:>4} {k['smem']:>5} {k['stack']:>5} "
              f"{k['spill_st']:>5}/{k['spill_ld']:<5}{flag}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    print("FAILED: compile errors or spills" if failed else f"ok: {len(rows)} kernels, no spills")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
