"""Benchmark: same as ``python -m lenet_xp.bench`` (e.g. ``--device cpu --torch``)."""

import sys

from lenet_xp.bench import main

if __name__ == "__main__":
    sys.exit(main())
