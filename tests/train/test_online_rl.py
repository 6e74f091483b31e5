"""RL in the online trainer (``--algorithm grpo`` and its variants): group advantages against hand-derived values,
one item per sample, the sampling policy's log-probs as π_old (ratio exactly 1 before the step), a short run and
its exact resume after SIGKILL, and bad settings as one-line errors."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import fastpref.losses as L
from fastpref.train import main
from fastpref.train.online import algorithms as A
from fastpref.train.online.judges import JudgeError

from conftest import assert_same_final_weights, kill_when_saved

ARGS = ["--online", "--algorithm", "grpo", "--sft-steps", "30", "--synthetic-train", "64", "--synthetic-eval", "16",
        "--rounds", "3", "--batch-size", "4", "--samples", "4", "--gen-batch", "4", "--threads", "1",
        "--no-progress", "--no-plots", "--eval-every", "1"]


# ------------------------------------------------------------------------------------------- advantages
def test_group_advantages_against_hand_derived_values():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0])
    # mean 1/2; unbiased std = sqrt(4 · (1/2)² / 3) = 1/√3
    want = 0.5 / (1 / math.sqrt(3) + 1e-4)
    assert A.group_advantages(r, "grpo").tolist() == pytest.approx([want, -want, -want, want], rel=1e-12)
    assert A.group_advantages(r, "dr_grpo").tolist() == [0.5, -0.5, -0.5, 0.5]
    # RLOO: 1 − (0 + 0 + 1)/3 = 2/3 and 0 − (1 + 0 + 1)/3 = −2/3
    assert A.group_advantages(r, "rloo").tolist() == pytest.approx([2 / 3, -2 / 3, -2 / 3, 2 / 3], rel=1e-12)
    r3 = torch.tensor([3.0, 0.0, 0.0])  # mean 1, std = sqrt((4 + 1 + 1)/2) = √3; others' means 0, 1.5, 1.5
    assert A.group_advantages(r3, "grpo").tolist() == pytest.approx(
        [2 / (math.sqrt(3) + 1e-4), -1 / (math.sqrt(3) + 1e-4), -1 / (math.sqrt(3) + 1e-4)], rel=1e-12)
    assert A.group_advantages(r3, "rloo").tolist() == [3.0, -1.5, -1.5]
    for kind in A.ADVANTAGES:  # equal rewards: no signal
        assert A.group_advantages(torch.full((5,), 0.7), kind).abs().max() < 1e-12
    with pytest.raises(ValueError, match="at least 2 samples"):
        A.group_advantages(torch.tensor([1.0]), "grpo")


class _Rewards:
    name = "stub"

    def __init__(self, rewards):
        self._r = rewards


def test_rl_builder_makes_one_item_per_sample_with_its_advantage():
    g = A.Group([5, 6], "p", [[1], [2, 3], [4], [7]], ["a", "b", "c", "d"], rewards=[1.0, 0.0, 0.5, 0.5])
    items, st = A.ALGORITHMS["rloo"].build(g, _Rewards(None), {})
    assert [it.seqs for it in items] == [{"": [1]}, {"": [2, 3]}, {"": [4]}, {"": [7]}]
    assert all(it.prompt == [5, 6] for it in items)
    assert [it.inputs["advantages"] for it in items] == pytest.approx([2 / 3, -2 / 3, 0.0, 0.0])
    assert st["tied"] == 0.0
    g.rewards = [0.2] * 4
    items, st = A.ALGORITHMS["grpo"].build(g, _Rewards(None), {})
    assert len(items) == 4 and st["tied"] == 1.0 and all(it.inputs["advantages"] == 0.0 for it in items)
    g.rewards = None
    with pytest.raises(JudgeError, match="gives no rewards"):
        A.ALGORITHMS["grpo"].build(g, _Rewards(None), {})


def test_reference_log_probs_are_computed_only_when_the_kl_term_is_on():
    assert A.ItemLoss({"grpo": 1.0}, {"beta": 0.04}, pad_id=0).needs_ref
    assert not A.ItemLoss({"grpo": 1.0}, {"beta": 0.0}, pad_id=0).needs_ref
    assert not A.ItemLoss({"grpo": 1.0}, {}, pad_id=0).needs_ref  # the loss's default β = 0
    assert A.ItemLoss({"grpo": 1.0}, {}, pad_id=0).needs_prev  # π_old = the sampling policy
    assert A.ItemLoss({"sigmoid": 1.0}, {}, pad_id=0).needs_ref  # preference losses unchanged


# ------------------------------------------------------------------------------------------- a short run
@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("grpo")
    summary = main(["--output-dir", str(out), *ARGS, "--epochs", "2"])
    return out, summary


def test_round_holds_every_sample_with_its_advantage_and_old_log_probs(straight):
    out, summary = straight
    data = json.loads((out / "rounds" / "round-00000.json").read_text())
    assert data["algorithm"] == "grpo" and len(data["groups"]) == 4 and len(data["items"]) == 16
    for k, g in enumerate(data["groups"]):
        assert g["item"] == list(range(4 * k, 4 * k + 4))
        adv = A.group_advantages(torch.tensor(g["rewards"], dtype=torch.float64), "grpo").tolist()
        assert [data["items"][i]["inputs"]["advantages"] for i in g["item"]] == adv
        for i in g["item"]:
            it = data["items"][i]
            assert len(it["prev"][""]) == len(it["seqs"][""]) == len(it["ref"][""])  # β = 0.04: KL to π_ref
    assert summary["train_steps"] == 6  # 3 rounds × 2 PPO-style steps on each fresh batch
    assert "grpo advantages" in summary["description"]


def test_old_log_probs_are_the_sampling_policys_so_the_first_ratio_is_exactly_one(straight):
    """Round 0 was sampled from the SFT start: the policy's log-probs of its items, in the training step's own
    batch, equal the saved π_old bit for bit, so r = 1 and the clipped surrogate's gradient is −A·∇log π."""
    from fastpref.train.model import disable_dropout, load_model

    out, _ = straight
    data = json.loads((out / "rounds" / "round-00000.json").read_text())
    items = [A.Item(**it) for it in data["items"]]
    policy = load_model(str(out / "sft" / "final"))
    disable_dropout(policy)
    policy.train()
    pad = json.loads((out / "sft" / "final" / "config.json").read_text()).get("pad_token_id") or 0
    loss = A.ItemLoss({"grpo": 1.0}, {"beta": 0.0}, pad_id=pad)
    kw = loss.inputs(policy, items)
    m = kw["mask"]
    assert torch.equal(kw["token_logps"][m], kw["old_token_logps"][m])
    log_r = L.log_ratio(kw["token_logps"], kw["old_token_logps"], m)
    assert torch.equal(log_r[m], torch.zeros_like(log_r[m]))


