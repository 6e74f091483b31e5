"""PNG plots of a run (matplotlib, Agg backend) and the short summary table."""
from __future__ import annotations

import json
from pathlib import Path

PANELS = {  # file → (title, [(metric key, label)])
    "loss.png": ("loss", [("loss", "train loss")]),
    "reward_accuracy.png": ("reward accuracy", [("rewards/accuracies", "train"),
                                                ("eval/reward_accuracy", "held-out"),
                                                ("eval/ranking_accuracy", "held-out ranking (policy log-probs)")]),
    "margins.png": ("reward margin", [("rewards/margins", "train"), ("eval/margin", "held-out")]),
    "logps.png": ("sequence log-probs", [("logps/chosen", "chosen (train)"), ("logps/rejected", "rejected (train)"),
                                         ("eval/logps_chosen", "chosen (held-out)"),
                                         ("eval/logps_rejected", "rejected (held-out)")]),
}


def plot(metrics_file: Path, out_dir: Path) -> list[Path]:
    """Write the plots of ``metrics.jsonl``; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [json.loads(x) for x in Path(metrics_file).read_text().splitlines() if x.strip()] \
        if Path(metrics_file).is_file() else []
    written = []
    for name, (title, series) in PANELS.items():
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for key, label in series:
            pts = [(r["step"], r[key]) for r in recs if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o" if key.startswith("eval/") else None, ms=3, label=label)
        sft_end = [r["step"] for r in recs if r.get("phase") == "sft"]
        if sft_end:
            ax.axvline(max(sft_end), color="grey", ls=":", lw=1, label="end of SFT warm-up")
        ax.set(title=title, xlabel="step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(Path(out_dir) / name, dpi=100)
        plt.close(fig)
        written.append(Path(out_dir) / name)
    return written


def table(summary: dict) -> str:
    """A few lines for the terminal."""
    def f(v):
        return "n/a" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    before = summary.get("eval_before") or {}
    rows = [
        ("held-out reward accuracy", f"{f(summary['eval_reward_accuracy'])}"
         f"   (before: {f(before.get('eval/reward_accuracy'))})"),
        ("held-out ranking accuracy", f"{f(summary['eval_ranking_accuracy'])}"
         f"   (before: {f(before.get('eval/ranking_accuracy'))})"),
        ("held-out reward margin", f(summary.get("eval_margin"))),
        ("steps", f"{summary['train_steps']} (SFT {summary['sft_steps']} + preference {summary['preference_steps']})"),
        ("loss", ", ".join(f"{k}×{v:g}" for k, v in summary["loss"].items()) + f"  {summary['layout']}"),
        ("examples", f"{summary['train_examples']} train, {summary['eval_examples']} held-out"),
        ("packing / reference", f"{'packed' if summary['packed'] else 'padded'} / {summary['ref_mode']}"),
        ("wall time", f"{summary['wall_seconds']:.1f} s"),
        ("final model", summary["final_model"]),
    ]
    w = max(len(k) for k, _ in rows)
    return "\n".join(["", "fastpref train: summary", "-" * (w + 40)] + [f"{k:<{w}}  {v}" for k, v in rows])
