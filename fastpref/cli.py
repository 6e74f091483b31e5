"""The ``fastpref`` command. Subcommands: ``train`` (see ``fastpref train --help``)."""
from __future__ import annotations

import sys

USAGE = "usage: fastpref train [flags]   (fastpref train --help for the flags)"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    if args[0] == "train":
        from .train import main as train_main

        train_main(args[1:])
        return 0
    print(f"fastpref: unknown command {args[0]!r}\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
