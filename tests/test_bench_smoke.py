"""Smoke test of the benchmark runner (python -m bench) and the README generator, on toy shapes.

Needs none of the optional reference libraries (those are filtered out here); takes seconds."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "bench", "--device", "cpu", "--tiny", "--out", str(out), "--no-plots",
           "--impls", "fastpref[torch],fastpref[triton],torch", "--workloads", "logprobs,dpo,sweep_N"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out


def test_runner_writes_results(run_dir):
    res = json.loads((run_dir / "bench.json").read_text())
    rows = res["rows"]
    assert {r["workload"] for r in rows} == {"logprobs", "dpo", "sweep_N"}
    measured = [r for r in rows if r.get("median_ms") is not None]
    assert {r["impl"] for r in measured} == {"fastpref[torch]", "torch"}
    for r in measured:
        assert r["min_ms"] <= r["median_ms"] <= r["max_ms"]
        assert r["peak_mib"] is not None and r["mem_method"] in ("VmHWM-reset", "ru_maxrss")
        assert r["speedup_vs_torch"] > 0
        assert r["max_abs_diff_vs_torch"] < 1e-3, r   # the implementations agree
    # the GPU backend is reported as skipped on the CPU, not timed
    tri = [r for r in rows if r["impl"] == "fastpref[triton]"]
    assert tri and all(r.get("median_ms") is None and "skipped" in r["note"] for r in tri)
    md = (run_dir / "bench.md").read_text()
    assert "| implementation |" in md and "fastpref (torch)" in md and "clear_refs" in md


def test_readme_generator(run_dir, tmp_path):
    from bench import readme

    results = tmp_path / "results"
    (results / "cpu").mkdir(parents=True)
    for name in ("bench.json", "bench.md"):
        (results / "cpu" / name).write_text((run_dir / name).read_text())
    (results / "cpu-8192").mkdir()   # a run at another shape gets its own, labelled section
    for name in ("bench.json", "bench.md"):
        (results / "cpu-8192" / name).write_text((run_dir / name).read_text())
    (results / "cpu" / "other.json").write_text(json.dumps({"rows": [{"impl": "x", "ms": 1.5}]}))
    md = tmp_path / "README.md"
    md.write_text("# t\n\n## Performance\n\n<!-- perf:begin -->\nold\n<!-- perf:end -->\n\n## After\n")
    assert readme.main(["--readme", str(md), "--results", str(results)]) == 0
    text = md.read_text()
    assert "old" not in text and text.endswith("<!-- perf:end -->\n\n## After\n")
    assert "### CPU" in text and "fastpref (torch)" in text and "(`cpu-8192`)" in text
    assert text.index("(`cpu-8192`)") > text.index("results/cpu/bench.json")
    assert "other.json" in text
    assert "```python" not in text   # the README's python blocks are executed by tests/test_readme.py
    assert readme.main(["--readme", str(md), "--results", str(results), "--check"]) == 0


@pytest.mark.parametrize("workload,K", [("token_kl", 0), ("listwise", 4), ("dpo", 2)])
def test_workload_steps_agree(workload, K):
    """The loss workloads' steps (in this process, no runner): fastpref and plain torch give the same loss
    and hidden-state gradient."""
    from bench.workloads import Entry, build_step

    got = {}
    for impl in ("fastpref[torch]", "torch"):
        e = Entry(workload, impl, "forward+backward", 64, 16, 100, "float32", T=16 if K else 0, K=K)
        _inputs, step = build_step(e, torch.device("cpu"))
        got[impl] = step()
    (out_a, grad_a), (out_b, grad_b) = got.values()
    assert out_a and grad_a
    assert max(abs(x - y) for x, y in zip(out_a + grad_a, out_b + grad_b)) < 1e-4


def test_runner_writes_a_fresh_folder_unless_told(tmp_path, monkeypatch):
    """`python -m bench` never writes over the committed results unless --update-results asks for it."""
    from bench import runner

    monkeypatch.setattr(runner, "RESULTS", str(tmp_path))
    first = runner.output_dir(None, False, "cpu")
    os.makedirs(first)
    second = runner.output_dir(None, False, "cpu")
    assert first != second and os.path.dirname(first) == os.path.dirname(second) == str(tmp_path / "tmp")
    assert runner.output_dir(None, True, "cpu") == str(tmp_path / "cpu")
    assert runner.output_dir("x/y", False, "cpu") == os.path.abspath("x/y")


def test_gemm_multiples_and_issue15_goals():
    """Rows read as multiples of the bare GEMMs of the same shape and pass, token KL as a multiple of the same
    backend's single-model primitive, and each goal is stated against its bound."""
    from bench import runner
    from bench.workloads import FROZEN

    shape = dict(zip("NDV", runner.GOAL_SHAPE), dtype="bfloat16")

    def row(workload, impl, mode, ms, peak=None):
        return dict(workload=workload, impl=impl, mode=mode, median_ms=ms, peak_mib=peak, flops=1.0,
                    label=impl, **shape)

    fb = "forward+backward"
    rows = [row("logprobs", "gemm", fb, 100.0), row("logprobs", "fastpref[triton]", fb, 110.0, 100.0),
            row("logprobs", "liger-flce", fb, 200.0, 1000.0), row("logprobs", "gemm", FROZEN, 50.0),
            row("logprobs", "fastpref[triton]", FROZEN, 60.0), row("token_kl", "fastpref[triton]", fb, 154.0),
            row("token_kl", "fastpref[triton]", FROZEN, 96.0)]
    runner.finish_rows(rows, None)
    assert rows[1]["gemm_x"] == 1.1 and rows[4]["gemm_x"] == 1.2 and rows[5]["primitive_x"] == 1.4
    assert rows[6]["primitive_x"] == 1.6   # a frozen-head KL against the frozen-head primitive
    assert rows[0].get("gemm_x") is None   # the baseline itself
    goals = runner.goals_check(rows)
    assert len(goals) == 4
    assert "1.60× the single-model primitive" in goals[3] and "DOES NOT HOLD" in goals[3]
    assert "1.10× the four bare GEMMs (goal ≤ 1.15×: HOLDS)" in goals[0] and "0.10 of its extra memory" in goals[0]
    assert "1.20× the two bare GEMMs (goal ≤ 1.1×: DOES NOT HOLD)" in goals[1]
    assert "1.40× the single-model primitive" in goals[2] and "HOLDS" in goals[2]


_WORKER_SCRIPT = """
from bench.runner import Isolated
from bench.workloads import Entry
w = Isolated("cpu", fresh=False)
quick = Entry("logprobs", "torch", "forward", 16, 8, 50, "float32", warmup=0, repeats=1)
slow = Entry("logprobs", "torch", "forward+backward", 2048, 256, 8000, "float32", warmup=0, repeats=100000)
try:
    assert w.run("entry", quick, 120)["median_ms"] > 0
    pid = w.proc.pid
    assert w.run("entry", quick, 120)["median_ms"] > 0 and w.proc.pid == pid, "one worker runs entries in turn"
    r = w.run("entry", slow, 3)
    assert "timed out" in r["error"] and w.proc is None, r
    assert w.run("entry", quick, 120)["median_ms"] > 0 and w.proc.pid != pid, "a fresh worker takes over"
finally:
    w.close()
print("ok")
"""


def test_persistent_worker_time_limit():
    """The GPU runner's worker (one process running the measurements in turn) on the CPU: the per-measurement
    limit holds, and the next measurement gets a fresh worker. In a fresh interpreter: forking after torch ops
    ran (this process) is not safe."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    r = subprocess.run([sys.executable, "-c", _WORKER_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout[-2000:] + r.stderr[-2000:]
