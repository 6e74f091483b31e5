"""The ``fastpref`` command as a user meets it: ``--version``, and a normal run prints fastpref's own lines only
(no third-party progress bars or warnings)."""
import importlib.metadata
import os
import re
import subprocess
import sys

import pytest

import fastpref

NOISE = ["[WARNING]", "Writing model shards", "Loading weights", "it/s]", "UserWarning", "FutureWarning"]


def run(args: list[str], cwd: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("DS_ACCELERATOR", "HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY")}
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=600)


def test_version(tmp_path):
    out = run(["-m", "fastpref.cli", "--version"], str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert re.fullmatch(rf"fastpref {re.escape(fastpref.__version__)} \(torch \S+; backends on \w+: .*torch.*\)\n",
                        out.stdout), out.stdout
    assert importlib.metadata.version("fastpref") == fastpref.__version__  # one version for the package and setup


@pytest.mark.parametrize("task", ["preference", "reward"])
def test_a_normal_run_prints_no_third_party_chatter(tmp_path, task):
    pytest.importorskip("transformers")
    out = run(["-m", "fastpref.train", "--task", task, "--output-dir", str(tmp_path / "run"), "--sft-steps", "20",
               "--steps", "4", "--synthetic-train", "64", "--synthetic-eval", "16", "--no-plots"], str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout + out.stderr
    assert "held-out" in text
    noisy = [n for n in NOISE if n in text]
    assert not noisy, f"third-party output {noisy} in:\n{text[-3000:]}"


def test_each_demo_has_its_own_default_folder():
    """make train, fastpref train --online and fastpref train --task reward run in any order on a fresh clone."""
    pytest.importorskip("yaml")
    from fastpref.train.config import load_config
    from fastpref.train.online.config import load_config as load_online

    folders = [load_config([]).output_dir, load_config(["--task", "reward"]).output_dir,
               load_online(["--online"]).output_dir, load_online(["--online", "--algorithm", "grpo"]).output_dir]
    assert len(set(folders)) == 4, folders
    assert load_config(["--task", "reward", "--output-dir", "x"]).output_dir == "x"
