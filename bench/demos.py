"""The three embedded demos over several seeds and backends, and the README's demo sentences made from them.

    python -m bench.demos run [--seeds 0 1 2] [--backends torch native] [--demos offline online reward]
    python -m bench.demos readme [--check]
    python -m bench.demos check FOLDER [FOLDER ...]

``run`` trains each demo as its command does with no arguments (only ``--seed``, ``--backend`` and a scratch
``--output-dir`` added), reads each ``summary.json`` and writes ``bench/results/demos/demos.json``: every run's
numbers and, per demo, the band (min-max over seeds and backends) of each number and of each gain. Runs of the
demos not named by ``--demos`` are kept from the existing file (each keeps its own date and commit).
``readme`` rewrites the text between ``<!-- demo:begin -->`` and ``<!-- demo:end -->`` in README.md (the
sentences) and docs/training.md (a table per backend) from that file; ``--check`` exits 1 when either is out of
date. ``check`` holds finished demo runs (their ``summary.json``) to the recorded bands: CI runs the README's
three demo commands on a fresh clone and checks them so. ``tests/train/test_demo_claims.py`` holds a CI run of
each demo to the recorded bands.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results", "demos", "demos.json")
README = os.path.join(ROOT, "README.md")
TRAINING_DOC = os.path.join(ROOT, "docs", "training.md")
BEGIN, END = "<!-- demo:begin -->", "<!-- demo:end -->"
COMMANDS = {"offline": [], "online": ["--online"], "reward": ["--task", "reward"],
            "grpo": ["--online", "--algorithm", "grpo"]}
# the make train path: no C++ extension, so the torch backend
MAKE_TRAIN_BACKEND = "torch"


def numbers(demo: str, s: dict) -> dict[str, float]:
    """The numbers a demo claims, from its summary.json: before/after pairs of held-out scores."""
    if demo == "offline":
        b, a = s["eval_greedy_before"], s["eval_greedy_after"]
        return {"exact_before": b["exact_match"], "exact_after": a["exact_match"],
                "digit_before": b["digit_accuracy"], "digit_after": a["digit_accuracy"]}
    if demo in ("online", "grpo"):
        return {"exact_before": s["start_greedy_accuracy"], "exact_after": s["final_greedy_accuracy"],
                "digit_before": s["start_greedy_digit_accuracy"], "digit_after": s["final_greedy_digit_accuracy"],
                "exact_peak": max(s["greedy_accuracy_per_round"])}
    return {"accuracy_before": s["eval_before"]["reward_accuracy"], "accuracy_after": s["eval_reward_accuracy"]}


def run_one(demo: str, seed: int, backend: str, scratch: str) -> dict:
    out = os.path.join(scratch, f"{demo}-{backend}-{seed}")
    cmd = [sys.executable, "-m", "fastpref.train", *COMMANDS[demo], "--seed", str(seed), "--backend", backend,
           "--output-dir", out, "--no-progress", "--no-plots"]
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"bench.demos: {demo} seed {seed} backend {backend} failed:\n{p.stderr[-2000:]}")
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    return {"demo": demo, "seed": seed, "backend": backend, "wall_s": round(time.time() - t0, 1),
            **{k: round(v, 4) for k, v in numbers(demo, summary).items()}}


def bands(runs: list[dict]) -> dict[str, dict[str, list[float]]]:
    """Per demo: [min, max] of every number and of every gain (after - before) over its runs."""
    out: dict[str, dict[str, list[float]]] = {}
    for demo in dict.fromkeys(r["demo"] for r in runs):
        rs = [r for r in runs if r["demo"] == demo]
        keys = [k for k in rs[0] if k not in ("demo", "seed", "backend", "wall_s", "date", "commit")]
        vals = {k: [r[k] for r in rs] for k in keys}
        for k in keys:
            if k.endswith("_after"):
                stem = k[:-len("_after")]
                vals[f"{stem}_gain"] = [r[k] - r[f"{stem}_before"] for r in rs]
        vals["wall_s"] = [r["wall_s"] for r in rs]
        out[demo] = {k: [round(min(v), 4), round(max(v), 4)] for k, v in vals.items()}
    return out


def run(args) -> None:
    scratch = tempfile.mkdtemp(prefix="fastpref-demos-")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    runs = []
    t0 = time.time()
    for demo in args.demos:
        for backend in args.backends:
            for seed in args.seeds:
                runs.append({**run_one(demo, seed, backend, scratch), "date": time.strftime("%Y-%m-%d"),
                             "commit": commit})
                print(json.dumps(runs[-1]), flush=True)
    import torch

    kept = []
    if os.path.exists(RESULTS):  # read now: another demo's runs may have been written meanwhile
        with open(RESULTS) as f:
            kept = [r for r in json.load(f)["runs"] if r["demo"] not in args.demos]
    runs = sorted(kept + runs, key=lambda r: (list(COMMANDS).index(r["demo"]), r["backend"], r["seed"]))
    res = {"command": "python -m bench.demos run", "date": time.strftime("%Y-%m-%d"),
           "machine": f"{platform.machine()}, {os.cpu_count()} cores", "torch": torch.__version__,
           "seeds": args.seeds, "backends": args.backends, "runs": runs, "bands": bands(runs)}
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {os.path.relpath(RESULTS, ROOT)}")


def _band(b: list[float], pct: bool = False) -> str:
    f = (lambda v: f"{100 * v:.0f}") if pct else (lambda v: f"{v:.2f}")
    return f(b[0]) if f(b[0]) == f(b[1]) else f"{f(b[0])}–{f(b[1])}"


def sentences(res: dict) -> str:
    """The README's demo text from demos.json."""
    bd, n = res["bands"], f"{len(res['seeds'])} seeds × the {' and '.join(res['backends'])} backends"
    lines = []
    if "offline" in bd:
        o = bd["offline"]
        lines.append(f"On 256 held-out prompts a verifier scores the greedy answers before and after preference "
                     f"training: per-digit accuracy {_band(o['digit_before'])} → {_band(o['digit_after'])}, "
                     f"exact answers {_band(o['exact_before'])} → {_band(o['exact_after'])} (ranges over {n}; "
                     f"`make train` uses the {MAKE_TRAIN_BACKEND} backend).")
    if "online" in bd:
        o = bd["online"]
        lines.append(f"`fastpref train --online` (SPPO, from its own SFT start): greedy exact answers "
                     f"{_band(o['exact_before'])} → {_band(o['exact_after'])}, per-digit "
                     f"{_band(o['digit_before'])} → {_band(o['digit_after'])}.")
    if "grpo" in bd:
        o = bd["grpo"]
        lines.append(f"`fastpref train --online --algorithm grpo` (RL with the verifier's rewards, same SFT start): "
                     f"greedy exact answers {_band(o['exact_before'])} → {_band(o['exact_after'])}.")
    if "reward" in bd:
        o = bd["reward"]
        lines.append(f"`fastpref train --task reward`: held-out pairs ranked right {_band(o['accuracy_before'])} → "
                     f"{_band(o['accuracy_after'])}.")
    src = os.path.relpath(RESULTS, ROOT)
    lines.append(f"Source: [`{src}`]({src}), made by `{res['command']}` on {res['date']} ({res['machine']}).")
    return "\n".join(lines)


