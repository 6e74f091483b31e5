"""Preference data: reading (JSONL / Parquet / `datasets` folders), row validation with file and line,
tokenization with an explicit truncation policy, and packed or padded micro-batches."""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor

from . import fields as F

FORMATS = {"pairs": ("prompt", "chosen", "rejected"), "list": ("prompt", "responses"),
           "unpaired": ("prompt", "completion", "label")}


class DataError(ValueError):
    """A bad input row: the message names the file and line (or row)."""


@dataclass
class Example:
    """One training example: its sequences (prompt ids, completion ids), in layout order, and extra inputs."""

    seqs: list[tuple[list[int], list[int]]]
    scores: list[float] | None = None
    ranks: list[float] | None = None
    label: bool | None = None
    prompt_key: str = ""
    numbers: dict[str, float | list[float]] = field(default_factory=dict)  # see fields.NUMBERS
    texts: dict[str, tuple[list[int], list[int]]] = field(default_factory=dict)  # (context ids, text ids)


@dataclass
class Dataset:
    """Tokenized examples of one layout (pairs: [chosen, rejected]; list: K responses; unpaired: one)."""

    layout: str
    examples: list[Example]
    source: str = ""
    skipped: Counter = field(default_factory=Counter)
    truncated: int = 0

    @property
    def num_responses(self) -> int:
        return len(self.examples[0].seqs)

    def __len__(self) -> int:
        return len(self.examples)


# ------------------------------------------------------------------------------------------------- reading
DATASETS_MARKERS = ("dataset_dict.json", "state.json")  # what `save_to_disk` writes at a folder's top


def _first_line(e: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _dataset_folder_rows(p: Path) -> Iterator[tuple[str, Any]]:
    """Rows of a `datasets` folder saved with ``save_to_disk`` (a DatasetDict: its "train" split, else the first)."""
    if not any((p / m).is_file() for m in DATASETS_MARKERS):
        raise DataError(f"{p}: a folder, but not a `datasets` folder saved with save_to_disk (it has no "
                        f"{' or '.join(DATASETS_MARKERS)}); give a .jsonl or .parquet file, or such a folder")
    from datasets import DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(p))
        if isinstance(ds, DatasetDict):
            ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
        rows = iter(ds)
        first = next(rows, None)
    except Exception as e:  # noqa: BLE001 - missing or damaged arrow files raise many kinds of error
        raise DataError(f"{p}: a `datasets` folder that cannot be read (missing or damaged files?): "
                        f"{_first_line(e)}") from None
    if first is not None:
        yield f"{p}[row 0]", first
    for i, row in enumerate(rows, 1):
        yield f"{p}[row {i}]", row


