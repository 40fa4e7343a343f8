"""<job>/job.json and <job>/error.txt: how each job of a sweep ended, written by the job, read by the report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transferlab.core.files import atomic_write
from transferlab.core.redaction import redact

JOB_FILE = "job.json"
ERROR_FILE = "error.txt"


def write_job_record(out_dir: Path, record: dict[str, Any]) -> None:
    atomic_write(out_dir / JOB_FILE, (json.dumps(redact(record), indent=2) + "\n").encode())


def read_job_record(job_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((job_dir / JOB_FILE).read_text())
    except (OSError, ValueError):
        return {}
