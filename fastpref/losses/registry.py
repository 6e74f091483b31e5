"""Name -> loss-function registry."""
from __future__ import annotations

from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)
_REGISTRY: dict[str, Callable] = {}


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


def get(name: str) -> Callable:
    """The loss function registered as `name`; ValueError listing the known names otherwise."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown loss {name!r}; known losses: {', '.join(names())}") from None
