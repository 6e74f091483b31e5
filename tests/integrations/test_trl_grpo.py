"""The fastpref drop-in GRPOTrainer against TRL's own, from the same seed, prompts and reward function, with TRL's
own generation (no vLLM) on a tiny model. Both trainers sample the same completions (same seed; generation does
not go through the fused head), so losses, logged metrics and updated parameters must match. Two optimisation
steps on one generated batch (``num_iterations=2``): the second has π_θ ≠ π_old, so ratios, clipping and the
old-policy log-probs (scored by the fused head at generation time) are exercised.
"""
import copy
import math

import pytest

from hf_tiny import assert_same_step, is_fastpref_forward, tiny_model, tiny_tokenizer

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

import torch  # noqa: E402
import trl  # noqa: E402

from fastpref.integrations import trl as ftrl  # noqa: E402

STEP_TOL = dict(rtol=1e-4, atol=1e-5)
SKIP_LOGS = ("train_runtime", "train_samples_per_second", "train_steps_per_second", "epoch", "step", "step_time")


def prompts(n=4, seed=0):
    import random

    rng = random.Random(seed)
    return datasets.Dataset.from_list([{"prompt": " ".join(f"w{rng.randrange(200)}" for _ in range(rng.randint(2, 5)))}
                                       for _ in range(n)])


def reward_len_and_words(completions, **kw):
    """A deterministic reward with spread within each group: distinct words plus a word-index term."""
    return [len(set(c.split())) + 0.01 * sum(int(w[1:]) for w in c.split() if w[1:].isdigit()) for c in completions]


def _run(trainer_cls, tmp_path, config):
    model = tiny_model("llama", seed=0)
    if config.get("beta", 0.0):  # TRL loads the reference from the policy's path: save a perturbed copy there
        ref_model = copy.deepcopy(model)
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():  # a reference distinct from the policy, so the KL and its gradient are nonzero
            for p in ref_model.parameters():
                p.add_(0.05 * p.std() * torch.randn(p.shape, generator=g))
        ref_model.save_pretrained(tmp_path / "ref")
        model.config._name_or_path = str(tmp_path / "ref")
    cfg = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, max_completion_length=6,
               max_steps=2, num_iterations=2, learning_rate=0.5, optim="sgd", lr_scheduler_type="constant",
               logging_steps=1, report_to="none", seed=0, save_strategy="no", disable_tqdm=True, use_cpu=True,
               bf16=False, dataloader_num_workers=0, gradient_checkpointing=False, temperature=1.3)
    cfg.update(config)
    args = trl.GRPOConfig(**cfg)
    trainer = trainer_cls(model=model, reward_funcs=reward_len_and_words, args=args, train_dataset=prompts(),
                          processing_class=tiny_tokenizer())
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    out = trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    after = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return trainer, out, logs, before, after


def _compare(tmp_path, config, loss_from="fastpref"):
    t_trl, out_trl, log_trl, before, after_trl = _run(trl.GRPOTrainer, tmp_path / "trl", config)
    t_fp, out_fp, log_fp, before_fp, after_fp = _run(ftrl.GRPOTrainer, tmp_path / "fp", config)
    assert t_fp.fastpref_last.get("loss_from") == loss_from, t_fp.fastpref_last
    torch.testing.assert_close(t_fp.fastpref_last["loss"], t_fp.fastpref_last["trl_loss"], rtol=1e-5, atol=1e-7)
    assert is_fastpref_forward(t_fp.model) and not is_fastpref_forward(t_trl.model)
    assert len(log_trl) == len(log_fp) == 2
    assert log_trl[0]["reward_std"] > 0, "the reward has no spread: the step would be trivial"
    for step_trl, step_fp in zip(log_trl, log_fp):
        assert set(step_trl) == set(step_fp), set(step_trl) ^ set(step_fp)
        for k in step_trl:
            if k not in SKIP_LOGS:
                assert math.isclose(step_trl[k], step_fp[k], rel_tol=1e-4, abs_tol=1e-5), (k, step_trl[k], step_fp[k])
    assert math.isclose(out_trl.training_loss, out_fp.training_loss, rel_tol=1e-5, abs_tol=1e-6)
    assert_same_step(before, before_fp, after_trl, after_fp, **STEP_TOL)
    return log_fp


CASES = {
    "dapo+kl": dict(loss_type="dapo", beta=0.04),
    "grpo+entropy": dict(loss_type="grpo", entropy_coef=0.05, epsilon_high=0.28),
    "gspo": dict(loss_type="grpo", importance_sampling_level="sequence", epsilon=3e-4, epsilon_high=4e-4),
    "cispo": dict(loss_type="cispo", epsilon_high=5.0),
    "bnpo+delta/accum2": dict(loss_type="bnpo", delta=1.5, gradient_accumulation_steps=2,
                              per_device_train_batch_size=2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_grpo_step_matches_trl(case, tmp_path):
    logs = _compare(tmp_path, CASES[case])
    if CASES[case].get("beta"):
        assert logs[0]["kl"] != 0.0


def test_grpo_unsupported_option_keeps_trls_loss_on_fused_logprobs(tmp_path):
    """top_entropy_quantile < 1 is not recomputed: TRL's loss, from fastpref's log-probs and entropies."""
    _compare(tmp_path, dict(loss_type="dapo", top_entropy_quantile=0.5), loss_from="trl")
