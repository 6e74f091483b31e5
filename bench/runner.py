"""Benchmark runner: every implementation × workload in one invocation, JSON + markdown + PNG plots.

    python -m bench --device cpu|cuda [--quick] [--plan check] [--out DIR | --update-results] [--impls a,b]
                    [--workloads a,b] [--tiny]

Results go to a fresh folder (bench/results/tmp/<device>-<time>) unless --out names one or --update-results
asks for the committed bench/results/<device>/. See bench/README.md for what is measured and how.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import asdict

import torch

import fastpref
from bench import impls as I
from bench.harness import CPU_MEMORY_METHOD, CUDA_MEMORY_METHOD, measure_entry
from bench.workloads import FROZEN, GEMMS, Entry, build_step, flops, valid_tokens

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")
FLAT = ("logprobs", "sweep_N", "sweep_V")
GOAL_SHAPE = (16384, 4096, 128256)  # issue 15's GPU goals: bf16, N=16384, D=4096, V=128256
QUICK_CPU_BUDGET_S = 420  # --quick on the CPU starts no measurement after 7 min: done within 10 on 2 cores
QUICK_CPU_TIMEOUT_S = 120
WORKLOAD_TITLES = {
    "logprobs": "Per-token log-probs",
    "dpo": "DPO from hidden states, with a reference model (policy forward+backward, reference forward)",
    "token_kl": "Token-level full-vocabulary KL(π_ref‖π_θ) between two models",
    "listwise": "Listwise Plackett-Luce, K = 4 responses per prompt, with a reference model",
    "sweep_N": "Sweep over tokens N (per-token log-probs, forward+backward)",
    "sweep_V": "Sweep over vocabulary V (per-token log-probs, forward+backward)",
    "issue5": "Issue-5 memory check: DPO, 8 pairs × 1024 tokens, D=256, V=32000 (forward+backward)",
    "latency": "Per-call latency: first call in a fresh process and steady state (per-token log-probs, fwd+bwd)",
}
SEQ_LABELS = {"liger-dpo": "Liger LigerFusedLinearDPOLoss"}


# ----------------------------------------------------------------------------------------------- plan
def latency_shapes(device: str, tiny: bool) -> list[tuple[int, int, int]]:
    """Small and medium (N, D, V) of the latency workload (the small one is issue 18's 64 × 32 × 100 on a CPU)."""
    if tiny:
        return [(16, 8, 50)]
    return [(64, 32, 100), (2048, 512, 32000)] if device == "cpu" else [(128, 1024, 32000), (4096, 4096, 128256)]


def latency_entries(device: str, tiny: bool, dtype: str) -> list[Entry]:
    return [Entry("latency", impl, "forward+backward", *shape, dtype, warmup=3, repeats=3 if tiny else 10)
            for shape in latency_shapes(device, tiny) for impl in ("fastpref", "torch")]


def check_plan(device: str, tiny: bool) -> list[Entry]:
    """The GPU check's plan (bench/gpu_check.sh), most informative first: issue 15's goal shape (bf16,
    N=16384, D=4096, V=128256) with the bare-GEMM baseline, each Triton backward strategy, the frozen head and
    token KL; then forward passes, N=4096, DPO; then latency. --tiny: the same plan at toy shapes (dry run)."""
    if tiny:
        dt, (N, D, V), N2, T, w, r = "float32", (64, 32, 256), 32, 16, 0, 1
    else:
        dt, (N, D, V), N2, T, w, r = "bfloat16", GOAL_SHAPE, 4096, 1024, 1, 3
    fb = "forward+backward"
    triton = ["fastpref[triton]", "fastpref[triton/gemm]", "fastpref[triton/atomic]"]
    backends = ["fastpref[triton]", "fastpref[native]"]

    def at(workload, impls, mode, n=N, **kw):
        if tiny:  # no compilation in a dry run
            impls = [i for i in impls if not (I.BY_KEY.get(i) and I.BY_KEY[i].compiled)]
        return [Entry(workload, i, mode, n, D, V, dt, warmup=w, repeats=r, **kw) for i in impls]

    return (at("logprobs", ["gemm", *triton, "fastpref[native]", "torch", "liger-flce", "cce", "torch.compile"], fb)
            + at("logprobs", ["gemm", *backends, "torch"], FROZEN)
            + at("token_kl", [*backends, "torch"], fb)
            + at("token_kl", [*backends, "torch"], FROZEN)
            + at("logprobs", ["gemm", *backends, "torch", "cce"], "forward")
            + at("sweep_N", ["gemm", *backends, "torch", "liger-flce", "cce"], fb, n=N2)
            + at("dpo", [*backends, "torch", "liger-dpo"], fb, n=N2, T=T, K=2)
            + latency_entries(device, tiny, dt))


def plan(device: str, quick: bool, tiny: bool = False, shape: tuple | None = None) -> list[Entry]:
    """The measurements, most important first (a --budget-s cut drops the tail)."""
    fp = ["fastpref[triton]", "fastpref[native]", "fastpref[torch]"]
    every = list(I.STANDARD)
    uncompiled = [i for i in every if not I.BY_KEY[i].compiled]
    seq_impls = every + ["liger-dpo"]
    kl_impls = list_impls = fp + ["torch", "torch.compile"]
    issue5 = None
    if tiny:  # the smoke test: seconds, no compilation
        dt, main, T = "float32", (64, 32, 256), 16
        w, r = 0, 1
        lp = uncompiled
        sweepN, sweepV, sweep_impls = [32, 64], [128, 256], fp + ["torch"]
        seq_impls, kl_impls, list_impls = uncompiled + ["liger-dpo"], fp + ["torch"], fp + ["torch"]
    elif device == "cuda":
        dt, main, T = "bfloat16", (4096, 4096, 128256), 1024
        w, r = 1, 3 if quick else 5
        lp = every
        if quick:
            sweepN, sweepV = [4096, 16384], [32000, 128256]
            sweep_impls = fp + ["torch", "torch.lce", "liger-flce", "cce", "trl-chunked", "liger-selective"]
            seq_impls = fp + ["torch", "liger-flce", "cce", "trl-chunked", "liger-selective", "liger-dpo"]
            list_impls = fp + ["torch"]
        else:
            sweepN, sweepV = [2048, 4096, 16384, 32768], [32000, 65536, 128256, 256000]
            sweep_impls = uncompiled
    else:
        dt, T = "float32", 512
        main = (2048, 256, 32000) if quick else (8192, 512, 32000)
        w, r = 1, 3
        lp = every
        issue5 = (8 * 2 * 1024, 256, 32000, 1024)
        if quick:
            sweepN, sweepV = [512, 2048, 8192], [8000, 32000, 128000]
            sweep_impls = fp + ["torch"]
            # the chunked F.linear_cross_entropy is ~5x slower than the rest on the CPU: per-token rows only
            seq_impls = [i for i in seq_impls if i not in ("torch.lce-chunked", "torch.lce")]
        else:
            sweepN, sweepV = [1024, 4096, 8192, 16384], [8000, 32000, 64000, 128000]
            sweep_impls = uncompiled
    N, D, V = shape or main
    T = min(T, N // 4) if shape else T
    sw, sr = (0, 1) if quick and device == "cpu" else (w, 1) if quick else (w, r)  # sweep points, --quick: one call
    out: list[Entry] = []
    for mode in ("forward", "forward+backward"):
        for i in [I.GEMM] + lp:
            if quick and device == "cpu" and mode == "forward" and i == "torch.lce-chunked":
                continue  # ~5x slower than the rest on the CPU: its forward+backward row says enough
            out.append(Entry("logprobs", i, mode, N, D, V, dt, warmup=w, repeats=r))
    for i in [I.GEMM] + fp + ["torch"]:  # frozen head (issue 15): lm_head weight without gradient
        out.append(Entry("logprobs", i, FROZEN, N, D, V, dt, warmup=w, repeats=r))
    if issue5:
        n5, d5, v5, t5 = issue5
        for i in fp + ["torch"]:
            out.append(Entry("issue5", i, "forward+backward", n5, d5, v5, dt, T=t5, K=2, warmup=0, repeats=1))
    for n in sweepN:
        for i in sweep_impls:
            out.append(Entry("sweep_N", i, "forward+backward", n, D, V, dt, warmup=sw, repeats=sr))
    for i in seq_impls:
        out.append(Entry("dpo", i, "forward+backward", N, D, V, dt, T=T, K=2, warmup=w, repeats=r))
    for i in kl_impls:
        out.append(Entry("token_kl", i, "forward+backward", N, D, V, dt, warmup=w, repeats=r))
    for i in list_impls:
        out.append(Entry("listwise", i, "forward+backward", N, D, V, dt, T=T, K=4, warmup=w, repeats=r))
    if quick or tiny:
        out += latency_entries(device, tiny, dt)
    for v in sweepV:
        for i in sweep_impls:
            out.append(Entry("sweep_V", i, "forward+backward", N, D, v, dt, warmup=sw, repeats=sr))
    return out


def _flat_key(e: Entry) -> tuple:
    return (e.impl, e.mode, e.N, e.D, e.V, e.dtype)


# ----------------------------------------------------------------------------------------------- running
def prepare(entries: list[Entry], device: str) -> None:
    """Import, once in the parent, what the measured processes would otherwise import on their first call
    (torch._dynamo for custom ops, inductor, the reference libraries): the forked children inherit it, so
    neither their times nor their memory include imports. No torch op runs here (OpenMP is not fork-safe),
    and on a GPU nothing initialises CUDA (a forked child could not use it then)."""
    import torch._dynamo  # noqa: F401

    if any(I.BY_KEY.get(e.impl) and I.BY_KEY[e.impl].compiled for e in entries):
        import torch._inductor.compile_fx  # noqa: F401
    dev = torch.device(device)
    for key in dict.fromkeys(e.impl for e in entries if e.workload != "latency"):
        if device == "cuda" and key.startswith("fastpref["):
            continue  # its availability check asks the device for its capability: that initialises CUDA
        try:
            if key == "liger-dpo":
                I.liger_dpo(dev, torch.float32, 0.1)
            elif key != I.GEMM:
                I.BY_KEY[key].make(dev, torch.float32)
        except I.Unavailable:
            pass


def _run_entry(e: Entry, device: str) -> dict:
    dev = torch.device(device)
    saved = {k: os.environ.get(k) for k in I.entry_environment(e.impl)}
    os.environ.update(I.entry_environment(e.impl))
    try:
        try:
            _inputs, step = build_step(e, dev)
        except I.Unavailable as why:
            return {"skipped": str(why)}
        try:
            r = measure_entry(step, dev, repeats=e.repeats, warmup=e.warmup)
        except torch.OutOfMemoryError:
            return {"error": "out of memory"}
        except ValueError as ex:  # a strategy the library refuses by name is not a failure of the benchmark
            if I.STRATEGY_ENV in str(ex):
                return {"skipped": str(ex)[:300]}
            raise
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    r["out_sample"], r["grad_sample"] = r.pop("sample")
    return r


def _device_broken(device: str) -> bool:
    """After an error: is this process's CUDA context unusable (an illegal address poisons it for good)?"""
    if device != "cuda":
        return False
    try:
        torch.cuda.synchronize()
        return False
    except Exception:  # noqa: BLE001 - any CUDA error
        return True


def _worker(conn, device: str) -> None:
    """A measuring process: runs the tasks it receives, one at a time, and sends each one's result dict.
    Exits when told to, when its parent dies, or after an error that broke its CUDA context."""
    try:  # die with the runner (Linux): a killed runner leaves no measurement running
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    while True:
        try:
            task = conn.recv()
        except EOFError:
            return
        if task is None:
            return
        kind, payload = task
        try:
            r = _run_entry(payload, device) if kind == "entry" else {"value": payload(device)}
        except Exception as ex:  # one failing implementation must not hide the others
            r = {"error": f"{type(ex).__name__}: {ex}"[:300], "traceback": traceback.format_exc()[-2000:]}
        r["fatal"] = "error" in r and _device_broken(device)
        if device == "cuda" and not r["fatal"]:
            torch.cuda.empty_cache()
        conn.send(r)
        if r["fatal"]:
            return


class Isolated:
    """Runs tasks in a forked worker process, each under a time limit.

    ``fresh``: a new process per task (CPU: each measurement has its own peak RSS). Otherwise one worker runs
    the tasks in turn (GPU: one CUDA context and one compilation cache for all), and is replaced after a
    timeout, a crash or an error that broke its CUDA context; so the limit holds on a GPU too, and a kernel
    that faults costs one row, not the rest of the run. The parent never touches the device."""

    def __init__(self, device: str, fresh: bool):
        self.device, self.fresh = device, fresh
        self.proc = self.conn = None

    def _start(self) -> None:
        ctx = mp.get_context("fork")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, self.device), daemon=True)
        self.proc.start()
        child.close()

    def close(self, kill: bool = False) -> None:
        if self.proc is None:
            return
        if not kill:
            try:
                self.conn.send(None)
            except (OSError, BrokenPipeError):
                pass
            self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()
        self.proc = self.conn = None

    def run(self, kind: str, payload, timeout_s: float) -> dict:
        """kind 'entry' (payload: an Entry) or 'call' (payload: a module-level function of the device name)."""
        if self.proc is None:
            self._start()
        self.conn.send((kind, payload))
        r = None
        if self.conn.poll(timeout_s):
            try:
                r = self.conn.recv()
            except EOFError:
                r = None
        else:
            self.close(kill=True)
            return {"error": f"timed out after {timeout_s:.0f} s"}
        if r is None:
            self.proc.join(5)
            code = self.proc.exitcode
            self.close(kill=True)
            return {"error": f"process died (exit code {code}; killed for memory, or a crash)"}
        if r.pop("fatal", False) or self.fresh:
            self.close()
        return r


