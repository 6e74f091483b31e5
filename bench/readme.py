"""Regenerate README.md's performance section from the latest results under bench/results/<device>/.

    python -m bench.readme [--readme README.md] [--results bench/results] [--check]

Rewrites only the text between ``<!-- perf:begin -->`` and ``<!-- perf:end -->``. Sources:
``bench/results/<folder>/bench.json`` (``python -m bench``; folders ``cpu`` and ``cuda`` first, then any other,
e.g. ``cpu-8192`` for a run at another shape), plus any other ``*.json`` there that carries a ``rows`` list,
shown with its own markdown file when one sits beside it.
--check exits 1 when the section is out of date (nothing written).
"""
from __future__ import annotations

import argparse
import json
import os
import re
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


HEADLINE = (("logprobs", "forward", "log-probs fwd"), ("logprobs", "forward+backward", "log-probs fwd+bwd"),
            ("logprobs", "forward+backward, frozen head", "log-probs fwd+bwd, frozen head"),
            ("dpo", "forward+backward", "DPO + reference"), ("token_kl", "forward+backward", "token KL"),
            ("listwise", "forward+backward", "listwise K=4"))


def _cell(r) -> str:
    if r is None or r.get("median_ms") is None:
        return "–"
    sp, mem = r.get("speedup_vs_torch"), r.get("mem_vs_torch")
    t = f"{_fmt(r['median_ms'])} ms" + (f" ({sp:.2f}×)" if sp is not None else "")
    m = f"{_fmt(r.get('peak_mib'), 4)} MiB" + (f" ({mem:.2f})" if mem is not None else "")
    out = f"{t}<br>{m}"
    if r.get("tflops"):
        out += f"<br>{_fmt(r['tflops'])} TFLOP/s"
    return out


def summary_table(rows: list[dict], gpu: bool) -> str:
    """Implementations × headline workloads; each cell: median ms (speed-up vs torch), peak MiB (× torch's)."""
    cols, heads = [], []
    for wl, mode, name in HEADLINE:
        rs = [r for r in rows if r["workload"] == wl and r["mode"] == mode]
        if rs:
            cols.append((wl, mode))
            heads.append(f"{name}<br>N={rs[0]['N']}, D={rs[0]['D']}, V={rs[0]['V']}")
    impls = list(dict.fromkeys(r["impl"] for r in rows if (r["workload"], r["mode"]) in cols
                               and r.get("median_ms") is not None))
    out = ["| implementation | " + " | ".join(heads) + " |", "|---|" + "|".join("---" for _ in heads) + "|"]
    for impl in impls:
        byw = {(r["workload"], r["mode"]): r for r in rows if r["impl"] == impl and (r["workload"], r["mode"]) in cols}
        lab = next((r["label"] for k, r in byw.items() if k[0] == "logprobs"), None) or next(iter(byw.values()))["label"]
        lab = re.sub(r" ×\d+ ", " ", lab)  # the bare-GEMM row: how many GEMMs differs by column
        out.append(f"| {lab} | " + " | ".join(_cell(byw.get(c)) for c in cols) + " |")
    return "\n".join(out)


def skipped(rows: list[dict]) -> list[str]:
    """'labels: reason' per distinct reason, for the rows that were not measured."""
    by_note: dict[str, list[str]] = {}
    for r in rows:
        note = (r.get("note") or "").removeprefix("skipped: ")
        if r.get("median_ms") is None and note:
            labs = by_note.setdefault(note, [])
            if r["label"] not in labs:
                labs.append(r["label"])
    return [f"{', '.join(labs)} ({note})" for note, labs in by_note.items()]


