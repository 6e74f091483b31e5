"""Online mode end to end (tiny): SIGKILL mid-round + --resume gives the uninterrupted parameters exactly;
2-process torchrun (gloo) gives the parameters of one process; bad settings give short messages."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from fastpref.train import main

from conftest import kill_when_saved

ARGS = ["--online", "--sft-steps", "30", "--synthetic-train", "64", "--synthetic-eval", "16", "--rounds", "2",
        "--prompts-per-round", "16", "--batch-size", "4", "--epochs", "2", "--gen-batch", "4", "--threads", "1",
        "--no-progress", "--no-plots", "--beta", "0.1"]


def _params(folder):
    return load_file(folder / "final" / "model.safetensors")


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    summary = main(["--output-dir", str(out), *ARGS])
    return out, summary


def test_round_data_and_summary(straight):
    out, summary = straight
    data = json.loads((out / "rounds" / "round-00000.json").read_text())
    assert data["algorithm"] == "sppo" and len(data["groups"]) == 16 and data["items"]
    assert all(len(g["samples"]) == 5 and len(g["rewards"]) == 5 for g in data["groups"])
    assert summary["evaluated_rounds"] == [0, 1, 2] and len(summary["greedy_accuracy_per_round"]) == 3
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in recs} == {"eval", "generate", "train"}
    assert summary["train_steps"] == sum(1 for r in recs if r["kind"] == "train")


def test_each_iterative_round_starts_a_fresh_optimiser_on_a_linear_schedule(straight):
    """As the official pipelines: AdamW's state restarts each round (its step count is the last round's), and the
    rate warms up then decays to 0 within the round."""
    from fastpref.train import checkpoint as C

    out, _ = straight
    _, trainer, _ = C.read(C.latest_valid(out / "checkpoints"))
    last = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "train" and r["round"] == 1]
    assert {int(s["step"]) for s in trainer["optimizer"]["state"].values()} == {len(last)}
    assert trainer["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-3 / (len(last) - len(last) // 10))


def test_sigkill_mid_round_then_resume_is_exact(tmp_path, straight):
    out, summary = straight
    args = [*ARGS, "--save-every", "1", "--keep-checkpoints", "50"]
    kill_when_saved(tmp_path, args, "step-00000002", timeout=300, poll=0.01)
    ckpts = sorted((tmp_path / "checkpoints").glob("step-*"))
    assert json.loads((ckpts[-1] / "info.json").read_text())["round_step"] > 0  # killed inside a round
    resumed = main(["--output-dir", str(tmp_path), *args, "--resume", "auto"])
    pa, pb = _params(tmp_path), _params(out)
    assert pa.keys() == pb.keys()
    for k in pa:
        assert torch.equal(pa[k], pb[k]), k
    assert resumed["greedy_accuracy_per_round"] == summary["greedy_accuracy_per_round"]
    for r in range(2):
        name = f"round-{r:05d}.json"
        assert (tmp_path / "rounds" / name).read_text() == (out / "rounds" / name).read_text()
    kinds = [(x["kind"], x["round"], x["step"]) for x in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())]
    want = [(x["kind"], x["round"], x["step"]) for x in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
    assert kinds == want


def test_two_processes_match_one(tmp_path, straight):
    out, _ = straight
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "fastpref.train", "--output-dir", str(tmp_path), *ARGS]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "rounds" / "round-00000.json").read_text() == (out / "rounds" / "round-00000.json").read_text()
    samples = lambda folder: json.loads((folder / "rounds" / "round-00001.json").read_text())["groups"]  # noqa: E731
    assert samples(tmp_path) == samples(out)  # round 1 is sampled from the (summed-gradient) trained policy
    got, want = _params(tmp_path), _params(out)
    for k in got:  # gradients summed in another order: float rounding, amplified a little by Adam
        torch.testing.assert_close(got[k], want[k], atol=1e-4, rtol=1e-3, msg=k)
    assert json.loads((tmp_path / "summary.json").read_text())["world_size"] == 2


@pytest.mark.parametrize("args, message", [
    (["--algorithm", "nope"], "invalid choice"),
    (["--samples", "1"], "needs at least 2 samples"),
    (["--prompts", "missing.jsonl", "--judge", "m:f"], "no such file"),
    (["--mixture-coef", "2"], "--mixture-coef 2.0: expected a number in [0, 1]"),
    (["--loss-args", "gamma=1"], "not taken by loss"),
    (["--judge", "no_such_mod_q:f"], "cannot import module"),
    (["--algorithm", "nash_md", "--epochs", "2"], "exactly one optimiser step"),
    (["--algorithm", "sppo", "--teacher"], "sppo does not put a teacher answer among its candidates"),
    (["--algorithm", "online_dpo", "--xpo-history", "2"], "for the xpo algorithm only"),
    (["--algorithm", "xpo", "--xpo-history", "-1"], "a number of earlier rounds >= 0"),
])
def test_bad_settings_exit_with_a_message(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        main(["--online", "--output-dir", str(tmp_path), "--sft-steps", "0", *args])
    assert e.value.code != 0
    assert message in (str(e.value.code) + capsys.readouterr().err)


def test_yaml_config_selects_online_mode(tmp_path, capsys):
    cfg = tmp_path / "online.yaml"
    cfg.write_text("online: true\nalgorithm: nope\n")
    with pytest.raises(SystemExit) as e:
        main(["--config", str(cfg)])
    assert e.value.code == 2 and "unknown --algorithm 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--online", "--help"])
    assert "nash_md (Munos+23" in capsys.readouterr().out


@pytest.mark.parametrize("algorithm", ["nash_md", "online_ipo", "xpo"])
def test_mixture_extragradient_and_reference_sampling_algorithms_run(tmp_path, algorithm):
    """The algorithms with their own machinery (mixture sampler, extragradient steps, π_ref samples) run a step."""
    s = main(["--online", "--algorithm", algorithm, "--output-dir", str(tmp_path), "--sft-steps", "0",
              "--synthetic-train", "16", "--synthetic-eval", "4", "--rounds", "1", "--batch-size", "4",
              "--threads", "1", "--no-progress", "--no-plots"])
    data = json.loads((tmp_path / "rounds" / "round-00000.json").read_text())
    assert len(data["groups"]) == 4 and s["evaluated_rounds"] == [0, 1]
    if algorithm != "online_ipo":
        assert all(g["extra"] is not None for g in data["groups"])
    else:  # EGPO's second gradient: fresh samples from θ_½, saved for an exact resume
        half = json.loads((tmp_path / "rounds" / "round-00000-half.json").read_text())
        assert len(half["groups"]) == 4 and half["groups"] != data["groups"]


SMALL = ["--online", "--sft-steps", "0", "--synthetic-train", "32", "--synthetic-eval", "4", "--batch-size", "4",
         "--gen-batch", "4", "--threads", "1", "--no-progress", "--no-plots"]


def test_dno_puts_the_teacher_answer_among_its_candidates_unless_told_not_to(tmp_path):
    """DNO (the paper's practical algorithm): the prompts' reference answer (the synthetic task's ``chosen``, the
    right answer) joins the K samples, is judged like them, and can be the chosen response of a pair."""
    from fastpref.train.synthetic import answer, load_tokenizer

    main(["--output-dir", str(tmp_path / "t"), *SMALL, "--algorithm", "dno", "--rounds", "1",
          "--prompts-per-round", "8"])
    data = json.loads((tmp_path / "t" / "rounds" / "round-00000.json").read_text())
    groups = data["groups"]
    assert len(groups) == 8 and all(g["teacher"] == answer(g["prompt"]) for g in groups)
    assert all(len(g["samples"]) == 5 and len(g["rewards"]) == 6 and g["rewards"][5] == 1.0 for g in groups)
    tok = load_tokenizer()
    teacher_ids = [tok(g["teacher"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for g in groups]
    chosen = [it["seqs"]["chosen"] for it in data["items"]]
    assert chosen and all(c in teacher_ids for c in chosen)  # the verifier prefers the right answer
    gen = [r for r in map(json.loads, (tmp_path / "t" / "metrics.jsonl").read_text().splitlines())
           if r["kind"] == "generate"]
    assert gen[0]["gen/teacher_chosen"] > 0
    main(["--output-dir", str(tmp_path / "n"), *SMALL, "--algorithm", "dno", "--rounds", "1",
          "--prompts-per-round", "8", "--no-teacher"])
    groups = json.loads((tmp_path / "n" / "rounds" / "round-00000.json").read_text())["groups"]
    assert all("teacher" not in g and len(g["rewards"]) == 5 for g in groups)


def test_teacher_asked_for_on_prompts_without_one_exits_with_a_message(tmp_path, capsys, write_jsonl):
    import sys
    import types

    mod = types.ModuleType("_online_judge_len")
    mod.reward = lambda prompts, completions: [float(len(c)) for c in completions]
    sys.modules[mod.__name__] = mod
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "add 1 : 2 3"}])
    with pytest.raises(SystemExit) as e:
        main([*SMALL, "--output-dir", str(tmp_path / "o"), "--algorithm", "dno", "--prompts", str(prompts),
              "--judge", f"{mod.__name__}:reward", "--teacher"])
    assert e.value.code != 0
    assert "--teacher: the prompts carry no teacher answer" in str(e.value.code) + capsys.readouterr().err


XPO = [*SMALL, "--algorithm", "xpo", "--sft-steps", "30", "--synthetic-train", "64", "--rounds", "4",
       "--eval-every", "1"]


def test_xpo_trains_on_the_pairs_of_past_rounds_and_resumes_exactly_after_sigkill(tmp_path):
    """XPO as the paper: each step's batch is drawn from every pair collected so far; a resumed run rebuilds
    that history from the saved round files and ends with the uninterrupted run's parameters."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    main(["--output-dir", str(straight), *XPO])
    recs = lambda folder: [r for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())]  # noqa
    gen = [r for r in recs(straight) if r["kind"] == "generate"]
    assert any(r.get("pool", 0) > r["items"] for r in gen[1:]), gen  # earlier rounds' items are drawn from
    kill_when_saved(killed, XPO, "step-00000002", timeout=300, poll=0.01)
    main(["--output-dir", str(killed), *XPO, "--resume", "auto"])
    pa, pb = _params(killed), _params(straight)
    for k in pb:
        assert torch.equal(pa[k], pb[k]), k
    strip = lambda rs: [{k: v for k, v in r.items() if k != "time"} for r in rs if r["kind"] != "eval"]  # noqa
    assert strip(recs(killed)) == strip(recs(straight))


