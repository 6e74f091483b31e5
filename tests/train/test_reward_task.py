"""``fastpref train --task reward``: pairwise and score data, the saved model, clear errors, and (with
FASTPREF_TEST_DEMO=1) the embedded demo's held-out reward accuracy; SIGKILL + --resume is exact."""
import json
import os

import pytest
import torch

from fastpref.train import main
from fastpref.train.synthetic import make_task

from conftest import assert_same_final_weights, kill_when_saved

SHORT = ["--no-progress", "--no-plots", "--threads", "1", "--batch-size", "8", "--eval-batch-size", "64"]


def _rm_scores(folder, rows):
    """r(prompt + chosen) and r(prompt + rejected) from the saved model, the plain transformers way."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    out = []
    for r in rows:
        pair = []
        for k in ("chosen", "rejected"):
            ids = tok(r["prompt"])["input_ids"] + tok(r[k], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            with torch.no_grad():
                pair.append(float(model(input_ids=torch.tensor([ids])).logits[0, 0]))
        out.append(pair)
    return out


def test_bt_on_synthetic_pairs_saves_a_loadable_classifier(tmp_path):
    s = main(["--task", "reward", "--loss", "bt", "--output-dir", str(tmp_path), "--sft-steps", "5", "--steps", "4",
              "--synthetic-train", "32", "--synthetic-eval", "16", "--loss-args", "label_smoothing=0.1", *SHORT])
    assert s["train_steps"] == 4 and s["num_labels"] == 1 and s["eval_reward_accuracy"] is not None
    held = make_task(32, 16)[1]
    scores = _rm_scores(tmp_path / "final", held)
    acc = sum((a > b) + 0.5 * (a == b) for a, b in scores) / len(scores)
    assert abs(acc - s["eval_reward_accuracy"]) < 1e-9  # the trainer's evaluation == the loaded model's


def test_regression_on_score_rows(tmp_path, write_jsonl, tiny_model_dir):
    rows = [{"prompt": r["prompt"], "response": r[k], "helpfulness": 4.0 if k == "chosen" else 1.0,
             "correctness": 3.0 if k == "chosen" else 0.0} for r in make_task(24, 0, seed=3)[0]
            for k in ("chosen", "rejected")]
    data = write_jsonl(tmp_path / "s.jsonl", rows)
    s = main(["--task", "reward", "--loss", "regression", "--model", str(tiny_model_dir), "--data", str(data),
              "--output-dir", str(tmp_path / "o"), "--steps", "3", "--eval-fraction", "0.3", *SHORT])
    assert s["attributes"] == ["helpfulness", "correctness"] and s["num_labels"] == 2
    assert s["eval_mse"] is not None and s["eval_reward_accuracy"] is not None


@pytest.mark.parametrize("argv, match", [
    (["--loss", "sigmoid"], "--task reward takes one of --loss"),
    (["--loss", "regression"], "score rows"),
    (["--loss", "scaled_bt"], "strength"),
    (["--loss", "bt", "--loss-args", "beta2=1"], "beta2"),
])
def test_clear_errors(argv, match, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--task", "reward", "--output-dir", str(tmp_path), "--steps", "1", "--sft-steps", "0",
              "--synthetic-train", "8", "--synthetic-eval", "8", *SHORT, *argv])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and match in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.skipif(os.environ.get("FASTPREF_TEST_DEMO") != "1", reason="set FASTPREF_TEST_DEMO=1 (minutes)")
def test_reward_demo_reaches_090(tmp_path):
    s = main(["--task", "reward", "--output-dir", str(tmp_path), "--no-progress", "--no-plots"])
    print(json.dumps({k: s[k] for k in ("eval_reward_accuracy", "wall_seconds")}))
    assert s["eval_reward_accuracy"] >= 0.9 and s["wall_seconds"] <= 180, s


RESUME = ["--task", "reward", "--sft-steps", "6", "--steps", "14", "--synthetic-train", "64", "--synthetic-eval", "16",
          "--save-every", "4", "--eval-every", "5", "--log-every", "3", *SHORT]


def _records(folder):
    return [{k: v for k, v in json.loads(x).items() if k != "time"}
            for x in (folder / "metrics.jsonl").read_text().splitlines()]


def test_sigkill_in_each_phase_then_resume_is_exact(tmp_path):
    """Killed once in the SFT phase and once in the reward phase, resumed each time: the same final weights,
    metrics and summary as an uninterrupted run."""
    a, b = tmp_path / "killed", tmp_path / "straight"
    kill_when_saved(a, RESUME, "step-00000004", timeout=240, poll=0.02)  # SFT phase (the causal LM)
    kill_when_saved(a, [*RESUME, "--resume", "auto"], "step-00000012", timeout=240, poll=0.02)  # reward phase
    resumed = main(["--output-dir", str(a), *RESUME, "--resume", "auto"])
    straight = main(["--output-dir", str(b), *RESUME])
    assert_same_final_weights(a, b)
    assert _records(a) == _records(b)
    same = ("eval_reward_accuracy", "eval_before", "train_steps")
    assert {k: resumed[k] for k in same} == {k: straight[k] for k in same}


def test_resume_from_the_end_of_the_sft_phase(tmp_path):
    """A checkpoint written as the SFT phase ends (before the reward model exists) resumes into the reward phase:
    same weights, evaluation before reward training and metrics as the run that wrote it."""
    args = [*RESUME, "--save-every", "6", "--keep-checkpoints", "5"]
    a, b = tmp_path / "a", tmp_path / "b"
    straight = main(["--output-dir", str(a), *args])
    resumed = main(["--output-dir", str(b), *args, "--resume", str(a / "checkpoints" / "step-00000006")])
    assert_same_final_weights(a, b)
    assert _records(a) == _records(b)
    assert resumed["eval_before"] == straight["eval_before"] and resumed["eval_before"] is not None
