"""The ahead-of-time report: compiles kernels for sm_90 without a GPU and parses registers/spills.

Runs one configuration per kernel (``--quick --arch 90``); the full report is ``python -m fastpref.kernels.report``.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("triton")
pytestmark = pytest.mark.aot

KERNELS = ("stats_forward", "stats_backward", "kl_forward", "kl_backward", "stats_dlogits", "kl_dlogits")


def test_parse_usage():
    from fastpref.kernels.report import parse_usage

    text = ("Resource usage:\n Common:\n  GLOBAL:0\n Function kernel:\n"
            "  REG:168 STACK:16 SHARED:0 LOCAL:0 CONSTANT[0]:552 TEXTURE:0 SURFACE:0 SAMPLER:0\n")
    assert parse_usage(text) == {"regs": 168, "stack": 16, "shared": 0}
    with pytest.raises(ValueError):
        parse_usage("nothing here")


def test_quick_report_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "fastpref.kernels.report", "--quick", "--arch", "90"],
                          capture_output=True, text=True, env=env, timeout=600)
    out = proc.stdout + proc.stderr
    if "cuobjdump not found" in out:
        pytest.skip("no cuobjdump in this triton installation")
    rows = {}
    for line in proc.stdout.splitlines():
        m = re.match(r"(\w+)\s+90\s+bf16\s+.*?\s(\d+)\s+(\d+)\s+(\d+)\s+(yes|no)\s", line)
        if m:
            rows[m.group(1)] = (int(m.group(2)), int(m.group(3)), int(m.group(4)), m.group(5))
    assert set(rows) == set(KERNELS), out
    for kernel, (regs, stack, shared, wgmma) in rows.items():
        assert 0 < regs <= 255 and stack == 0, f"{kernel}: REG {regs} STACK {stack}"
        assert shared > 0 and wgmma == "yes", f"{kernel}: expected Hopper tensor-core code"
    assert proc.returncode == 0, out
