"""The online mode's plot: per-round held-out greedy accuracy, win-rate against the start, KL to the
reference, judge scores and lengths of the samples, and the training loss (one PNG, matplotlib Agg)."""
from __future__ import annotations

import json
from pathlib import Path

PANELS = [  # (title, y-axis label, [(record kind, metric key, label)])
    ("held-out greedy answers", "share of held-out prompts", [("eval", "eval/greedy_accuracy", "verifier exact match"),
                                 ("eval", "eval/greedy_digit_accuracy", "per-digit accuracy"),
                                 ("eval", "eval/winrate_vs_start", "judge win-rate vs start")]),
    ("KL(π_θ‖π_ref) per token", "nats per token", [("eval", "eval/kl_to_ref", "greedy answers")]),
    ("samples of each round", "judge score / share of prompts", [("generate", "gen/judge_score", "judge score (mean)"),
                               ("generate", "gen/chosen_score", "chosen"), ("generate", "gen/rejected_score", "rejected"),
                               ("generate", "gen/tied", "tied fraction")]),
    ("generation length", "tokens", [("generate", "gen/length", "samples"), ("eval", "eval/length", "greedy answers")]),
    ("training loss", "loss", [("train", "loss", "loss")]),
]


def plot(metrics_file: Path, out_dir: Path) -> Path:
    """Write ``online.png`` from ``metrics.jsonl`` (x axis: round); returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [json.loads(x) for x in Path(metrics_file).read_text().splitlines() if x.strip()]
    cols = 3
    rows = -(-len(PANELS) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat[len(PANELS):]:
        ax.set_visible(False)
    for ax, (title, ylabel, series) in zip(axes.flat, PANELS):
        for kind, key, label in series:
            pts = [(r["round"] if kind != "train" else r["step"], r[key]) for r in recs
                   if r.get("kind") == kind and r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o" if kind != "train" else None, ms=3, label=label)
        ax.set(title=title, ylabel=ylabel, xlabel="step" if series[0][0] == "train" else "round")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(out_dir) / "online.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
