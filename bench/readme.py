"""Regenerate README.md's performance section from the latest results under bench/results/<device>/.

    python -m bench.readme [--readme README.md] [--results bench/results] [--check]

Rewrites only the text between ``<!-- perf:begin -->`` and ``<!-- perf:end -->``. Sources:
``bench/results/<device>/bench.json`` (``python -m bench``), plus any other ``*.json`` there that carries a
``rows`` list (e.g. bench/cpu_native.py's results), shown with its own markdown file when one sits beside it.
--check exits 1 when the section is out of date (nothing written).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEGIN, END = "<!-- perf:begin -->", "<!-- perf:end -->"
DEVICE_ORDER = ("cpu", "cuda")
SOFTWARE = ("torch", "triton", "cuda", "python", "fastpref", "liger-kernel", "cut-cross-entropy", "trl")


def _fmt(v, digits=3):
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 10 ** digits else f"{v:.0f}"
    return str(v)


def _times(r):
    if r.get("median_ms") is None:
        return "–"
    return f"{_fmt(r['median_ms'])} ({_fmt(r['min_ms'])}–{_fmt(r['max_ms'])})"


def _ratio(r, key):
    v = r.get(key)
    return "–" if v is None else f"{v:.2f}×" if key == "speedup_vs_torch" else f"{v:.2f}"


def summary_table(rows: list[dict], gpu: bool) -> str:
    """One compact table over the headline workloads (no sweeps): rows = implementations, per workload."""
    cols = ["workload", "implementation", "ms, median (min–max)", "speed vs torch", "peak MiB", "mem vs torch"]
    if gpu:
        cols.append("TFLOP/s (% peak)")
    out = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for wl, wname in (("logprobs", "log-probs"), ("dpo", "DPO + ref"), ("token_kl", "token KL"),
                      ("listwise", "listwise K=4")):
        for r in rows:
            if r["workload"] != wl or r.get("median_ms") is None:
                continue
            mode = {"forward": " fwd", "forward+backward": " fwd+bwd"}[r["mode"]] if wl == "logprobs" else ""
            shape = f"N={r['N']}, D={r['D']}, V={r['V']}"
            cells = [f"{wname}{mode} ({shape})", r["label"], _times(r), _ratio(r, "speedup_vs_torch"),
                     _fmt(r.get("peak_mib"), 4), _ratio(r, "mem_vs_torch")]
            if gpu:
                cells.append(f"{_fmt(r.get('tflops'))} ({_fmt(r.get('pct_of_peak'), 2)}%)" if r.get("tflops")
                             else "–")
            out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def skipped(rows: list[dict]) -> list[str]:
    seen = {}
    for r in rows:
        note = r.get("note") or ""
        if r.get("median_ms") is None and note:
            seen.setdefault(f"{r['label']}: {note}", None)
    return list(seen)


def device_section(device: str, folder: str, rel: str) -> list[str]:
    path = os.path.join(folder, "bench.json")
    lines = []
    if os.path.exists(path):
        with open(path) as f:
            res = json.load(f)
        env, rows = res["environment"], res["rows"]
        gpu = device == "cuda"
        what = env.get("gpu") if gpu else env.get("cpu") or "CPU"
        lines += [f"### {'GPU' if gpu else 'CPU'}: {what}", ""]
        soft = ", ".join(f"{k} {env[k]}" for k in SOFTWARE if env.get(k))
        lines += [f"Measured {env['date']} on {env['machine']}" + (f" ({env['gpu']})" if gpu else "") +
                  f" with {soft}" + (f", at commit {env['git_commit']}" if env.get("git_commit") else "") +
                  f"; fastpref backends: {', '.join(env['fastpref_backends'])}. Source: `{rel}/bench.json`, "
                  f"made by `{res['command']}` ({res['wall_s']:.0f} s); full tables, sweeps and notes in "
                  f"[`{rel}/bench.md`]({rel}/bench.md).", ""]
        if res.get("bf16_peak_tflops"):
            lines += [f"Measured bf16 matmul peak: {res['bf16_peak_tflops']:.0f} TFLOP/s.", ""]
        dtype = rows[0]["dtype"] if rows else ""
        lines += [f"{dtype}; times in ms over {rows[0]['repeats'] if rows else '?'} timed repeats after warm-up; "
                  "ratios against plain torch with materialized logits on the same inputs in the same run.", ""]
        lines += [summary_table(rows, gpu), ""]
        if res.get("issue5"):
            lines += ["**" + res["issue5"]["text"] + "**", ""]
        sk = skipped(rows)
        if sk:
            lines += ["Not measured here: " + "; ".join(sk) + ".", ""]
        pngs = [p for p in ("sweep_N.png", "sweep_V.png") if os.path.exists(os.path.join(folder, p))]
        if pngs:
            lines += [" ".join(f"![{p[:-4]}]({rel}/{p})" for p in pngs), ""]
        lines += ["Peak memory: " + res["memory_method"], ""]
    # other result files in the same folder (e.g. bench/cpu_native.py's)
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".json") or name == "bench.json":
            continue
        try:
            with open(os.path.join(folder, name)) as f:
                other = json.load(f)
        except (OSError, ValueError):
            continue
        if not isinstance(other, dict):
            continue
        md = os.path.join(folder, name[:-5] + ".md")
        lines += [f"#### `{rel}/{name}`", ""]
        env = other.get("environment") or {}
        if env:
            lines += ["Measured " + ", ".join(f"{k} {v}" for k, v in env.items() if isinstance(v, (str, int, float)))
                      + ".", ""]
        if os.path.exists(md):
            with open(md) as f:
                body = f.read().strip()
            # demote headings so they nest under this section
            body = "\n".join(("###" + ln) if ln.startswith("#") else ln for ln in body.splitlines())
            lines += [body, ""]
        elif isinstance(other.get("rows"), list) and other["rows"]:
            keys = [k for k in other["rows"][0] if not isinstance(other["rows"][0][k], (list, dict))]
            lines += ["| " + " | ".join(keys) + " |", "|" + "|".join("---" for _ in keys) + "|"]
            lines += ["| " + " | ".join(_fmt(r.get(k)) for k in keys) + " |" for r in other["rows"]]
            lines += [""]
    return lines


def generate(results: str, readme_dir: str) -> str:
    lines = ["_This section is generated by `python -m bench.readme` from the latest results under "
             "`bench/results/`; do not edit it by hand. Rerun `python -m bench --device cpu --quick` (or "
             "`bash bench/gpu_check.sh OUT` on a GPU machine), then `python -m bench.readme`._", ""]
    found = False
    devices = [d for d in DEVICE_ORDER if os.path.isdir(os.path.join(results, d))]
    devices += sorted(d for d in os.listdir(results) if os.path.isdir(os.path.join(results, d))
                      and d not in DEVICE_ORDER and d != "tmp") if os.path.isdir(results) else []
    for d in devices:
        folder = os.path.join(results, d)
        rel = os.path.relpath(folder, readme_dir).replace(os.sep, "/")
        sec = device_section(d, folder, rel)
        if sec:
            found = True
            lines += sec
    if not any(d == "cuda" for d in devices):
        lines += ["No GPU results committed yet: `bash bench/gpu_check.sh OUT` runs the GPU benchmark "
                  "(`python -m bench --device cuda --quick`) and writes them to `bench/results/cuda/`.", ""]
    if not found:
        lines += ["No results yet: run `python -m bench --device cpu --quick`.", ""]
    return "\n".join(lines).rstrip() + "\n"


def rewrite(text: str, section: str) -> str:
    i, j = text.find(BEGIN), text.find(END)
    if i < 0 or j < i:
        raise SystemExit(f"README has no {BEGIN} ... {END} block")
    return text[: i + len(BEGIN)] + "\n" + section + text[j:]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--readme", default=os.path.join(ROOT, "README.md"))
    p.add_argument("--results", default=os.path.join(ROOT, "bench", "results"))
    p.add_argument("--check", action="store_true", help="exit 1 if the section is out of date; write nothing")
    a = p.parse_args(argv)
    with open(a.readme) as f:
        text = f.read()
    new = rewrite(text, generate(a.results, os.path.dirname(os.path.abspath(a.readme))))
    if a.check:
        if new != text:
            print("README performance section is out of date: run python -m bench.readme")
            return 1
        return 0
    if new != text:
        with open(a.readme, "w") as f:
            f.write(new)
        print(f"rewrote the performance section of {a.readme}")
    else:
        print("README performance section already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
