"""Greedy answers scored by a verifier (fastpref.train.evaluate), the demo task's verifier, and the full demo:
preference training must raise the per-digit accuracy of greedy answers on held-out prompts."""
import json

import pytest
import torch

from fastpref.train.evaluate import greedy_answers, greedy_scores, prompt_ids
from fastpref.train.model import tiny_model
from fastpref.train.synthetic import demonstrations, load_tokenizer, make_task, verify


def test_verify():
    assert verify("add 3 : 1 2 8 9", "4 5 1 2") == {"exact_match": 1.0, "digit_accuracy": 1.0}
    assert verify("add 3 : 1 2 8 9", "5 6 2 3") == {"exact_match": 0.0, "digit_accuracy": 0.0}  # K + 1
    assert verify("add 1 : 1 2 3 4", "2 3 4") == {"exact_match": 0.0, "digit_accuracy": 0.75}  # one missing
    assert verify("add 1 : 1 2 3 4", "2 3 4 5 6") == {"exact_match": 0.0, "digit_accuracy": 1.0}  # one extra
    assert verify("add 1 : 1 2 3 4", "") == {"exact_match": 0.0, "digit_accuracy": 0.0}


def test_demonstrations_are_sloppy_in_the_stated_share():
    rows = make_task(2000, 0)[0]
    demos = demonstrations(rows, error_rate=0.6)
    wrong = [verify(d["prompt"], d["chosen"])["exact_match"] == 0 for d in demos]
    assert 0.55 < sum(wrong) / len(wrong) < 0.65
    assert all(verify(r["prompt"], r["chosen"])["exact_match"] == 1 for r in rows)
    assert all(verify(r["prompt"], r["rejected"])["exact_match"] == 0 for r in rows)


@torch.no_grad()
def _naive_greedy(model, tok, prompt, max_new_tokens):
    """The naive way: the full forward of the whole sequence (full logits) at every step, no cache, no batching."""
    ids = prompt_ids(tok, prompt)
    new = []
    for _ in range(max_new_tokens):
        nxt = int(model(torch.tensor([ids + new])).logits[0, -1].float().argmax())
        if nxt == tok.eos_token_id:
            break
        new.append(nxt)
    return tok.decode(new, skip_special_tokens=True).strip()


def test_greedy_answers_match_naive_decoding_and_scores_average_the_verifier():
    tok = load_tokenizer()
    model = tiny_model(len(tok), seed=3, hidden=32, layers=2, heads=2).eval()
    with torch.no_grad():  # make EOS likely enough that some answers end early, others run to the limit
        model.lm_head.weight[tok.eos_token_id] *= 4
    prompts = [r["prompt"] for r in make_task(0, 12, seed=5)[1]] + ["add 1 : 2 3", "add 2 : 9 9 9 9 9"]
    answers = greedy_answers(model, tok, prompts, max_new_tokens=6, batch_size=5)
    assert answers == [_naive_greedy(model, tok, p, 6) for p in prompts]
    assert model.training is False
    scores = greedy_scores(model, tok, prompts, verify, max_new_tokens=6, batch_size=5)
    each = [verify(p, a) for p, a in zip(prompts, answers)]
    assert scores == pytest.approx({k: sum(e[k] for e in each) / len(each) for k in each[0]})


@pytest.mark.demo
def test_demo_preference_training_improves_greedy_answers(tmp_path):
    """The full embedded default (`make train`, about a minute of CPU): per-digit accuracy of greedy answers on
    held-out prompts rises by at least 10 points from before preference training to after it."""
    from fastpref.train import main

    out = tmp_path / "demo"
    s = main(["--output-dir", str(out), "--no-progress"])
    before, after = s["eval_greedy_before"], s["eval_greedy_after"]
    assert after["digit_accuracy"] >= before["digit_accuracy"] + 0.10, (before, after)
    assert after["exact_match"] > before["exact_match"]
    saved = json.loads((out / "summary.json").read_text())
    assert saved["eval_greedy_after"] == after and saved["eval_reward_accuracy"] is not None
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"eval": true' in x]
    assert sum(r["phase"] == "pref" for r in evals) >= 6 and sum(r["phase"] == "sft" for r in evals) >= 6
    assert all("eval/greedy_digit_accuracy" in r for r in evals)
    assert (out / "greedy.png").stat().st_size > 1000
