"""The bundled, deterministic synthetic preference task and its word-level tokenizer.

Prompt ``add K : d1 d2 ... dn`` (K in 1..3, n in 3..6 digits). The preferred answer adds K to every digit
modulo 10; the rejected answer breaks the rule: it uses another shift, or one or two of its digits are wrong.
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


def _example(rng: random.Random) -> dict:
    k = rng.randint(1, 3)
    digits = [rng.randrange(10) for _ in range(rng.randint(3, 6))]
    good = [(d + k) % 10 for d in digits]
    if rng.random() < 0.5:  # the wrong shift throughout
        j = rng.choice([j for j in (1, 2, 3) if j != k])
        bad = [(d + j) % 10 for d in digits]
    else:  # one or two digits wrong
        bad = list(good)
        for i in rng.sample(range(len(bad)), rng.choice((1, 2))):
            bad[i] = rng.choice([w for w in range(10) if w != good[i]])
    prompt = f"add {k} : " + " ".join(map(str, digits))
    return {"prompt": prompt, "chosen": " ".join(map(str, good)), "rejected": " ".join(map(str, bad))}


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