def device_section(device: str, folder: str, rel: str, said: set[str] | None = None) -> list[str]:
    """The README lines of one results folder; a method paragraph already in ``said`` is not repeated."""
    said = set() if said is None else said
    path = os.path.join(folder, "bench.json")
    lines = []
    if os.path.exists(path):
        with open(path) as f:
            res = json.load(f)
        env, rows = res["environment"], res["rows"]
        gpu = device.split("-")[0] == "cuda"
        what = env.get("gpu") if gpu else env.get("cpu") or "CPU"
        extra = "" if device in DEVICE_ORDER else f" (`{device}`)"
        lines += [f"### {'GPU' if gpu else 'CPU'}: {what}{extra}", ""]
        soft = ", ".join(f"{k} {env[k]}" for k in SOFTWARE if env.get(k))
        lines += [f"Measured {env['date']} on {env['machine']}" + (f" ({env.get('gpu', '?')})" if gpu else "") +
                  f" with {soft}" + (f", at commit {env['git_commit']}" if env.get("git_commit") else "") +
                  f"; fastpref backends: {', '.join(env.get('fastpref_backends', ['?']))}. Source: `{rel}/bench.json`, "
                  f"made by `{res['command']}` ({res['wall_s']:.0f} s"
                  + (f", 1-minute load average {env['loadavg_at_start']} → {res.get('loadavg_at_end')}"
                     if env.get("loadavg_at_start") is not None else "") + f"); full tables, sweeps and notes in "
                  f"[`{rel}/bench.md`]({rel}/bench.md).", ""]
        if res.get("bf16_peak_tflops"):
            lines += [f"Measured bf16 matmul peak: {res['bf16_peak_tflops']:.0f} TFLOP/s.", ""]
        dtype = rows[0]["dtype"] if rows else ""
        timed = next((r for r in rows if r.get("median_ms") is not None), None)
        lines += [f"{dtype}. Each cell: median time over {timed['repeats'] if timed else '?'} timed repeats after "
                  "warm-up (speed-up against plain torch with materialized logits, on the same inputs in the same "
                  "run), then peak memory above the inputs (as a fraction of plain torch's). DPO and listwise rows "
                  "of a per-token implementation add the loss in torch on its per-sequence sums.", ""]
        lines += [summary_table(rows, gpu), ""]
        for goal in res.get("goals") or []:
            lines += [f"**Goal check: {goal}.**", ""]
        if res.get("issue5"):
            lines += ["**" + res["issue5"]["text"] + "**", ""]
        sk = skipped(rows)
        if sk:
            lines += ["Not measured here: " + "; ".join(sk) + ".", ""]
        pngs = [p for p in ("sweep_N.png", "sweep_V.png") if os.path.exists(os.path.join(folder, p))]
        if pngs:
            lines += [" ".join(f"![{p[:-4]}]({rel}/{p})" for p in pngs), ""]
        if res["memory_method"] not in said:
            said.add(res["memory_method"])
            lines += [res["memory_method"], ""]
    # other result files in the same folder
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
        meta = other.get("environment") or other.get("meta") or {}
        orows = other.get("rows") or other.get("results")
        if not os.path.exists(md) and not (isinstance(orows, list) and orows):
            continue
        lines += [f"#### Also: `{rel}/{name}`", ""]
        if meta:
            lines += ["Run parameters: " + ", ".join(f"{k} {v}" for k, v in meta.items()
                                                      if isinstance(v, (str, int, float)) and v != "") + ".", ""]
        if os.path.exists(md):
            with open(md) as f:
                body = f.read().strip()
            # demote headings so they nest under this section
            body = "\n".join(("###" + ln) if ln.startswith("#") else ln for ln in body.splitlines())
            lines += [body, ""]
        else:
            keys = [k for k in orows[0] if not isinstance(orows[0][k], (list, dict))]
            lines += ["| " + " | ".join(keys) + " |", "|" + "|".join("---" for _ in keys) + "|"]
            lines += ["| " + " | ".join(_fmt(r.get(k)) for k in keys) + " |" for r in orows]
            lines += [""]
    return lines


def generate(results: str, readme_dir: str) -> str:
    lines = ["_This section is generated by `python -m bench.readme` from the latest results under "
             "`bench/results/`; do not edit it by hand. Rerun `python -m bench --device cpu --quick --update-results` "
             "(or `bash bench/gpu_check.sh OUT` on a GPU machine), then `python -m bench.readme`._", ""]
    found, said = False, set()
    devices = [d for d in DEVICE_ORDER if os.path.isdir(os.path.join(results, d))]
    devices += sorted(d for d in os.listdir(results) if os.path.isdir(os.path.join(results, d))
                      and d not in DEVICE_ORDER and d != "tmp") if os.path.isdir(results) else []
    for d in devices:
        folder = os.path.join(results, d)
        rel = os.path.relpath(folder, readme_dir).replace(os.sep, "/")
        sec = device_section(d, folder, rel, said)
        if sec:
            found = True
            lines += sec
    if not any(d == "cuda" for d in devices):
        lines += ["No GPU results committed yet: `bash bench/gpu_check.sh OUT` runs the GPU benchmark "
                  "(`python -m bench --device cuda --plan check`) and copies it to `bench/results/cuda/`.", ""]
    if not found:
        lines += ["No results yet: run `python -m bench --device cpu --quick --update-results`.", ""]
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
