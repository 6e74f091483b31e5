"""Issue 25 (part B): no silent wrong results and no tracebacks. Every number is checked before work, a data
problem of any format is one line before the model loads, a non-finite loss stops the run, judges follow the
one-line rule, and the API refuses what the command refuses."""
import json
import shutil

import pytest

from test_cli_errors import GOOD, refused


@pytest.fixture
def broken_model(tmp_path, tiny_model_dir):
    """A model folder whose weights cannot be loaded: an error found before the model loads is reported as
    itself, one found after would be hidden behind the model's."""
    out = tmp_path / "broken-model"
    shutil.copytree(tiny_model_dir, out)
    (out / "model.safetensors").write_bytes(b"not safetensors")
    return out


def stopped(capsys, argv) -> str:
    """Run ``fastpref train argv`` in-process, past the checks of its settings; assert exit 2 and a one-line error
    as the last line of stderr, no traceback; returns that line."""
    from fastpref.train import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fastpref train: error: ") and "Traceback" not in "".join(err), err
    return err[-1]


def rows(n: int) -> list[dict]:
    return [{**GOOD, "prompt": f"add 1 : {i} 3 4 5"} for i in range(n)]


def data_refused(capsys, tmp_path, model, data, *extra) -> str:
    return refused(capsys, tmp_path / "out", ["--model", str(model), "--data", str(data), *extra])


def test_eval_fraction_that_holds_out_everything_is_refused(tmp_path, capsys, write_jsonl, broken_model):
    data = write_jsonl(tmp_path / "d.jsonl", rows(4))
    line = data_refused(capsys, tmp_path, broken_model, data, "--eval-fraction", "0.999")
    assert line == (f"fastpref train: error: --eval-fraction 0.999: every prompt of {data} (4 rows) would be held "
                    "out, leaving none to train on; lower it or give --eval-data")


def test_json_array_is_named(tmp_path, capsys, broken_model):
    data = tmp_path / "d.json"
    data.write_text(json.dumps(rows(2), indent=2))
    assert data_refused(capsys, tmp_path, broken_model, data) == (
        f"fastpref train: error: --data: {data}: a JSON array; JSON Lines is expected (one JSON object per line, "
        "e.g. written with pandas' to_json(orient='records', lines=True))")


def test_truncated_parquet_is_one_line(tmp_path, capsys, broken_model):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    data = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows(8)), data)
    data.write_bytes(data.read_bytes()[:-40])
    line = data_refused(capsys, tmp_path, broken_model, data)
    assert line.startswith(f"fastpref train: error: --data: {data}: not a readable Parquet file (truncated or "
                           "damaged?): ")


def test_plain_folder_is_not_a_datasets_folder(tmp_path, capsys, broken_model):
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "d.jsonl").write_text(json.dumps(GOOD) + "\n")
    assert data_refused(capsys, tmp_path, broken_model, tmp_path / "folder") == (
        f"fastpref train: error: --data: {tmp_path / 'folder'}: a folder, but not a `datasets` folder saved with "
        "save_to_disk (it has no dataset_dict.json or state.json); give a .jsonl or .parquet file, or such a folder")


def _datasets_folder(path, data_rows):
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    datasets.Dataset.from_list(data_rows).save_to_disk(str(path))
    return path


def test_datasets_folder_without_its_arrow_files(tmp_path, capsys, broken_model):
    folder = _datasets_folder(tmp_path / "ds", rows(4))
    for f in folder.glob("*.arrow"):
        f.unlink()
    line = data_refused(capsys, tmp_path, broken_model, folder)
    assert line.startswith(f"fastpref train: error: --data: {folder}: a `datasets` folder that cannot be read "
                           "(missing or damaged files?): ")


def test_bad_row_of_a_datasets_folder_before_the_model(tmp_path, capsys, broken_model):
    folder = _datasets_folder(tmp_path / "ds", [*rows(2), {**GOOD, "chosen": ""}])
    assert data_refused(capsys, tmp_path, broken_model, folder) == \
        f"fastpref train: error: --data: {folder}[row 2]: 'chosen' is empty"


