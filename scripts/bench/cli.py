"""The command line of scripts/benchmark.py (and of its one-section wrappers, scripts/predict_bench.py and
scripts/fill_bench.py): run the chosen sections, write benchmark.json and the markdown table, judge the targets."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from . import NAMES, Context, check, markdown, run_sections, summary, targets
from .common import SHARED, subset_folder


def parser(description: str, sections: str) -> argparse.ArgumentParser:
    found = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    found.add_argument(
        "--quick", action="store_true", help="smaller everything: every key in under 4 min on 2 cores (the tradeoff section adds a few)"
    )
    found.add_argument("--data", type=Path, default=SHARED / "oxford-pets-sample", help="folder of Oxford-IIIT Pet photos")
    found.add_argument("--out", type=Path, default=Path("benchmark.json"))
    found.add_argument("--device", default="auto", help="auto | cpu | cuda")
    found.add_argument("--sections", default=sections, help=f"comma-separated subset of {','.join(NAMES)}")
    found.add_argument("--compile", action="store_true", help="also measure accuracy with performance.compile=true (slow on CPU)")
    found.add_argument("--check", action="store_true", help="exit 1 when a target is missed (each missed one printed on a line)")
    found.add_argument("--from", dest="source", type=Path, help="with --check: evaluate this benchmark JSON's targets, run nothing")
    return found


def main(argv: Optional[list[str]] = None, description: str = "", sections: str = ",".join(NAMES)) -> int:
    """Exit 0, or 1 when --check finds a missed target; 2 for bad input (argparse's usage errors, a missing --data)."""
    ours = parser(description, sections)
    args = ours.parse_args(argv)
    if args.source is not None:
        if not args.check:
            ours.error("--from needs --check")
        return check(json.loads(args.source.read_text())["targets"])
    chosen = [s for s in args.sections.split(",") if s]
    unknown = [s for s in chosen if s not in NAMES]
    if unknown:
        ours.error(f"--sections: unknown {unknown}; choose from {', '.join(NAMES)}")
    if not args.data.is_dir():
        print(f"error: --data: {args.data} is not a folder; point it at the Oxford-IIIT Pet sample", file=sys.stderr)
        return 2

    from transferlab.core.hardware import detect, resolve_device

    logging.basicConfig(level=logging.WARNING)
    for name in ("lightning.pytorch", "lightning.fabric", "transferlab"):
        logging.getLogger(name).setLevel(logging.WARNING)
    device = resolve_device(args.device)
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="transferlab-bench-"))
    try:
        root = subset_folder(args.data, 3 if args.quick else None, work / "subset")
        ctx = Context(args.data, root, sorted(root.glob("*.jpg")), work, device, args.quick, args.compile)
        details = run_sections(chosen, ctx)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result: dict[str, Any] = {
        **summary(details),
        "hardware": detect().to_dict(),
        "mode": "quick" if args.quick else "full",
        "device": str(device),
        "seconds": time.perf_counter() - started,
        "details": details,
    }
    result["targets"] = targets(details)
    result["table"] = table = markdown(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    print(table)
    print(f"\nwrote {args.out}")
    return check(result["targets"]) if args.check else 0
