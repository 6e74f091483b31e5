"""The ``fastpref`` command. Subcommands: ``train`` (see ``fastpref train --help``)."""
from __future__ import annotations

import sys

USAGE = "usage: fastpref train [flags]   (fastpref train --help for the flags)\n       fastpref --version"


def version() -> str:
    """One line: fastpref's version, torch's, and the backends that run on this machine's default device."""
    import torch

    from . import __version__
    from .backends import available

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return f"fastpref {__version__} (torch {torch.__version__}; backends on {device}: {', '.join(available(device))})"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    if args[0] in ("-V", "--version"):
        print(version())
        return 0
    if args[0] == "train":
        from ._quiet import quiet_third_party

        quiet_third_party()
        from .train import main as train_main

        train_main(args[1:])
        return 0
    print(f"fastpref: unknown command {args[0]!r}\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
