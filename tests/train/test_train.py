"""End to end: the embedded default (shortened), the saved model, real-data formats and losses, CLI."""
import json

import pytest
import torch

from fastpref.train import main
from fastpref.train.synthetic import make_task



def test_embedded_default_short(tmp_path):
    SHORT = ["--sft-steps", "10", "--steps", "6", "--synthetic-train", "64", "--synthetic-eval", "16", "--batch-size", "4", "--eval-batch-size", "16", "--no-progress", "--no-plots", "--save-every", "0", "--eval-every", "0", "--threads", "1"]

    out = tmp_path / "demo"
    s = main(["--output-dir", str(out), *SHORT, "--plots", "--save-every", "5", "--eval-every", "5"])
    saved = json.loads((out / "summary.json").read_text())
    for key in ("eval_reward_accuracy", "eval_ranking_accuracy", "train_steps", "wall_seconds"):
        assert saved[key] is not None
    assert saved["train_steps"] == 16 and s["packed"] and s["ref_mode"] == "precompute"
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("rewards/accuracies" in r for r in recs) and any(r.get("eval") for r in recs)
    for png in ("loss.png", "reward_accuracy.png", "margins.png", "logps.png"):
        assert (out / png).stat().st_size > 1000
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step-00000015", "step-00000016"]
    assert (out / "final" / "model.safetensors").is_file()


def _seq_logps(model, tok, prompt, completion):
    p = tok(prompt)["input_ids"]
    c = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = torch.tensor([p + c])
    with torch.no_grad():
        logits = model(ids).logits[0, :-1].float()  # the naive way: full logits
    lp = logits.log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
    return float(lp[len(p) - 1:].sum())


def test_saved_model_loads_and_prefers_chosen(tmp_path):
    """The final model loads with transformers; its log-probs, computed the naive way (full logits), prefer
    the chosen answers it was trained on, and on held-out prompts they match the trainer's fused evaluation."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    s = main(["--output-dir", str(out), "--sft-steps", "0", "--steps", "30", "--lr", "3e-3", "--beta", "0.5",
              "--synthetic-train", "48", "--synthetic-eval", "32", "--batch-size", "16", "--no-progress",
              "--no-plots", "--save-every", "0", "--eval-every", "0", "--threads", "1"])
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    tok = AutoTokenizer.from_pretrained(out / "final")
    train, held = make_task(48, 32)

    def acc(rows):
        return sum(_seq_logps(model, tok, r["prompt"], r["chosen"]) > _seq_logps(model, tok, r["prompt"], r["rejected"])
                   for r in rows) / len(rows)

    assert acc(train) >= 0.9
    assert abs(acc(held) - s["eval_ranking_accuracy"]) < 1e-9  # fused path == naive full-logits path


@pytest.mark.parametrize("fmt,loss,extra", [
    ("pairs-chat", "sigmoid=1,sft=0.5", []), ("pairs", "tdpo1", []), ("pairs", "simpo", []),
    ("list", "plackett_luce", []), ("unpaired", "kto", []),
    ("pairs", "ipo", ["--gradient-checkpointing", "--packing", "off", "--grad-accum", "2"])])
def test_real_data_formats_and_losses(tmp_path, tiny_model_dir, write_jsonl, fmt, loss, extra):
    rows = make_task(24, 0, seed=2)[0]
    if fmt == "pairs-chat":
        rows = [{"prompt": [{"role": "user", "content": r["prompt"]}],
                 "chosen": [{"role": "assistant", "content": r["chosen"]}], "rejected": r["rejected"]} for r in rows]
    elif fmt == "list":
        rows = [{"prompt": r["prompt"], "responses": [r["chosen"], r["rejected"], "0"], "scores": [2, 1, 0]}
                for r in rows]
    elif fmt == "unpaired":
        rows = [{"prompt": r["prompt"], "completion": r[k], "label": k == "chosen"} for r in rows
                for k in ("chosen", "rejected")]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    s = main(["--model", str(tiny_model_dir), "--data", str(data), "--output-dir", str(tmp_path / "o"),
              "--loss", loss, "--beta", "0.2", "--steps", "3", "--batch-size", "4", "--lr", "1e-3",
              "--eval-fraction", "0.25", "--max-length", "40", "--no-progress", "--no-plots", "--threads", "1", *extra])
    assert s["train_steps"] == 3 and s["eval_examples"] > 0 and s["eval_reward_accuracy"] is not None
    assert s["ref_mode"] == {"tdpo1": "online", "simpo": "none"}.get(loss, "precompute")
    assert s["layout"] == fmt.split("-")[0] and s["packed"] == ("off" not in extra)


def test_yaml_config_and_loss_args(tmp_path, tiny_model_dir, write_jsonl):
    data = write_jsonl(tmp_path / "train.jsonl", make_task(16, 0, seed=3)[0])
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {tiny_model_dir}\ndata: {data}\nloss: {{sigmoid: 1.0, sft: 0.1}}\n"
                   "loss_args: {label_smoothing: 0.1}\nsteps: 2\nbatch_size: 4\nplots: false\nprogress: false\n")
    s = main(["--config", str(cfg), "--output-dir", str(tmp_path / "o"), "--beta", "0.3"])
    assert s["loss"] == {"sigmoid": 1.0, "sft": 0.1} and s["hparams"] == {"label_smoothing": 0.1, "beta": 0.3}


def test_bad_loss_for_layout_is_a_clear_error(tmp_path, tiny_model_dir, write_jsonl, capsys):
    data = write_jsonl(tmp_path / "u.jsonl", [{"prompt": "add 1 : 2", "completion": "3", "label": True}] * 4)
    for loss, message in (("sigmoid", "cannot be trained on 'unpaired' data"), ("nope", "--loss nope: unknown loss")):
        with pytest.raises(SystemExit) as e:
            main(["--model", str(tiny_model_dir), "--data", str(data), "--output-dir", str(tmp_path / "o"),
                  "--loss", loss, "--no-progress"])
        assert e.value.code == 2 and message in capsys.readouterr().err
        assert not (tmp_path / "o").exists()


def test_cli_entry_point(capsys):
    from fastpref.cli import main as cli

    assert cli(["--help"]) == 0 and "fastpref train" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli(["train", "--help"])
    assert "--max-length" in capsys.readouterr().out
