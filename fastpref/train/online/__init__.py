"""Online and iterative preference training: ``fastpref train --online`` (see ``--help`` and docs/online.md).

With no other arguments: SPPO on the bundled synthetic task, judged by its exact verifier, from a weak
SFT-warm-up policy, on the CPU in a few minutes.
"""
from __future__ import annotations


def main(argv: list[str] | None = None) -> dict:
    """Parse flags (and ``--config`` YAML) and run the rounds; returns the run summary."""
    from .config import load_config
    from .loop import train

    return train(load_config(argv))


__all__ = ["main"]