def run_inprocess(e: Entry, device: str) -> dict:
    try:
        return _run_entry(e, device)
    except Exception as ex:
        return {"error": f"{type(ex).__name__}: {ex}"[:300]}
    finally:
        if device == "cuda":
            torch.cuda.empty_cache()


def run_latency(e: Entry, device: str, timeout_s: float) -> dict:
    """One latency measurement in a fresh interpreter (bench/latency.py), so that its first call is a first call."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), ROOT) if p)
    cmd = [sys.executable, "-m", "bench.latency", "--impl", e.impl, "--device", device,
           "--shape", f"{e.N},{e.D},{e.V}", "--dtype", e.dtype, "--steady", str(e.repeats)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or [f"exit code {p.returncode}"])[-1][:300]}
    r = json.loads(p.stdout.strip().splitlines()[-1])
    r.update(out_sample=[], grad_sample=[], peak_mib=None)
    return r


def bf16_peak_tflops(device: str = "cuda") -> float:
    """The device's measured dense bf16 matmul peak (8192³ torch.matmul, median of 10)."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    ts = []
    for _ in range(10):
        s, t = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        t.record()
        torch.cuda.synchronize()
        ts.append(s.elapsed_time(t) / 1e3)
    ts.sort()
    del a, b
    torch.cuda.empty_cache()
    return 2 * 8192**3 / ts[len(ts) // 2] / 1e12


def device_environment(device: str) -> dict:
    """What only the device can say (run in a worker on GPUs): its name, CUDA, fastpref's backends there."""
    env = {"fastpref_backends": fastpref.available_backends(device)}
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
        env["triton_backward_strategies"] = list(I.triton_strategies())
    return env


def environment(device: str, on_device: dict) -> dict:
    env = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "device": device, "torch": torch.__version__,
           "fastpref": fastpref.__version__, "python": platform.python_version(),
           "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}"}
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        if names:
            env["cpu"] = names[0]
    except OSError:
        pass
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    env.update({k: v for k, v in I.library_versions().items()})
    env.update(on_device)
    if hasattr(os, "getloadavg"):
        env["loadavg_at_start"] = round(os.getloadavg()[0], 2)
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                           cwd=ROOT).stdout.strip() or None
    except OSError:
        pass
    return env


