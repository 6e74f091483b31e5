"""Data formats and every bad-row error, with file and line; --skip-bad-rows counts instead."""
import json

import pytest

from fastpref.train import data as D
from fastpref.train.synthetic import load_tokenizer

TOK = load_tokenizer()


def tk(max_length=32, **kw):
    return D.Tokenize(TOK, max_length, **kw)


def load(tmp_path, rows, **kw):
    path = tmp_path / "d.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return D.load_dataset(path, kw.pop("tokenize", tk()), **kw)


def test_pairwise_strings(tmp_path):
    ds = load(tmp_path, [{"prompt": "add 1 : 2 3", "chosen": "3 4", "rejected": "3 5"}])
    assert ds.layout == "pairs" and len(ds) == 1
    (p, c), (_, r) = ds.examples[0].seqs
    assert p == TOK("add 1 : 2 3")["input_ids"] and p[0] == TOK.bos_token_id
    assert c == TOK("3 4", add_special_tokens=False)["input_ids"] + [TOK.eos_token_id]
    assert r[-2] != c[-2]


def test_pairwise_chat_messages(tmp_path):
    row = {"prompt": [{"role": "user", "content": "add 1 : 2"}],
           "chosen": [{"role": "assistant", "content": "3"}], "rejected": [{"role": "assistant", "content": "4"}]}
    ds = load(tmp_path, [row])
    (p, c), _ = ds.examples[0].seqs
    assert TOK.decode(p) == "user : add 1 : 2 assistant :"
    assert TOK.decode(c) == "3 [EOS]"


def test_listwise_scores_and_ranks(tmp_path):
    ds = load(tmp_path, [{"prompt": "add 1 : 2", "responses": ["3", "4", "5"], "scores": [1.0, 0.2, 0]},
                         {"prompt": "add 1 : 3", "responses": ["4", "5", "6"], "scores": [2, 1, 0.5]}])
    assert ds.layout == "list" and ds.num_responses == 3 and ds.examples[1].scores == [2.0, 1.0, 0.5]
    ds = load(tmp_path, [{"prompt": "add 1 : 2", "responses": ["3", "4"], "ranks": [1, 2]}])
    assert ds.examples[0].ranks == [1.0, 2.0]
    b = D.batch(ds, [0], packed=True)
    assert b.cu_seqlens.tolist()[-1] == b.labels.numel() and "ranks" in b.inputs


def test_unpaired(tmp_path):
    ds = load(tmp_path, [{"prompt": "add 1 : 2", "completion": "3", "label": True},
                         {"prompt": "add 1 : 2", "completion": "5", "label": 0}])
    assert ds.layout == "unpaired" and [e.label for e in ds.examples] == [True, False]
    assert D.batch(ds, [0, 1], packed=False).inputs["desirable"].tolist() == [True, False]


def test_parquet_and_datasets_folder(tmp_path, pairs_rows):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(pairs_rows), tmp_path / "d.parquet")
    a = D.load_dataset(tmp_path / "d.parquet", tk())
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(pairs_rows).save_to_disk(str(tmp_path / "folder"))
    b = D.load_dataset(tmp_path / "folder", tk())
    assert len(a) == len(b) == len(pairs_rows) and a.examples[3].seqs == b.examples[3].seqs


GOOD = {"prompt": "add 1 : 2 3", "chosen": "3 4", "rejected": "3 5"}
BAD = [
    ({"prompt": "add 1 : 2", "chosen": "3"}, "missing field 'rejected'"),
    ({"chosen": "3", "rejected": "4"}, "missing field 'prompt'"),
    ({"prompt": "add 1 : 2", "chosen": 3, "rejected": "4"}, "field 'chosen' must be a string or a list of chat"),
    ({"prompt": "add 1 : 2", "chosen": "  ", "rejected": "4"}, "'chosen' is empty"),
    ({"prompt": "add 1 : 2", "chosen": [{"role": "assistant"}], "rejected": "4"}, "string 'role' and 'content'"),
    ({"prompt": " ".join(["1"] * 40), "chosen": "3", "rejected": "4"}, "leaves no room for the completion"),
    ("{not json", "invalid JSON"),
    ([1, 2], "must be a JSON object"),
]


@pytest.mark.parametrize("row,message", BAD, ids=[m for _, m in BAD])
def test_bad_rows_name_file_and_line(tmp_path, row, message):
    with pytest.raises(D.DataError) as e:
        load(tmp_path, [GOOD, GOOD, row, GOOD])
    assert f"d.jsonl:3: " in str(e.value) and message in str(e.value)


@pytest.mark.parametrize("row,message", [
    ({"prompt": "p", "responses": ["a"], "scores": [1]}, "at least 2 completions"),
    ({"prompt": "p", "responses": ["1", "2"]}, "need 'scores' or 'ranks'"),
    ({"prompt": "p", "responses": ["1", "2"], "scores": [1]}, "has 1 entries for 2 responses"),
    ({"prompt": "p", "responses": ["1", "2"], "scores": ["a", 1]}, "must be a list of numbers"),
    ({"prompt": "p", "responses": ["1", "2", "3"], "scores": [1, 2, 3]}, "3 responses, but earlier rows have 2"),
    ({"prompt": "p", "responses": ["1", ""], "scores": [1, 2]}, "responses[1]: 'response' is empty"),
])
def test_listwise_errors(tmp_path, row, message):
    good = {"prompt": "p", "responses": ["1", "2"], "scores": [1, 0]}
    with pytest.raises(D.DataError, match="d.jsonl:2: ") as e:
        load(tmp_path, [good, row])
    assert message in str(e.value)


