"""The output folder as a transaction (issue 25, part A): one run at a time (a lock naming its holder), one rule
for every task (empty: start; the same run: --resume auto; anything else: refused with the choices),
--overwrite removes only fastpref's own files and never an input, files are written whole (a full disk leaves
the previous state), unusable folders are refused up front, and a resume is checked, not trusted."""
import hashlib
import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from fastpref.train import checkpoint as C
from fastpref.train import main

from conftest import assert_same_final_weights

ARGS = ["--sft-steps", "4", "--steps", "6", "--synthetic-train", "64", "--synthetic-eval", "8", "--batch-size", "4",
        "--eval-batch-size", "8", "--no-progress", "--no-plots", "--eval-every", "0", "--threads", "1"]
ONLINE = ["--online", "--sft-steps", "4", "--synthetic-train", "64", "--synthetic-eval", "8", "--rounds", "1",
          "--prompts-per-round", "8", "--batch-size", "4", "--gen-batch", "4", "--threads", "1", "--no-progress",
          "--no-plots", "--save-every", "1"]


def refused(capsys, argv: list[str]) -> str:
    """Run ``fastpref train argv`` in-process; assert exit 2 and a one-line error without a traceback; returns
    the error line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("fastpref train: error: ") and "Traceback" not in "\n".join(err), err
    return err[-1][len("fastpref train: error: "):]


def snapshot(folder: pathlib.Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (the lock file aside), by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".fastpref.lock"}


def records(folder: pathlib.Path) -> list[dict]:
    return [{k: v for k, v in json.loads(x).items() if k != "time"}
            for x in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory) -> pathlib.Path:
    """A finished preference run, with a checkpoint at the end of the SFT phase (step 4), to copy from."""
    out = tmp_path_factory.mktemp("offline") / "run"
    main(["--output-dir", str(out), *ARGS, "--save-every", "4", "--keep-checkpoints", "10"])
    return out


@pytest.fixture(scope="module")
def online_run(tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("online") / "run"
    main(["--output-dir", str(out), *ONLINE])
    return out


def copy_of(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".fastpref.lock"))
    return dst


# ------------------------------------------------------------------------------------------ one rule for all
@pytest.mark.parametrize("source", ["offline_run", "online_run"])
def test_online_run_refuses_a_folder_holding_a_run(request, tmp_path, capsys, source):
    out = copy_of(request.getfixturevalue(source), tmp_path / "run")
    before = snapshot(out)
    task = "preference" if source == "offline_run" else "online"
    line = refused(capsys, ["--output-dir", str(out), *ONLINE])
    assert line.startswith(f"--output-dir {out} already holds {'an' if task == 'online' else 'a'} {task} run (")
    assert line.endswith("continue it with --resume auto, replace it with --overwrite, or choose another "
                         "--output-dir")
    assert snapshot(out) == before


def test_resume_of_another_tasks_run_is_refused(tmp_path, capsys, offline_run):
    out = copy_of(offline_run, tmp_path / "run")
    before = snapshot(out)
    for extra in (["--task", "reward", "--resume", "auto", "--no-progress"], [*ONLINE, "--resume", "auto"]):
        task = "a reward" if "reward" in extra else "an online"
        assert refused(capsys, ["--output-dir", str(out), *extra]) == (
            f"--resume: --output-dir {out} holds a preference run, not {task} run: replace it with --overwrite or "
            "choose another --output-dir")
    assert snapshot(out) == before


def test_online_overwrite_removes_only_its_own_files(tmp_path, online_run):
    out = copy_of(online_run, tmp_path / "run")
    (out / "notes.png").write_text("mine")
    (out / "rounds" / "stale.txt").write_text("old")
    main(["--output-dir", str(out), *ONLINE, "--overwrite", "--seed", "1"])
    assert (out / "notes.png").read_text() == "mine" and not (out / "rounds" / "stale.txt").exists()
    assert json.loads((out / "run.json").read_text())["settings"]["seed"] == 1


def test_overwrite_keeps_the_users_own_plots(tmp_path, offline_run):
    out = copy_of(offline_run, tmp_path / "run")
    (out / "mine.png").write_bytes(b"my own picture")
    (out / "greedy.png").write_bytes(b"an earlier run's plot")  # fastpref's own name, but not written by it
    main(["--output-dir", str(out), *[a for a in ARGS if a != "--no-plots"], "--overwrite"])
    assert (out / "mine.png").read_bytes() == b"my own picture"
    assert (out / "greedy.png").read_bytes().startswith(b"\x89PNG")
    assert "greedy.png" in json.loads((out / "run.json").read_text())["files"]


@pytest.mark.parametrize("flags", [["--model", "{out}/final", "--ref-model", "{out}/final"],
                                   ["--data", "{out}/checkpoints/rows.jsonl"]])
def test_overwrite_refuses_while_an_input_lies_inside_what_it_would_remove(tmp_path, capsys, offline_run, flags,
                                                                          pairs_rows, write_jsonl):
    out = copy_of(offline_run, tmp_path / "run")
    write_jsonl(out / "checkpoints" / "rows.jsonl", pairs_rows)
    before = snapshot(out)
    argv = [f.format(out=out) for f in flags]
    line = refused(capsys, ["--output-dir", str(out), *ARGS, *argv, "--overwrite"])
    entry = "final" if "--model" in flags else "checkpoints"
    assert line == (f"{argv[0]} {argv[1]} lies inside {out / entry}, which --overwrite would delete: copy it out "
                    "of --output-dir first")
    assert snapshot(out) == before


# ------------------------------------------------------------------------------------------------- the lock
def _start(out: pathlib.Path, args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fastpref.train", "--output-dir", str(out), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_a_second_run_on_a_busy_folder_is_refused_with_the_holder(tmp_path, capsys):
    out = tmp_path / "run"
    first = _start(out, ARGS)
    lock = out / ".fastpref.lock"
    deadline = time.time() + 120
    while not (lock.is_file() and lock.read_text()):
        assert first.poll() is None and time.time() < deadline
        time.sleep(0.05)
    line = refused(capsys, ["--output-dir", str(out), *ARGS, "--overwrite"])
    assert first.wait(timeout=300) == 0, first.stderr.read()
    assert line.startswith(f"--output-dir {out} is in use by another run (pid {first.pid} on ")
    assert ", started " in line and line.endswith("UTC): wait for it to end or choose another --output-dir")
    steps = [r["step"] for r in records(out) if not r.get("eval")]
    assert steps == sorted(steps) and steps[-1] == 10


# ------------------------------------------------------------------------------------- writes are all-or-none
@pytest.fixture
def tmpfs(tmp_path):
    """A 16 MiB tmpfs (root only; skipped elsewhere), unmounted afterwards."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


