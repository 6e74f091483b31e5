"""Tiny random causal LMs of many families (no downloads), a local tokenizer and a preference dataset."""
from __future__ import annotations

import pytest

transformers = pytest.importorskip("transformers")

import torch  # noqa: E402

COMMON = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=1, pad_token_id=0)


def _cfg(name: str) -> tuple[str, dict]:
    """(model class name, config kwargs) per family."""
    c = dict(COMMON)
    return {
        "llama": ("LlamaForCausalLM", dict(c, config="LlamaConfig")),
        "mistral": ("MistralForCausalLM", dict(c, config="MistralConfig")),
        "qwen2": ("Qwen2ForCausalLM", dict(c, config="Qwen2Config")),
        "qwen3": ("Qwen3ForCausalLM", dict(c, config="Qwen3Config", head_dim=8)),
        # small softcaps so that softcapping changes the result noticeably
        "gemma2": ("Gemma2ForCausalLM", dict(c, config="Gemma2Config", head_dim=8, final_logit_softcapping=3.0,
                                             attn_logit_softcapping=50.0, sliding_window=4)),
        "gemma3": ("Gemma3ForCausalLM", dict(c, config="Gemma3TextConfig", head_dim=8, final_logit_softcapping=3.0,
                                             sliding_window=4)),
        "phi3": ("Phi3ForCausalLM", dict(c, config="Phi3Config")),
        "gpt2": ("GPT2LMHeadModel", dict(config="GPT2Config", vocab_size=256, n_embd=32, n_layer=2, n_head=4,
                                         n_positions=128, tie_word_embeddings=True, bos_token_id=1,
                                         eos_token_id=1, pad_token_id=0)),
        "gpt_neox": ("GPTNeoXForCausalLM", dict(c, config="GPTNeoXConfig")),
        "olmo2": ("Olmo2ForCausalLM", dict(c, config="Olmo2Config")),
        "phi": ("PhiForCausalLM", dict(c, config="PhiConfig")),  # lm_head with a bias
        "cohere": ("CohereForCausalLM", dict(c, config="CohereConfig", logit_scale=0.5)),  # logit_scale
        "granite": ("GraniteForCausalLM", dict(c, config="GraniteConfig", logits_scaling=4.0)),
        "mixtral": ("MixtralForCausalLM", dict(c, config="MixtralConfig", num_local_experts=4, num_experts_per_tok=2,
                                               output_router_logits=True, router_aux_loss_coef=0.02)),
    }[name]


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "gpt2", "gpt_neox", "olmo2", "phi",
            "cohere", "granite", "mixtral"]


def tiny_model(name: str = "llama", seed: int = 0, **overrides):
    cls_name, kw = _cfg(name)
    kw = dict(kw, **overrides)
    cfg_cls = getattr(transformers, kw.pop("config"))
    cfg = cfg_cls(**kw)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(cfg).float().eval()
    with torch.no_grad():  # random init is very flat; spread the logits so softmaxes are peaked somewhere
        head = model.get_output_embeddings()
        head.weight.mul_(4.0)
        if getattr(head, "bias", None) is not None:
            head.bias.normal_(0, 0.5)
    return model


def tiny_tokenizer(vocab_size: int = 256):
    """A local word-level tokenizer (no hub): words w0..w{n}, plus special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<pad>", "<eos>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials)}
    for i in range(vocab_size - len(specials)):
        vocab[f"w{i}"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                                unk_token="<unk>")


def preference_dataset(n: int = 4, seed: int = 0):
    """n pairs of random word sequences with different prompt / completion lengths."""
    import random

    from datasets import Dataset

    rng = random.Random(seed)
    words = lambda k: " ".join(f"w{rng.randrange(200)}" for _ in range(k))  # noqa: E731
    rows = [dict(prompt=words(rng.randint(2, 5)), chosen=" " + words(rng.randint(2, 6)),
                 rejected=" " + words(rng.randint(2, 6))) for _ in range(n)]
    return Dataset.from_list(rows)


def naive_logprobs(model, input_ids, labels, attention_mask=None, temperature: float = 1.0, **kw):
    """The reference path: full logits → log_softmax → gather (HF's shift), 0 where the label is ignored."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kw).logits
    lp = (logits[:, :-1].float() / temperature).log_softmax(-1)
    lab = labels[:, 1:]
    return lp.gather(-1, lab.clamp(min=0).unsqueeze(-1)).squeeze(-1).masked_fill(lab == -100, 0.0)


def batch(vocab: int = 256, B: int = 3, T: int = 13, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, T), generator=g)
    am = torch.ones_like(ids)
    am[1, -3:] = 0  # right padding
    labels = ids.masked_fill(am == 0, -100)
    labels[:, :4] = -100  # a prompt
    return ids, labels, am


def is_fastpref_forward(model) -> bool:
    """Whether ``model.forward`` is fastpref's (possibly wrapped by accelerate: autocast / fp32 conversion)."""
    fn = model.forward
    while fn is not None:
        if getattr(fn, "_fastpref", False):
            return True
        fn = getattr(fn, "__wrapped__", None)
    return False


def assert_same_step(before: dict, before_fp: dict, after_ref: dict, after_fp: dict, min_move: float = 1e-4,
                     before_tol: dict | None = None, **step_tol) -> None:
    """Both trainers started from the same parameters (``before_tol``: assert_close's default when None), fastpref's
    step landed where the reference's did (``step_tol``), and that step moved some parameter by more than
    ``min_move``."""
    moved = 0.0
    for n in before:
        torch.testing.assert_close(before_fp[n], before[n], **(before_tol or {}))
        torch.testing.assert_close(after_fp[n], after_ref[n], **step_tol, msg=lambda m: f"{n}: {m}")
        moved = max(moved, float((after_ref[n] - before[n]).abs().max()))
    assert moved > min_move, "the step did not change the parameters"
