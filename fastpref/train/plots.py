"""PNG plots of a run (matplotlib, Agg backend) and the short summary table."""
from __future__ import annotations

import json
from pathlib import Path

PANELS = {  # file → (title, y-axis label, [(metric key, legend label, phase or None for both)])
    "greedy.png": ("held-out greedy answers (verifier)", "share of held-out prompts",
                   [("eval/greedy_digit_accuracy", "per-digit accuracy", None),
                    ("eval/greedy_exact_match", "exact match", None)]),
    "loss.png": ("training loss", "loss", [("loss", "SFT (token NLL)", "sft"), ("loss", "preference loss", "pref")]),
    "reward_accuracy.png": ("reward accuracy", "share of pairs ranked right",
                            [("rewards/accuracies", "train", "pref"), ("eval/reward_accuracy", "held-out", "pref"),
                             ("eval/ranking_accuracy", "held-out ranking (policy log-probs)", "pref")]),
    "margins.png": ("reward margin", "β·log-ratio, chosen − rejected",
                    [("rewards/margins", "train", "pref"), ("eval/margin", "held-out", "pref")]),
    "logps.png": ("sequence log-probs", "log-prob per sequence (nats)",
                  [("logps/chosen", "chosen (train)", "pref"), ("logps/rejected", "rejected (train)", "pref"),
                   ("eval/logps_chosen", "chosen (held-out)", "pref"),
                   ("eval/logps_rejected", "rejected (held-out)", "pref")]),
}
REWARD_PANELS = {  # the reward task's records carry no phase (its SFT warm-up is not logged)
    "reward_accuracy.png": ("reward model: pairs ranked right", "share of pairs",
                            [("accuracy", "train batch", None), ("eval/reward_accuracy", "held-out", None)]),
    "loss.png": ("training loss", "loss", [("loss", "reward-model loss", None)]),
}


def plot(metrics_file: Path, out_dir: Path, panels: dict | None = None) -> list[Path]:
    """Write the plots of ``metrics.jsonl`` (``PANELS`` unless ``panels`` is given; panels without data are
    skipped); returns the files written. Held-out evaluations are drawn with markers. A panel with data from the
    SFT warm-up shades it; a panel of the preference phase alone starts where that phase starts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [json.loads(x) for x in Path(metrics_file).read_text().splitlines() if x.strip()] \
        if Path(metrics_file).is_file() else []
    sft_end = max((r["step"] for r in recs if r.get("phase") == "sft"), default=None)
    written = []
    for name, (title, ylabel, series) in (PANELS if panels is None else panels).items():
        curves = []
        for key, label, phase in series:
            pts = [(r["step"], r[key]) for r in recs
                   if r.get(key) is not None and (phase is None or r.get("phase") == phase)]
            if pts:
                curves.append((key, label, pts))
        if not curves:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 3.8))
        if sft_end and any(pts[0][0] < sft_end for _, _, pts in curves):
            ax.axvspan(0, sft_end, color="grey", alpha=0.12, lw=0, label="SFT warm-up")
            ax.axvline(sft_end, color="grey", ls=":", lw=1)
        for key, label, pts in curves:
            ax.plot(*zip(*pts), marker="o" if key.startswith("eval/") else None, ms=3, label=label)
        ax.set(title=title, xlabel="optimizer step", ylabel=ylabel)
        ax.grid(alpha=0.3)
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
    g0, g1 = summary.get("eval_greedy_before") or {}, summary.get("eval_greedy_after") or {}
    rows = [(f"held-out greedy {k.replace('_', ' ')}", f"{f(g1.get(k))}   (before preference training: {f(v)})")
            for k, v in g0.items()]
    if summary.get("preference_steps"):  # an SFT-only run (e.g. the online demo's warm-up) has none of these
        rows += [
            ("held-out reward accuracy", f"{f(summary['eval_reward_accuracy'])}"
             f"   (before: {f(before.get('eval/reward_accuracy'))})"),
            ("held-out ranking accuracy", f"{f(summary['eval_ranking_accuracy'])}"
             f"   (before: {f(before.get('eval/ranking_accuracy'))})"),
            ("held-out reward margin", f(summary.get("eval_margin"))),
        ]
    rows += [
        ("steps", f"{summary['train_steps']} (SFT {summary['sft_steps']} + preference {summary['preference_steps']})"),
        ("loss", ", ".join(f"{k}×{v:g}" for k, v in summary["loss"].items()) + f"  {summary['layout']}"),
        ("examples", f"{summary['train_examples']} train, {summary['eval_examples']} held-out"),
        ("packing / reference", f"{'packed' if summary['packed'] else 'padded'} / {summary['ref_mode']}"),
        ("backend / device", f"{summary.get('backend')} / {summary.get('device')}"),
        ("wall time", f"{summary['wall_seconds']:.1f} s"),
        ("final model", summary["final_model"]),
    ]
    w = max(len(k) for k, _ in rows)
    return "\n".join(["", "fastpref train: summary", "-" * (w + 40)] + [f"{k:<{w}}  {v}" for k, v in rows])
