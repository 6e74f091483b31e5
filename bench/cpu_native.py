"""CPU benchmark of the native backend against plain torch and torch's own fused op (not a timed test).

One process runs everything; each measurement runs in a fresh child process so that its peak RSS
(resource.getrusage ru_maxrss, minus the child's peak after building the inputs and a small warm-up) is
the memory the implementation needs above its inputs. Implementations are interleaved per repeat, so
that a busy machine slows all of them alike. Per implementation and mode: median wall time of the
repeats with min/max, and the median peak-RSS growth.

Token log-probs (per-token loss, reduction "none") of h [N, D] @ W[V, D]ᵀ, fp32; "fwd" runs under
torch.no_grad() (scoring), "fwd+bwd" backpropagates Σ logp into hidden and weight.

    python bench/cpu_native.py [--N 8192 --D 512 --V 32000 --repeats 3 --out bench/results/cpu/native.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

IMPLS = {
    "native": "fastpref.token_logprobs(backend='native')",
    "fastpref-torch": "fastpref.token_logprobs(backend='torch')",
    "plain-torch": "log_softmax(h @ Wᵀ).gather (materialized logits)",
    "F.linear_cross_entropy": "torch.nn.functional.linear_cross_entropy(reduction='none'), reference path",
    "F.linear_cross_entropy-chunked": "same with options=torch.nn.LinearCrossEntropyOptions()",
}


def _child(impl: str, mode: str, N: int, D: int, V: int, threads: int) -> dict:
    import resource

    import torch

    torch.set_num_threads(threads)
    import fastpref
    import torch.nn.functional as F

    def make(n, d, v):
        g = torch.Generator().manual_seed(0)
        h = torch.randn(n, d, generator=g)
        w = torch.randn(v, d, generator=g).div_(d ** 0.5)  # in place: no second copy inflates the baseline
        return h, w, torch.randint(0, v, (n,), generator=g)

    def logp(h, w, lab):
        if impl == "native":
            return fastpref.token_logprobs(h, w, lab, backend="native")
        if impl == "fastpref-torch":
            return fastpref.token_logprobs(h, w, lab, backend="torch")
        if impl == "plain-torch":
            return torch.log_softmax(h @ w.T, dim=-1).gather(1, lab[:, None]).squeeze(1)
        if impl == "F.linear_cross_entropy":
            return -F.linear_cross_entropy(h, w, lab, reduction="none")
        if impl == "F.linear_cross_entropy-chunked":
            return -F.linear_cross_entropy(h, w, lab, reduction="none", options=torch.nn.LinearCrossEntropyOptions())
        raise ValueError(impl)

    def run(h, w, lab):
        if mode == "fwd":
            with torch.no_grad():
                return logp(h, w, lab)
        hh, ww = h.requires_grad_(True), w.requires_grad_(True)
        out = logp(hh, ww, lab)
        out.sum().backward()
        return out

    run(*make(64, D, 1024))  # load libraries and kernels outside the measurement
    h, w, lab = make(N, D, V)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    out = run(h, w, lab)
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"seconds": dt, "peak_mib": (peak - base) / 1024, "checksum": float(out.double().sum())}


def available(impl: str) -> str | None:
    import torch
    import torch.nn.functional as F

    if impl.startswith("F.linear_cross_entropy") and not hasattr(F, "linear_cross_entropy"):
        return "torch has no F.linear_cross_entropy"
    if impl.endswith("chunked") and not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        return "torch has no LinearCrossEntropyOptions"
    if impl == "native":
        from fastpref import backends

        try:
            backends.resolve("native", torch.device("cpu"), torch.float32)
        except ValueError as why:
            return str(why)
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--N", type=int, default=8192)
    ap.add_argument("--D", type=int, default=512)
    ap.add_argument("--V", type=int, default=32000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--impls", default=",".join(i for i in IMPLS if not i.endswith("chunked")),
                    help="comma-separated; F.linear_cross_entropy-chunked is off by default (about 8x slower "
                         "than the reference path on CPU: 16 s at N=1024, V=8000)")
    ap.add_argument("--modes", default="fwd,fwd+bwd")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "cpu", "native.json"))
    ap.add_argument("--child", nargs=2, metavar=("IMPL", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(_child(*args.child, args.N, args.D, args.V, args.threads)))
        return 0

    import torch

    impls = [i for i in args.impls.split(",") if i]
    skipped = {i: why for i in impls if (why := available(i))}
    impls = [i for i in impls if i not in skipped]
    modes = [m for m in args.modes.split(",") if m]
    runs: dict[tuple[str, str], list[dict]] = {(i, m): [] for i in impls for m in modes}
    load_before = os.getloadavg()
    t_start = time.time()
    for rep in range(args.repeats):
        for mode in modes:
            for impl in impls:
                cmd = [sys.executable, os.path.abspath(__file__), "--child", impl, mode, "--N", str(args.N),
                       "--D", str(args.D), "--V", str(args.V), "--threads", str(args.threads)]
                p = subprocess.run(cmd, capture_output=True, text=True)
                if p.returncode != 0:
                    print(f"{impl} {mode}: child failed\n{p.stderr[-2000:]}", file=sys.stderr)
                    continue
                r = json.loads(p.stdout.strip().splitlines()[-1])
                runs[(impl, mode)].append(r)
                print(f"  rep {rep} {mode:8} {impl:32} {r['seconds']:7.2f} s {r['peak_mib']:8.1f} MiB", flush=True)
    rows = []
    for (impl, mode), rs in runs.items():
        if not rs:
            continue
        secs = [r["seconds"] for r in rs]
        mems = [r["peak_mib"] for r in rs]
        rows.append({"impl": impl, "mode": mode, "what": IMPLS[impl], "seconds_median": statistics.median(secs),
                     "seconds_min": min(secs), "seconds_max": max(secs), "peak_mib_median": statistics.median(mems),
                     "peak_mib_min": min(mems), "peak_mib_max": max(mems), "runs": rs})
    meta = {"N": args.N, "D": args.D, "V": args.V, "dtype": "float32", "repeats": args.repeats,
            "threads": args.threads, "torch": torch.__version__, "python": platform.python_version(),
            "machine": f"{platform.machine()} {os.cpu_count()} CPUs ({_cpu_model()})",
            "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
            "wall_seconds": round(time.time() - t_start, 1), "skipped": skipped}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "results": rows}, f, indent=1)
    print(f"\nN={args.N} D={args.D} V={args.V} fp32, {args.threads} threads, torch {torch.__version__}, "
          f"median of {args.repeats} (min–max); memory = peak RSS above inputs")
    print("| implementation | mode | time (s) | peak memory (MiB) |")
    print("|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["mode"], r["seconds_median"])):
        print(f"| {r['impl']} | {r['mode']} | {r['seconds_median']:.2f} ({r['seconds_min']:.2f}–{r['seconds_max']:.2f}) "
              f"| {r['peak_mib_median']:.0f} ({r['peak_mib_min']:.0f}–{r['peak_mib_max']:.0f}) |")
    for i, why in skipped.items():
        print(f"skipped {i}: {why}")
    print(f"load average before/after: {load_before} / {meta['loadavg_after']}; wrote {args.out}")
    return 0


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    sys.exit(main())
