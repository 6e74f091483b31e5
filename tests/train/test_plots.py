"""The trainer's plots read as a person reads them: labelled axes, no empty shaded regions, no strips."""
import json

import matplotlib
import matplotlib.figure
import pytest

from fastpref.train import plots
from fastpref.train.online import plots as online_plots

matplotlib.use("Agg")


@pytest.fixture
def saved(monkeypatch):
    """Records (file name, figure size, [(x limits, y label, visible)]) of every figure saved."""
    out = []
    orig = matplotlib.figure.Figure.savefig

    def savefig(fig, path, *a, **k):
        out.append((str(path).rsplit("/", 1)[-1], tuple(fig.get_size_inches()),
                    [(ax.get_xlim(), ax.get_ylabel(), ax.get_visible()) for ax in fig.axes]))
        return orig(fig, path, *a, **k)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    return out


def write(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def test_preference_panels_start_where_their_phase_starts(tmp_path, saved):
    recs = [{"step": s, "phase": "sft", "loss": 2.0 - s / 100} for s in range(10, 101, 10)]
    recs += [{"step": s, "phase": "sft", "eval": True, "eval/greedy_exact_match": 0.1} for s in (0, 50, 100)]
    recs += [{"step": 100 + s, "phase": "pref", "loss": 0.6, "rewards/margins": s / 10, "rewards/accuracies": 0.7}
             for s in range(10, 101, 10)]
    recs += [{"step": 100 + s, "phase": "pref", "eval": True, "eval/margin": s / 10} for s in (0, 50, 100)]
    plots.plot(write(tmp_path / "metrics.jsonl", recs), tmp_path)
    by_name = {name: axes for name, _, axes in saved}
    assert by_name["margins.png"][0][0][0] >= 95, "the preference-only panel still spans the SFT warm-up"
    assert by_name["loss.png"][0][0][0] <= 10 and by_name["greedy.png"][0][0][0] <= 0  # both phases: from 0
    assert all(ylabel for axes in by_name.values() for _, ylabel, _ in axes)


def test_online_plot_is_a_grid_with_labelled_axes(tmp_path, saved):
    recs = [{"kind": "eval", "round": r, "eval/greedy_accuracy": r / 5, "eval/kl_to_ref": r / 10,
             "eval/length": 5} for r in range(6)]
    recs += [{"kind": "generate", "round": r, "gen/judge_score": 0.5, "gen/length": 5} for r in range(5)]
    recs += [{"kind": "train", "round": r, "step": r, "loss": 1.0} for r in range(5)]
    online_plots.plot(write(tmp_path / "metrics.jsonl", recs), tmp_path)
    (name, (w, h), axes), = saved
    assert name == "online.png" and w / h < 2.5, f"a {w}x{h} inch strip"
    assert all(ylabel for _, ylabel, visible in axes if visible)


def test_reward_task_plots_its_held_out_accuracy(tmp_path, saved):
    recs = [{"step": 0, "eval": True, "eval/reward_accuracy": 0.55}]
    recs += [{"step": s, "loss": 0.69, "accuracy": 0.6} for s in range(1, 50, 10)]
    recs += [{"step": 50, "eval": True, "eval/reward_accuracy": 0.9}]
    written = plots.plot(write(tmp_path / "metrics.jsonl", recs), tmp_path, plots.REWARD_PANELS)
    assert [p.name for p in written] == ["reward_accuracy.png", "loss.png"]
    assert all(p.stat().st_size > 1000 for p in written)


def test_summary_table_of_an_sft_only_run_has_no_empty_preference_rows():
    summary = dict(eval_before=None, eval_greedy_before={"exact_match": 0.1}, eval_greedy_after={"exact_match": 0.2},
                   preference_steps=0, train_steps=5, sft_steps=5, loss={"sigmoid": 1.0}, layout="pairs",
                   train_examples=3, eval_examples=2, packed=True, ref_mode="precompute", backend="torch",
                   device="cpu", wall_seconds=1.0, final_model="x", eval_reward_accuracy=None,
                   eval_ranking_accuracy=None, eval_margin=None)
    text = plots.table(summary)
    assert "n/a" not in text and "greedy exact match" in text
    assert "reward accuracy" in plots.table({**summary, "preference_steps": 3, "eval_reward_accuracy": 0.9})
