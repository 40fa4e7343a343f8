"""Which jobs of a sweep are really worse than the best one, and what repeated seeds say.

Each job's per-image predictions (`test_predictions.csv`, or a cross-validation's `oof_predictions.csv`) are
compared with the best job's on the images both were tested on: a paired bootstrap (core.statistics), so that
easy and hard images cancel. Jobs tested on different images (another data.split_seed) get an unpaired one.
Jobs that differ only in `seed` are also grouped: mean ± std of their metrics.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from typing import Optional

from transferlab.core.statistics import Comparison, mean_std_interval, paired_bootstrap, unpaired_bootstrap
from transferlab.sweeps.collect import Job, Sweep, columns

PREDICTION_FILES = ("test_predictions.csv", "oof_predictions.csv")  # the first a job has
ALPHA = 0.05
SEED_KEYS = ("seed",)


def correctness(job: Job) -> Optional[dict[str, bool]]:
    """{image path: predicted right} from the job's predictions file, or None when it has none."""
    for name in PREDICTION_FILES:
        path = job.path / name
        if path.is_file():
            try:
                with open(path, newline="") as fh:
                    return {row["path"]: row["label"] == row["predicted"] for row in csv.DictReader(fh)}
            except (OSError, KeyError, csv.Error):
                return None
    return None


@dataclass
class Verdict:
    comparison: Comparison

    @property
    def text(self) -> str:
        c = self.comparison
        how = f"{'paired' if c.paired else 'unpaired'}, {c.images} images"
        return f"{c.verdict(ALPHA)} (p={c.p_value:.3g}; acc {c.difference:+.3f} [{c.ci95[0]:+.3f}, {c.ci95[1]:+.3f}]; {how})"


def compare_to_best(sweep: Sweep) -> dict[str, Verdict]:
    """{job name: its verdict against the best job} for every completed job with predictions (not the best)."""
    best = sweep.best
    reference = correctness(best) if best else None
    if not best or not reference:
        return {}
    found = {}
    for job in sweep.jobs:
        if job is best or job.status != "completed":
            continue
        other = correctness(job)
        if not other:
            continue
        common = sorted(reference.keys() & other.keys())
        if len(common) >= max(10, 0.5 * min(len(reference), len(other))):
            comparison = paired_bootstrap([reference[p] for p in common], [other[p] for p in common], seed=0)
        else:
            comparison = unpaired_bootstrap(list(reference.values()), list(other.values()), seed=0)
        found[job.name] = Verdict(comparison)
    return found


@dataclass
class SeedGroup:
    """Jobs whose overrides are the same but for the seed."""

    settings: dict[str, str]
    jobs: list[Job]

    def summary(self, metric: str) -> Optional[str]:
        values = [v for j in self.jobs if (v := j.value(metric)) is not None]
        if not values:
            return None
        mean, std, _ = mean_std_interval(values)
        return f"{mean:.4f} ± {std:.4f} (n={len(values)})"


def seed_groups(sweep: Sweep) -> list[SeedGroup]:
    """Groups of 2+ completed jobs that differ only in a seed key; empty when the sweep varies no seed."""
    if not any(key in sweep.swept for key in SEED_KEYS):
        return []
    groups: dict[tuple, SeedGroup] = {}
    for job in sweep.jobs:
        if job.status != "completed":
            continue
        settings = {k: v for k, v in job.overrides.items() if k not in SEED_KEYS}
        groups.setdefault(tuple(sorted(settings.items())), SeedGroup(settings, [])).jobs.append(job)
    return [g for g in groups.values() if len(g.jobs) > 1]


def group_label(group: SeedGroup, swept: list[str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in group.settings.items() if k in swept) or "defaults"


def shown_metrics(sweep: Sweep, limit: int) -> list[str]:
    _, metrics = columns(sweep)
    first = [m for m in (sweep.metric, "test/acc", "test/balanced_acc", "test/macro_f1", "test/ece") if m in metrics]
    rest = [m for m in metrics if m.split("/")[0] in ("val", "test", "adv") and m not in first and not m.endswith("_std")]
    return (first + rest)[:limit] or metrics[:limit]


def vs_best(sweep: Sweep, verdicts: dict[str, Verdict], job: Job) -> str:
    if sweep.best is not None and job.name == sweep.best.name:
        return "best"
    return verdicts[job.name].text if job.name in verdicts else ""
