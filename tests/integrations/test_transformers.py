"""fastpref.integrations.transformers against the naive logits path of each model family (CPU, float32)."""
import pytest

from hf_tiny import FAMILIES, batch, naive_logprobs, tiny_model

import torch  # noqa: E402

from fastpref.integrations import transformers as fi  # noqa: E402

TOL = dict(rtol=1e-5, atol=2e-5)


def _grads(model, logp, upstream):
    model.zero_grad(set_to_none=True)
    (logp * upstream).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _check_grads(model, ours, ref):
    assert ours.keys() == ref.keys()
    head = model.get_output_embeddings().weight
    names = {n for n, p in model.named_parameters() if p is head}
    assert names & ours.keys(), "the lm_head / tied embedding weight got no gradient"
    for n in ref:
        torch.testing.assert_close(ours[n], ref[n], rtol=1e-4, atol=1e-5, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("family", FAMILIES)
def test_family_logprobs_and_grads(family):
    model = tiny_model(family)
    ids, labels, am = batch()
    up = torch.randn(ids.shape[0], ids.shape[1] - 1, generator=torch.Generator().manual_seed(2))
    ours = fi.token_logprobs(model, ids, labels, am)
    ref = naive_logprobs(model, ids, labels, am)
    assert ours.dtype == torch.float32 and ours.shape == (3, 12)
    torch.testing.assert_close(ours, ref, **TOL)
    assert (ours[labels[:, 1:] == -100] == 0).all()
    _check_grads(model, _grads(model, ours, up), _grads(model, ref, up))


def test_tied_embeddings_share_one_gradient():
    model = tiny_model("gpt2")
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_softcap_and_scale_are_used():
    """The transforms matter at these tiny configs: dropping them changes the answer."""
    for family, attr in (("gemma2", "final_logit_softcapping"), ("cohere", "logit_scale"),
                         ("granite", "logits_scaling")):
        model = tiny_model(family)
        ids, labels, am = batch()
        with torch.no_grad():
            ours = fi.token_logprobs(model, ids, labels, am)
            head = fi.lm_head(model)
            plain = fi._stats.token_logprobs(model.base_model(input_ids=ids, attention_mask=am).last_hidden_state
                                             [:, :-1], head.weight, labels[:, 1:])
        assert (ours - plain).abs().max() > 1e-2, (family, attr)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_temperature_entropy_lse(family):
    model = tiny_model(family)
    ids, labels, am = batch()
    T = 0.7
    st = fi.token_stats(model, ids, labels, am, temperature=T, entropy=True, log_sum_p2=True)
    with torch.no_grad():
        z = model(input_ids=ids, attention_mask=am).logits[:, :-1].float() / T
        lse = z.logsumexp(-1)
        p = z.softmax(-1)
        ent = -(p * z.log_softmax(-1)).sum(-1)
        p2 = (p * p).sum(-1).log()
    mask = labels[:, 1:] != -100
    torch.testing.assert_close(st.logp, naive_logprobs(model, ids, labels, am, temperature=T).detach(), **TOL)
    torch.testing.assert_close(st.lse[mask], lse[mask], **TOL)
    torch.testing.assert_close(st.entropy[mask], ent[mask], **TOL)
    torch.testing.assert_close(st.log_sum_p2[mask], p2[mask], **TOL)


def test_moe_aux_loss_matches_model():
    model = tiny_model("mixtral")
    ids, labels, am = batch()
    st = fi.token_stats(model, ids, labels, am)
    out = model(input_ids=ids, attention_mask=am, labels=labels)
    assert st.aux_loss is not None
    torch.testing.assert_close(st.aux_loss, out.aux_loss)
    # the aux loss is differentiable and reaches the router
    st.aux_loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "gate" in n)


def test_shift_labels():
    model = tiny_model("qwen2")
    ids, labels, am = batch()
    shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1)
    a = fi.token_stats(model, ids, None, am, shift_labels=shifted).logp
    b = fi.token_logprobs(model, ids, labels, am)
    torch.testing.assert_close(a[:, :-1], b)
    assert (a[:, -1] == 0).all()


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_token_kl_against_naive(direction):
    model, ref_model = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    ids, labels, am = batch()
    out = fi.token_kl(model, ref_model, ids, labels, am, direction=direction)
    lp = model(input_ids=ids, attention_mask=am).logits[:, :-1].float().log_softmax(-1)
    with torch.no_grad():
        rlp = ref_model(input_ids=ids, attention_mask=am).logits[:, :-1].float().log_softmax(-1)
    kl = (rlp.exp() * (rlp - lp)).sum(-1) if direction == "forward" else (lp.exp() * (lp - rlp)).sum(-1)
    mask = labels[:, 1:] != -100
    kl = kl * mask
    torch.testing.assert_close(out.kl, kl, **TOL)
    torch.testing.assert_close(out.ref_logp, naive_logprobs(ref_model, ids, labels, am).detach(), **TOL)
    up = torch.randn_like(kl)
    g1 = torch.autograd.grad((out.kl * up).sum(), list(model.parameters()), allow_unused=True)
    g2 = torch.autograd.grad((kl * up).sum(), list(model.parameters()), allow_unused=True)
    for a, b in zip(g1, g2):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert all(p.grad is None for p in ref_model.parameters())


def test_patch_causal_lm_and_unpatch():
    model = tiny_model("llama")
    ids, labels, am = batch()
    ref_out = model(input_ids=ids, attention_mask=am, labels=labels)
    with fi.patch_causal_lm(model, entropy=True):
        out = model(ids, attention_mask=am, labels=labels)
        assert out.logits is None and out.log_probs.shape == (3, 12) and out.entropy is not None
        torch.testing.assert_close(out.log_probs, naive_logprobs(model, ids, labels, am), **TOL)
        torch.testing.assert_close(out.loss, ref_out.loss, **TOL)  # HF's causal-LM loss
        assert model(input_ids=ids).logits.shape == (3, 13, 256)  # no labels: original forward
        with pytest.raises(RuntimeError):
            fi.patch_causal_lm(model)
    assert "forward" not in model.__dict__
    assert model(input_ids=ids, attention_mask=am, labels=labels).logits is not None
    handle = fi.patch_causal_lm(model)
    assert model(input_ids=ids, labels=labels).logits is None
    handle.unpatch()
    assert model(input_ids=ids, labels=labels).logits is not None


def test_patch_moe_loss_includes_aux():
    model = tiny_model("mixtral")
    ids, labels, am = batch()
    ref = model(input_ids=ids, attention_mask=am, labels=labels)
    with fi.causal_lm_logprobs(model):
        out = model(input_ids=ids, attention_mask=am, labels=labels)
    torch.testing.assert_close(out.loss, ref.loss, **TOL)
    torch.testing.assert_close(out.aux_loss, ref.aux_loss)


def test_logit_summaries():
    g = torch.Generator().manual_seed(0)
    h, w, b = torch.randn(37, 16, generator=g), torch.randn(50, 16, generator=g), torch.randn(50, generator=g)
    lab = torch.randint(0, 50, (37,), generator=g)
    lab[:5] = (h[:5] @ w.T + b).argmax(-1)
    for cap in (None, 2.0):
        z = h @ w.T + b
        if cap:
            z = cap * torch.tanh(z / cap)
        z = z / 0.5
        mean, top1 = fi.logit_summaries(h, w, lab, bias=b, softcap=cap, temperature=0.5, row_chunk=8, vocab_chunk=7)
        torch.testing.assert_close(mean, z.mean(-1), rtol=1e-5, atol=1e-5)
        assert torch.equal(top1, z.argmax(-1) == lab) and top1[:5].all()
