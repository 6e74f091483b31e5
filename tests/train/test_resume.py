"""Checkpoints: SIGKILL between checkpoints + --resume reaches exactly the uninterrupted parameters;
corrupted, truncated or pickled checkpoints are refused and the previous good one is used."""
import os
import re

import pytest
import torch
from safetensors.torch import load_file

from fastpref.train import checkpoint as C
from fastpref.train import main

from conftest import kill_when_saved

ARGS = ["--sft-steps", "6", "--steps", "14", "--synthetic-train", "64", "--synthetic-eval", "16", "--batch-size", "4",
        "--eval-batch-size", "16", "--no-progress", "--no-plots", "--save-every", "4", "--eval-every", "5",
        "--threads", "1"]


def test_sigkill_then_resume_is_exact(tmp_path):
    a, b = tmp_path / "killed", tmp_path / "straight"
    kill_when_saved(a, ARGS, "step-00000008", timeout=240, poll=0.02)
    resumed = main(["--output-dir", str(a), *ARGS, "--resume", "auto"])
    straight = main(["--output-dir", str(b), *ARGS])
    pa, pb = load_file(a / "final" / "model.safetensors"), load_file(b / "final" / "model.safetensors")
    assert pa.keys() == pb.keys()
    for k in pa:
        assert torch.equal(pa[k], pb[k]), k
    assert resumed["eval_reward_accuracy"] == straight["eval_reward_accuracy"]
    steps = [int(x.split('"step": ')[1].split(",")[0]) for x in (a / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 20


def _ckpt(root, step):
    return C.write(root / f"step-{step:08d}", {"w": torch.full((4,), float(step))}, {"step": step}, {"step": step})


def test_corrupt_checkpoints_are_refused(tmp_path):
    good, bad = _ckpt(tmp_path, 1), _ckpt(tmp_path, 2)
    assert C.read(good)[1]["step"] == 1
    data = bytearray((bad / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (bad / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(C.CheckpointError, match="sha256 does not match"):
        C.read(bad)
    warnings = []
    assert C.latest_valid(tmp_path, warn=warnings.append) == good and "refusing" in warnings[0]
    (bad / "model.safetensors").write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(C.CheckpointError, match="truncated"):
        C.verify(bad)
    (bad / C.MANIFEST).unlink()
    with pytest.raises(C.CheckpointError, match="incomplete"):
        C.verify(bad)


def test_pickled_code_is_never_executed(tmp_path):
    folder = _ckpt(tmp_path, 3)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"step": Evil()}, folder / "trainer_state.pt")
    # Re-sign the manifest, as an attacker with write access could: the load must still refuse to unpickle.
    import json

    mf = json.loads((folder / C.MANIFEST).read_text())
    p = folder / "trainer_state.pt"
    mf["files"]["trainer_state.pt"] = {"sha256": C.sha256(p), "bytes": p.stat().st_size}
    (folder / C.MANIFEST).write_text(json.dumps(mf))
    with pytest.raises(Exception, match="(?i)weights.only|unpickl|unsupported"):
        C.read(folder)
    assert not marker.exists()


def test_resume_from_tampered_checkpoint_is_a_clear_error(tmp_path, capsys):
    out = tmp_path / "run"
    short = [a if a != "14" else "2" for a in ARGS]
    main(["--output-dir", str(out), *short])
    last = C.step_folders(out / "checkpoints")[-1]
    (last / "trainer_state.pt").write_bytes(b"garbage")
    with pytest.raises(SystemExit) as e:
        main(["--output-dir", str(out), *short, "--resume", str(last)])
    assert e.value.code == 2 and re.search("cannot resume: .*trainer_state.pt", capsys.readouterr().err)
