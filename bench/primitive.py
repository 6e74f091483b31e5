"""Time and memory of the primitive (token log-probs) and of token_kl, against plain torch and torch.compile.

    python -m bench.primitive --device cuda --out DIR [--quick]

Every implementation runs in this one process, on the same inputs, so ratios hold on noisy machines.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

import fastpref
from bench.harness import markdown_table, measure


def plain_logprobs(h, w, labels):
    """The naive path: materialized [N, V] logits, float32 log_softmax, gather."""
    logits = (h @ w.T).float()
    return torch.log_softmax(logits, -1).gather(1, labels[:, None]).squeeze(1)


def implementations(device: torch.device):
    impls = {"torch (materialized logits)": plain_logprobs}
    try:
        impls["torch.compile (materialized)"] = torch.compile(plain_logprobs, dynamic=False)
    except Exception as e:  # pragma: no cover - compile support depends on the install
        print(f"# torch.compile unavailable: {e}", file=sys.stderr)
    for name in fastpref.available_backends(device):
        impls[f"fastpref[{name}]"] = (
            lambda h, w, y, _b=name: fastpref.token_logprobs(h, w, y, backend=_b))
    return impls


def run(device: torch.device, shapes, dtype, repeats: int) -> list[dict]:
    rows = []
    for N, D, V in shapes:
        g = torch.Generator(device="cpu").manual_seed(0)
        h0 = (torch.randn(N, D, generator=g) ).to(device, dtype)
        w0 = (torch.randn(V, D, generator=g) / D**0.5).to(device, dtype)
        y = torch.randint(0, V, (N,), generator=g).to(device)
        results = {}
        for name, fn in implementations(device).items():
            for mode in ("forward", "forward+backward"):
                h = h0.clone().requires_grad_(mode != "forward")
                w = w0.clone().requires_grad_(mode != "forward")

                def step():
                    if mode == "forward":
                        with torch.no_grad():
                            return fn(h, w, y)
                    out = fn(h, w, y)
                    out.backward(torch.ones_like(out))
                    h.grad = w.grad = None

                try:
                    r = measure(step, device, repeats=repeats)
                except torch.OutOfMemoryError:
                    r = {"median_ms": None, "peak_mib": None, "note": "out of memory"}
                    torch.cuda.empty_cache()
                except Exception as e:  # one failing implementation must not hide the others
                    r = {"median_ms": None, "peak_mib": None, "note": f"{type(e).__name__}: {e}"[:120]}
                r.update(impl=name, mode=mode, N=N, D=D, V=V, dtype=str(dtype).replace("torch.", ""))
                results[(name, mode)] = r
                rows.append(r)
        for mode in ("forward", "forward+backward"):
            base = results.get(("torch (materialized logits)", mode), {}).get("median_ms")
            for (name, m), r in results.items():
                if m == mode and base and r.get("median_ms"):
                    r["speedup_vs_torch"] = base / r["median_ms"]
        rows.extend(kl_rows(device, N, D, V, dtype, repeats, h0, w0, y))
    return rows


def kl_rows(device, N, D, V, dtype, repeats, h0, w0, y) -> list[dict]:
    """token_kl forward+backward vs the single-model primitive at the same shape, per backend."""
    out = []
    rh, rw = h0.roll(1, 0), w0.roll(1, 0)
    for name in fastpref.available_backends(device):
        h = h0.clone().requires_grad_()
        w = w0.clone().requires_grad_()

        def kl_step():
            r = fastpref.token_kl(h, w, rh, rw, y, backend=name)
            (r.kl.sum() + r.logp.sum()).backward()
            h.grad = w.grad = None

        def stats_step():
            fastpref.token_logprobs(h, w, y, backend=name).sum().backward()
            h.grad = w.grad = None

        try:
            a = measure(kl_step, device, repeats=repeats)
            b = measure(stats_step, device, repeats=repeats)
            a.update(impl=f"fastpref[{name}] token_kl", mode="forward+backward", N=N, D=D, V=V,
                     dtype=str(dtype).replace("torch.", ""), kl_over_logprobs=a["median_ms"] / b["median_ms"])
            out.append(a)
        except Exception as e:
            out.append({"impl": f"fastpref[{name}] token_kl", "mode": "forward+backward", "N": N,
                        "note": f"{type(e).__name__}: {e}"[:120]})
    return out


COLUMNS = [("impl", "implementation"), ("mode", "pass"), ("N", "N"), ("D", "D"), ("V", "V"), ("dtype", "dtype"),
           ("median_ms", "median ms"), ("min_ms", "min"), ("max_ms", "max"), ("peak_mib", "peak MiB"),
           ("speedup_vs_torch", "× torch"), ("kl_over_logprobs", "KL/logp time"), ("note", "note")]


def environment(device: torch.device) -> dict:
    env = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "python": platform.python_version(),
           "machine": platform.machine(), "cpu_count": os.cpu_count()}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        env["device"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--quick", action="store_true", help="small shapes, few repeats")
    p.add_argument("--out", default=None, help="folder for primitive.json and primitive.md")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    dtype = getattr(torch, a.dtype)
    if a.quick:
        shapes, repeats = [(256, 64, 1000)], 2
    elif device.type == "cuda":
        shapes, repeats = [(4096, 4096, 128256), (16384, 4096, 128256)], 5
    else:
        shapes, repeats = [(2048, 512, 32000)], 3
    rows = run(device, shapes, dtype, repeats)
    table = markdown_table(rows, COLUMNS)
    env = environment(device)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "primitive.json"), "w") as f:
            json.dump({"environment": env, "rows": rows}, f, indent=1)
        with open(os.path.join(a.out, "primitive.md"), "w") as f:
            f.write(f"{env}\n\n{table}\n")
    print(env)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
