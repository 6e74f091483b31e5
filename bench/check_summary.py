"""The GPU check's closing summary: steps, test counts, benchmark table (the last lines it prints).

    python -m bench.check_summary OUT_DIR

Reads OUT_DIR/steps.tsv (name, status, seconds, limit, note; written by bench/gpu_check.sh), the pytest
JUnit file OUT_DIR/tests.xml, and OUT_DIR/bench/ and OUT_DIR/latency/: bench.json, or bench.partial.json
when the step was cut. Uses only the standard library: it must print even when torch cannot be imported.
"""
from __future__ import annotations

import json
import os
import sys
import xml.etree.ElementTree as ET


def steps_table(path: str) -> list[str]:
    out = ["| step | status | seconds | limit | note |", "|---|---|---|---|---|"]
    total = budget = 0
    try:
        with open(path) as f:
            rows = [ln.rstrip("\n").split("\t") for ln in f if ln.strip()]
    except OSError:
        return ["(no steps recorded)"]
    for name, status, secs, limit, *note in rows:
        total += int(secs)
        budget += int(limit)
        out.append(f"| {name} | {status} | {secs} | {limit} | {note[0] if note else ''} |")
    out.append(f"| total | | {total} | {budget} | |")
    return out


def test_counts(path: str) -> str:
    """'tests: N run, P passed, F failed, E errors, S skipped' from a JUnit XML file."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as why:
        return f"tests: no JUnit report ({type(why).__name__})"
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    return (f"tests: {n['tests']} run, {passed} passed, {n['failures']} failed, {n['errors']} errors, "
            f"{n['skipped']} skipped")


def _f(v, digits=3) -> str:
    if v is None:
        return "–"
    return f"{v:.{digits}g}" if abs(v) < 10 ** digits else f"{v:.0f}"


def bench_table(folder: str) -> list[str]:
    for name, partial in (("bench.json", False), ("bench.partial.json", True)):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            break
    else:
        return ["(no benchmark results)"]
    with open(path) as f:
        res = json.load(f)
    out = [f"{os.path.basename(folder)} ({name}{', cut before the end' if partial else ''}):",
           "| workload | pass | implementation | N | D | V | median ms | × GEMMs | × torch | peak MiB | note |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        mode = r["mode"].replace("forward+backward", "fwd+bwd").replace("forward", "fwd")
        note = (r.get("note") or "")[:70]
        if r["workload"] == "latency" and r.get("median_ms") is not None:
            note = f"first call {_f(r.get('first_call_ms'))} ms; {note}".rstrip("; ")
        out.append(f"| {r['workload']} | {mode} | {r['label']} | {r['N']} | {r['D']} | {r['V']} | "
                   f"{_f(r.get('median_ms'))} | {_f(r.get('gemm_x'))} | {_f(r.get('speedup_vs_torch'))} | "
                   f"{_f(r.get('peak_mib'), 4)} | {note} |")
    out += [f"goal: {g}" for g in res.get("goals") or []]
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m bench.check_summary OUT_DIR", file=sys.stderr)
        return 2
    out = argv[0]
    lines = ["== summary", *steps_table(os.path.join(out, "steps.tsv")), "",
             test_counts(os.path.join(out, "tests.xml"))]
    for folder in ("bench", "latency"):
        lines += ["", *bench_table(os.path.join(out, folder))]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