def _parquet_rows(p: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(p)
    except Exception as e:  # noqa: BLE001 - pyarrow's ArrowInvalid / OSError for truncated or foreign files
        raise DataError(f"{p}: not a readable Parquet file (truncated or damaged?): {_first_line(e)}") from None
    for i, row in enumerate(table.to_pylist()):
        yield f"{p}[row {i}]", row


def _jsonl_rows(p: Path) -> Iterator[tuple[str, Any]]:
    first = True
    with p.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            if first and line.lstrip().startswith("["):
                raise DataError(f"{p}: a JSON array; JSON Lines is expected (one JSON object per line, e.g. "
                                "written with pandas' to_json(orient='records', lines=True))")
            first = False
            try:
                yield f"{p}:{n}", json.loads(line)
            except json.JSONDecodeError as e:
                yield f"{p}:{n}", DataError(f"{p}:{n}: invalid JSON ({e.msg} at column {e.colno})")


def read_rows(path: str | Path) -> Iterator[tuple[str, Any]]:
    """(location, row) pairs; location is ``file:line`` for JSON Lines, ``file[row i]`` otherwise. Rows that are
    not valid JSON are yielded as DataError instances; a file or folder that is not what its kind needs (a
    JSON array instead of JSON Lines, a truncated Parquet file, a folder not saved by ``datasets``) raises one."""
    p = Path(path)
    if p.is_dir():
        yield from _dataset_folder_rows(p)
    elif p.suffix == ".parquet":
        yield from _parquet_rows(p)
    elif p.suffix in (".jsonl", ".json", ".ndjson"):
        yield from _jsonl_rows(p)
    elif not p.exists():
        raise FileNotFoundError(f"--data {p}: no such file or folder")
    else:
        raise DataError(f"{p}: unsupported data file (use .jsonl, .parquet or a `datasets` folder saved to disk)")


def detect_format(row: Any, where: str) -> str:
    """pairs / list / unpaired from a row's fields."""
    if isinstance(row, dict):
        if "chosen" in row or "rejected" in row:
            return "pairs"
        if "responses" in row:
            return "list"
        if "completion" in row or "label" in row:
            return "unpaired"
    raise DataError(f"{where}: cannot tell the data format from fields {sorted(row) if isinstance(row, dict) else type(row).__name__}; "
                    "expected {prompt, chosen, rejected}, {prompt, responses, scores|ranks} or {prompt, completion, label}")


# ------------------------------------------------------------------------------------------------ validation
def _is_messages(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(m, dict) for m in x)


def _text_or_messages(row: dict, key: str, where: str) -> str | list:
    if key not in row or row[key] is None:
        raise DataError(f"{where}: missing field {key!r}")
    v = row[key]
    if isinstance(v, str):
        if not v.strip() and key != "prompt":
            raise DataError(f"{where}: {key!r} is empty")
        return v
    if _is_messages(v):
        if not v:
            raise DataError(f"{where}: {key!r} is an empty message list")
        for m in v:
            if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: {key!r}: every chat message needs string 'role' and 'content', got {m}")
        if key != "prompt" and not any(m["content"].strip() for m in v):
            raise DataError(f"{where}: {key!r} is empty")
        return v
    raise DataError(f"{where}: field {key!r} must be a string or a list of chat messages, got {type(v).__name__}")


def _numbers(row: dict, key: str, k: int, where: str) -> list[float] | None:
    v = row.get(key)
    if v is None:
        return None
    if not isinstance(v, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
        raise DataError(f"{where}: {key!r} must be a list of numbers, got {v!r:.80}")
    if len(v) != k:
        raise DataError(f"{where}: {key!r} has {len(v)} entries for {k} responses")
    F.check_values(key, key, v, where, DataError)
    return [float(x) for x in v]


def validate(row: Any, layout: str, where: str) -> dict:
    """The row's fields, checked for presence, types and emptiness (DataError with the location otherwise)."""
    if isinstance(row, DataError):
        raise row
    if not isinstance(row, dict):
        raise DataError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    out = {"prompt": _text_or_messages(row, "prompt", where)}
    if layout == "pairs":
        out["completions"] = [_text_or_messages(row, "chosen", where), _text_or_messages(row, "rejected", where)]
    elif layout == "list":
        resp = row.get("responses")
        if not isinstance(resp, list) or len(resp) < 2:
            raise DataError(f"{where}: 'responses' must be a list of at least 2 completions, got {resp!r:.80}")
        out["completions"] = [_text_or_messages({"response": r}, "response", f"{where}: responses[{i}]")
                              for i, r in enumerate(resp)]
        out["scores"] = _numbers(row, "scores", len(resp), where)
        out["ranks"] = _numbers(row, "ranks", len(resp), where)
        if out["scores"] is None and out["ranks"] is None:
            raise DataError(f"{where}: listwise rows need 'scores' or 'ranks'")
    else:
        out["completions"] = [_text_or_messages(row, "completion", where)]
        lab = row.get("label")
        if lab is None and row.get("probability") is not None:  # Nash-MD rows: scored, not labelled
            lab = True
        if lab is None:
            raise DataError(f"{where}: missing field 'label'")
        if not isinstance(lab, bool) and lab not in (0, 1):
            raise DataError(f"{where}: 'label' must be true/false (or 1/0), got {lab!r}")
        out["label"] = bool(lab)
    out["numbers"] = F.read_numbers(row, layout, len(out["completions"]), where, DataError)
    out["texts"] = F.read_texts(row, layout, where, DataError)
    return out


# ---------------------------------------------------------------------------------------------- tokenization
def with_start(tokenizer, prompt_ids: list[int]) -> list[int]:
    """``prompt_ids``, or for an empty prompt that the tokenizer gave no BOS (GPT-2 / Qwen style) a start token,
    BOS else EOS, so that a completion's first token has a position that predicts it ([] when it has neither)."""
    if prompt_ids:
        return prompt_ids
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return [] if start is None else [start]


@dataclass
class Tokenize:
    """Turns validated rows into token ids. Truncation policy: prompts longer than ``max_prompt_length`` keep
    their last tokens; then ``truncation="end"`` cuts the completion's end to fit ``max_length``, ``"error"``
    refuses the row. A prompt that leaves no room for a completion token is always a bad row."""

    tokenizer: Any
    max_length: int
    max_prompt_length: int | None = None
    truncation: str = "end"

    def _chat(self, prompt, completion) -> tuple[str, str]:
        tok = self.tokenizer
        if not getattr(tok, "chat_template", None):
            raise DataError("chat messages need a tokenizer with a chat template")
        pm = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        cm = completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}]
        p = tok.apply_chat_template(pm, tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(pm + cm, tokenize=False)
        if not full.startswith(p):
            raise DataError("the chat template renders prompt + completion without the prompt as a prefix")
        return p, full[len(p):]

    def ids(self, prompt, completion, where: str) -> tuple[list[int], list[int], bool]:
        """(prompt ids, completion ids incl. EOS, truncated?)."""
        tok = self.tokenizer
        try:
            if isinstance(prompt, list) or isinstance(completion, list):
                p_text, c_text = self._chat(prompt, completion)
                p = tok(p_text, add_special_tokens=False)["input_ids"]
            else:
                c_text = completion
                p = tok(prompt, add_special_tokens=True)["input_ids"]
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
        c = tok(c_text, add_special_tokens=False)["input_ids"]
        if tok.eos_token_id is not None and (not c or c[-1] != tok.eos_token_id):
            c = c + [tok.eos_token_id]
        if not c or (tok.eos_token_id is not None and len(c) == 1):
            raise DataError(f"{where}: a completion is empty after tokenization")
        p = with_start(tok, p)
        if not p:
            raise DataError(f"{where}: the prompt is empty and the tokenizer has no BOS or EOS token to start "
                            "the sequence with")
        if self.max_prompt_length is not None and len(p) > self.max_prompt_length:
            p = p[-self.max_prompt_length:]
        if len(p) >= self.max_length:
            raise DataError(f"{where}: the prompt is {len(p)} tokens, which leaves no room for the completion at "
                            f"--max-length {self.max_length} (raise --max-length or set --max-prompt-length)")
        cut = len(p) + len(c) > self.max_length
        if cut and self.truncation == "error":
            raise DataError(f"{where}: prompt + completion is {len(p) + len(c)} tokens > --max-length "
                            f"{self.max_length} (--truncation error)")
        return p, c[: self.max_length - len(p)], cut


def load_dataset(path_or_rows, tokenize: Tokenize, *, layout: str | None = None, skip_bad_rows: bool = False,
                 source: str = "") -> Dataset:
    """Read, validate and tokenize. Bad rows raise DataError, or are skipped and counted with ``skip_bad_rows``."""
    rows = read_rows(path_or_rows) if isinstance(path_or_rows, (str, Path)) else \
        ((f"{source}[row {i}]", r) for i, r in enumerate(path_or_rows))
    examples, skipped, truncated, k = [], Counter(), 0, None
    for where, row in rows:
        try:
            if layout is None:
                if isinstance(row, DataError):
                    raise row
                layout = detect_format(row, where)
            v = validate(row, layout, where)
            seqs, cut_any = [], False
            for comp in v["completions"]:
                p, c, cut = tokenize.ids(v["prompt"], comp, where)
                seqs.append((p, c))
                cut_any |= cut
            if layout == "list":
                if k is None:
                    k = len(seqs)
                elif len(seqs) != k:
                    raise DataError(f"{where}: {len(seqs)} responses, but earlier rows have {k} "
                                    "(listwise training needs the same number of responses in every row)")
            texts = {}
            for name, text in v["texts"].items():  # scored in the context fields.TEXTS names
                if not isinstance(v["prompt"], str) or not all(isinstance(c, str) for c in v["completions"]):
                    raise DataError(f"{where}: {name!r} needs string prompt and completions (not chat messages)")
                ctx = v["prompt"] if name == "reference_sample" else "\n".join([v["prompt"], *v["completions"]])
                p, c, cut = tokenize.ids(ctx, text, where)
                texts[name] = (p, c)
            if examples and (set(v["numbers"]) != set(examples[0].numbers) or set(texts) != set(examples[0].texts)):
                have, first = set(v["numbers"]) | set(texts), set(examples[0].numbers) | set(examples[0].texts)
                raise DataError(f"{where}: field(s) {sorted(have ^ first)} present in some rows but not in others "
                                "(a per-example field must be in every row)")
            truncated += cut_any
            examples.append(Example(seqs, v.get("scores"), v.get("ranks"), v.get("label"), json.dumps(v["prompt"]),
                                    v["numbers"], texts))
        except DataError as e:
            if not skip_bad_rows:
                raise
            reason = str(e).split(": ", 1)[-1].split(" (")[0]
            skipped[reason] += 1
    name = str(path_or_rows) if isinstance(path_or_rows, (str, Path)) else source
    if not examples:
        raise DataError(f"{name}: no usable rows" + (f" ({sum(skipped.values())} bad rows skipped)" if skipped else ""))
    return Dataset(layout or "pairs", examples, name, skipped, truncated)


# ------------------------------------------------------------------------------------------------- batching
@dataclass
class Batch:
    """Sequences of B examples in layout order. Packed: input_ids/position_ids [R, L] (rows of several
    sequences, position ids restarting at 0 for each), ``keep`` [N] the flat positions of the real tokens in
    sequence order, labels [N], cu_seqlens [S+1]. Padded: [S, T] tensors with attention_mask."""

    input_ids: Tensor
    position_ids: Tensor
    labels: Tensor
    cu_seqlens: Tensor | None
    attention_mask: Tensor | None
    index: Tensor  # [B] example indices
    inputs: dict[str, Tensor]  # extra loss inputs (scores, ranks, desirable)
    keep: Tensor | None = None

    def to(self, device) -> "Batch":
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Batch(mv(self.input_ids), mv(self.position_ids), mv(self.labels), mv(self.cu_seqlens),
                     mv(self.attention_mask), self.index, {k: v.to(device) for k, v in self.inputs.items()},
                     mv(self.keep))


def sequences(ds: Dataset, index: list[int], which: str = "all") -> list[tuple[list[int], list[int]]]:
    """The sequences of examples ``index`` in layout order (pairs: all chosen, then all rejected; list:
    prompt-major). ``which="target"``: one SFT target per example (chosen / best response / desirable)."""
    ex = [ds.examples[i] for i in index]
    if which == "target":
        out = []
        for e in ex:
            if ds.layout == "list":
                key = e.scores if e.scores is not None else [-r for r in e.ranks]
                out.append(e.seqs[max(range(len(key)), key=key.__getitem__)])
            elif ds.layout == "unpaired":
                if e.label:
                    out.append(e.seqs[0])
            else:
                out.append(e.seqs[0])
        return out
    if ds.layout == "pairs":
        return [e.seqs[0] for e in ex] + [e.seqs[1] for e in ex]
    return [s for e in ex for s in e.seqs]


def pad_id_of(tokenizer) -> int:
    """The id that pads batches: the tokenizer's pad token, else its EOS token, else 0."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


def split_by_prompt(full: Dataset, fraction: float) -> tuple[Dataset, Dataset | None]:
    """(training set, held-out set or None): a deterministic split by a hash of the prompt, so that no prompt is
    in both; about ``fraction`` of the prompts are held out. DataError when that leaves no training row (held-out
    rows are never trained on)."""
    pick = lambda e: int(hashlib.sha256(e.prompt_key.encode()).hexdigest()[:8], 16) % 10_000 \
        < fraction * 10_000  # noqa: E731
    ev = [e for e in full.examples if pick(e)]
    tr = [e for e in full.examples if not pick(e)]
    if not tr:
        raise DataError(f"--eval-fraction {fraction:g}: every prompt of {full.source} ({len(full)} rows) would be "
                        "held out, leaving none to train on; lower it or give --eval-data")
    held = Dataset(full.layout, ev, full.source + " (held-out split)") if ev else None
    return Dataset(full.layout, tr, full.source, full.skipped, full.truncated), held


def completion_labels(prompt_len: int, completion: list[int]) -> list[int]:
    """Shifted labels of one sequence of ``prompt_len`` prompt tokens then ``completion`` (length
    prompt_len + len(completion)): position t is labelled with token t+1 when that token is part of the
    completion, else -100. With an empty prompt the first completion token has no position before it, so it is
    not labelled (:class:`Tokenize` gives such prompts a start token, so that it is)."""
    return ([-100] * prompt_len + completion)[1:] + [-100]


def collate(seqs: list[tuple[list[int], list[int]]], *, packed: bool, pad_id: int = 0, pack_length: int = 0,
            index: list[int] | None = None, inputs: dict | None = None, sequence_labels: bool = False) -> Batch:
    """Labels are already shifted: labels[t] = token t+1 when that token is part of the completion, else -100.
    ``sequence_labels``: also ``inputs["nll_labels"]``, shaped like labels, with the prompt's tokens labelled
    too (a prompt + completion NLL, as TRL's ORPO).

    Packed: sequences go, in order, into rows of at most ``pack_length`` tokens (one row if 0; a longer
    sequence gets a row of its own). Attention is block-diagonal inside a row, so bounded rows keep the
    attention cost of dense (CPU / SDPA) kernels near Σ n_i² instead of N²; only row tails are padding."""
    ids, labs = [], []
    for p, c in seqs:
        toks = p + c
        ids.append(toks)
        labs.append(completion_labels(len(p), c))
    idx = torch.tensor(index or [], dtype=torch.long)
    inputs = dict(inputs or {})
    if sequence_labels:
        full = [t[1:] + [-100] for t in ids]
        if packed:
            inputs["nll_labels"] = torch.tensor([t for s in full for t in s])
        else:
            inputs["nll_labels"] = torch.full((len(ids), max(map(len, ids))), -100, dtype=torch.long)
            for i, f in enumerate(full):
                inputs["nll_labels"][i, : len(f)] = torch.tensor(f)
    if packed:
        lengths = torch.tensor([len(t) for t in ids])
        cu = torch.zeros(len(ids) + 1, dtype=torch.int32)
        cu[1:] = lengths.cumsum(0)
        rows: list[list[list[int]]] = [[]]
        for t in ids:
            if rows[-1] and pack_length and sum(map(len, rows[-1])) + len(t) > pack_length:
                rows.append([])
            rows[-1].append(t)
        L = max(sum(map(len, r)) for r in rows)
        inp = torch.full((len(rows), L), pad_id, dtype=torch.long)
        pos = torch.zeros((len(rows), L), dtype=torch.long)
        keep = []
        for r, row in enumerate(rows):
            off = 0
            for t in row:
                inp[r, off:off + len(t)] = torch.tensor(t)
                pos[r, off:off + len(t)] = torch.arange(len(t))
                keep.extend(range(r * L + off, r * L + off + len(t)))
                off += len(t)
            pos[r, off:] = torch.arange(L - off)  # the tail is a separate (ignored) sequence
        return Batch(inp, pos, torch.tensor([t for s in labs for t in s]), cu, None, idx, inputs,
                     torch.tensor(keep))
    T = max(len(t) for t in ids)
    inp = torch.full((len(ids), T), pad_id, dtype=torch.long)
    lab = torch.full((len(ids), T), -100, dtype=torch.long)
    att = torch.zeros((len(ids), T), dtype=torch.long)
    for i, (t, lb) in enumerate(zip(ids, labs)):
        inp[i, : len(t)], lab[i, : len(lb)], att[i, : len(t)] = torch.tensor(t), torch.tensor(lb), 1
    pos = torch.arange(T)[None].expand(len(ids), T)
    return Batch(inp, pos, lab, None, att, idx, inputs)


def batch(ds: Dataset, index: list[int], *, packed: bool, pad_id: int = 0, pack_length: int = 0,
          sequence_labels: bool = False) -> Batch:
    """A training micro-batch of examples ``index`` with the extra inputs their layout provides."""
    ex = [ds.examples[i] for i in index]
    inputs: dict[str, Tensor] = {}
    if ds.layout == "list":
        if ex[0].scores is not None:
            inputs["scores"] = torch.tensor([e.scores for e in ex])
        if ex[0].ranks is not None:
            inputs["ranks"] = torch.tensor([e.ranks for e in ex])
    elif ds.layout == "unpaired":
        inputs["desirable"] = torch.tensor([bool(e.label) for e in ex])
    for name in ex[0].numbers:
        inputs[name] = torch.tensor([e.numbers[name] for e in ex], dtype=torch.float32)
    return collate(sequences(ds, index), packed=packed, pad_id=pad_id, pack_length=pack_length, index=index,
                   inputs=inputs, sequence_labels=sequence_labels)


def order(n: int, seed: int, start: int, count: int) -> list[int]:
    """Positions [start, start+count) of the example stream: one seeded permutation of range(n) per epoch.
    A pure function of its arguments, so a resumed run continues at the exact data position."""
    out: list[int] = []
    pos = start
    while len(out) < count:
        epoch, off = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
        take = perm[off: off + count - len(out)]
        out += take
        pos += len(take)
    return out


def epoch_batch(n: int, seed: int, step: int, batch_size: int) -> list[int]:
    """Indices of training step ``step`` over n items in batches of ``batch_size`` that never cross an epoch:
    epoch e is the seeded permutation ``order`` uses, cut into ceil(n / batch_size) batches, the last one
    shorter when batch_size does not divide n. So no item appears twice in a step and every item once per
    epoch (``order`` instead wraps into the next epoch's permutation). Empty when n = 0."""
    if n == 0:
        return []
    per_epoch = -(-n // batch_size)
    epoch, b = divmod(step, per_epoch)
    return order(n, seed, epoch * n + b * batch_size, min(batch_size, n - b * batch_size))
