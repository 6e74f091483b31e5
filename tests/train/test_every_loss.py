"""Every registry loss trains: through ``fastpref.nn.PreferenceLoss`` and through ``fastpref train`` (two
steps, tiny model) on data that feeds it. Fails when a registered loss has no case here. Estimator-only
entries (k1-k3) and add-on terms (vpo, xpo) run combined with a main loss."""
import json
import math

import pytest
import torch

import fastpref.losses as L
from fastpref.nn import PreferenceLoss
from fastpref.train import main
from fastpref.train.config import parse_kv, parse_loss
from fastpref.train.fields import NUMBERS, TEXTS
from fastpref.train.synthetic import make_task

# not a training objective: LSC transforms rewards into a utility for RL (online mode), it has no model to fit
NOT_TRAINED = {"lsc": "a reward transform (utility to maximise) for online RL, not a loss"}
# on-policy RL losses need sampled completions with advantages: they train through fastpref.nn.PolicyLoss
# (test_policy_losses_train below) and the GRPOTrainer drop-in, not on an offline preference data set
ON_POLICY = ("cispo", "grpo", "gspo", "ppo_clip")

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
    covered = set(CASES) | set(NOT_TRAINED) | set(ON_POLICY)
    assert covered == set(L.names()), sorted(set(L.names()) ^ covered)
    assert {n for n, c in CASES.items() if c[0] in ("reward", "scores")} == set(REWARD_INPUTS)


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
    recs = [json.loads(x) for x in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses), recs
    if layout in ("reward", "scores"):
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "o" / "final")
        assert model.config.num_labels == s["num_labels"]


@pytest.mark.parametrize("name, drop, needs", [
    ("sppo", "chosen_winrate", "chosen_winrate"), ("sppo", "prev", "--prev-model"), ("gpo", "chosen_score", "chosen_score"),
    ("tgdpo", "token_rm", "--token-reward-model"), ("rdpo_rationale", "rationale", "rationale"),
    ("brain", "proposal_logps", "proposal_logps"), ("online_ipo", "preference_probability", "preference_probability"),
    ("xpo", "reference_sample", "reference_sample"), ("scaled_bt", "strength", "strength")])
def test_missing_input_names_its_field_or_flag(name, drop, needs, tmp_path, tiny_model_dir, write_jsonl, capsys):
    layout, spec, fields, flags, args = CASES[name]
    fields = {k: v for k, v in fields.items() if k != drop}
    flags = [f for f in flags if f != drop]
    data = write_jsonl(tmp_path / "d.jsonl", _rows(layout, fields))
    argv = ["--model", str(tiny_model_dir), "--data", str(data), "--output-dir", str(tmp_path / "o"), "--loss", spec,
            "--steps", "1", "--no-progress", "--no-plots", "--threads", "1"]
    argv += ["--task", "reward"] if layout == "reward" else []
    argv += ["--prev-model", str(tiny_model_dir)] if "prev" in flags else []
    argv += ["--token-reward-model", str(tiny_model_dir)] if "token_rm" in flags else []
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    assert needs in capsys.readouterr().err


def _module_case(name, g):
    """PreferenceLoss, its forward keywords and inputs, for a CASES entry (random tensors, tiny shapes)."""
    layout, spec, fields, flags, args = CASES[name]
    weights = parse_loss(spec)
    hp = parse_kv(args)
    B, K, T, Dm, V = 3, 3, 6, 8, 13
    S = {"pairs": 2 * B, "list": B * K, "unpaired": B}[layout]
    loss = PreferenceLoss(weights, layout=layout, num_responses=K if layout == "list" else None, backend="torch", **hp)
    labels = torch.randint(0, V, (S, T), generator=g)
    labels[:, :2] = -100
    kw = dict(ref_hidden=torch.randn(S, T, Dm, generator=g), ref_weight=torch.randn(V, Dm, generator=g))
    per = (B, K) if layout == "list" else (B,)
    for f in fields:
        for feed in NUMBERS.get(f, (None, None, ()))[2]:
            if feed in loss.accepted:
                kw[feed] = 0.1 + 0.8 * torch.rand(per, generator=g)
        if f in TEXTS and TEXTS[f][2] in loss.accepted:
            kw[TEXTS[f][2]] = -torch.rand(B, generator=g) * 5
    if layout == "list":
        kw.update({k: torch.randn(per, generator=g) for k in ("scores", "rewards", "relevance") if k in loss.accepted})
    if layout == "unpaired" and "desirable" in loss.accepted:
        kw["desirable"] = torch.arange(B) % 2 == 0
    if "prev" in flags:
        kw.update(prev_chosen_logps=-10 * torch.rand(B, generator=g), prev_rejected_logps=-10 * torch.rand(B, generator=g))
    if "token_rm" in flags:
        kw["rm_token_logps"] = -torch.rand(S, T, generator=g)
    if "kl" in loss.accepted:
        kw["kl"] = torch.tensor(0.05)
    if loss.nll_tokens == "sequence":
        kw["nll_labels"] = torch.randint(0, V, (S, T), generator=g)
    return loss, torch.randn(S, T, Dm, generator=g), torch.randn(V, Dm, generator=g), labels, kw


