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
