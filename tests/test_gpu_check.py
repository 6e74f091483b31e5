"""The GPU check (bench/gpu_check.sh) in its dry mode: every step's plumbing on the CPU, so that a broken script
fails here rather than in a rare GPU window. Also checks the budget written into the script."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "gpu_check.sh")
STEPS = ["env", "wheels", "build", "import", "tests", "warmup", "large", "sanitizer", "memcheck", "racecheck", "bench",
         "latency"]


def test_budget_fits_nine_minutes():
    text = open(SCRIPT).read()
    limits = dict(re.findall(r"\[(\w+)\]=(\d+)", re.search(r"declare -A LIMIT=\(([^)]*)\)", text).group(1)))
    assert sorted(limits) == sorted(STEPS)
    assert sum(map(int, limits.values())) == int(re.search(r"^BUDGET=(\d+)$", text, re.M).group(1)) <= 540


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    if shutil.which("bash") is None or shutil.which("timeout") is None:
        pytest.skip("needs bash and coreutils' timeout")
    out = tmp_path_factory.mktemp("gpu_check")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTPREF_REQUIRE_BACKENDS")}
    env["PYTHON"] = sys.executable
    bundle = out / "bundle.tar.gz"
    p = subprocess.run(["bash", SCRIPT, "--dry", "--bundle", str(bundle), str(out / "check")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=1800)
    return p, out / "check", bundle


def test_dry_run_every_step(dry_run):
    p, out, bundle = dry_run
    log = p.stdout[-6000:] + p.stderr[-3000:]
    assert p.returncode == 0, log
    steps = [line.split("\t") for line in (out / "steps.tsv").read_text().splitlines()]
    assert [s[0] for s in steps] == STEPS, log
    status = {s[0]: s[1] for s in steps}
    notes = {s[0]: s[4] for s in steps}
    # The dry run's stand-in sanitizer refuses the device: recorded as unsupported, not a failure (exit 0 above).
    assert status["sanitizer"] == "unsupported" and "refuses this device" in notes["sanitizer"], steps
    assert status["memcheck"] == status["racecheck"] == "skipped" and "unsupported" in notes["memcheck"]
    assert status["wheels"] in ("ok", "skipped")
    assert all(status[s] == "ok" for s in STEPS if s not in ("sanitizer", "memcheck", "racecheck", "wheels")), status
    assert (out / "env" / "pip-freeze.txt").stat().st_size > 0 and bundle.stat().st_size > 0
    assert "available_backends('cpu')" in (out / "logs" / "import.log").read_text()
    warmup = (out / "logs" / "warmup.log").read_text()  # the sanitizer's programs: forced blocks, both backends
    assert warmup.count("ok triton") == 2 and warmup.count("ok native") == 2, warmup
    large = (out / "logs" / "large.log").read_text()  # sampled rows/columns against float64, every backend
    assert "FAILED" not in large and large.count("ok ") == 14, large


def test_dry_run_tests_and_summary(dry_run):
    p, out, _bundle = dry_run
    xml = (out / "tests.xml").read_text()
    assert re.search(r'tests="[1-9]', xml) and 'failures="0"' in xml and 'errors="0"' in xml
    tail = p.stdout.strip().splitlines()
    summary = tail[tail.index("== summary"):]
    assert summary[1].startswith("| step | status |") and any(s.startswith("tests: ") for s in summary)
    assert any(s.startswith("| logprobs | fwd+bwd | bare GEMMs") for s in summary)
    assert any(s.startswith("| latency |") for s in summary)


def test_dry_run_benchmark_rows(dry_run):
    _p, out, _bundle = dry_run
    rows = json.loads((out / "bench" / "bench.json").read_text())["rows"]
    by = {(r["workload"], r["impl"], r["mode"]): r for r in rows}
    gemm = by[("logprobs", "gemm", "forward+backward")]
    assert gemm["median_ms"] > 0
    torch_row = by[("logprobs", "torch", "forward+backward")]
    assert torch_row["gemm_x"] == pytest.approx(torch_row["median_ms"] / gemm["median_ms"])
    assert by[("logprobs", "torch", "forward+backward, frozen head")]["median_ms"] > 0
    for strategy in ("fastpref[triton/gemm]", "fastpref[triton/atomic]"):
        assert by[("logprobs", strategy, "forward+backward")]["note"].startswith("skipped")  # CPU: not timed
    kl = by[("token_kl", "torch", "forward+backward")]  # KL against the same implementation's single model
    assert kl["primitive_x"] == pytest.approx(kl["median_ms"] / torch_row["median_ms"])
    lat = json.loads((out / "latency" / "bench.json").read_text())["rows"]
    assert {r["impl"] for r in lat} == {"fastpref", "torch"}
    assert all(r["first_call_ms"] > 0 and r["median_ms"] > 0 for r in lat), lat
    assert not (out / "bench" / "bench.partial.json").exists()
