"""The fastpref trainer: ``fastpref train`` / ``python -m fastpref.train`` (see ``--help``).

With no arguments it trains the bundled tiny model on the bundled synthetic preference task on the CPU.
"""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> dict:
    """Parse flags (and ``--config`` YAML), check them, and train; returns the run summary. A user error
    (see :mod:`fastpref.train.validate`) is printed as one line and ends the process with exit status 2."""
    from .config import load_config
    from .validate import EXIT_CODE, UserError, check

    try:
        cfg = check(load_config(argv))
        from .checkpoint import CheckpointError
        from .data import DataError
        from .loop import train

        try:
            return train(cfg)
        except (DataError, CheckpointError) as e:
            raise UserError(str(e)) from None
        except SystemExit as e:  # the trainer's own refusals (e.g. a loss that cannot train on this data)
            if isinstance(e.code, str):
                raise UserError(e.code) from None
            raise
    except UserError as e:
        print(f"fastpref train: error: {e}", file=sys.stderr)
        raise SystemExit(EXIT_CODE) from None


__all__ = ["main"]
