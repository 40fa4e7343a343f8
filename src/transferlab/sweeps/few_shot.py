"""The few-shot learning curve of a sweep that varies `data.shots`: the test metric against training images per class.

`transferlab-train -m data.shots=1,2,4,8,all seed=1,2,3 data.split_seed=0 ...` gives 15 jobs; each point of the
curve is one shot count of one series (the jobs' other swept settings, e.g. `finetune.head_solver`, apart from
the seeds): the mean over its seeds of the task's test metric (test/acc; test/map for multi-label runs), with a
95 % t-interval over the seeds (core.statistics.mean_std_interval; independent repetitions, so no overlap
correction). One completed seed gives a point without an interval. `all` (or null) is every training image: drawn
at the right end, one octave past the largest K, labelled with its image count. `train_images` is what each job
trained on, read from its splits.csv (the rows marked `train`; the mean when the seeds differ).
Written as `<sweep>/few_shot_curve.csv`, a table in summary.md and a picture with the table in report.html.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from transferlab.core.statistics import mean_std_interval
from transferlab.sweeps.collect import Job, Sweep, cell

SHOTS_KEY = "data.shots"
REPLICATE_KEYS = ("seed", "data.shots_seed", "data.split_seed")  # repetitions of one setting: averaged over
CURVE_CSV = "few_shot_curve.csv"
COLUMNS = ("series", "shots", "runs", "metric", "mean", "ci95_low", "ci95_high", "train_images")
ALL_VALUES = ("all", "null", "none", "~", "")


def shots_value(text: str) -> Optional[int]:
    """K of an override value; None for all / null (every training image)."""
    value = str(text).strip().strip("'\"").lower()
    return None if value in ALL_VALUES else int(value)


def _splits(job: Job) -> tuple[Optional[int], Optional[frozenset[str]]]:
    """(training images, the test files) of a job's splits.csv; (None, None) when it has none."""
    try:
        with open(job.path / "splits.csv", newline="") as fh:
            rows = [(row["path"], row["split"]) for row in csv.DictReader(fh)]
    except (OSError, KeyError, csv.Error):
        return None, None
    return sum(1 for _, split in rows if split == "train"), frozenset(path for path, split in rows if split == "test")


@dataclass
class Point:
    series: str
    shots: Optional[int]  # None: every training image (all)
    values: list[float] = field(default_factory=list)
    train_images: list[int] = field(default_factory=list)

    @property
    def label(self) -> str:
        return "all" if self.shots is None else str(self.shots)

    @property
    def mean(self) -> float:
        return mean_std_interval(self.values)[0]

    @property
    def interval(self) -> Optional[list[float]]:
        """The 95 % t-interval over the seeds; None with one run (no spread to measure)."""
        return mean_std_interval(self.values, 0.0)[2] if len(self.values) > 1 else None

    @property
    def images(self) -> Optional[float]:
        """Training images of its jobs (their mean if the seeds differ), or None when no splits.csv says."""
        if not self.train_images:
            return None
        mean = sum(self.train_images) / len(self.train_images)
        return int(mean) if mean == int(mean) else round(mean, 1)


@dataclass
class Curve:
    metric: str
    points: list[Point]
    series_keys: list[str]
    same_test: Optional[bool]  # every job tested on the same files (splits.csv); None: not known

    @property
    def series(self) -> list[str]:
        return list(dict.fromkeys(p.series for p in self.points))

    def rows(self) -> list[list[Any]]:
        found = []
        for p in self.points:
            low, high = p.interval or ("", "")
            found.append([p.series, p.label, len(p.values), self.metric, p.mean, low, high, "" if p.images is None else p.images])
        return found

    def note(self) -> str:
        runs = sorted({len(p.values) for p in self.points})
        text = (
            f"Each point: the mean {self.metric} of its completed seeds ({' or '.join(map(str, runs))} per point), with the 95 % "
            "t-interval over them (seeds are independent runs; no interval from one run)."
        )
        if self.same_test is True:
            text += " Every job was tested on the same test images."
        elif self.same_test is False:
            text += " The jobs were tested on different test images (data.split_seed varies): pin data.split_seed to compare the points on the same images."
        return text


def curve_metric(jobs: list[Job]) -> str:
    """The task's test metric: test/acc, or test/map when the runs are multi-label (they have no accuracy)."""
    has = {key for job in jobs for key in ("test/acc", "test/map") if job.value(key) is not None}
    return "test/map" if "test/map" in has and "test/acc" not in has else "test/acc"