def label(e: Entry) -> str:
    if e.workload == "latency":
        return {"fastpref": "fastpref (default backend)", "torch": "torch, materialized logits"}[e.impl]
    if e.workload in ("dpo", "listwise", "issue5"):
        if e.impl in SEQ_LABELS:
            return SEQ_LABELS[e.impl]
        base = I.BY_KEY[e.impl]
        if base.family == "fastpref":
            return f"fastpref PreferenceLoss ({e.impl[9:-1]})"
        return f"{base.label} + loss in torch"
    if e.workload == "token_kl":
        return {"torch": "torch, both models' logits", "torch.compile": "torch.compile, both models' logits"}.get(
            e.impl, f"fastpref token_kl ({e.impl[9:-1]})")
    if e.impl == I.GEMM:
        return f"bare GEMMs ×{GEMMS[e.mode]} (torch.mm, {e.dtype})"
    return I.BY_KEY[e.impl].label


def _maxdiff(a: list, b: list) -> float | None:
    if not a or not b or len(a) != len(b):
        return None
    return max(abs(x - y) for x, y in zip(a, b))


def _shape(r: dict) -> tuple:
    return r["N"], r["D"], r["V"], r["dtype"]


def finish_rows(rows: list[dict], peak_tflops: float | None) -> None:
    """Ratios against plain torch at the same workload/shape/pass, against the bare GEMMs of the same shape and
    pass measured in the same run ('gemm_x'; token KL against the single model's four), token KL against the
    same backend's single-model primitive ('primitive_x'), agreement and TFLOP/s."""
    base, gemm, prim = {}, {}, {}
    for r in rows:
        if r["impl"] == I.BASELINE and r.get("median_ms"):
            base[(r["workload"], r["mode"], r["N"], r["D"], r["V"], r["dtype"])] = r
        if r["impl"] == I.GEMM and r.get("median_ms"):
            gemm[(r["mode"], *_shape(r))] = r["median_ms"]
        if r["workload"] in FLAT and r["mode"] in ("forward+backward", FROZEN) and r.get("median_ms"):
            prim[(r["impl"], r["mode"], *_shape(r))] = r["median_ms"]
    for r in rows:
        if r.get("median_ms") and r["impl"] != I.GEMM and r["workload"] in FLAT + ("token_kl",):
            g = gemm.get((r["mode"], *_shape(r)))
            r["gemm_x"] = r["median_ms"] / g if g else None
        key = (r["impl"], r["mode"], *_shape(r))  # a frozen-head KL against the frozen-head primitive
        if r.get("median_ms") and r["workload"] == "token_kl" and prim.get(key):
            r["primitive_x"] = r["median_ms"] / prim[key]
            r["note"] = "; ".join(x for x in (r.get("note"), f"{r['primitive_x']:.2f}× the single-model log-probs "
                                                               f"{r['mode']}") if x)
    for r in rows:
        b = base.get((r["workload"], r["mode"], r["N"], r["D"], r["V"], r["dtype"]))
        if r.get("median_ms") and b:
            r["speedup_vs_torch"] = b["median_ms"] / r["median_ms"]
            if r.get("peak_mib") is not None and b.get("peak_mib"):
                r["mem_vs_torch"] = r["peak_mib"] / b["peak_mib"]
            d = [x for x in (_maxdiff(r.get("out_sample"), b.get("out_sample")),
                             _maxdiff(r.get("grad_sample"), b.get("grad_sample"))) if x is not None]
            r["max_abs_diff_vs_torch"] = max(d) if d else None
        if r.get("median_ms") and peak_tflops:
            r["tflops"] = r["flops"] / (r["median_ms"] / 1e3) / 1e12
            r["pct_of_peak"] = 100 * r["tflops"] / peak_tflops


