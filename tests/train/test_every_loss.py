"""Every registry loss trains: through ``fastpref.nn.PreferenceLoss`` and through ``fastpref train`` (two
steps, tiny model) on data that feeds it. Fails when a registered loss has no case here. Estimator-only
entries (k1-k3) and add-on terms (vpo, xpo) run combined with a main loss."""
import pytest
import torch

import fastpref.losses as L
from fastpref.nn import PreferenceLoss
from fastpref.train import main
from fastpref.train.synthetic import make_task

# not a training objective: LSC transforms rewards into a utility for RL (online mode), it has no model to fit
NOT_TRAINED = {"lsc": "a reward transform (utility to maximise) for online RL, not a loss"}

# name: (layout, --loss spec, per-row fields, flags, loss-args)
CASES = {n: ("pairs", n, {}, [], "") for n in (
    "aot", "aot_unpaired", "apo_down", "apo_zero", "asft", "bco_pair", "cal_dpo", "cpo", "discopop", "dpop",
    "flex_dpo", "hinge", "ipo", "nca_pair", "orpo", "robust", "rpo", "sft", "sigmoid", "sigmoid_norm", "simpo",
    "slic", "sppo_hard", "tdpo1", "tdpo2")}
CASES.update({
    "exo_pair": ("pairs", "exo_pair", {}, [], "label_smoothing=0.001"),
    "ld_dpo": ("pairs", "ld_dpo", {}, [], "ld_alpha=0.5"),
    "rdpo": ("pairs", "rdpo", {}, [], "alpha=0.01"),
    "rdpo_rationale": ("pairs", "rdpo_rationale", {"rationale": "shift all digits"}, [], ""),
    "rorpo": ("pairs", "rorpo", {"rationale": "shift all digits"}, [], ""),
    "online_ipo": ("pairs", "online_ipo", {"preference_probability": 0.8}, [], ""),
    "egpo": ("pairs", "egpo", {"preference_probability": 0.8}, [], ""),
    "sppo": ("pairs", "sppo", {"chosen_winrate": 0.7, "rejected_winrate": 0.3}, ["prev"], ""),
    "gpo": ("pairs", "gpo", {"chosen_score": 0.4, "rejected_score": -0.4}, ["prev"], ""),
    "inpo": ("pairs", "inpo", {}, ["prev"], "tau=0.1,eta=0.5"),
    "tgdpo": ("pairs", "tgdpo", {}, ["token_rm"], ""),
    "k1": ("pairs", "sigmoid=1,k1=0.1", {}, [], ""),
    "k2": ("pairs", "sigmoid=1,k2=0.1", {}, [], ""),
    "k3": ("pairs", "sigmoid=1,k3=0.1", {}, [], ""),
    "vpo": ("pairs", "sigmoid=1,vpo=1", {}, [], "alpha=0.1,optimistic=false"),
    "xpo": ("pairs", "sigmoid=1,xpo=1", {"reference_sample": "1 2 3"}, [], ""),
    "brain": ("list", "brain", {"proposal_logps": [-3.0, -4.0, -5.0]}, [], ""),
    "kto": ("unpaired", "kto", {}, [], ""),
    "bco": ("unpaired", "bco", {}, [], ""),
    "apo_zero_unpaired": ("unpaired", "apo_zero_unpaired", {}, [], ""),
    "nash_md": ("unpaired", "nash_md", {"probability": 0.6}, [], ""),
    "bt": ("reward", "bt", {"margin": 0.5}, [], "label_smoothing=0.05,center_rewards_coefficient=0.01"),
    "scaled_bt": ("reward", "scaled_bt", {"strength": 2}, [], ""),
    "gpm": ("reward", "gpm", {}, [], ""),
    "micro": ("reward", "micro", {}, [], ""),
    "regression": ("scores", "regression", {}, [], ""),
})
CASES.update({n: ("list", n, {}, [], "") for n in ("exo", "infonca", "lipo_lambda", "nca", "plackett_luce", "pro",
                                                   "rrhf")})


def test_every_registered_loss_has_a_case():
    assert set(CASES) | set(NOT_TRAINED) == set(L.names()), sorted(set(L.names()) ^ (set(CASES) | set(NOT_TRAINED)))


def _rows(layout, fields):
    base = make_task(6, 0, seed=5)[0]
    if layout in ("pairs", "reward"):
        return [{**r, **fields} for r in base]
    if layout == "list":
        return [{"prompt": r["prompt"], "responses": [r["chosen"], r["rejected"], "0"], "scores": [2, 1, 0],
                 **fields} for r in base]
    if layout == "scores":
        return [{"prompt": r["prompt"], "response": r[k], "scores": [float(k == "chosen"), 0.5]} for r in base
                for k in ("chosen", "rejected")]
    rows = [{"prompt": r["prompt"], "completion": r[k], "label": k == "chosen", **fields} for r in base
            for k in ("chosen", "rejected")]
    if "probability" in fields:
        rows = [{k: v for k, v in r.items() if k != "label"} for r in rows]
    return rows


@pytest.mark.parametrize("name", sorted(CASES))
def test_trains_two_steps(name, tmp_path, tiny_model_dir, write_jsonl):
    layout, spec, fields, flags, args = CASES[name]
    data = write_jsonl(tmp_path / "d.jsonl", _rows(layout, fields))
    argv = ["--model", str(tiny_model_dir), "--data", str(data), "--output-dir", str(tmp_path / "o"), "--loss", spec,
            "--steps", "2", "--batch-size", "2", "--lr", "1e-3", "--eval-fraction", "0", "--max-length", "40",
            "--no-progress", "--no-plots", "--threads", "1", "--save-every", "0", "--eval-every", "0"]
    if layout in ("reward", "scores"):
        argv += ["--task", "reward"]
    argv += ["--loss-args", args] if args else []
    argv += ["--prev-model", str(tiny_model_dir)] if "prev" in flags else []
    argv += ["--token-reward-model", str(tiny_model_dir)] if "token_rm" in flags else []
    s = main(argv)
    assert s["train_steps"] == 2
    assert all(torch.isfinite(torch.tensor(v)) for k, v in s.items() if k == "final_loss")