def test_unpaired_data_with_a_pairwise_loss_before_the_model(tmp_path, capsys, write_jsonl, broken_model):
    data = write_jsonl(tmp_path / "u.jsonl", [{"prompt": "add 1 : 2", "completion": "3", "label": i % 2 == 0}
                                               for i in range(4)])
    line = refused(capsys, tmp_path / "out", ["--model", str(broken_model), "--data", str(data),
                                              "--eval-data", str(data)], early=False)
    assert line.startswith("fastpref train: error: --loss sigmoid cannot be trained on 'unpaired' data here: "), line


@pytest.mark.parametrize("field,value,message", [
    ("margin", 1e308, "'margin' is 1e+308, beyond float32's range (±3.4e38) in which the loss reads it"),
    ("preference_probability", 1.5, "'preference_probability' is 1.5, expected a probability in [0, 1]"),
])
def test_per_row_numbers_are_checked_in_float32_and_range(tmp_path, capsys, write_jsonl, broken_model, field,
                                                          value, message):
    data = write_jsonl(tmp_path / "d.jsonl", [{**r, field: value if i == 1 else 0.5} for i, r in enumerate(rows(3))])
    assert data_refused(capsys, tmp_path, broken_model, data) == f"fastpref train: error: --data: {data}:2: {message}"


def test_listwise_score_beyond_float32(tmp_path, capsys, write_jsonl, broken_model):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "add 1 : 2", "responses": ["3", "4"], "scores": [1e39, 0]}])
    assert data_refused(capsys, tmp_path, broken_model, data) == (
        f"fastpref train: error: --data: {data}:1: 'scores' is 1e+39, beyond float32's range (±3.4e38) in which the "
        "loss reads it")


@pytest.mark.parametrize("argv,message", [
    (["--loss", "sigmoid=-1"], "--loss sigmoid=-1.0: expected a finite weight > 0"),
    (["--loss-args", "label_smoothing=0.7"], "--loss-args label_smoothing=0.7: expected a number in [0, 0.5]"),
    (["--beta", "1e39"], "--beta 1e+39: expected a number > 0 (finite in float32)"),
])
def test_loss_numbers_are_the_api_checks(tmp_path, capsys, argv, message):
    assert refused(capsys, tmp_path / "out", argv) == "fastpref train: error: " + message


def test_non_finite_loss_stops_the_run_keeping_the_good_checkpoints(tmp_path, capsys):
    from conftest import SHORT

    out = tmp_path / "out"
    line = stopped(capsys, ["--output-dir", str(out), *SHORT, "--sft-steps", "2", "--lr", "1e30", "--save-every", "1",
                            "--loss", "sigmoid=1,sft=0.2"])
    assert line == ("fastpref train: error: training stopped at step 4 (pref): loss = nan, loss/sft = nan, "
                    "loss/sigmoid = nan, grad_norm = nan; the "
                    "step was not applied and no checkpoint, final model or summary was written from it (lower --lr "
                    "or --max-grad-norm, or check the data's numbers; --resume auto continues from the last "
                    "checkpoint)")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002", "step-00000003"]
    assert not (out / "final").exists() and not (out / "summary.json").exists()
    for line in (out / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl"))


# ------------------------------------------------------------------------------------------------- online
@pytest.mark.parametrize("argv,message", [
    (["--eval-every", "0"], "--eval-every 0: expected a whole number >= 1"),
    (["--lr", "nan"], "--lr nan: expected a number > 0"),
    (["--epochs", "nan"], "--epochs nan: expected a number > 0"),
    (["--temperature", "nan"], "--temperature nan: expected a number > 0"),
    (["--threads", "-1"], "--threads -1: expected a whole number >= 1"),
    (["--max-grad-norm", "nan"], "--max-grad-norm nan: expected a number > 0"),
    (["--beta", "-1"], "--beta -1.0: expected a number > 0"),
    (["--judge-timeout", "0"], "--judge-timeout 0.0: expected a number > 0"),
])
def test_online_numbers_are_checked_up_front(tmp_path, capsys, argv, message):
    assert refused(capsys, tmp_path / "out", ["--online", *argv]) == "fastpref train: error: " + message


def _judge_module(**fns) -> str:
    import sys
    import types

    name = f"_guard_judge_{len(sys.modules)}"
    mod = types.ModuleType(name)
    mod.__dict__.update(fns)
    sys.modules[name] = mod
    return name


def _boom(prompts, completions):
    raise RuntimeError("boom")


def _hang(prompts, completions):
    import time

    time.sleep(30)


@pytest.mark.parametrize("fn,timeout,message", [
    (lambda p, c: [float("nan")] * len(c), None,
     "judge failed: reward function {m}:f returned nan; expected finite values in [-inf, inf]"),
    (lambda p, c: [1.0], None, "judge failed: reward function {m}:f returned 1 values for 4 completions"),
    (_boom, None, "judge failed: reward function {m}:f raised RuntimeError: boom"),
    (_hang, "0.5", "judge failed: reward function {m}:f gave no answer within 0.5 s (--judge-timeout)"),
])
def test_judges_fail_as_one_line_from_the_first_evaluation(tmp_path, capsys, write_jsonl, fn, timeout, message):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"add 1 : {i} 2"} for i in range(4)])
    m = _judge_module(f=fn)
    line = stopped(capsys, [
        "--online", "--output-dir", str(tmp_path / "out"), "--no-progress", "--prompts", str(prompts), "--judge", f"{m}:f", "--rounds", "1",
        "--prompts-per-round", "4", "--batch-size", "2", "--gen-batch", "4", "--max-new-tokens", "2",
        "--threads", "1", "--no-plots", *(["--judge-timeout", timeout] if timeout else [])])
    assert line == "fastpref train: error: " + message.format(m=m)