def _verdict(ok: bool) -> str:
    return "HOLDS" if ok else "DOES NOT HOLD"


CPU_GOAL_SHAPE = (8192, 512, 32000)  # issue 15's CPU goal: native, float32, frozen head


def goals_check(rows: list[dict]) -> list[str]:
    """Issue 15's goals, one sentence per measured row: on GPUs at (bf16, N=16384, D=4096, V=128256); on the
    CPU the frozen head at (float32, N=8192, D=512, V=32000), native backend vs plain torch."""
    base = {(r["workload"], r["mode"], *_shape(r)): r for r in rows if r["impl"] == I.BASELINE and r.get("peak_mib")}
    cpu = [r for r in rows if (r["N"], r["D"], r["V"]) == CPU_GOAL_SHAPE and r["dtype"] == "float32"
           and r["mode"] == FROZEN and r["impl"] == "fastpref[native]" and r.get("median_ms")]
    out = []
    for r in cpu:
        t = base.get((r["workload"], r["mode"], *_shape(r)))
        if t and r.get("peak_mib") is not None:
            mem = r["peak_mib"] / t["peak_mib"]
            out.append(f"{r['label']} (frozen head, CPU): {t['median_ms'] / r['median_ms']:.2f}× plain torch's speed "
                       f"(faster: {_verdict(r['median_ms'] < t['median_ms'])}) at {mem:.3f} of its memory "
                       f"(goal ≤ 1/8: {_verdict(mem <= 0.125)})")
    at = [r for r in rows if (r["N"], r["D"], r["V"]) == GOAL_SHAPE and r["dtype"] == "bfloat16"
          and r["workload"] in ("logprobs", "token_kl") and r.get("median_ms")]
    ours = [r for r in at if r["impl"].startswith("fastpref[")]
    liger = next((r for r in at if r["impl"] == "liger-flce" and r["mode"] == "forward+backward"), None)
    for r in ours:
        x, what = r.get("gemm_x"), f"{r['label']} ({r['workload']}, {r['mode']})"
        if r["workload"] == "logprobs" and r["mode"] == "forward+backward" and x:
            line = f"{what}: {x:.2f}× the four bare GEMMs (goal ≤ 1.15×: {_verdict(x <= 1.15)})"
            if liger and r.get("peak_mib") is not None and liger.get("peak_mib"):
                faster = r["median_ms"] < liger["median_ms"]
                mem = r["peak_mib"] / liger["peak_mib"]
                line += (f"; {liger['median_ms'] / r['median_ms']:.2f}× Liger's speed (faster: {_verdict(faster)}), "
                         f"{mem:.2f} of its extra memory (goal ≤ 0.25: {_verdict(mem <= 0.25)})")
            out.append(line)
        elif r["workload"] == "logprobs" and r["mode"] == FROZEN and x:
            out.append(f"{what}: {x:.2f}× the two bare GEMMs (goal ≤ 1.1×: {_verdict(x <= 1.1)})")
        elif r["workload"] == "token_kl" and r.get("primitive_x"):
            out.append(f"{what}: {r['primitive_x']:.2f}× the single-model primitive of the same backend "
                       f"(goal ≤ 1.5×: {_verdict(r['primitive_x'] <= 1.5)})")
    return out


