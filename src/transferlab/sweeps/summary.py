"""The summary of a sweep: one table of every job, and a report a person can read (transferlab-report, SweepSummary).

Reads each job folder (Hydra's `.hydra/overrides.yaml`, our `job.json` and `metrics.json`) and writes, in the
sweep folder: `summary.csv` (one row per job: its overrides as columns, `status`, its metrics), `summary.md`
(sorted by the optimised metric, failures listed with their error) and a self-contained `report.html`; a sweep
that varies `data.shots` also gets `few_shot_curve.csv`, its table and its picture (sweeps.few_shot).
"""

from __future__ import annotations

import csv
import json
import logging
import sys
from pathlib import Path
from typing import Any, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from transferlab.core.errors import one_line
from transferlab.sweeps.collect import Job, Sweep, cell, collect, columns, headline, natural, with_interval
from transferlab.sweeps.compare import Verdict, compare_to_best, group_label, seed_groups, shown_metrics, vs_best
from transferlab.sweeps.few_shot import CURVE_CSV, TABLE_HEAD, few_shot_curve, markdown_lines, table_rows, write_curve_csv
from transferlab.sweeps.records import ERROR_FILE, JOB_FILE, read_job_record

SUMMARY_CSV, SUMMARY_MD, REPORT_HTML = "summary.csv", "summary.md", "report.html"
log = logging.getLogger(__name__)


def write_csv(sweep: Sweep, verdicts: dict[str, Verdict]) -> Path:
    """One row per job; `*_ci95` intervals as `[low, high]`; `p_vs_best` / `vs_best`: the paired test against the best."""
    keys, metrics = columns(sweep)
    intervals = [f"{m}_ci95" for m in metrics if any(f"{m}_ci95" in j.metrics for j in sweep.jobs)]
    with open(sweep.path / SUMMARY_CSV, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["job", *keys, "status", *metrics, *intervals, "p_vs_best", "vs_best", "duration_s", "error"])
        for job in sweep.jobs:
            verdict = verdicts.get(job.name)
            writer.writerow(
                [
                    job.name,
                    *(job.overrides.get(k, "") for k in keys),
                    job.status,
                    *(job.metrics.get(m, "") if job.metrics.get(m) is not None else "" for m in metrics),
                    *(json.dumps(job.metrics[i]) if isinstance(job.metrics.get(i), list) else "" for i in intervals),
                    f"{verdict.comparison.p_value:.4g}" if verdict else "",
                    vs_best(sweep, verdicts, job),
                    job.duration_s if job.duration_s is not None else "",
                    job.error or "",
                ]
            )
    return sweep.path / SUMMARY_CSV


def seed_lines(sweep: Sweep) -> list[str]:
    """Markdown table of the seed groups: mean ± std of each shown metric."""
    groups = seed_groups(sweep)
    if not groups:
        return []
    shown = shown_metrics(sweep, 4)
    lines = ["", "## Repeated seeds (mean ± std)", "", "| settings | " + " | ".join(shown) + " |", "|" + "---|" * (len(shown) + 1)]
    for group in groups:
        lines.append(f"| {group_label(group, sweep.swept)} | " + " | ".join(group.summary(m) or "" for m in shown) + " |")
    return lines


