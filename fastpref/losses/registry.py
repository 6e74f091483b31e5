"""Name -> loss-function registry: the registered names, the papers' and TRL's aliases for them, and the
checks of hyper-parameter values that every entry point (``PreferenceLoss``, ``PolicyLoss``, the trainer's
flags) shares."""
from __future__ import annotations

import difflib
import inspect
import math
from typing import Any, Callable, Mapping, TypeVar

F = TypeVar("F", bound=Callable)
_REGISTRY: dict[str, Callable] = {}

# Names the papers and TRL use -> registry names.
ALIASES = {
    "dpo": "sigmoid", "rso": "hinge", "r_dpo": "rdpo", "bradley_terry": "bt", "reward": "bt", "rm": "bt",
    "pl": "plackett_luce", "listmle": "plackett_luce", "lipo": "lipo_lambda", "dpo_positive": "dpop",
    "aot_pair": "aot", "nll": "sft",
}

# hyper-parameter -> (lowest, highest, lowest allowed itself?, highest allowed itself?); None: unbounded. Every
# numeric hyper-parameter must also be finite in float32, the dtype the losses compute in; a loss's own default
# always passes (GRPO's beta = 0: no KL term).
RANGES: dict[str, tuple[float | None, float | None, bool, bool]] = {
    "beta": (0.0, None, False, True), "label_smoothing": (0.0, 0.5, True, True),
    "soft_labels": (0.0, 1.0, True, True), "pref_probs": (0.0, 1.0, True, True),
    "other_pref_probs": (0.0, 1.0, True, True), "probability": (0.0, 1.0, True, True),
    "chosen_winrates": (0.0, 1.0, True, True), "rejected_winrates": (0.0, 1.0, True, True),
    "desirable_weight": (0.0, None, False, True), "undesirable_weight": (0.0, None, False, True),
    "rpo_alpha": (0.0, None, True, True), "cpo_alpha": (0.0, None, True, True),
    "sft_weight": (0.0, None, True, True), "dpop_lambda": (0.0, None, True, True),
    "reg_lambda": (0.0, None, True, True), "reward_temperature": (0.0, None, False, True),
    "discopop_tau": (0.0, None, False, True), "epsilon": (0.0, None, True, True),
    "epsilon_high": (0.0, None, True, True),
}
FLOAT32_MAX = 3.4028234663852886e38


def register(*names: str) -> Callable[[F], F]:
    """Decorator: register a loss function under one or more names."""

    def deco(fn: F) -> F:
        for name in names:
            if name in _REGISTRY:
                raise ValueError(f"loss {name!r} registered twice")
            _REGISTRY[name] = fn
        return fn

    return deco


def names() -> list[str]:
    """Sorted list of registered loss names."""
    return sorted(_REGISTRY)


def unknown_name(name: object) -> str:
    """Why ``name`` is no loss, in words: "unknown loss; did you mean ...?" with the closest known names."""
    key = str(name).strip().lower().replace("-", "_")
    close = difflib.get_close_matches(key, names() + list(ALIASES), n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(map(repr, close))}?" if close else f"known: {', '.join(names())}"
    return f"unknown loss; {hint} (DPO is 'sigmoid')"


def resolve(name: str) -> str:
    """The registry name of ``name``: itself, or the registry's name for a paper's / TRL's alias (``dpo`` ->
    ``sigmoid``; case and '-' ignored). ValueError with the closest known names otherwise."""
    if isinstance(name, str):
        if name in _REGISTRY:
            return name
        key = name.strip().lower().replace("-", "_")
        if key in _REGISTRY or key in ALIASES:
            return ALIASES.get(key, key)
    raise ValueError(f"loss {name!r}: {unknown_name(name)}")


def get(name: str) -> Callable:
    """The loss function registered as ``name`` (or as the alias's registry name, see :func:`resolve`)."""
    return _REGISTRY[resolve(name)]


def _expected(lo: float | None, hi: float | None, lo_in: bool, hi_in: bool) -> str:
    if lo is not None and hi is not None:
        return f"a number in {'[' if lo_in else '('}{lo:g}, {hi:g}{']' if hi_in else ')'}"
    return f"a number {'>=' if lo_in else '>'} {lo:g}" if lo is not None else "a finite number"


def _out_of_range(name: str, x: float) -> str | None:
    """What is wrong with value ``x`` of hyper-parameter ``name`` (None: nothing)."""
    lo, hi, lo_in, hi_in = RANGES.get(name, (None, None, True, True))
    if not math.isfinite(x) or abs(x) > FLOAT32_MAX:
        return f"expected {_expected(lo, hi, lo_in, hi_in)} (finite in float32)"
    if (lo is not None and (x < lo or (x == lo and not lo_in))) or \
            (hi is not None and (x > hi or (x == hi and not hi_in))):
        return f"expected {_expected(lo, hi, lo_in, hi_in)}"
    return None


def check_value(name: str, value: Any, default: Any = inspect.Parameter.empty) -> None:
    """ValueError naming ``name`` unless ``value`` (a number, or a floating tensor: every element) is finite in
    float32 and in ``RANGES``' range; ``default``, the loss's own, always passes. Other values pass."""
    import torch

    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, (int, float)):
        if isinstance(default, (int, float)) and not isinstance(default, bool) and value == default:
            return
        why = _out_of_range(name, float(value))
        if why:
            raise ValueError(f"{name}={value!r}: {why}")
    elif isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel():
        x = value.detach().double()
        lo, hi = float(x.min()), float(x.max())  # one synchronisation with the device
        for v in (lo, hi) if math.isfinite(lo) and math.isfinite(hi) else (float(x[~torch.isfinite(x)][0]),):
            why = _out_of_range(name, v)
            if why:
                raise ValueError(f"{name} holds {v!r}: {why}")


def check_weights(weights: Mapping[str, Any]) -> None:
    """ValueError unless every weight of {loss: weight} is a number > 0 and finite (a negative weight would
    train the term's gradient ascent)."""
    for name, w in weights.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0:
            raise ValueError(f"loss {name}={w!r}: expected a finite weight > 0")


def check_values(fns: Mapping[str, Callable], values: Mapping[str, Any]) -> None:
    """:func:`check_value` for every value that a loss of ``fns`` {name: function} takes, against each such
    loss's own default."""
    for fn in fns.values():
        params = inspect.signature(fn).parameters
        for key, value in values.items():
            if key in params:
                check_value(key, value, params[key].default)
