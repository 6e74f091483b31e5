"""The fastpref KTOTrainer (TRL's loss, fastpref's fused head) against TRL's own, one step."""
import copy
import math
import random

import pytest

from hf_tiny import tiny_model, tiny_tokenizer

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

import torch  # noqa: E402
import trl  # noqa: E402

from fastpref.integrations import trl as ftrl  # noqa: E402

if ftrl.KTOTrainer is None:  # pragma: no cover
    pytest.skip("this TRL has no stable KTOTrainer", allow_module_level=True)


def _dataset(n=4, seed=0):
    rng = random.Random(seed)
    words = lambda k: " ".join(f"w{rng.randrange(200)}" for _ in range(k))  # noqa: E731
    return datasets.Dataset.from_list([dict(prompt=words(rng.randint(2, 5)), completion=" " + words(rng.randint(2, 6)),
                                            label=bool(i % 2)) for i in range(n)])


def _run(cls, tmp_path, loss_type):
    model = tiny_model("llama")
    ref = copy.deepcopy(model)
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        for p in ref.parameters():
            p.add_(0.05 * p.std() * torch.randn(p.shape, generator=g))
    args = trl.KTOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, learning_rate=0.5,
                         optim="sgd", lr_scheduler_type="constant", logging_steps=1, report_to="none", seed=0,
                         save_strategy="no", disable_tqdm=True, use_cpu=True, bf16=False, loss_type=loss_type,
                         max_length=64)
    t = cls(model=model, ref_model=ref, args=args, train_dataset=_dataset(), processing_class=tiny_tokenizer())
    t.train()
    log = next(h for h in t.state.log_history if "loss" in h)
    return log, {n: p.detach().clone() for n, p in t.model.named_parameters()}


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_kto_step_matches_trl(loss_type, tmp_path):
    log_a, after_a = _run(trl.KTOTrainer, tmp_path / "trl", loss_type)
    log_b, after_b = _run(ftrl.KTOTrainer, tmp_path / "fp", loss_type)
    assert set(log_a) == set(log_b)
    for k in log_a:
        if k not in ("epoch", "step"):
            assert math.isclose(log_a[k], log_b[k], rel_tol=1e-4, abs_tol=1e-5), (k, log_a[k], log_b[k])
    for n in after_a:
        torch.testing.assert_close(after_b[n], after_a[n], rtol=1e-4, atol=1e-5)