def write_markdown(sweep: Sweep, verdicts: dict[str, Verdict]) -> Path:
    keys, _ = columns(sweep)
    shown = shown_metrics(sweep, 6)
    header = ["job", *(sweep.swept or keys), "status", *shown, "vs best (paired bootstrap, test images)"]
    lines = [f"# Sweep {sweep.path}", "", headline(sweep), "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for job in sweep.jobs:
        cells = [
            job.name,
            *(cell(job.overrides.get(k, "")) for k in (sweep.swept or keys)),
            job.status,
            *(with_interval(job, m) for m in shown),
            vs_best(sweep, verdicts, job),
        ]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    lines += seed_lines(sweep)
    lines += markdown_lines(few_shot_curve(sweep))
    failed = [j for j in sweep.jobs if j.status == "failed"]
    if failed:
        lines += ["", "## Failures", ""]
        for job in failed:
            detail = job.path / ERROR_FILE
            where = f" (traceback: `{detail}`)" if detail.is_file() else ""
            lines.append(f"- job {job.name} ({', '.join(f'{k}={v}' for k, v in job.overrides.items() if k in sweep.swept)}): {job.error}{where}")
    (sweep.path / SUMMARY_MD).write_text("\n".join(lines) + "\n")
    return sweep.path / SUMMARY_MD


def write_report(sweep_dir: str | Path, html: bool = True, metric: Optional[str] = None, direction: Optional[str] = None) -> Sweep:
    sweep = collect(sweep_dir, metric, direction)
    verdicts = compare_to_best(sweep)
    write_csv(sweep, verdicts)
    write_markdown(sweep, verdicts)
    curve = few_shot_curve(sweep)
    if curve is not None:
        write_curve_csv(curve, sweep.path)
    if html:
        from transferlab.sweeps.report_html import write_html  # matplotlib: only when a page is wanted

        write_html(sweep, sweep.path / REPORT_HTML, verdicts)
    return sweep


def print_summary(sweep: Sweep, limit: int = 20) -> None:
    """The table, the best job and each distinct error with its jobs, on stderr (text is never read as markup)."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(title=Text(f"Sweep {sweep.path}"), title_justify="left")
    verdicts = compare_to_best(sweep)
    for column in ("job", *sweep.swept, "status", sweep.metric, "test/acc", "vs best"):
        table.add_column(Text(column))
    for job in sweep.jobs[:limit]:
        style = {"failed": "red", "pruned": "yellow", "incomplete": "yellow", "interrupted": "yellow"}.get(job.status, "")
        verdict = verdicts.get(job.name)
        short = f"{verdict.comparison.verdict()} (p={verdict.comparison.p_value:.2g})" if verdict else vs_best(sweep, {}, job)
        cells = [job.name, *(cell(job.overrides.get(k, "")) for k in sweep.swept), job.status, with_interval(job, sweep.metric)]
        cells += [with_interval(job, "test/acc"), short]
        table.add_row(*map(Text, cells), style=style)
    console = Console(stderr=True, highlight=False)
    console.print(table)
    console.print(Text(headline(sweep)))
    curve = few_shot_curve(sweep)
    if curve is not None:
        shots = Table(title=Text(f"Few-shot curve: {curve.metric} ({sweep.path / CURVE_CSV})"), title_justify="left")
        for column in TABLE_HEAD:
            shots.add_column(Text(column))
        for row in table_rows(curve):
            shots.add_row(*map(Text, row))
        console.print(shots)
    by_error: dict[str, list[Job]] = {}
    for job in (j for j in sweep.jobs if j.status == "failed"):
        by_error.setdefault(job.error or "unknown error", []).append(job)
    for error, jobs in by_error.items():
        names = ", ".join(j.name for j in sorted(jobs, key=lambda j: natural(j.name)))
        console.print(Text.assemble((f"{len(jobs)} job(s) failed", "red"), f" ({names}): {error} (traceback: {jobs[0].path / ERROR_FILE})"))
    console.print(Text(f"Summary: {sweep.path / SUMMARY_MD}; report: {sweep.path / REPORT_HTML}"))


class SweepSummary(Callback):
    """At the end of a multirun: summary.csv / summary.md / report.html in the sweep folder, failures printed."""

    def __init__(self, html: bool = True) -> None:
        self.html = html

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Write and print the summary; then exit 1 when any job failed (the last thing Hydra does in a multirun,
        and the command's exit code: the failed jobs are recorded in their folders and listed above)."""
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        records = [read_job_record(path.parent) for path in sweep_dir.glob("**/" + JOB_FILE)]
        failed = sum(1 for r in records if r.get("status") == "failed")  # the exit code, report or not
        try:
            print_summary(write_report(sweep_dir, html=self.html))
        except Exception as exc:  # noqa: BLE001 - the jobs' own results are already on disk
            log.error("could not write the sweep report of %s: %s", sweep_dir, one_line(exc))
        if failed:
            sys.exit(1)
