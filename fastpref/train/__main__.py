"""``python -m fastpref.train [flags]``."""
import sys

from . import main

if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except KeyboardInterrupt:
        sys.exit(130)
