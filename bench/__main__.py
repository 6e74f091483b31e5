"""python -m bench --device cpu|cuda [--quick]: see bench/runner.py."""
import sys

from bench.runner import main

if __name__ == "__main__":
    sys.exit(main())
