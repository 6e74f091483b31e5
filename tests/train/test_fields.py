"""Per-example fields: names and aliases, validation with the row's location, all-or-none, batching; the
prompt-inclusive NLL labels."""
import json

import pytest
import torch

from fastpref.train import data as D
from fastpref.train.objective import loss_inputs, make_loss
from fastpref.train.synthetic import load_tokenizer

TOK = load_tokenizer()
ROW = {"prompt": "add 1 : 2 3", "chosen": "3 4", "rejected": "3 5"}


def load(tmp_path, rows):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return D.load_dataset(path, D.Tokenize(TOK, 48))


def test_aliases_batch_and_feed_the_losses(tmp_path):
    ds = load(tmp_path, [{**ROW, "soft_label": 0.8, "score_chosen": 1.5, "score_rejected": -1, "chosen_probs": 0.7,
                          "rejected_probs": 0.2},
                         {**ROW, "preference_probability": 0.6, "chosen_score": 0.5, "rejected_score": 0,
                          "chosen_winrate": 0.6, "rejected_winrate": 0.4}])
    b = D.batch(ds, [0, 1], packed=False)
    assert b.inputs["preference_probability"].tolist() == pytest.approx([0.8, 0.6])
    assert b.inputs["chosen_score"].tolist() == [1.5, 0.5] and b.inputs["rejected_winrate"].tolist() == pytest.approx([0.2, 0.4])
    loss = make_loss({"sigmoid": 1.0, "gpo": 1.0, "sppo": 1.0}, {}, "pairs", None, None, "torch")
    got = loss_inputs(loss, "pairs", b.inputs)
    assert got["soft_labels"] is b.inputs["preference_probability"] and "pref_probs" not in got
    assert set(got) == {"soft_labels", "chosen_scores", "rejected_scores", "chosen_winrates", "rejected_winrates"}


def test_rationale_is_tokenized_after_prompt_and_both_answers(tmp_path):
    ds = load(tmp_path, [{**ROW, "rationale": "yes"}])
    ctx, text = ds.examples[0].texts["rationale"]
    assert TOK.decode(ctx) == "[BOS] add 1 : 2 3 3 4 3 5" and TOK.decode(text) == "yes [EOS]"


@pytest.mark.parametrize("rows, match", [
    ([{**ROW, "margin": 1.0}, ROW], r"d.jsonl:2: field\(s\) \['margin'\] present in some rows"),
    ([{**ROW, "strength": "high"}], "d.jsonl:1: 'strength' must be a number"),
    ([{**ROW, "preference_probability": float("nan")}], "non-finite"),
    ([{"prompt": "add 1 : 2", "responses": ["3", "4"], "scores": [1, 0], "proposal_logps": [-1.0]}],
     "'proposal_logps' has 1 entries for 2 responses"),
    ([{"prompt": [{"role": "user", "content": "add 1 : 2"}], "chosen": "3", "rejected": "4", "rationale": "yes"}],
     "needs string prompt"),
])
def test_bad_fields_name_the_row(tmp_path, rows, match):
    with pytest.raises(D.DataError, match=match):
        load(tmp_path, rows)


@pytest.mark.parametrize("packed", [False, True])
def test_sequence_labels_count_the_prompt(packed):
    seqs = [([2, 5, 6], [7, 3]), ([2, 8], [9, 10, 3])]
    b = D.collate(seqs, packed=packed, sequence_labels=True)
    full = b.inputs["nll_labels"].reshape(-1).tolist()
    lab = b.labels.reshape(-1).tolist()
    assert full == [5, 6, 7, 3, -100, 8, 9, 10, 3, -100]  # both sequences are 5 tokens: no padding either way
    assert lab == [-100, -100, 7, 3, -100, -100, 9, 10, 3, -100]
    assert torch.equal(torch.tensor(full)[torch.tensor(lab) != -100], torch.tensor(lab)[torch.tensor(lab) != -100])
