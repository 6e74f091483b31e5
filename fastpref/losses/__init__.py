"""fastpref.losses: pure-torch preference losses on per-sequence / per-token log-probs or reward scores.

Importable on its own (depends only on torch). ``names()`` lists the registered losses, ``get(name)`` returns
one. Every loss takes keyword tensors and returns the unreduced per-example loss (reduce with ``.mean()``).
"""
from . import kl_estimators, listwise, pairwise, reduce, reference_free, reward, rl, token_level, unpaired, variants
from ._math import log1mexp
from .listwise import best_first_order
from .pairwise import f_divergence_scores, logratios
from .reduce import ld_dpo_partial_sums, ld_dpo_shared_lengths, masked_sums, packed_sums
from .reference_free import alphapo_reward, log_odds
from .registry import check_values, check_weights, get, names, resolve
from .reward import gpm_score
from .rl import (clipped_surrogate, entropy_bonus, kl_penalty, log_ratio, normalise, policy_metrics,
                 sampler_importance_ratio)
from .token_level import wpo_weights
from .unpaired import kto_mismatched_index, kto_reference_point
from .variants import combine

globals().update({_name: get(_name) for _name in names()})  # every registered loss as fastpref.losses.<name>

__all__ = [
    "alphapo_reward", "best_first_order", "clipped_surrogate", "combine", "entropy_bonus", "f_divergence_scores",
    "check_values", "check_weights", "get", "gpm_score", "kl_estimators", "kl_penalty", "log_ratio",
    "normalise", "policy_metrics", "rl",
    "sampler_importance_ratio", "kto_mismatched_index", "kto_reference_point", "ld_dpo_partial_sums",
    "ld_dpo_shared_lengths", "listwise", "log1mexp", "log_odds", "logratios", "masked_sums", "names",
    "packed_sums", "pairwise", "reduce", "reference_free", "resolve", "reward", "token_level", "unpaired", "variants",
    "wpo_weights",
] + names()