def table(res: dict) -> str:
    """docs/training.md's table: each demo's numbers per backend, the range over the seeds."""
    out = [f"| demo, held-out score | {' | '.join(f'`{b}`: before → after' for b in res['backends'])} |",
           "|---|" + "---|" * len(res["backends"])]
    labels = {"exact": "greedy answers, exact match", "digit": "greedy answers, per-digit accuracy",
              "accuracy": "pairs ranked right"}
    for demo in dict.fromkeys(r["demo"] for r in res["runs"]):
        rs = [r for r in res["runs"] if r["demo"] == demo]
        for stem, label in labels.items():
            if f"{stem}_after" not in rs[0]:
                continue
            cells = []
            for b in res["backends"]:
                sub = bands([r for r in rs if r["backend"] == b])[demo]
                cells.append(f"{_band(sub[f'{stem}_before'])} → {_band(sub[f'{stem}_after'])}")
            out.append(f"| {demo}: {label} | {' | '.join(cells)} |")
    return "\n".join(out)


def _replace(path: str, body: str, check: bool) -> bool:
    """Puts ``body`` between the markers of ``path``; True when the file was (check: would be) unchanged."""
    with open(path) as f:
        text = f.read()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{BEGIN}\n{body}\n{END}{tail}"
    if not check and new != text:
        with open(path, "w") as f:
            f.write(new)
    return new == text


def readme(args) -> int:
    with open(RESULTS) as f:
        res = json.load(f)
    src = os.path.relpath(RESULTS, ROOT)
    note = (f"Ranges over seeds {', '.join(map(str, res['seeds']))}; source: [`{src}`](../{src}), made by "
            f"`{res['command']}` on {res['date']} ({res['machine']}, torch {res['torch']}).")
    same = [_replace(README, sentences(res), args.check), _replace(TRAINING_DOC, table(res) + "\n\n" + note, args.check)]
    if args.check and not all(same):
        print("the demo text in README.md / docs/training.md is out of date: python -m bench.demos readme",
              file=sys.stderr)
        return 1
    return 0


SLACK = 0.02  # a band is over 3 seeds x 2 backends; another machine of the same kind may round differently


def demo_of(summary: dict) -> str:
    if "algorithm" in summary:
        return "grpo" if summary["algorithm"] == "grpo" else "online"
    return "reward" if summary.get("task") == "reward" else "offline"


def outside(demo: str, got: dict[str, float], band: dict[str, list[float]]) -> list[str]:
    """The numbers of one run (and their gains) that fall outside the demo's recorded band, as text."""
    values = dict(got)
    for k in got:
        if k.endswith("_after"):
            values[k[:-len("_after")] + "_gain"] = got[k] - got[k[:-len("_after")] + "_before"]
    return [f"{k} = {v:.3f} not in [{band[k][0]:.3f}, {band[k][1]:.3f}]" for k, v in values.items()
            if k in band and not band[k][0] - SLACK <= v <= band[k][1] + SLACK]


def check(folders: list[str]) -> int:
    with open(RESULTS) as f:
        recorded = json.load(f)["bands"]
    bad = 0
    for folder in folders:
        with open(os.path.join(folder, "summary.json")) as f:
            summary = json.load(f)
        demo = demo_of(summary)
        problems = outside(demo, numbers(demo, summary), recorded[demo])
        bad += bool(problems)
        print(f"demo {demo} ({folder}): " + ("; ".join(problems) if problems else "inside the README's bands"))
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.demos", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    r = sub.add_parser("run")
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    r.add_argument("--backends", nargs="+", default=["torch", "native"])
    r.add_argument("--demos", nargs="+", default=list(COMMANDS), choices=list(COMMANDS))
    w = sub.add_parser("readme")
    w.add_argument("--check", action="store_true")
    c = sub.add_parser("check")
    c.add_argument("folders", nargs="+")
    args = ap.parse_args(argv)
    if args.what == "check":
        return check(args.folders)
    if args.what == "run":
        run(args)
        return 0
    return readme(args)


if __name__ == "__main__":
    sys.exit(main())