REWARD_INPUTS = {  # reward-model losses read model outputs, passed to PreferenceLoss as inputs
    "bt": lambda g: dict(chosen_rewards=torch.randn(3, generator=g), rejected_rewards=torch.randn(3, generator=g),
                         margin=torch.rand(3, generator=g)),
    "scaled_bt": lambda g: dict(chosen_rewards=torch.randn(3, generator=g), rejected_rewards=torch.randn(3, generator=g),
                                strength=torch.tensor([1.0, 2.0, 3.0])),
    "gpm": lambda g: dict(chosen_embeddings=torch.randn(3, 4, generator=g), rejected_embeddings=torch.randn(3, 4, generator=g)),
    "micro": lambda g: dict(chosen_rewards=torch.randn(3, 2, generator=g), rejected_rewards=torch.randn(3, 2, generator=g),
                            router_logits=torch.randn(3, 2, generator=g)),
    "regression": lambda g: dict(predictions=torch.randn(3, 2, generator=g), targets=torch.randn(3, 2, generator=g)),
}


@pytest.mark.parametrize("name", sorted(REWARD_INPUTS))
def test_reward_losses_through_preference_loss(name):
    """A reward loss in PreferenceLoss takes the model outputs as inputs (the LM head is not involved)."""
    g = torch.Generator().manual_seed(0)
    kw = {k: v.requires_grad_() for k, v in REWARD_INPUTS[name](g).items()}
    h, w = torch.randn(6, 4, 8, generator=g), torch.randn(13, 8, generator=g)
    out = PreferenceLoss(name, backend="torch")(h, w, torch.randint(0, 13, (6, 4), generator=g), **kw)
    gold = L.get(name)(**kw).mean()
    torch.testing.assert_close(out.loss, gold)
    first = next(iter(kw.values()))
    assert torch.autograd.grad(out.loss, first)[0].abs().sum() > 0


@pytest.mark.parametrize("name", sorted(n for n, c in CASES.items() if c[0] not in ("reward", "scores")))
def test_runs_through_preference_loss(name):
    """Finite loss, and a finite, non-zero gradient for the hidden states and the head."""
    g = torch.Generator().manual_seed(0)
    loss, h, w, labels, kw = _module_case(name, g)
    h.requires_grad_(), w.requires_grad_()
    out = loss(h, w, labels, **kw)
    gh, gw = torch.autograd.grad(out.loss, [h, w])
    assert torch.isfinite(out.loss) and torch.isfinite(gh).all() and torch.isfinite(gw).all()
    assert gh.abs().sum() > 0 and gw.abs().sum() > 0


@pytest.mark.parametrize("name", ON_POLICY)
def test_policy_losses_train(name):
    """Two optimizer steps of an on-policy loss through PolicyLoss: finite losses, non-zero gradients, and the
    first step moves the old-policy ratio away from 1 (so the second step sees the clipping path)."""
    from fastpref.nn import PolicyLoss

    g = torch.Generator().manual_seed(3)
    S, T, D, V = 4, 7, 8, 13
    hidden = torch.randn(S, T, D, generator=g, requires_grad=True)
    weight = (torch.randn(V, D, generator=g) / D**0.5).requires_grad_()
    labels = torch.randint(0, V, (S, T), generator=g)
    labels[:, :2] = -100
    advantages = torch.randn(S, generator=g)
    module = PolicyLoss(name, kl="k3", beta=0.05, backend="torch")
    opt = torch.optim.SGD([hidden, weight], lr=0.5)
    with torch.no_grad():
        logits = (hidden @ weight.T).log_softmax(-1)
        old = torch.where(labels >= 0, logits.gather(-1, labels.clamp(min=0)[..., None])[..., 0], 0.0)
    ref_hidden, ref_weight = hidden.detach().clone(), weight.detach().clone()
    for _ in range(2):
        out = module(hidden, weight, labels, advantages=advantages, old_token_logps=old,
                     ref_hidden=ref_hidden, ref_weight=ref_weight)
        opt.zero_grad()
        out.loss.backward()
        assert math.isfinite(out.loss.item())
        assert hidden.grad.abs().sum() > 0 and weight.grad.abs().sum() > 0
        opt.step()
