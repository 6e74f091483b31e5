"""Every user error of ``fastpref train``: one line naming the flag / file / line and what was expected, exit
status 2, no traceback, nothing written to the output folder; and the rule that a run is never overwritten
silently."""
import json
import os
import subprocess
import sys

import pytest

from fastpref.train import main
from fastpref.losses.registry import ALIASES as LOSS_ALIASES
from fastpref.train.validate import UserError, resolve_losses

from conftest import SHORT

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def refused(capsys, out, argv, early: bool = True) -> str:
    """Run ``fastpref train argv`` in-process; assert exit 2, the error as one line (the only stderr line when
    ``early``: before any model is loaded), no traceback, no output folder; returns the line."""
    with pytest.raises(SystemExit) as e:
        main(["--output-dir", str(out), "--no-progress", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fastpref train: error: ") and "Traceback" not in "".join(err), err
    assert len(err) == 1 or not early, err
    assert not out.exists()
    return err[-1]


@pytest.mark.parametrize("argv,message", [
    (["--steps", "0"], "--steps 0: expected a whole number >= 1"),
    (["--steps", "-3"], "--steps -3: expected a whole number >= 1"),
    (["--beta", "-1"], "--beta -1.0: expected a number > 0"),
    (["--batch-size", "0"], "--batch-size 0: expected a whole number >= 1"),
    (["--lr", "-1e-4"], "--lr -0.0001: expected a number > 0"),
    (["--lr", "abc"], "argument --lr: invalid float value: 'abc'"),
    (["--lr", "nan"], "--lr nan: expected a number > 0"),
    (["--warmup-ratio", "1"], "--warmup-ratio 1.0: expected a number in [0, 1)"),
    (["--sft-steps", "-1"], "--sft-steps -1: expected a whole number >= 0"),
    (["--grad-accum", "0"], "--grad-accum 0: expected a whole number >= 1"),
    (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--loss", "sigmoud"], "--loss sigmoud: unknown loss; did you mean 'sigmoid'"),
    (["--loss", "dpo=x"], "could not convert string to float"),
    (["--loss-args", "nope=1"], "--loss-args nope: not a parameter of sigmoid"),
    (["--eval-data", "x.jsonl"], "--eval-data x.jsonl: no such file or folder"),
    (["--resume", "no/such/checkpoint"], "--resume no/such/checkpoint: no such folder"),
    (["--distributed", "fsdp"], "--distributed fsdp needs to be launched with torchrun"),
])
def test_flag_errors(tmp_path, capsys, argv, message):
    assert message in refused(capsys, tmp_path / "out", argv)


def test_path_errors(tmp_path, capsys, write_jsonl):
    out = tmp_path / "out"
    line = refused(capsys, out, ["--model", str(tmp_path / "missing-model")])
    assert f"--model {tmp_path / 'missing-model'}: no such folder" in line
    (tmp_path / "empty").mkdir()
    line = refused(capsys, out, ["--model", str(tmp_path / "empty")])
    assert "not a Hugging Face model folder (no config.json)" in line
    assert "--data" in refused(capsys, out, ["--data", str(tmp_path / "none.jsonl")])
    (tmp_path / "d.csv").write_text("a,b\n")
    assert "unsupported data file" in refused(capsys, out, ["--data", str(tmp_path / "d.csv")])
    (tmp_path / "file").write_text("")
    assert "exists and is not a folder" in refused(capsys, tmp_path / "file2", ["--output-dir", str(tmp_path / "file")])


GOOD = {"prompt": "add 1 : 2 3 4 5", "chosen": "3 4 5 6", "rejected": "4 5 6 7"}


@pytest.mark.parametrize("rows,extra,message", [
    (['{"prompt": "a", "chosen": "b", "rejected": "c"}', '{"prompt": "a" "chosen": "b"}'], [],
     "--data: {d}:2: invalid JSON (Expecting ',' delimiter at column 16)"),
    ([{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": "b"}], [],
     "--data: {d}:2: missing field 'rejected'"),
    ([{"prompt": "a", "chosen": "", "rejected": "c"}], [], "--data: {d}:1: 'chosen' is empty"),
    ([{"text": "a"}], [], "--data: {d}:1: cannot tell the data format"),
    ([GOOD, GOOD], ["--max-length", "5"], "{d}:1: the prompt is 8 tokens, which leaves no room"),  # found later
])
def test_data_errors(tmp_path, capsys, write_jsonl, tiny_model_dir, rows, extra, message):
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    line = refused(capsys, tmp_path / "out", ["--model", str(tiny_model_dir), "--data", str(data), *extra],
                   early=not extra)
    assert "fastpref train: error: " + message.format(d=data) in line


@pytest.mark.parametrize("text,message", [
    ("steps: 0\n", "c.yaml line 1: steps 0: expected a whole number >= 1"),
    ("lr: 1e-3\nbeta: -2\n", "c.yaml line 2: beta -2: expected a number > 0"),
    ("lr: 1e-3\nsteps: [1\n", "c.yaml line 3: not valid YAML"),
    ("batch_sise: 4\n", "c.yaml line 1: batch_sise: unknown setting; did you mean 'batch_size'?"),
    ("plots: maybe\n", "c.yaml line 1: plots: expected true or false, got 'maybe'"),
    ("- 1\n", "c.yaml: expected a mapping of settings"),
])
def test_config_errors(tmp_path, capsys, text, message):
    (tmp_path / "c.yaml").write_text(text)
    assert message in refused(capsys, tmp_path / "out", ["--config", str(tmp_path / "c.yaml")])
    assert "--config" in refused(capsys, tmp_path / "out", ["--config", str(tmp_path / "nope.yaml")])


def test_loss_aliases():
    names = ["sigmoid", "kto", "tdpo1", "tdpo2", "hinge", "plackett_luce"]
    assert resolve_losses({"DPO": 1.0, "kto": 0.5}, names)[0] == {"sigmoid": 1.0, "kto": 0.5}
    assert resolve_losses({"rso": 1.0}, names)[1] == ["--loss rso: using the registry's 'hinge'"]
    with pytest.raises(UserError, match="did you mean") as e:
        resolve_losses({"tdpo": 1.0}, names)
    assert "'tdpo1'" in str(e.value) and "'tdpo2'" in str(e.value)
    from fastpref import losses

    assert set(LOSS_ALIASES.values()) <= set(losses.names())


def test_errors_come_before_heavy_imports_and_without_traceback(tmp_path):
    """The real command: exit 2, one line, no traceback, and transformers was never imported."""
    code = ("import sys\nfrom fastpref.train import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
            "    print('transformers' in sys.modules, file=sys.stderr)\n    raise\n")
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run([sys.executable, "-c", code, "--steps", "0", "--output-dir", str(tmp_path / "o")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines() == ["fastpref train: error: --steps 0: expected a whole number >= 1", "False"]


def test_help_lists_every_flag_with_meaning_and_default(capsys):
    import dataclasses

    from fastpref.train.config import HELP, Config

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(Config):
        if f.name != "extra":
            assert "--" + f.name.replace("_", "-") in text and f.name in HELP
    assert ("--steps STEPS optimizer steps of preference training, >= 1 (default: demo: 300, with --data: --epochs "
            "over the data)") in text
    assert "--output-dir OUTPUT_DIR folder for metrics.jsonl" in text and "(default: runs/demo)" in text


def test_output_folder_is_never_overwritten_silently(tmp_path, capsys):
    out = tmp_path / "run"
    main(["--output-dir", str(out), *SHORT])
    first = json.loads((out / "summary.json").read_text())
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as e:  # refused, with the choices
        main(["--output-dir", str(out), *SHORT])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume auto" in err and "--overwrite" in err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != "notes.txt"} == before
    s = main(["--output-dir", str(out), *SHORT, "--resume", "auto"])  # finished: resumes at the end
    assert s["train_steps"] == first["train_steps"] and s["eval_greedy_before"] == first["eval_greedy_before"]
    (out / "checkpoints" / "junk").mkdir()
    s = main(["--output-dir", str(out), *SHORT, "--overwrite", "--steps", "2"])
    assert s["train_steps"] == 12 and not (out / "checkpoints" / "junk").exists()
    assert (out / "notes.txt").read_text() == "mine"  # only the run's own files are replaced
    assert s["backend"] in ("torch", "native", "triton") and s["versions"]["torch"] and s["versions"]["fastpref"]


def test_device_errors(tmp_path, capsys):
    import torch

    if not torch.cuda.is_available():
        assert "--device cuda: CUDA is not available here" in refused(capsys, tmp_path / "o", ["--device", "cuda"])
