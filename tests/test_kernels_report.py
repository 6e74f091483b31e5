"""The ahead-of-time report: compiles kernels for sm_90 without a GPU and parses registers/spills.

Runs bf16 without flags per kernel (``--quick --arch 90``), in both launch shapes; the full report is
``python -m fastpref.kernels.report``.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("triton")
pytestmark = pytest.mark.aot

KERNELS = ("stats_forward", "stats_backward", "kl_forward", "kl_backward", "stats_dlogits", "kl_dlogits",
           "stats_frozen", "kl_frozen")
# Epilogues: no matrix product (no wgmma expected); the size arguments they take.
EPILOGUES = {"stats_frozen": {"M"}, "kl_frozen": {"M"}}
ROW = re.compile(r"(\w+)\s+90\s+bf16\s+-\s+(\w+)\s+(\S+)\s+.*?\s(\d+)\s+(\d+)\s+(\d+)\s+(yes|no)\s")


def test_parse_usage():
    from fastpref.kernels.report import parse_usage

    text = ("Resource usage:\n Common:\n  GLOBAL:0\n Function kernel:\n"
            "  REG:168 STACK:16 SHARED:0 LOCAL:0 CONSTANT[0]:552 TEXTURE:0 SURFACE:0 SAMPLER:0\n")
    assert parse_usage(text) == {"regs": 168, "stack": 16, "shared": 0}
    with pytest.raises(ValueError):
        parse_usage("nothing here")


def test_quick_report_sm90():
    """Each kernel is compiled as Triton specializes it at launch: once with M, V and D multiples of 16, once with
    a ragged M and V (the report builds the signature with Triton's own binder from the launch's arguments)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "fastpref.kernels.report", "--quick", "--arch", "90"],
                          capture_output=True, text=True, env=env, timeout=600)
    out = proc.stdout + proc.stderr
    if "cuobjdump not found" in out:
        pytest.skip("no cuobjdump in this triton installation")
    rows = {}
    for line in proc.stdout.splitlines():
        m = ROW.match(line)
        if m:
            rows[(m.group(1), m.group(2))] = (set(m.group(3).split(",")), *map(int, m.group(4, 5, 6)), m.group(7))
    assert {k for k, _ in rows} == set(KERNELS), out
    for kernel in KERNELS:
        assert set(c for k, c in rows if k == kernel) == {"div16", "ragged"}, out
        div16, ragged = rows[(kernel, "div16")][0], rows[(kernel, "ragged")][0]
        sizes = EPILOGUES.get(kernel, {"M", "V", "D"})
        assert sizes <= div16, f"{kernel}: {sizes} are multiples of 16 in the div16 launch\n{out}"
        assert not {"M", "V"} & ragged and ("D" in ragged) == ("D" in sizes), f"{kernel}: ragged M and V are not\n{out}"
    for (kernel, case), (_x16, regs, stack, shared, wgmma) in rows.items():
        assert 0 < regs <= 255 and stack == 0, f"{kernel} ({case}): REG {regs} STACK {stack}"
        if kernel not in EPILOGUES:
            assert shared > 0 and wgmma == "yes", f"{kernel} ({case}): expected Hopper tensor-core code"
    assert proc.returncode == 0, out