def test_full_disk_leaves_the_previous_final_model_intact(tmpfs, capsys):
    out = tmpfs / "run"
    main(["--output-dir", str(out), *ARGS])
    before = snapshot(out / "final")
    free = os.statvfs(tmpfs).f_bavail * os.statvfs(tmpfs).f_frsize
    with open(tmpfs / "filler", "wb") as f:  # leave 64 KiB: less than the model's weights
        f.write(b"\0" * max(0, free - (64 << 10)))
    line = refused(capsys, ["--output-dir", str(out), *ARGS, "--resume", "auto"])
    assert line.startswith(f"cannot write {out / 'final'}: No space left on device"), line
    assert snapshot(out / "final") == before
    assert not [p.name for p in out.iterdir() if p.name.startswith((".tmp-", ".old-"))]


def test_full_disk_during_a_checkpoint_leaves_no_half_checkpoint_and_the_run_resumes(tmpfs, capsys, offline_run):
    out = tmpfs / "run"
    free = os.statvfs(tmpfs).f_bavail * os.statvfs(tmpfs).f_frsize
    filler = tmpfs / "filler"
    filler.write_bytes(b"\0" * max(0, free - (1600 << 10)))  # room for the reference, not for a checkpoint
    args = [*ARGS, "--save-every", "4", "--keep-checkpoints", "10"]
    line = refused(capsys, ["--output-dir", str(out), *args])
    assert line.startswith(f"cannot write {out / 'checkpoints'}/step-0000000") and "No space left on device" in line
    assert not [p for p in out.rglob(".tmp-*")] and not (out / "final").exists()
    filler.unlink()
    (out / ".tmp-final-1").mkdir()  # as a run killed while writing its final model leaves it
    main(["--output-dir", str(out), *args, "--resume", "auto"])
    assert not [p for p in out.rglob(".tmp-*")]
    assert_same_final_weights(out, offline_run)
    assert records(out) == records(offline_run)