def issue5_check(rows: list[dict]) -> dict | None:
    rs = [r for r in rows if r["workload"] == "issue5"]
    naive = next((r for r in rs if r["impl"] == "torch" and r.get("peak_mib")), None)
    ours = [r for r in rs if r["impl"].startswith("fastpref[") and r.get("peak_mib") is not None]
    if not naive or not ours:
        return None
    worst = max(ours, key=lambda r: r["peak_mib"])
    ratio = worst["peak_mib"] / naive["peak_mib"]
    return {"naive_peak_mib": naive["peak_mib"],
            "fastpref_peak_mib": {r["impl"]: r["peak_mib"] for r in ours},
            "worst_ratio": ratio, "holds": ratio < 1 / 8,
            "text": (f"Issue-5 memory check (DPO, 8 pairs × 1024 tokens, D=256, V=32000, forward+backward): "
                     f"fastpref.nn.PreferenceLoss peaks at {worst['peak_mib']:.0f} MiB ({worst['impl']}, the "
                     f"worst backend) vs {naive['peak_mib']:.0f} MiB for the naive logits path = "
                     f"{ratio:.3f} of it; the bound is < 1/8 = 0.125: "
                     f"{'HOLDS' if ratio < 1 / 8 else 'DOES NOT HOLD'}.")}


# ----------------------------------------------------------------------------------------------- outputs
def _fmt(v, digits=3):
    if v is None:
        return "–"
    if isinstance(v, float):
        if v != v:
            return "–"
        return f"{v:.{digits}g}" if abs(v) < 10 ** digits else f"{v:.0f}"
    return str(v)


def latency_table(rows: list[dict]) -> str:
    cols = ["implementation", "backend", "N", "D", "V", "import ms", "first call ms", "steady median ms",
            "min–max ms", "first / steady", "note"]
    out = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        ok = r.get("median_ms") is not None
        cells = [r["label"], r.get("backend") or "–", str(r["N"]), str(r["D"]), str(r["V"]),
                 _fmt(r.get("import_ms")), _fmt(r.get("first_call_ms")), _fmt(r.get("median_ms")),
                 f"{_fmt(r.get('min_ms'))}–{_fmt(r.get('max_ms'))}" if ok else "–",
                 _fmt(r["first_call_ms"] / r["median_ms"]) if ok and r.get("first_call_ms") else "–",
                 (r.get("note") or "").replace("|", "/")]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def table(rows: list[dict], gpu: bool) -> str:
    if rows and rows[0]["workload"] == "latency":
        return latency_table(rows)
    with_gemm = any(r.get("gemm_x") for r in rows)
    cols = ["implementation", "pass", "N", "D", "V", "median ms", "min–max ms", "× torch speed",
            "peak MiB", "mem / torch"]
    if with_gemm:
        cols += ["× GEMMs"]
    if gpu:
        cols += ["TFLOP/s", "% bf16 peak"]
    cols += ["max abs diff vs torch", "note"]
    out = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        ok = r.get("median_ms") is not None
        cells = [r["label"], r["mode"].replace("forward+backward", "fwd+bwd").replace("forward", "fwd"),
                 str(r["N"]), str(r["D"]), str(r["V"]), _fmt(r.get("median_ms")),
                 f"{_fmt(r.get('min_ms'))}–{_fmt(r.get('max_ms'))}" if ok else "–",
                 _fmt(r.get("speedup_vs_torch")), _fmt(r.get("peak_mib"), 4), _fmt(r.get("mem_vs_torch"))]
        if with_gemm:
            cells += ["1 (baseline)" if r["impl"] == I.GEMM and ok else _fmt(r.get("gemm_x"))]
        if gpu:
            cells += [_fmt(r.get("tflops")), _fmt(r.get("pct_of_peak"))]
        d = r.get("max_abs_diff_vs_torch")
        cells += [f"{d:.1e}" if d is not None else "–", (r.get("note") or "").replace("|", "/")]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def markdown(result: dict) -> str:
    env, rows = result["environment"], result["rows"]
    gpu = env["device"] == "cuda"
    lines = [f"# fastpref benchmarks — {env.get('gpu') or env.get('cpu') or env['device']}", ""]
    lines.append("Generated by `" + result["command"] + f"` on {env['date']}.")
    lines.append("Software: " + ", ".join(f"{k} {v}" for k, v in env.items()
                                           if k in ("torch", "triton", "cuda", "python", "fastpref", "liger-kernel",
                                                    "cut-cross-entropy", "trl") and v) + ".")
    lines.append(f"Machine: {env['machine']}" + (f"; GPU {env.get('gpu', '?')}" if gpu else "") +
                 (f"; git {env['git_commit']}" if env.get("git_commit") else "") + ".")
    lines.append(f"fastpref backends available: {', '.join(env.get('fastpref_backends', ['?']))}.")
    if result.get("bf16_peak_tflops"):
        lines.append(f"Measured bf16 matmul peak (8192³ torch.matmul): {result['bf16_peak_tflops']:.0f} TFLOP/s.")
    load = (f" (1-minute load average {env['loadavg_at_start']} at the start, {result.get('loadavg_at_end')} at "
            f"the end, on {os.cpu_count()} cores)" if env.get("loadavg_at_start") is not None else "")
    lines.append(f"Wall time of the run: {result['wall_s']:.0f} s{load}.")
    lines += ["", "Times: median over the timed repeats (min–max shown) after warm-up, device-synchronised. "
              "'× torch speed' = torch time / this time; 'mem / torch' = this peak / torch's peak, both against "
              "plain torch with materialized logits at the same workload, shape and pass. "
              "'max abs diff vs torch': largest difference from plain torch over the first 16 outputs (and, for "
              "forward+backward, the first 16 entries of the hidden-state gradient).",
              "", result["memory_method"], ""]
    if result.get("issue5"):
        lines += ["**" + result["issue5"]["text"] + "**", ""]
    if result.get("goals"):
        lines += ["Issue-15 goals (GPU: bf16, N=16384, D=4096, V=128256; CPU: float32, N=8192, D=512, V=32000; "
                  "'× GEMMs': this time over the bare torch.mm GEMMs of the same shape measured in this run):", ""]
        lines += [f"- {g}" for g in result["goals"]] + [""]
    for wl, title in WORKLOAD_TITLES.items():
        rs = [r for r in rows if r["workload"] == wl]
        if not rs:
            continue
        lines += [f"## {title}", "", table(rs, gpu), ""]
        if wl in ("sweep_N", "sweep_V") and os.path.exists(os.path.join(result["out_dir"], f"{wl}.png")):
            lines += [f"![{wl}]({wl}.png)", ""]
    if result["notes"]:
        lines += ["## Notes", ""] + [f"- {n}" for n in result["notes"]] + [""]
    return "\n".join(lines)


