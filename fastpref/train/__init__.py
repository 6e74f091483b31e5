"""The fastpref trainer: ``fastpref train`` / ``python -m fastpref.train`` (see ``--help``).

With no arguments it trains the bundled tiny model on the bundled synthetic preference task on the CPU.
"""
from __future__ import annotations


def main(argv: list[str] | None = None) -> dict:
    """Parse flags (and ``--config`` YAML) and train; returns the run summary. ``--online`` (or ``online: true``
    in the YAML) runs the online / iterative mode instead (``fastpref.train.online``)."""
    import sys

    from .online.config import wants_online

    argv = sys.argv[1:] if argv is None else list(argv)
    if wants_online(argv):
        from .online import main as online_main

        return online_main(argv)
    from .config import load_config
    from .loop import train

    return train(load_config(argv))


__all__ = ["main"]
