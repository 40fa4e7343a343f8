"""The `predict` section of scripts/benchmark.py alone: transferlab-predict against a raw PyTorch inference loop.

    python scripts/predict_bench.py [--quick] [--out predict.json] [--check]   # = scripts/benchmark.py --sections predict

The section itself (what both sides do, how they are timed) is bench/predict.py.
"""

from __future__ import annotations

import sys

# Python puts a script's own folder first on sys.path: the bench package beside this file, from any working directory.
from bench.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], description=__doc__.split("\n\n")[0], sections="predict"))
