"""torch.compile with the default (inductor) backend in a fresh interpreter, before any eager call (issue: the
backend used to be loaded inside the traced region). One subprocess runs every case (tests/compile_fresh.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
CASES = ["functions", "PreferenceLoss[pairs]", "PreferenceLoss[list]", "PreferenceLoss[unpaired]",
         "PreferenceLoss[packed]", "training_step"]
TOL = 1e-4  # relative to the eager values: compiled float32 code only reassociates sums


@pytest.fixture(scope="module")
def results() -> dict[str, dict]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]),
               TORCHINDUCTOR_COMPILE_THREADS="1")  # tiny graphs: a pool of compile workers costs more than it saves
    proc = subprocess.run([sys.executable, str(HERE / "compile_fresh.py")], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            out[row["case"]] = row
    return out


def _check(row: dict) -> None:
    assert "error" not in row, row.get("error")
    assert row["graph_breaks"] == 0  # fullgraph=True: a break would have raised
    assert row["value_err"] <= TOL and row["grad_err"] <= TOL, row


@pytest.mark.parametrize("case", CASES)
def test_compiles_fullgraph_in_a_fresh_process(results, case):
    _check(results[case])


def test_same_compiled_code_on_every_backend(results):
    """The backend ("auto") is resolved when the op runs: FASTPREF_BACKEND picks each one, no recompilation."""
    import fastpref

    names = fastpref.available_backends("cpu")
    assert "torch" in names
    for name in names:
        _check(results[f"functions[{name}]"])


@pytest.mark.gpu
def test_compiled_on_every_cuda_backend(results):
    import fastpref

    names = fastpref.available_backends("cuda")
    assert "triton" in names
    for name in names:
        _check(results[f"functions[cuda-{name}]"])


def test_training_step_optimizer_breaks_only_inside_torch(results):
    """torch.optim graph-breaks around the update on purpose; nothing else in the step does."""
    assert results["training_step"]["optimizer_graph_breaks"] <= 2