def test_non_string_prompt_in_prompts_is_one_line(tmp_path, capsys, write_jsonl):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "add 1 : 2"}, {"prompt": 5}])
    m = _judge_module(f=lambda p, c: [0.0] * len(c))
    line = stopped(capsys, ["--online", "--output-dir", str(tmp_path / "out"), "--prompts", str(prompts), "--judge",
                            f"{m}:f", "--threads", "1", "--no-progress", "--no-plots"])
    assert line == (f"fastpref train: error: {prompts}:2: field 'prompt' must be a string or a list of chat "
                    "messages, got int")


def test_reward_score_beyond_float32(tmp_path, capsys, write_jsonl, tiny_model_dir):
    data = write_jsonl(tmp_path / "s.jsonl", [{"prompt": f"add 1 : {i}", "response": "3", "score": 1e39 if i else 1}
                                              for i in range(4)])
    line = stopped(capsys, ["--task", "reward", "--loss", "regression", "--model", str(tiny_model_dir), "--data",
                            str(data), "--output-dir", str(tmp_path / "out"), "--no-progress", "--no-plots"])
    assert line == (f"fastpref train: error: {data}:2: 'score' is 1e+39, beyond float32's range (±3.4e38) in which "
                    "the loss reads it")


def test_the_stop_names_the_step_and_the_term():
    from fastpref.train.run import NonFinite, stop_if_not_finite

    stop_if_not_finite(3, "pref", {"loss": 0.7, "loss/sft": 0.2, "grad_norm": 1.0})  # healthy: nothing
    with pytest.raises(NonFinite, match=r"^training stopped at step 3 \(pref\): loss = inf, loss/sft = inf; "):
        stop_if_not_finite(3, "pref", {"loss": float("inf"), "loss/sigmoid": 0.5, "loss/sft": float("inf"),
                                       "grad_norm": 1.0})


def test_online_non_finite_loss_stops_the_run(tmp_path, capsys):
    line = stopped(capsys, ["--online", "--output-dir", str(tmp_path / "out"), "--sft-steps", "5",
                            "--synthetic-train", "32", "--synthetic-eval", "8", "--rounds", "2",
                            "--prompts-per-round", "8", "--batch-size", "4", "--epochs", "2", "--gen-batch", "8",
                            "--threads", "1", "--no-progress", "--no-plots", "--lr", "1e30"])
    assert line.startswith("fastpref train: error: training stopped at step ") and " (online): loss = " in line, line
    assert not (tmp_path / "out" / "final").exists() and not (tmp_path / "out" / "summary.json").exists()
