"""transferlab-report <sweep dir>: one table of every job of a sweep, and a report a person can read.

Writes, in the sweep folder: `summary.csv` (one row per job: its overrides as columns, `status`, its metrics),
`summary.md` (sorted by the optimised metric, failures listed with their error) and a self-contained
`report.html`; a sweep over `data.shots` also gets `few_shot_curve.csv` (the test metric against training images
per class, mean and 95 % interval over seeds) and its picture. A multirun writes them by itself when it ends; this
command rebuilds them, e.g. for a sweep that is still running or was killed.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from transferlab.cli.exits import user_errors_exit
from transferlab.config.validation import validate_values
from transferlab.sweeps.summary import print_summary, write_report


@user_errors_exit
def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="transferlab-report", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("sweep_dir", help="the sweep folder of a multirun (hydra.sweep.dir)")
    parser.add_argument("--metric", help="the metric to rank by (default: the jobs' optimized_metric)")
    parser.add_argument("--direction", choices=("maximize", "minimize"), help="default: the sweeper's, else by the metric's name")
    parser.add_argument("--no-html", action="store_true", help="only summary.csv and summary.md")
    args = parser.parse_args(argv)
    validate_values(vars(args), "report")
    sweep = write_report(args.sweep_dir, html=not args.no_html, metric=args.metric, direction=args.direction)
    print_summary(sweep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
