"""Benchmark: ``python scripts/bench.py --device cpu --torch`` (same as ``python -m lenet_xp.bench``)."""

import sys

from lenet_xp.bench import main

if __name__ == "__main__":
    sys.exit(main())