def plots(result: dict, out_dir: str) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        result["notes"].append("matplotlib not installed: no plots")
        return []
    made = []
    for wl, axis in (("sweep_N", "N"), ("sweep_V", "V")):
        rs = [r for r in result["rows"] if r["workload"] == wl and r.get("median_ms")]
        if not rs:
            continue
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=72)
        for impl in dict.fromkeys(r["impl"] for r in rs):
            pts = sorted((r[axis], r["median_ms"], r.get("peak_mib")) for r in rs if r["impl"] == impl)
            lab = next(r["label"] for r in rs if r["impl"] == impl)
            a1.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=lab, ms=3)
            mp_ = [(p[0], p[2]) for p in pts if p[2] is not None and p[2] > 0]
            if mp_:
                a2.plot([p[0] for p in mp_], [p[1] for p in mp_], "o-", label=lab, ms=3)
        fixed = "D={D}, V={V}".format(**rs[0]) if axis == "N" else "N={N}, D={D}".format(**rs[0])
        for a, yl in ((a1, "median ms"), (a2, "peak MiB above inputs")):
            a.set_xscale("log", base=2)
            a.set_yscale("log")
            a.set_xlabel(f"{axis} ({fixed}, {rs[0]['dtype']}, fwd+bwd)")
            a.set_ylabel(yl)
            a.grid(alpha=0.3, which="both")
        a2.legend(fontsize=6, loc="best")
        fig.tight_layout()
        path = os.path.join(out_dir, f"{wl}.png")
        fig.savefig(path)
        plt.close(fig)
        made.append(path)
    return made


# ----------------------------------------------------------------------------------------------- main
def run_round(entries: list[Entry], a, worker: Isolated | None, t_start: float, out_dir: str, env: dict,
              rnd: int) -> tuple[list[dict], int]:
    """One pass over the plan: a row per entry (measured, skipped or failed), and how many the budget cut."""
    rows, done = [], {}
    skipped_budget = 0
    tag = f" r{rnd + 1}/{a.rounds}" if a.rounds > 1 else ""
    for n, e in enumerate(entries):
        lab = label(e)
        row = {**asdict(e), "label": lab, "flops": flops(e), "valid_tokens": valid_tokens(e)}
        fk = _flat_key(e)
        if e.workload in FLAT and fk in done:  # same measurement already made in another workload
            src = done[fk]
            row.update({k: v for k, v in src.items() if k not in asdict(e) and k not in ("label", "flops")})
            rows.append(row)
            continue
        if a.budget_s is not None and time.perf_counter() - t_start > a.budget_s:
            row["note"] = "not run: time budget exhausted"
            skipped_budget += 1
            rows.append(row)
            continue
        t0 = time.perf_counter()
        if e.workload == "latency":
            r = run_latency(e, a.device, a.timeout_s)
        elif worker is not None:
            r = worker.run("entry", e, a.timeout_s)
        else:
            r = run_inprocess(e, a.device)
        r["entry_s"] = time.perf_counter() - t0
        if "skipped" in r:
            r["note"] = "skipped: " + r.pop("skipped")
        elif "error" in r:
            r["note"] = "failed: " + r["error"]
        row.update(r)
        rows.append(row)
        if e.workload in FLAT and r.get("median_ms") is not None:
            done[fk] = r
        # a run killed from outside (the GPU check's limit) still leaves what it measured
        with open(os.path.join(out_dir, "bench.partial.json"), "w") as f:
            json.dump({"environment": env, "rows": rows}, f, indent=1, default=str)
        status = (f"{r['median_ms']:9.1f} ms  peak {r.get('peak_mib') or 0:8.0f} MiB" if r.get("median_ms")
                  is not None else r.get("note", ""))
        print(f"[{n + 1:3d}/{len(entries)}{tag} {time.perf_counter() - t_start:6.0f}s] {e.workload:9s} {e.mode:16s} "
              f"N={e.N:<6d} V={e.V:<7d} {lab[:48]:48s} {status}", flush=True)
    return rows, skipped_budget


