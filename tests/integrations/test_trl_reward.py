"""The fastpref RewardTrainer (TRL's forward and metrics, fastpref's `bt` loss) against TRL's own, one step."""
import math

import pytest

from hf_tiny import COMMON, assert_same_step, preference_dataset, tiny_tokenizer

pytest.importorskip("trl")
pytest.importorskip("datasets")

import torch  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402

from fastpref.integrations import trl as ftrl  # noqa: E402

if ftrl.RewardTrainer is None:  # pragma: no cover
    pytest.skip("this TRL has no RewardTrainer", allow_module_level=True)

CASES = {
    "plain": dict(margin=False, center_rewards_coefficient=None),
    "margin": dict(margin=True, center_rewards_coefficient=None),
    "center": dict(margin=False, center_rewards_coefficient=0.01),
    "margin+center": dict(margin=True, center_rewards_coefficient=0.01),
}
SKIP = ("train_runtime", "train_samples_per_second", "train_steps_per_second", "epoch", "step", "eval_runtime",
        "eval_samples_per_second", "eval_steps_per_second")
TOL = dict(rel_tol=1e-6, abs_tol=1e-7)


def _model():
    """A tiny random Llama with a scalar score head, spread so that rewards (and the margins) are O(1)."""
    cfg = transformers.LlamaConfig(**COMMON, num_labels=1)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.LlamaForSequenceClassification(cfg).float()
    with torch.no_grad():
        model.score.weight.normal_(0, 0.5)
    return model


def _data(n, seed, margin):
    data = preference_dataset(n, seed=seed)
    if margin:
        data = data.add_column("margin", [0.25 * (i % 4) - 0.3 for i in range(n)])
    return data


def _run(cls, tmp_path, margin, center_rewards_coefficient):
    args = trl.RewardConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, per_device_eval_batch_size=4,
                            max_steps=1, learning_rate=0.5, optim="sgd", lr_scheduler_type="constant",
                            logging_steps=1, report_to="none", seed=0, save_strategy="no", eval_strategy="no",
                            disable_tqdm=True, use_cpu=True, bf16=False, max_length=64, dataloader_num_workers=0,
                            center_rewards_coefficient=center_rewards_coefficient)
    trainer = cls(model=_model(), args=args, train_dataset=_data(4, 0, margin), eval_dataset=_data(4, 3, margin),
                  processing_class=tiny_tokenizer())
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    out = trainer.train()
    log = next(h for h in trainer.state.log_history if "loss" in h)
    after = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    evaluated = trainer.evaluate()
    return trainer, out, log, evaluated, before, after


def _same_logs(a, b):
    assert set(a) == set(b), set(a) ^ set(b)
    for k in a:
        if k not in SKIP:
            assert math.isclose(a[k], b[k], **TOL), (k, a[k], b[k])


@pytest.mark.parametrize("case", list(CASES))
def test_reward_step_matches_trl(case, tmp_path):
    t_trl, out_trl, log_trl, eval_trl, before, after_trl = _run(trl.RewardTrainer, tmp_path / "trl", **CASES[case])
    t_fp, out_fp, log_fp, eval_fp, before_fp, after_fp = _run(ftrl.RewardTrainer, tmp_path / "fp", **CASES[case])
    # the loss really went through fastpref, and TRL's formula agrees on the same rewards
    assert t_fp.fastpref_last, "fastpref compute_loss did not run"
    torch.testing.assert_close(t_fp.fastpref_last["loss"], t_fp.fastpref_last["trl_loss"], rtol=1e-6, atol=1e-7)
    for k in ("loss", "grad_norm", "num_tokens", "min_reward", "mean_reward", "max_reward", "accuracy", "margin"):
        assert k in log_trl, k
    assert 0.0 < log_trl["accuracy"] < 1.0  # the rewards are not degenerate: both loss branches matter
    _same_logs(log_trl, log_fp)
    _same_logs(eval_trl, eval_fp)
    assert math.isclose(out_trl.training_loss, out_fp.training_loss, **TOL)
    assert before.keys() == before_fp.keys() == after_fp.keys()
    assert_same_step(before, before_fp, after_trl, after_fp, min_move=1e-3, before_tol=dict(rtol=0, atol=0),
                     rtol=1e-6, atol=1e-7)


def test_reward_loss_options_matter():
    """The margin and the centering term change the loss (so the parity cases above test them)."""
    g = torch.Generator().manual_seed(0)
    r_w, r_l, m = torch.randn(6, generator=g), torch.randn(6, generator=g), torch.rand(6, generator=g)
    plain = ftrl.reward_loss(r_w, r_l)
    torch.testing.assert_close(plain, -torch.nn.functional.logsigmoid(r_w - r_l).mean())
    with_m = ftrl.reward_loss(r_w, r_l, margin=m)
    torch.testing.assert_close(with_m, -torch.nn.functional.logsigmoid(r_w - r_l - m).mean())
    centered = ftrl.reward_loss(r_w, r_l, center_rewards_coefficient=0.1)
    torch.testing.assert_close(centered, plain + 0.1 * ((r_w + r_l) ** 2).mean())
    assert not torch.isclose(plain, with_m) and not torch.isclose(plain, centered)
