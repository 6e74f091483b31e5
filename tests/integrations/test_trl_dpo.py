"""The fastpref drop-in DPOTrainer against TRL's own, one optimisation step from the same seed and data."""
import copy
import math

import pytest

from hf_tiny import assert_same_step, is_fastpref_forward, preference_dataset, tiny_model, tiny_tokenizer

pytest.importorskip("trl")
pytest.importorskip("datasets")

import torch  # noqa: E402
import trl  # noqa: E402

from fastpref.integrations import trl as ftrl  # noqa: E402

LOSS_TYPES = ["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]

CASES = {name: dict(loss_type=[name]) for name in LOSS_TYPES}
CASES["exo_pair"]["label_smoothing"] = 1e-3
CASES["robust"]["label_smoothing"] = 0.2
CASES["aot"]["label_smoothing"] = 0.1
CASES.update({
    "sigmoid+sft(weights)": dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]),
    "mpo(sigmoid+bco_pair+sft)": dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]),
    "sigmoid/forward_kl": dict(loss_type=["sigmoid"], f_divergence_type="forward_kl"),
    "ipo/js_divergence": dict(loss_type=["ipo"], f_divergence_type="js_divergence"),
    "sigmoid_norm/alpha_divergence": dict(loss_type=["sigmoid_norm"], f_divergence_type="alpha_divergence",
                                          f_alpha_divergence_coef=0.3),
    "sigmoid/ld_alpha": dict(loss_type=["sigmoid"], ld_alpha=0.5),
    "ipo/ld_alpha+wpo": dict(loss_type=["ipo"], ld_alpha=0.3, use_weighting=True),
    "sigmoid/use_weighting": dict(loss_type=["sigmoid"], use_weighting=True),
    "sigmoid/label_smoothing(ignored by TRL)": dict(loss_type=["sigmoid"], label_smoothing=0.3),
    "sigmoid/precompute_ref": dict(loss_type=["sigmoid"], precompute_ref_log_probs=True),
})

STEP_TOL = dict(rtol=1e-4, atol=1e-5)


def _run(trainer_cls, tmp_path, config, peft_config=None, family="llama"):
    model = tiny_model(family, seed=0)
    ref_model = None
    if peft_config is None:
        ref_model = copy.deepcopy(model)
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():  # move the reference a little so that log-ratios (and every loss branch) are nonzero
            for p in ref_model.parameters():
                p.add_(0.05 * p.std() * torch.randn(p.shape, generator=g))
    args = trl.DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, learning_rate=0.5,
                         optim="sgd", lr_scheduler_type="constant", logging_steps=1, report_to="none", seed=0,
                         save_strategy="no", eval_strategy="no", disable_tqdm=True, use_cpu=True, beta=0.2, bf16=False,
                         max_length=64, dataloader_num_workers=0, gradient_checkpointing=False, **config)
    trainer = trainer_cls(model=model, ref_model=ref_model, args=args, train_dataset=preference_dataset(4),
                          processing_class=tiny_tokenizer(), peft_config=peft_config)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    out = trainer.train()
    logs = next(h for h in trainer.state.log_history if "loss" in h)
    after = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return trainer, out, logs, before, after


def _compare(tmp_path, config, **kw):
    t_trl, out_trl, log_trl, before, after_trl = _run(trl.DPOTrainer, tmp_path / "trl", config, **kw)
    t_fp, out_fp, log_fp, before_fp, after_fp = _run(ftrl.DPOTrainer, tmp_path / "fp", config, **kw)
    # the drop-in really went through fastpref, and TRL's formula agrees on the same tensors
    assert t_fp.fastpref_last, "fastpref _compute_loss did not run"
    torch.testing.assert_close(t_fp.fastpref_last["loss"], t_fp.fastpref_last["trl_loss"], rtol=1e-5, atol=1e-6)
    assert is_fastpref_forward(t_fp.model.get_base_model() if hasattr(t_fp.model, "get_base_model")
                                else t_fp.model)
    assert set(log_trl) == set(log_fp), set(log_trl) ^ set(log_fp)
    for k in log_trl:
        if k in ("train_runtime", "train_samples_per_second", "train_steps_per_second", "epoch", "step"):
            continue
        a, b = log_trl[k], log_fp[k]
        assert math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-5), (k, a, b)
    assert math.isclose(out_trl.training_loss, out_fp.training_loss, rel_tol=1e-5, abs_tol=1e-6)
    assert before.keys() == before_fp.keys() == after_fp.keys()
    assert_same_step(before, before_fp, after_trl, after_fp, **STEP_TOL)
    return log_trl, log_fp


@pytest.mark.parametrize("case", list(CASES))
def test_dpo_step_matches_trl(case, tmp_path):
    _compare(tmp_path, CASES[case])


def test_dpo_peft_implicit_reference(tmp_path):
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                          init_lora_weights=False)
    _compare(tmp_path, dict(loss_type=["sigmoid"]), peft_config=cfg)


def test_dpo_gemma2_softcap(tmp_path):
    _compare(tmp_path, dict(loss_type=["sigmoid"]), family="gemma2")


def test_dpo_moe_aux_loss(tmp_path):
    """Mixtral with router_aux_loss_coef: TRL adds coef · aux_loss to the loss and logs `aux_loss`."""
    log_trl, log_fp = _compare(tmp_path, dict(loss_type=["sigmoid"], router_aux_loss_coef=0.05), family="mixtral")
    assert "aux_loss" in log_fp and log_fp["aux_loss"] > 0