@pytest.mark.parametrize("kind", ["under a file", "symlink loop", "read-only"])
def test_unusable_output_folders_are_refused_before_the_model_loads(tmp_path, capsys, kind):
    if kind == "under a file":
        (tmp_path / "file").write_text("x")
        out, why = tmp_path / "file" / "run", "cannot create or write it (Not a directory)"
    elif kind == "symlink loop":
        out, why = tmp_path / "loop", "is a broken or looping link, not a folder"
        out.symlink_to(out)
    else:
        out, why = tmp_path / "ro", "cannot create or write it (Read-only file system)"
        out.mkdir()
        if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(out)],
                                               capture_output=True).returncode != 0:
            pytest.skip("a read-only mount needs root")
    try:
        t0 = time.time()
        for argv in (ARGS, ONLINE, ["--task", "reward", "--no-progress"]):
            assert refused(capsys, ["--output-dir", str(out), *argv]) == f"--output-dir {out}: {why}"
        assert time.time() - t0 < 30
    finally:
        if kind == "read-only":
            subprocess.run(["umount", "-l", str(out)], check=True)


# ---------------------------------------------------------------------------------- resume: checked, not trusted
@pytest.mark.parametrize("change,shown", [(["--lr", "0.002"], "--lr 5e-07 → 0.002"),
                                          (["--loss", "ipo"], "--loss {'sigmoid': 1.0} → {'ipo': 1.0}"),
                                          (["--batch-size", "8"], "--batch-size 4 → 8"),
                                          ("data", "--data contents ")])
def test_resume_with_other_settings_or_data_is_refused(tmp_path, capsys, write_jsonl, pairs_rows, change, shown):
    data = write_jsonl(tmp_path / "rows.jsonl", pairs_rows)
    out = tmp_path / "run"
    args = [*ARGS, "--data", str(data), "--save-every", "3"]
    main(["--output-dir", str(out), *args])
    before = snapshot(out)
    if change == "data":
        write_jsonl(data, [{**pairs_rows[0], "chosen": pairs_rows[0]["chosen"] + " 1"}, *pairs_rows[1:]])
        change = []
    line = refused(capsys, ["--output-dir", str(out), *args, *change, "--resume", "auto"])
    assert line.startswith(f"--resume: --output-dir {out} holds a preference run with other settings: {shown}")
    assert line.endswith("(run it with its settings, replace it with --overwrite, or choose another --output-dir)")
    assert snapshot(out) == before


def test_resume_allow_lets_a_run_train_longer_and_nothing_else(tmp_path, capsys, offline_run):
    out = copy_of(offline_run, tmp_path / "run")
    args = [*ARGS, "--save-every", "4", "--keep-checkpoints", "10", "--resume", "auto"]
    assert refused(capsys, ["--output-dir", str(out), *args, "--resume-allow", "steps,lr"]) == (
        "--resume-allow lr: only steps, epochs, rounds, eval_every, log_every may differ from the resumed run's "
        "settings")
    longer = [a if a != "6" else "8" for a in args]
    assert refused(capsys, ["--output-dir", str(out), *longer]).startswith(
        f"--resume: --output-dir {out} holds a preference run with other settings: --steps 6 → 8 (")
    s = main(["--output-dir", str(out), *longer, "--resume-allow", "steps"])
    assert s["train_steps"] == 12 and json.loads((out / "run.json").read_text())["settings"]["steps"] == 8
    main(["--output-dir", str(out), *longer])  # the run's settings are now the longer ones


def test_a_checkpoint_of_another_task_or_algorithm_is_refused(tmp_path, capsys, online_run):
    ckpt = C.step_folders(online_run / "checkpoints")[-1]
    line = refused(capsys, ["--output-dir", str(tmp_path / "a"), *ARGS, "--resume", str(ckpt)])
    assert line == (f"cannot resume: {ckpt}: written by an online run with other settings: task online → "
                    "preference")
    out = copy_of(online_run, tmp_path / "b")
    line = refused(capsys, ["--output-dir", str(out), *ONLINE, "--algorithm", "dno", "--resume", "auto"])
    assert line.startswith(f"--resume: --output-dir {out} holds an online run with other settings: --algorithm "
                           "sppo → dno")


