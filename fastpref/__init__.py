"""fastpref: preference-alignment losses from hidden states, never materializing [tokens × vocab] logits."""
from .backends import available as available_backends
from .kl import TokenKL, token_kl
from .options import LogitOptions
from .stats import TokenStats, token_logprobs, token_stats

__version__ = "0.1.0"

__all__ = [
    "LogitOptions", "TokenKL", "TokenStats", "available_backends", "token_kl", "token_logprobs", "token_stats",
]