def test_sigkill_then_resume_is_bit_exact(tmp_path, straight):
    out, summary = straight
    args = [*ARGS, "--epochs", "2", "--save-every", "1", "--keep-checkpoints", "50"]
    kill_when_saved(tmp_path, args, "step-00000003", timeout=300, poll=0.01)
    ckpts = sorted((tmp_path / "checkpoints").glob("step-*"))
    assert json.loads((ckpts[-1] / "info.json").read_text())["round_step"] > 0  # killed between PPO steps
    resumed = main(["--output-dir", str(tmp_path), *args, "--resume", "auto"])
    assert_same_final_weights(tmp_path, out)
    assert resumed["greedy_accuracy_per_round"] == summary["greedy_accuracy_per_round"]
    for r in range(3):
        name = f"round-{r:05d}.json"
        assert (tmp_path / "rounds" / name).read_text() == (out / "rounds" / name).read_text()


def test_two_processes_match_one(tmp_path, straight):
    """torchrun: each rank samples its chunks and trains on its share of the G × prompts samples; the summed
    gradients give one process's run (the grpo loss_type normalises per sequence)."""
    out, _ = straight
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "fastpref.train", "--output-dir", str(tmp_path), *ARGS, "--epochs", "2"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    name = "round-00000.json"
    assert (tmp_path / "rounds" / name).read_text() == (out / "rounds" / name).read_text()
    got, want = (load_file(f / "final" / "model.safetensors") for f in (tmp_path, out))
    for k in got:  # gradients summed in another order: float rounding, amplified a little by Adam
        torch.testing.assert_close(got[k], want[k], atol=1e-4, rtol=1e-3, msg=k)


@pytest.mark.parametrize("algorithm", ["dr_grpo", "dapo", "bnpo", "rloo"])
def test_each_variant_trains(tmp_path, algorithm):
    s = main(["--output-dir", str(tmp_path), *ARGS, "--algorithm", algorithm, "--rounds", "1"])
    assert s["train_steps"] == 1 and s["hparams"]["beta"] == 0.0
    data = json.loads((tmp_path / "rounds" / "round-00000.json").read_text())
    assert len(data["items"]) == 16 and all(not it["ref"] for it in data["items"])  # no KL: no π_ref pass
    if algorithm == "dr_grpo":  # Dr. GRPO divides by the generation budget
        assert s["hparams"]["max_completion_length"] == 8


@pytest.mark.skipif(os.environ.get("FASTPREF_ONLINE_DEMO") != "1",
                    reason="the full RL demo (minutes); run with FASTPREF_ONLINE_DEMO=1")
def test_embedded_rl_demo_improves_greedy_answers(tmp_path):
    s = main(["--online", "--algorithm", "grpo", "--output-dir", str(tmp_path), "--no-progress"])
    assert s["improvement_points"] >= 20 and s["digit_improvement_points"] >= 20, s
    assert s["wall_seconds"] <= 300, s


# ------------------------------------------------------------------------------------------- user errors
@pytest.mark.parametrize("args, message", [
    (["--samples", "1"], "grpo needs at least 2 samples per prompt"),
    (["--epochs", "1.5"], "--epochs 1.5: grpo takes a whole number of optimiser steps"),
    (["--judge", "pairwise:m:f"], "grpo needs rewards"),
    (["--loss-args", "loss_type=sum"], "loss_type=sum: expected one of grpo, bnpo, dr_grpo, dapo"),
    (["--loss-args", "kl_estimator=k9"], "kl_estimator=k9: expected one of k1, k2, k3"),
    (["--beta", "nan"], "--beta"),
])
def test_bad_rl_settings_exit_with_one_line(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        main(["--online", "--algorithm", "grpo", "--output-dir", str(tmp_path), "--sft-steps", "0", *args])
    text = str(e.value.code) + capsys.readouterr().err
    assert message in text, text
    assert len(str(e.value.code).strip().splitlines()) <= 1