def test_an_unreadable_checkpoint_is_refused_and_the_previous_one_used(tmp_path, capsys, offline_run):
    out = copy_of(offline_run, tmp_path / "run")
    newest = C.step_folders(out / "checkpoints")[-1]
    (newest / "trainer_state.pt").write_bytes(b"garbage")  # with a manifest that agrees with it
    mf = json.loads((newest / C.MANIFEST).read_text())
    mf["files"]["trainer_state.pt"] = {"sha256": C.sha256(newest / "trainer_state.pt"), "bytes": 7}
    (newest / C.MANIFEST).write_text(json.dumps(mf))
    capsys.readouterr()
    main(["--output-dir", str(out), *ARGS, "--save-every", "4", "--keep-checkpoints", "10", "--resume", "auto"])
    log = capsys.readouterr().out
    assert f"refusing checkpoint {newest}: {newest}: unreadable (" in log
    assert "resumed from " + str(C.step_folders(out / "checkpoints")[-2]) in log
    assert_same_final_weights(out, offline_run)


def test_a_manifest_with_a_broken_entry_is_refused_not_a_keyerror(tmp_path):
    good = C.write(tmp_path / "step-00000001", {"w": torch.zeros(2)}, {"step": 1}, {})
    bad = C.write(tmp_path / "step-00000002", {"w": torch.ones(2)}, {"step": 2}, {})
    mf = json.loads((bad / C.MANIFEST).read_text())
    mf["files"]["model.safetensors"].pop("bytes")
    (bad / C.MANIFEST).write_text(json.dumps(mf))
    with pytest.raises(C.CheckpointError, match="unreadable manifest"):
        C.verify(bad)
    warnings = []
    assert C.latest_valid(tmp_path, warn=warnings.append) == good and "unreadable manifest" in warnings[0]


