"""fastpref.integrations.transformers on PEFT models: LoRA on the body, on lm_head, modules_to_save."""
import pytest

from hf_tiny import batch, naive_logprobs, tiny_model

import torch  # noqa: E402

from fastpref.integrations import transformers as fi  # noqa: E402

peft = pytest.importorskip("peft")
TOL = dict(rtol=1e-5, atol=2e-5)


def _grads(model, logp, upstream):
    model.zero_grad(set_to_none=True)
    (logp * upstream).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _lora(model, targets, dropout=0.0, **kw):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=targets, **kw)
    m = peft.get_peft_model(model, cfg)
    torch.manual_seed(3)
    with torch.no_grad():  # nonzero B so the adapters change the output
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    return m


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["q_proj", "lm_head"]])
def test_peft_lora(targets):
    model = _lora(tiny_model("llama"), targets)
    ids, labels, am = batch()
    up = torch.randn(3, 12, generator=torch.Generator().manual_seed(2))
    ours = fi.token_logprobs(model, ids, labels, am)
    ref = naive_logprobs(model, ids, labels, am)
    torch.testing.assert_close(ours, ref, **TOL)
    g1, g2 = _grads(model, ours, up), _grads(model, ref, up)
    assert g1.keys() == g2.keys() and any("lm_head" in n for n in g1) == ("lm_head" in targets)
    for n in g2:
        torch.testing.assert_close(g1[n], g2[n], rtol=1e-4, atol=1e-5)
    with model.disable_adapter():  # the implicit reference
        base = fi.token_logprobs(model, ids, labels, am)
        torch.testing.assert_close(base, naive_logprobs(model, ids, labels, am), **TOL)
    assert (base - ours).abs().max() > 1e-3


class _Halve(torch.nn.Module):
    def forward(self, x):
        return x * 0.5


def test_peft_lora_head_applies_dropout_on_the_adapter_branch_only():
    """Dropout acts on the adapter's input only; a deterministic stand-in makes the comparison exact."""
    model = _lora(tiny_model("llama"), ["lm_head"], dropout=0.3).train()
    model.get_output_embeddings().lora_dropout["default"] = _Halve()
    ids, labels, am = batch()
    torch.testing.assert_close(fi.token_logprobs(model, ids, labels, am), naive_logprobs(model, ids, labels, am),
                               **TOL)


def test_peft_modules_to_save_head():
    model = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=4, target_modules=["q_proj"],
                                                                       modules_to_save=["lm_head"]))
    with torch.no_grad():
        model.get_output_embeddings().modules_to_save["default"].weight.mul_(1.5)
    ids, labels, am = batch()
    torch.testing.assert_close(fi.token_logprobs(model, ids, labels, am), naive_logprobs(model, ids, labels, am),
                               **TOL)