def merge_rounds(rounds: list[list[dict]]) -> list[dict]:
    """Rows of several rounds (same plan, same order) as one: all repeats pooled, the largest peak memory."""
    if len(rounds) == 1:
        return rounds[0]
    merged = []
    for same in zip(*rounds):
        row = dict(same[0])
        ok = [r for r in same if r.get("median_ms") is not None]
        if len(ok) == len(same):
            times = [t for r in ok for t in r["times_ms"]]
            row.update(median_ms=statistics.median(times), min_ms=min(times), max_ms=max(times), times_ms=times,
                       repeats=len(times), round_medians_ms=[r["median_ms"] for r in ok], rounds=len(ok))
            peaks = [r["peak_mib"] for r in ok if r.get("peak_mib") is not None]
            row["peak_mib"] = max(peaks) if peaks else None
        elif ok:  # some round failed: report that round's note
            bad = next(r for r in same if r.get("median_ms") is None)
            row = dict(bad)
        merged.append(row)
    return merged


def output_dir(out: str | None, update_results: bool, device: str) -> str:
    """Where a run writes: --out, or the committed bench/results/<device>/ only when asked (--update-results),
    else a fresh git-ignored bench/results/tmp/<device>-<date>-<time>[-k]/ that no earlier run wrote."""
    if out:
        return os.path.abspath(out)
    if update_results:
        return os.path.join(RESULTS, device)
    base = os.path.join(RESULTS, "tmp", f"{device}-{time.strftime('%Y%m%d-%H%M%S')}")
    path, k = base, 1
    while os.path.exists(path):
        k += 1
        path = f"{base}-{k}"
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true",
                   help=f"small shapes and few repeats (CPU: no new measurement after {QUICK_CPU_BUDGET_S} s, so "
                        "under 10 min on 2 cores)")
    p.add_argument("--tiny", action="store_true", help="toy shapes, no compilation (the test suite's smoke run)")
    p.add_argument("--plan", choices=("standard", "check"), default="standard",
                   help="check: the GPU check's plan (issue-15 goal shape, GEMM baseline, backward strategies, "
                        "frozen head, latency), most informative first")
    p.add_argument("--out", default=None, help="output folder (default: a fresh bench/results/tmp/<device>-<time>)")
    p.add_argument("--update-results", action="store_true",
                   help="write to the committed results, bench/results/<device>/ (then: python -m bench.readme)")
    p.add_argument("--impls", default=None, help="comma-separated implementation keys to keep")
    p.add_argument("--workloads", default=None, help="comma-separated workloads to keep")
    p.add_argument("--budget-s", type=float, default=None,
                   help="stop starting new measurements after this many seconds (the rest are reported skipped)")
    p.add_argument("--timeout-s", type=float, default=None,
                   help=f"limit per measurement (default 600 s; --quick on the CPU {QUICK_CPU_TIMEOUT_S} s); it holds "
                        "on GPUs too (a worker process is replaced), not with --isolate none")
    p.add_argument("--isolate", choices=("auto", "fork", "none"), default="auto",
                   help="fork: measurements in worker processes (CPU: one per measurement, its own peak RSS; GPU: "
                        "one worker, replaced after a timeout or a CUDA fault); none: in this process (auto: fork)")
    p.add_argument("--shape", default=None, help="N,D,V of the headline workloads instead of the preset")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the whole plan this many times in turn and pool the repeats (fairer on a shared machine)")
    a = p.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device")
    if a.out and a.update_results:
        p.error("--out and --update-results name two different folders: give one")
    if a.rounds < 1:
        p.error("--rounds must be >= 1")
    t_start = time.perf_counter()
    out_dir = output_dir(a.out, a.update_results, a.device)
    os.makedirs(out_dir, exist_ok=True)
    quick_cpu = a.quick and a.device == "cpu" and a.plan == "standard"
    if a.budget_s is None and quick_cpu:
        a.budget_s = QUICK_CPU_BUDGET_S
    if a.timeout_s is None:
        a.timeout_s = QUICK_CPU_TIMEOUT_S if quick_cpu else 600

    shape = tuple(int(x) for x in a.shape.split(",")) if a.shape else None
    entries = check_plan(a.device, a.tiny) if a.plan == "check" else plan(a.device, a.quick, a.tiny, shape)
    if a.impls:
        keep = set(a.impls.split(","))
        entries = [e for e in entries if e.impl in keep]
    if a.workloads:
        keep = set(a.workloads.split(","))
        entries = [e for e in entries if e.workload in keep]

    prepare(entries, a.device)
    notes = []
    worker = None if a.isolate == "none" else Isolated(a.device, fresh=a.device == "cpu")
    if worker is not None and a.device == "cuda" and torch.cuda.is_initialized():
        worker = None  # a forked child cannot use CUDA once the parent initialised it
        notes.append("CUDA was initialised before the measurements started: they ran in this process, and the "
                     "per-measurement time limit did not hold.")
    if worker is None or a.device == "cpu":
        on_device = device_environment(a.device)
    else:  # the device's own answers come from the worker (the parent must not initialise CUDA)
        got = worker.run("call", device_environment, 120)
        on_device = got.get("value") or {"device_error": got.get("error")}
    env = environment(a.device, on_device)
    missing = [d for d, v in I.library_versions().items() if v is None]
    if missing:
        notes.append(f"not installed, skipped: {', '.join(missing)} (pip install -r requirements-bench.txt)")
    if a.device == "cpu":
        notes.append("fastpref's triton backend is a GPU backend (on a CPU only the Triton interpreter runs it, "
                     "for tests): not timed here.")
        notes.append("Cut Cross-Entropy on the CPU runs its impl='torch_compile' (materialized logits under "
                     "torch.compile); its Triton 'cce' kernels need a GPU. Liger's fused linear cross-entropy is a "
                     "Triton kernel: GPU only. Liger's DPO loss runs with compiled=False on the CPU.")
    notes.append("DPO / listwise: the first quarter of every sequence is prompt (label -100). fastpref drops "
                 "ignored rows internally; every per-token implementation marked '+ loss in torch' gets only the "
                 "completion tokens (hidden[mask]) as TRL does on GPUs, and the loss is computed from the "
                 "per-sequence sums in plain torch; Liger's DPO loss takes the padded batch as its API requires.")
    notes.append("Token KL: no reference library computes a full-vocabulary KL between two models per token "
                 "(Liger's JSD distillation loss returns only a scalar): compared against plain torch only.")
    notes.append("Model FLOPs per step: 2·N·D·V per forward GEMM pass, 4·N·D·V for a backward, 2·N·D·V for the "
                 "frozen head's backward (N = completion tokens); recomputation inside an implementation is not "
                 "counted.")
    if any(e.impl == I.GEMM for e in entries):
        notes.append("Bare GEMMs: the N·D·V matrix products one step needs at least, through torch.mm in the "
                     "input dtype into preallocated outputs: forward 1 (the logits), forward+backward 4 (logits, "
                     "their recompute, dH, dW), frozen head 2 (logits, dH). '× GEMMs' divides a row's time by "
                     "theirs at the same shape and pass; token KL rows by the single model's four.")
    if any(I.fastpref_variant(e.impl)[1] for e in entries if e.impl.startswith("fastpref[")):
        notes.append(f"Triton backward strategies are selected with {I.STRATEGY_ENV}=atomic|gemm for the whole "
                     "measurement; 'fastpref (triton)' is the library's default. Offered by this fastpref: "
                     f"{', '.join(I.triton_strategies()) or 'none (a fastpref without the variable)'}.")
    if any(e.workload == "latency" for e in entries):
        notes.append("Latency: each row is a fresh interpreter (bench/latency.py) with torch imported and the "
                     "inputs on the device first; 'import ms' = import fastpref, 'first call' = the first "
                     "forward+backward (lazy imports, backend selection, kernel loading or compilation: a GPU's "
                     "Triton cache on disk is warm when earlier steps compiled these kernels), then 3 warm-up "
                     "calls and the median of the steady ones.")
    peak = None
    if a.device == "cuda":
        peak = (bf16_peak_tflops() if worker is None else worker.run("call", bf16_peak_tflops, 120).get("value"))

    rounds, skipped = [], 0
    try:
        for rnd in range(a.rounds):
            rows, cut = run_round(entries, a, worker, t_start, out_dir, env, rnd)
            rounds.append(rows)
            skipped += cut
    finally:
        if worker is not None:
            worker.close()
    rows = merge_rounds(rounds)
    if skipped:
        notes.append(f"{skipped} measurements not run: the --budget-s {a.budget_s:.0f} s was spent.")
    if a.rounds > 1:
        notes.append(f"{a.rounds} rounds: the whole plan ran {a.rounds} times in turn, so that a slow phase of a "
                     "shared machine falls on every implementation; times are the median (min–max) over all "
                     "rounds' repeats, peak memory the largest of the rounds.")
    finish_rows(rows, peak)
    for r in rows:
        if "traceback" in r:
            r.pop("traceback")
    cmd = "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {"environment": env, "command": cmd.strip(), "quick": a.quick, "bf16_peak_tflops": peak,
              "memory_method": CUDA_MEMORY_METHOD if a.device == "cuda" else CPU_MEMORY_METHOD,
              "notes": notes, "rows": rows, "issue5": issue5_check(rows), "goals": goals_check(rows),
              "out_dir": out_dir}
    if not a.no_plots:
        plots(result, out_dir)
    result["wall_s"] = time.perf_counter() - t_start
    if hasattr(os, "getloadavg"):
        result["loadavg_at_end"] = round(os.getloadavg()[0], 2)
    md = markdown(result)
    with open(os.path.join(out_dir, "bench.json"), "w") as f:
        json.dump({k: v for k, v in result.items() if k != "out_dir"}, f, indent=1)
    with open(os.path.join(out_dir, "bench.md"), "w") as f:
        f.write(md)
    print()
    print(md)
    if result["issue5"]:
        print(result["issue5"]["text"])
    print(f"results: {out_dir}" + ("" if a.update_results else
                                  " (the committed results are written with --update-results)"))
    partial = os.path.join(out_dir, "bench.partial.json")
    if os.path.exists(partial):
        os.remove(partial)
    return 0
