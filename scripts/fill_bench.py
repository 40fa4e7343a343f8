"""The `fill` section of scripts/benchmark.py alone: transferlab's feature-cache fill against a raw PyTorch loop.

    python scripts/fill_bench.py [--quick] [--out fill.json] [--check]   # = scripts/benchmark.py --sections fill

The section itself (what both sides do, how they are timed) is bench/fill.py.
"""

from __future__ import annotations

import sys

# Python puts a script's own folder first on sys.path: the bench package beside this file, from any working directory.
from bench.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], description=__doc__.split("\n\n")[0], sections="fill"))