def few_shot_curve(sweep: Sweep) -> Optional[Curve]:
    """The curve of a sweep whose jobs vary data.shots; None otherwise (or when no job has a test metric)."""
    if SHOTS_KEY not in sweep.swept:
        return None
    done = [j for j in sweep.jobs if j.status == "completed" and SHOTS_KEY in j.overrides]
    metric = curve_metric(done)
    keys = [k for k in sweep.swept if k != SHOTS_KEY and k not in REPLICATE_KEYS]
    points: dict[tuple[str, Optional[int]], Point] = {}
    tests = set()
    for job in done:
        value = job.value(metric)
        try:
            shots = shots_value(job.overrides[SHOTS_KEY])
        except ValueError:
            continue
        if value is None:
            continue
        series = ", ".join(f"{k}={job.overrides.get(k, '')}" for k in keys) or "defaults"
        point = points.setdefault((series, shots), Point(series, shots))
        point.values.append(value)
        images, test = _splits(job)
        if images is not None:
            point.train_images.append(images)
        tests.add(test)
    if not points:
        return None
    ordered = sorted(points.values(), key=lambda p: (p.series, math.inf if p.shots is None else p.shots))
    same_test = None if None in tests else len(tests) == 1
    return Curve(metric, ordered, keys, same_test)


def write_curve_csv(curve: Curve, folder: Path) -> Path:
    with open(folder / CURVE_CSV, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(COLUMNS)
        writer.writerows(curve.rows())
    return folder / CURVE_CSV


def interval_text(point: Point) -> str:
    interval = point.interval
    return f"[{interval[0]:.4f}, {interval[1]:.4f}]" if interval else "one run: no interval"


def table_rows(curve: Curve) -> list[list[str]]:
    """The curve as text cells: series, shots, runs, mean, 95 % interval, training images."""
    return [[p.series, p.label, str(len(p.values)), f"{p.mean:.4f}", interval_text(p), cell(p.images)] for p in curve.points]


TABLE_HEAD = ["series", "shots per class", "runs", "mean", "95 % interval (seeds)", "training images"]


def markdown_lines(curve: Optional[Curve]) -> list[str]:
    if curve is None:
        return []
    lines = ["", f"## Few-shot curve: {curve.metric} against training images per class ({CURVE_CSV})", "", curve.note(), ""]
    lines += ["| " + " | ".join(TABLE_HEAD) + " |", "|" + "---|" * len(TABLE_HEAD)]
    return lines + ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in table_rows(curve)]


def curve_figure(curve: Curve) -> Any:
    """Matplotlib figure: one line per series, log2 x-axis of shots, `all` one octave past the largest K."""
    from transferlab.core.plotting import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    finite = sorted({p.shots for p in curve.points if p.shots is not None})
    at_all = 2.0 * finite[-1] if finite else 1.0
    ticks: dict[float, str] = {float(k): str(k) for k in finite}
    everything = sorted({p.images for p in curve.points if p.shots is None and p.images is not None})
    if any(p.shots is None for p in curve.points):
        counts = "-".join(cell(n) for n in dict.fromkeys(everything[:1] + everything[-1:]))
        ticks[at_all] = "all" + (f"\n({counts} images)" if counts else "")
    for number, series in enumerate(curve.series):
        points = [p for p in curve.points if p.series == series]
        dodge = 2 ** (0.04 * (number - (len(curve.series) - 1) / 2))  # side by side, so the intervals do not hide each other
        xs = [(float(p.shots) if p.shots is not None else at_all) * dodge for p in points]
        means = [p.mean for p in points]
        errors = [[p.mean - (p.interval or [p.mean])[0] for p in points], [(p.interval or [0, p.mean])[1] - p.mean for p in points]]
        steps = sum(1 for p in points if p.shots is not None)  # the jump to `all` is no step of the axis: dashed
        (line,) = ax.plot(xs[:steps], means[:steps], marker="o", label=series if len(curve.series) > 1 else None)
        ax.plot(xs[max(steps - 1, 0) :], means[max(steps - 1, 0) :], marker="o", linestyle="--", color=line.get_color())
        ax.errorbar(xs, means, yerr=errors, fmt="none", ecolor=line.get_color(), capsize=4)
    if all(0.0 <= p.mean <= 1.0 for p in curve.points):  # accuracy / mAP: a 2-seed t-interval may reach past [0, 1]
        lows = [max(0.0, (p.interval or [p.mean])[0]) for p in curve.points]
        highs = [min(1.0, (p.interval or [0.0, p.mean])[1]) for p in curve.points]
        ax.set_ylim(max(0.0, min(lows) - 0.03), min(1.0, max(highs)) + 0.03)
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(ticks), list(ticks.values()))
    ax.minorticks_off()
    ax.set_xlabel("training images per class (data.shots)")
    ax.set_ylabel(curve.metric)
    ax.set_title(f"{curve.metric}: mean over seeds, 95 % t-interval", fontsize=10)
    ax.grid(alpha=0.3)
    if len(curve.series) > 1:
        ax.legend(fontsize=8)
    return fig