@pytest.mark.parametrize("keep", [False, True])
def test_online_set_up_switches_dropout_off_unless_kept(tmp_path, monkeypatch, keep):
    """As TRL's online trainers: every dropout module and dropout rate of the policy and the reference is 0 after
    set-up (so a train-mode forward is deterministic); --keep-dropout leaves them; the saved config keeps its
    rates."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from fastpref.train.dist import Dist
    from fastpref.train.online import loop
    from fastpref.train.online.config import load_config

    def gpt2(cfg, tok, folder, d):
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=1, n_head=2, n_positions=32))

    monkeypatch.setattr(loop, "starting_policy", gpt2)
    cfg = load_config([*SMALL, "--output-dir", str(tmp_path), *(["--keep-dropout"] if keep else [])]).resolved()
    run = loop.OnlineRun(cfg, Dist())
    want = 0.1 if keep else 0.0
    for model in (run.policy, run.ref):
        rates = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
        assert len(rates) >= 4 and all(p == want for p in rates)
        assert model.config.resid_pdrop == model.config.attn_pdrop == want
    x = torch.tensor([[2, 14, 6, 15, 5]])
    run.policy.train()
    assert torch.equal(run.policy(x).logits, run.policy(x).logits) != keep
    run.restore_dropout()
    assert run.policy.config.resid_pdrop == 0.1


def test_disable_dropout_zeroes_the_attention_rates_hugging_face_reads_at_forward_time():
    """A Llama reads ``attention_dropout`` from its attention modules (no nn.Dropout): it is zeroed there too."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from fastpref.train.model import disable_dropout

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, attention_dropout=0.5,
                                         attn_implementation="eager")).train()
    x = torch.tensor([[1, 5, 7, 9, 3]])
    assert not torch.equal(model(x).logits, model(x).logits)
    restore = disable_dropout(model)
    assert torch.equal(model(x).logits, model(x).logits)
    assert model.config.attention_dropout == 0.0
    restore()
    assert model.config.attention_dropout == 0.5


@pytest.mark.skipif(os.environ.get("FASTPREF_ONLINE_DEMO") != "1",
                    reason="the full online demo (minutes); run with FASTPREF_ONLINE_DEMO=1")
def test_embedded_demo_improves_greedy_answers(tmp_path):
    s = main(["--online", "--output-dir", str(tmp_path), "--no-progress"])
    assert s["improvement_points"] >= 20 and s["digit_improvement_points"] >= 20, s
    assert s["wall_seconds"] <= 300, s
    assert (tmp_path / "online.png").is_file()