@pytest.mark.parametrize("damage", ["flip a bit", "truncate"])
def test_a_damaged_reference_cache_is_computed_again(tmp_path, capsys, offline_run, damage):
    out = copy_of(offline_run, tmp_path / "run")
    cache = out / "ref_logps.safetensors"
    raw = bytearray(cache.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) - 16]
    else:
        n = int.from_bytes(raw[:8], "little")
        begin, end = json.loads(raw[8:8 + n])["train"]["data_offsets"]
        raw[8 + n + (begin + end) // 2] ^= 1
    cache.write_bytes(bytes(raw))
    capsys.readouterr()
    main(["--output-dir", str(out), *ARGS, "--save-every", "4", "--keep-checkpoints", "10",
          "--resume", str(out / "checkpoints" / "step-00000008")])
    assert f"refusing the cache {cache}" in capsys.readouterr().out
    assert_same_final_weights(out, offline_run)


def test_altered_round_data_is_refused_on_resume(tmp_path, capsys, online_run):
    out = copy_of(online_run, tmp_path / "run")
    path = out / "rounds" / "round-00000.json"
    data = json.loads(path.read_text())
    data["groups"][0]["rewards"][0] += 1  # the checksum is left as it was
    path.write_text(json.dumps(data))
    ckpt = C.step_folders(out / "checkpoints")[0]  # inside round 0: its data is read back
    assert json.loads((ckpt / "info.json").read_text())["round_step"] > 0
    assert refused(capsys, ["--output-dir", str(out), *ONLINE, "--resume", str(ckpt)]) == (
        f"{path}: sha256 does not match its contents (damaged or altered)")


# ------------------------------------------------------------------------------------------------ metrics
def test_metrics_after_a_restart_from_scratch_hold_one_run(tmp_path, offline_run):
    out = copy_of(offline_run, tmp_path / "run")
    import shutil

    shutil.rmtree(out / "checkpoints")  # as if killed before its first checkpoint
    main(["--output-dir", str(out), *ARGS, "--save-every", "4", "--keep-checkpoints", "10", "--resume", "auto"])
    assert records(out) == records(offline_run)


def test_resuming_from_the_end_of_sft_writes_each_evaluation_once(tmp_path, offline_run):
    out = copy_of(offline_run, tmp_path / "run")
    main(["--output-dir", str(out), *ARGS, "--save-every", "4", "--keep-checkpoints", "10",
          "--resume", str(out / "checkpoints" / "step-00000004")])
    assert records(out) == records(offline_run)
    assert_same_final_weights(out, offline_run)


def test_a_half_written_last_metrics_line_is_dropped_on_resume(tmp_path, offline_run):
    out = copy_of(offline_run, tmp_path / "run")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "lo')
    main(["--output-dir", str(out), *ARGS, "--save-every", "4", "--keep-checkpoints", "10",
          "--resume", str(out / "checkpoints" / "step-00000008")])
    assert records(out) == records(offline_run)


def test_json_output_never_holds_a_bare_nan(tmp_path):
    from types import SimpleNamespace

    from fastpref.train.outputs import Outputs

    d = SimpleNamespace(main=True, barrier=lambda: None)
    out = Outputs(tmp_path, d, 1, print)
    out.record({"step": 1, "loss": math.nan, "grad_norm": math.inf})
    out.save_summary({"eval_margin": -math.inf, "per_round": [math.nan, 1.0]})

    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in JSON output"))

    assert strict((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "loss": None, "grad_norm": None}
    assert strict((tmp_path / "summary.json").read_text()) == {"eval_margin": None, "per_round": [None, 1.0]}


# ------------------------------------------------------------------------------------------------ property
PROP = ["--sft-steps", "4", "--steps", "6", "--synthetic-train", "64", "--synthetic-eval", "8", "--batch-size", "4",
        "--eval-batch-size", "8", "--no-progress", "--no-plots", "--save-every", "2", "--eval-every", "0",
        "--threads", "1"]


def whole_or_resumable(out: pathlib.Path) -> None:
    """The folder holds one run (run.json's) and nothing of another: every checkpoint is that run's, the final
    model equals that run's last checkpoint, the metrics have no step twice, a summary comes with a final model."""
    if not (out / "run.json").exists():
        assert not [p for p in out.iterdir() if not p.name.startswith(".")], list(out.iterdir())
        return
    seed = json.loads((out / "run.json").read_text())["settings"]["seed"]
    folders = C.step_folders(out / "checkpoints")
    for f in folders:
        assert C.read(f)[2]["run"]["settings"]["seed"] == seed, f
    if (out / "final").exists():
        last = load_file(folders[-1] / "model.safetensors")
        final = load_file(out / "final" / "model.safetensors")
        assert folders[-1].name == "step-00000010" and set(final) <= set(last)
        assert all(torch.equal(final[k], last[k]) for k in final)
    if (out / "summary.json").exists():
        assert json.loads((out / "summary.json").read_text())["train_steps"] == 10 and (out / "final").exists()
    if (out / "metrics.jsonl").exists():
        lines, recs = (out / "metrics.jsonl").read_text().splitlines(), []
        for i, line in enumerate(lines):
            try:
                recs.append(json.loads(line))
            except ValueError:  # only a killed run's last line may be half-written
                assert i == len(lines) - 1 and not (out / "summary.json").exists(), line
        steps = [r["step"] for r in recs if not r.get("eval")]
        assert steps == sorted(set(steps)), steps


def test_any_sequence_of_runs_kills_overwrites_and_races_leaves_one_whole_run(tmp_path):
    import random

    rng, out, seed, done = random.Random(25), tmp_path / "run", 0, []
    t0 = time.time()
    while time.time() - t0 < 40 or not {"kill", "race", "overwrite"} <= set(done):
        op = rng.choice(["run", "kill", "resume", "overwrite", "race"])
        done.append(op)
        if op in ("overwrite", "kill") and rng.random() < 0.5:
            seed, extra = seed + 1, ["--overwrite"]
        else:
            extra = ["--resume", "auto"] if op != "run" else []
        args = [*PROP, "--seed", str(seed), *extra]
        before = snapshot(out) if out.exists() else {}
        first = _start(out, args)
        if op == "kill":
            time.sleep(rng.uniform(0.5, 6.0))
            first.kill()
            first.wait()
        elif op == "race":
            time.sleep(0.3)
            second = _start(out, args)
            codes = sorted([first.wait(), second.wait()])
            busy = (first if first.returncode == 2 else second).stderr.read()
            assert codes == [0, 2] and "is in use by another run (pid " in busy, (codes, busy)
        else:
            code, err = first.wait(), first.stderr.read()
            assert code == 0 or (op == "run" and code == 2 and "already holds" in err), err
            if code == 2:
                assert snapshot(out) == before
        first.stderr.close()
        whole_or_resumable(out)
    print("operations:", done)
    main(["--output-dir", str(out), *PROP, "--seed", str(seed), "--resume", "auto"])
    whole_or_resumable(out)
    main(["--output-dir", str(tmp_path / "straight"), *PROP, "--seed", str(seed)])
    assert_same_final_weights(out, tmp_path / "straight")
