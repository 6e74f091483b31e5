"""Per-example numbers and texts a data row may carry, under the field names common data sets use, and the
loss inputs they feed; and where every other loss input comes from (for messages that name the field or flag).

A field is optional per data set, but all-or-none: when one row has it, every row must.
"""
from __future__ import annotations

import math

# canonical field: (layout, accepted aliases, loss inputs it feeds, what it is)
NUMBERS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...], str]] = {
    "preference_probability": ("pairs", ("soft_label",), ("soft_labels", "pref_probs"),
                               "P(chosen ≻ rejected) in [0, 1] (soft label; online IPO's P(y ≻ y'))"),
    "margin": ("pairs", (), ("margin",), "reward margin m of the pair (reward models: bt, gpm)"),
    "strength": ("pairs", ("preference_strength",), ("strength",),
                 "preference strength, e.g. HelpSteer2-Preference's 1-3 (scaled_bt)"),
    "chosen_score": ("pairs", ("score_chosen",), ("chosen_scores",),
                     "GPO's mean preference score of the chosen response against the previous iterate's samples"),
    "rejected_score": ("pairs", ("score_rejected",), ("rejected_scores",), "the same for the rejected response"),
    "chosen_winrate": ("pairs", ("chosen_probs",), ("chosen_winrates",),
                       "SPPO's estimated win-rate of the chosen response against the previous iterate"),
    "rejected_winrate": ("pairs", ("rejected_probs",), ("rejected_winrates",), "the same for the rejected one"),
    "scores": ("list", (), ("scores", "rewards", "relevance"), "one score per response (higher is better)"),
    "ranks": ("list", (), ("ranks",), "one rank per response (1 = best)"),
    "proposal_logps": ("list", (), ("proposal_logps",),
                       "log q(y_i) of each response under the proposal that sampled it (BRAIn)"),
    "probability": ("unpaired", (), ("probability",), "judge probability P(y ≻ y') of the completion (Nash-MD)"),
}
# fields that are probabilities: in [0, 1] (every other number only has to be finite in float32)
PROBABILITIES = ("preference_probability", "chosen_winrate", "rejected_winrate", "probability")
FLOAT32_MAX = 3.4028234663852886e38


def check_values(name: str, key: str, values: list, where: str, error) -> None:
    """``error`` (an exception class) naming ``where`` and the field ``key`` unless every value is finite in
    float32, the dtype the loss reads it in, and (for :data:`PROBABILITIES`) in [0, 1]."""
    for x in values:
        if not math.isfinite(x):
            raise error(f"{where}: {key!r} has a non-finite value")
        if abs(x) > FLOAT32_MAX:
            raise error(f"{where}: {key!r} is {x:g}, beyond float32's range (±3.4e38) in which the loss reads it")
        if name in PROBABILITIES and not 0.0 <= x <= 1.0:
            raise error(f"{where}: {key!r} is {x:g}, expected a probability in [0, 1]")


# text fields the trainer scores with the policy (log-probs with gradients): (layout, context, loss input)
TEXTS: dict[str, tuple[str, str, str]] = {
    "rationale": ("pairs", "prompt + chosen + rejected", "rationale_logps"),
    "reference_sample": ("pairs", "prompt", "ref_sample_logps"),
}
# loss inputs computed with another model, and the flag that names it
MODEL_INPUTS = {"prev_chosen_logps": "--prev-model", "prev_rejected_logps": "--prev-model",
                "rm_chosen_token_logps": "--token-reward-model", "rm_rejected_token_logps": "--token-reward-model"}
# list-layout scores also feed graded inputs when a data set only has ranks (higher = better)
FROM_RANKS = ("rewards", "relevance")


def source(loss_input: str) -> str | None:
    """Where a loss input comes from, in words ('data field ...' / 'flag ...'), or None if unknown here."""
    for name, (layout, aliases, feeds, _) in NUMBERS.items():
        if loss_input in feeds:
            alias = f" (or {', '.join(repr(a) for a in aliases)})" if aliases else ""
            return f"data field {name!r}{alias} on {layout} rows"
    for name, (layout, _, feeds) in TEXTS.items():
        if loss_input == feeds:
            return f"data field {name!r} (text) on {layout} rows"
    if loss_input in MODEL_INPUTS:
        return f"flag {MODEL_INPUTS[loss_input]}"
    return None


def read_numbers(row: dict, layout: str, k: int, where: str, error) -> dict[str, float | list[float]]:
    """The row's numeric fields of this layout under their canonical names (validated: finite numbers; lists
    of K numbers on list rows)."""
    out: dict = {}
    for name, (lay, aliases, _, _) in NUMBERS.items():
        if lay != layout or name in ("scores", "ranks"):
            continue
        key = next((a for a in (name, *aliases) if row.get(a) is not None), None)
        if key is None:
            continue
        v = row[key]
        vals = v if layout == "list" else [v]
        if not isinstance(vals, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                 for x in vals):
            raise error(f"{where}: {key!r} must be {'a list of numbers' if layout == 'list' else 'a number'}, "
                        f"got {v!r:.80}")
        if layout == "list" and len(vals) != k:
            raise error(f"{where}: {key!r} has {len(vals)} entries for {k} responses")
        check_values(name, key, vals, where, error)
        out[name] = [float(x) for x in vals] if layout == "list" else float(v)
    return out


def read_texts(row: dict, layout: str, where: str, error) -> dict[str, str]:
    out = {}
    for name, (lay, _, _) in TEXTS.items():
        if lay == layout and row.get(name) is not None:
            if not isinstance(row[name], str) or not row[name].strip():
                raise error(f"{where}: {name!r} must be a non-empty string")
            out[name] = row[name]
    return out