@pytest.mark.parametrize("row,message", [
    ({"prompt": "p", "completion": "1"}, "missing field 'label'"),
    ({"prompt": "p", "completion": "1", "label": "yes"}, "'label' must be true/false"),
    ({"prompt": "p", "completion": "", "label": True}, "'completion' is empty"),
])
def test_unpaired_errors(tmp_path, row, message):
    with pytest.raises(D.DataError, match="d.jsonl:2: ") as e:
        load(tmp_path, [{"prompt": "p", "completion": "1", "label": True}, row])
    assert message in str(e.value)


def test_skip_bad_rows_counts(tmp_path):
    rows = [GOOD] + [r for r, _ in BAD] + [GOOD]
    ds = load(tmp_path, rows, skip_bad_rows=True)
    assert len(ds) == 2 and sum(ds.skipped.values()) == len(BAD)
    with pytest.raises(D.DataError, match="no usable rows"):
        load(tmp_path, [r for r, _ in BAD], skip_bad_rows=True)


def test_truncation_policy(tmp_path):
    row = {"prompt": "add 1 : 2", "chosen": " ".join(["3"] * 20), "rejected": "4"}
    ds = load(tmp_path, [row], tokenize=tk(max_length=12))
    (p, c), _ = ds.examples[0].seqs
    assert len(p) + len(c) == 12 and ds.truncated == 1 and c[-1] != TOK.eos_token_id  # completion end cut
    with pytest.raises(D.DataError, match="d.jsonl:1: .*> --max-length 12 \\(--truncation error\\)"):
        load(tmp_path, [row], tokenize=tk(max_length=12, truncation="error"))
    ds = load(tmp_path, [{**row, "prompt": " ".join(["5"] * 30)}], tokenize=tk(max_length=12, max_prompt_length=4))
    assert len(ds.examples[0].seqs[0][0]) == 4  # prompt keeps its last tokens


def test_packed_batch_matches_padded(tmp_path, pairs_rows):
    ds = D.load_dataset(pairs_rows, tk())
    packed, padded = D.batch(ds, [0, 1, 2], packed=True, pack_length=40), D.batch(ds, [0, 1, 2], packed=False)
    assert packed.input_ids.shape[0] < 6 and packed.cu_seqlens.numel() == 7
    flat = packed.input_ids.reshape(-1)[packed.keep]
    assert flat.tolist() == padded.input_ids[padded.attention_mask.bool()].tolist()
    assert packed.labels.tolist() == padded.labels[padded.attention_mask.bool()].tolist()


def test_data_order_is_a_pure_function():
    a = D.order(10, 3, 0, 25)
    assert a[:10] != a[10:20] and sorted(a[:10]) == list(range(10))
    assert D.order(10, 3, 7, 11) == a[7:18]


def test_epoch_batches_never_wrap_and_cover_each_epoch_once():
    n, bs = 20, 8  # 3 batches per epoch: 8, 8, 4
    steps = [D.epoch_batch(n, 5, s, bs) for s in range(6)]
    assert [len(b) for b in steps] == [8, 8, 4, 8, 8, 4]
    for e in range(2):
        assert sorted(i for b in steps[3 * e:3 * e + 3] for i in b) == list(range(n))
    assert D.epoch_batch(n, 5, 0, 32) == D.order(n, 5, 0, n)  # fewer items than a batch: each once
    assert D.epoch_batch(0, 5, 0, 32) == []


@pytest.mark.parametrize("packed", [False, True])
def test_empty_prompt_labels_predict_the_next_token(packed):
    """Labels are shifted: a sequence with no prompt token cannot label its first completion token with itself
    (padded batches did, packed ones crashed)."""
    b = D.collate([([], [7, 8, 3]), ([2, 14, 5], [7, 8, 3])], packed=packed)
    first = b.labels[:3] if packed else b.labels[0, :3]
    assert first.tolist() == [8, 3, -100]
    assert (b.labels[3:] if packed else b.labels[1]).tolist() == [-100, -100, 7, 8, 3, -100]


class _NoBos:
    """A GPT-2 / Qwen style tokenizer: no BOS added, EOS only (the bundled one, with BOS dropped)."""

    bos_token_id, eos_token_id, chat_template = None, TOK.eos_token_id, None

    def __call__(self, text, add_special_tokens=True):
        ids = TOK(text, add_special_tokens=False)["input_ids"]
        return {"input_ids": ids}


@pytest.mark.parametrize("row", [{"prompt": "", "chosen": "3 4", "rejected": "3 5"},
                                 {"prompt": "", "completion": "3 4", "label": True},
                                 {"prompt": "", "responses": ["3", "4"], "scores": [1, 0]}])
def test_empty_prompt_without_bos_scores_every_completion_token(tmp_path, row):
    ds = load(tmp_path, [row], tokenize=D.Tokenize(_NoBos(), 32))
    for p, c in ds.examples[0].seqs:
        assert p == [TOK.eos_token_id]
        b = D.collate([(p, c)], packed=False)
        assert b.labels[0].tolist() == c + [-100]


def test_empty_prompt_is_generated_from_the_token_training_starts_it_with():
    from fastpref.train.evaluate import prompt_ids

    assert prompt_ids(_NoBos(), "") == [TOK.eos_token_id] and prompt_ids(TOK, "") == [TOK.bos_token_id]
    assert prompt_ids(_NoBos(), "add 1 : 2") == TOK("add 1 : 2", add_special_tokens=False)["input_ids"]
