"""The fastpref trainer: ``fastpref train`` / ``python -m fastpref.train`` (see ``--help``).

With no arguments it trains the bundled tiny model on the bundled synthetic preference task on the CPU.
``--online`` (or ``online: true`` in the YAML) runs the online / iterative mode instead (``fastpref.train.online``),
``--task reward`` trains a reward model (``fastpref.train.reward``).

This module is the command dispatch above the tasks: the tasks (``preference``, ``reward``, ``online``) stand on
the run core (``run``, ``phases``, ``outputs``), which imports no task (docs/training.md, "How
the trainer is built").
"""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> dict:
    """Parse flags (and ``--config`` YAML), check them, and train; returns the run summary. A user error
    (see :mod:`fastpref.train.validate`) is printed as one line and ends the process with exit status 2."""
    from .online.config import wants_online
    from .validate import EXIT_CODE, UserError, check

    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if wants_online(argv):  # the online mode checks its own settings as it parses them
            from .online import main as online_main

            def run() -> dict:
                return online_main(argv)
        else:
            from .config import load_config

            cfg = check(load_config(argv))  # before anything heavy is imported

            def run() -> dict:
                return train_task(cfg)
        from .checkpoint import CheckpointError
        from .data import DataError

        try:
            return run()
        except (DataError, CheckpointError) as e:
            raise UserError(str(e)) from None
        except SystemExit as e:  # the trainer's own refusals (e.g. a loss that cannot train on this data)
            if isinstance(e.code, str):
                raise UserError(e.code) from None
            raise
    except UserError as e:
        print(f"fastpref train: error: {e}", file=sys.stderr)
        raise SystemExit(EXIT_CODE) from None


def train_task(cfg) -> dict:
    """Run the task ``cfg.task`` names (preference or reward) with a checked configuration; returns its summary."""
    if cfg.task == "reward":
        from .reward import train_reward

        return train_reward(cfg)
    from .preference import train

    return train(cfg)


__all__ = ["main", "train_task"]
