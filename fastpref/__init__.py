"""fastpref: preference-alignment losses from hidden states, never materializing [tokens × vocab] logits."""
from .backends import available as available_backends
from .kl import TokenKL, token_kl
from .options import LogitOptions, batch_invariant
from .stats import TokenStats, token_logprobs, token_stats

__version__ = "0.1.0"

# Submodules reachable as attributes after ``import fastpref``, imported on first use (their optional
# dependencies, e.g. transformers / trl for integrations, load only then).
_LAZY_SUBMODULES = ("integrations", "losses", "nn", "parallel", "train")


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_SUBMODULES))

__all__ = [
    "LogitOptions", "TokenKL", "TokenStats", "available_backends", "batch_invariant", "token_kl", "token_logprobs", "token_stats",
]
