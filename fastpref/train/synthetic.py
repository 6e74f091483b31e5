"""The bundled, deterministic synthetic preference task and its word-level tokenizer.

Prompt ``add K : d1 d2 ... dn`` (K in 1..3, n = 4 digits). The correct answer adds K to every digit
modulo 10. The demonstrator whose answers the SFT warm-up imitates is sloppy: in ``DEMO_ERROR_RATE`` of its
answers it makes the systematic error of adding K + 1. The preference pairs prefer the correct answer to a wrong
one (mostly that systematic error, else one or two wrong digits), so preference training has to pick out the
right behaviour; :func:`verify` scores a model's answers (exact match, per-digit accuracy).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
TOKENIZER_FILE = ASSETS / "tokenizer.json"
SPECIAL = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
WORDS = [str(d) for d in range(10)] + ["add", ":", "user", "assistant", "system", "yes", "no", "the", "a", "is"]
# A simple chat template, so chat-formatted data also works with the bundled tokenizer.
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}assistant : {% endif %}")


def build_tokenizer_json() -> str:
    """The bundled tokenizer (word level, whitespace split, [BOS] prepended) as a `tokenizers` JSON string."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="[BOS] $A", pair="[BOS] $A $B",
                                                       special_tokens=[("[BOS]", vocab["[BOS]"])])
    tok.add_special_tokens(SPECIAL)
    return tok.to_str(pretty=True)


def load_tokenizer():
    """The bundled tokenizer as a ``transformers.PreTrainedTokenizerFast`` (no download)."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER_FILE), bos_token="[BOS]", eos_token="[EOS]",
                                  pad_token="[PAD]", unk_token="[UNK]")
    tok.chat_template = CHAT_TEMPLATE
    return tok


DIGITS = (4, 4)  # fewest and most digits of a prompt (fixed: the tiny model learns the rule in seconds)
DEMO_ERROR_RATE = 0.6  # share of the SFT demonstrations with the systematic error
SYSTEMATIC_SHARE = 0.75  # share of the rejected answers that are the systematic error


def _shifted(digits: list[int], k: int) -> str:
    return " ".join(str((d + k) % 10) for d in digits)


def _parse(prompt: str) -> tuple[int, list[int]]:
    """``"add K : d1 ... dn"`` → (K, [d1, ..., dn])."""
    head, _, tail = prompt.partition(":")
    return int(head.split()[1]), [int(t) for t in tail.split()]


def _example(rng: random.Random) -> dict:
    k = rng.randint(1, 3)
    digits = [rng.randrange(10) for _ in range(rng.randint(*DIGITS))]
    good = _shifted(digits, k).split()
    if rng.random() < SYSTEMATIC_SHARE:  # the demonstrator's systematic error: K + 1
        bad = _shifted(digits, k + 1).split()
    else:  # one or two digits wrong
        bad = list(good)
        for i in rng.sample(range(len(bad)), rng.choice((1, 2))):
            bad[i] = rng.choice([str(w) for w in range(10) if str(w) != good[i]])
    prompt = f"add {k} : " + " ".join(map(str, digits))
    return {"prompt": prompt, "chosen": " ".join(good), "rejected": " ".join(bad)}


def demonstrations(rows: list[dict], error_rate: float = DEMO_ERROR_RATE, seed: int = 0) -> list[dict]:
    """The sloppy demonstrator's answers to the prompts of ``rows`` (SFT data, ``{prompt, chosen}``): correct,
    or with probability ``error_rate`` the systematic error (adding K + 1)."""
    rng = random.Random(seed + 1)
    out = []
    for row in rows:
        k, digits = _parse(row["prompt"])
        shift = k + 1 if rng.random() < error_rate else k
        out.append({"prompt": row["prompt"], "chosen": _shifted(digits, shift), "rejected": row["rejected"]})
    return out


def answer(prompt: str) -> str:
    """The correct answer to ``add K : d1 ... dn`` (ValueError for a prompt of another form)."""
    try:
        k, digits = _parse(prompt)
    except (IndexError, ValueError):
        raise ValueError(f"not a prompt of the synthetic task: {prompt[:60]!r} (expected 'add K : d1 ... dn')") \
            from None
    return _shifted(digits, k)


def verify(prompt: str, answer: str) -> dict[str, float]:
    """Scores of an answer to ``add K : d1 ... dn``: ``exact_match`` (1 or 0) and ``digit_accuracy`` (share of
    the n expected digits given at their position; missing digits count as wrong, extra ones break exactness)."""
    k, digits = _parse(prompt)
    want, got = _shifted(digits, k).split(), answer.split()
    return {"exact_match": float(got == want),
            "digit_accuracy": sum(g == w for g, w in zip(got, want)) / len(want)}


def make_task(n_train: int = 2000, n_eval: int = 256, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Deterministic train and held-out rows ``{prompt, chosen, rejected}``; held-out prompts never occur in train."""
    rng = random.Random(seed)
    train, seen = [], set()
    while len(train) < n_train:
        row = _example(rng)
        train.append(row)
        seen.add(row["prompt"])
    held = []
    while len(held) < n_eval:
        row = _example(rng)
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            held.append(row)
    return train, held


if __name__ == "__main__":  # regenerate the bundled tokenizer: python -m fastpref.train.synthetic
    ASSETS.mkdir(exist_ok=True)
    TOKENIZER_FILE.write_text(build_tokenizer_json())
    print(json.dumps({"written": str(TOKENIZER_FILE)}))
