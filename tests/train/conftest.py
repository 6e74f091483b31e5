"""Shared fixtures for the trainer tests: a tiny local HF model folder and small data files."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("transformers")

SHORT = ["--sft-steps", "10", "--steps", "6", "--synthetic-train", "64", "--synthetic-eval", "16",
         "--batch-size", "4", "--eval-batch-size", "16", "--no-progress", "--no-plots", "--save-every", "0",
         "--eval-every", "0", "--threads", "1"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> pathlib.Path:
    """The demo model (random init) and the bundled tokenizer, saved as a Hugging Face folder."""
    from fastpref.train.model import tiny_model
    from fastpref.train.synthetic import load_tokenizer

    out = tmp_path_factory.mktemp("tiny-model")
    tok = load_tokenizer()
    tiny_model(len(tok), seed=0, hidden=32, layers=1, heads=2).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _write_jsonl(path: pathlib.Path, rows) -> pathlib.Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture
def write_jsonl():
    """write_jsonl(path, rows): one JSON object (or raw string) per line."""
    return _write_jsonl


@pytest.fixture
def pairs_rows():
    from fastpref.train.synthetic import make_task

    return make_task(48, 8, seed=1)[0]


def kill_when_saved(out: pathlib.Path, args: list[str], checkpoint: str, timeout: float, poll: float) -> None:
    """Run ``fastpref train --output-dir out *args`` in a subprocess, SIGKILL it as soon as
    ``out/checkpoints/<checkpoint>`` exists, and check that it died by the kill before writing ``final``."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "fastpref.train", "--output-dir", str(out), *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not (out / "checkpoints" / checkpoint).exists():
        assert proc.poll() is None and time.time() < deadline, "training ended before the kill"
        time.sleep(poll)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (out / "final").exists()


def assert_same_final_weights(a: pathlib.Path, b: pathlib.Path) -> None:
    """The final models of the runs in ``a`` and ``b`` hold bitwise equal tensors under the same names."""
    import torch
    from safetensors.torch import load_file

    pa, pb = load_file(a / "final" / "model.safetensors"), load_file(b / "final" / "model.safetensors")
    assert pa.keys() == pb.keys()
    for k in pa:
        assert torch.equal(pa[k], pb[k]), k
