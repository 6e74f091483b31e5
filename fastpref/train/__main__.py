"""``python -m fastpref.train [flags]``."""
import sys

from .._quiet import quiet_third_party
from . import main

if __name__ == "__main__":
    quiet_third_party()
    try:
        main(sys.argv[1:])
    except KeyboardInterrupt:
        sys.exit(130)
