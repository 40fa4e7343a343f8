"""A sweep as data: every job folder's overrides, outcome (job.json) and metrics, ranked by the optimised metric.

Job folders are found by Hydra's `.hydra/overrides.yaml` or our job.json (any `hydra.sweep.subdir` layout).
A `val/*` metric is ranked only when it means the same thing in every completed job (`selection/protocol` in
metrics.json: the probe's inner cross-validation, the validation split, a cross-validation mean of either): a
`finetune=frozen,full` grid measures the probe's out-of-fold accuracy over train + val and the fine-tuned model's
validation-split accuracy, so the report lists its jobs unranked and says why.
"""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from transferlab.core.errors import DataError
from transferlab.data.labels import task_metric
from transferlab.sweeps.records import read_job_record

PER_CLASS = re.compile(r"/(acc_class|precision|recall)/")  # one column per class: in the job's own metrics.json only
_SKIP_DIRS = {"checkpoints", "csv", "tensorboard", "wandb", ".submitit", "feature_maps", "ideal_class", "adversarial"}


@dataclass
class Job:
    name: str
    path: Path
    status: str
    overrides: dict[str, str]
    metrics: dict[str, Any]
    error: Optional[str] = None
    duration_s: Optional[float] = None
    protocol: Optional[str] = None  # what its val/* were measured on (selection/protocol)

    def value(self, metric: str) -> Optional[float]:
        number = self.metrics.get(metric)
        return float(number) if isinstance(number, (int, float)) and math.isfinite(number) else None


@dataclass
class Sweep:
    path: Path
    jobs: list[Job]
    metric: str
    direction: str  # maximize | minimize
    swept: list[str] = field(default_factory=list)  # override keys whose value differs between jobs
    log_scale: Optional[set[str]] = None  # parameters the Optuna space samples on a log scale (None: not an Optuna sweep)
    unranked: Optional[str] = None  # why the jobs are not ranked (their metric means different things), or None

    @property
    def best(self) -> Optional[Job]:
        if self.unranked:
            return None
        ranked = [j for j in self.jobs if j.status == "completed" and j.value(self.metric) is not None]
        return ranked[0] if ranked else None

    def count(self, status: str) -> int:
        return sum(1 for j in self.jobs if j.status == status)


def _yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


def _job_dirs(sweep_dir: Path) -> list[Path]:
    """Folders holding a job: Hydra's `.hydra/overrides.yaml` or our job.json (any sweep.subdir layout)."""
    found, stack = [], [sweep_dir]
    while stack:
        folder = stack.pop()
        for child in sorted(folder.iterdir()):
            if not child.is_dir() or child.name.startswith(".") or child.name in _SKIP_DIRS:
                continue
            if (child / ".hydra" / "overrides.yaml").is_file() or (child / "job.json").is_file():
                found.append(child)
            elif len(child.relative_to(sweep_dir).parts) < 4:
                stack.append(child)
    return found


def read_job(job_dir: Path, sweep_dir: Path) -> Job:
    record = read_job_record(job_dir)
    raw = _yaml(job_dir / ".hydra" / "overrides.yaml") or record.get("overrides") or []
    overrides = dict(str(o).lstrip("+~").split("=", 1) for o in raw if "=" in str(o))
    try:
        metrics = json.loads((job_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        metrics = {}
    metrics = {k: v for k, v in metrics.items() if not PER_CLASS.search(k) and k != "best_checkpoint"}
    status = record.get("status") or ("completed" if metrics else "incomplete")
    if not metrics:
        metrics = _curve_metrics(job_dir)
    if status == "running":
        status = "incomplete"  # still running, or its process was killed
    protocol = metrics.get("selection/protocol") or inferred_protocol(_yaml(job_dir / ".hydra" / "config.yaml") or {})
    name = job_dir.relative_to(sweep_dir).as_posix()
    return Job(name, job_dir, status, overrides, metrics, record.get("error"), record.get("duration_s"), str(protocol))


def inferred_protocol(config: dict[str, Any]) -> str:
    """selection/protocol of a job from before the key existed, from its saved config (training.fit's rule)."""
    finetune, cv = config.get("finetune") or {}, config.get("cv") or {}
    inner = "probe_inner_cv" if finetune.get("head_solver") == "lbfgs" and finetune.get("select_c", "cv") == "cv" else "validation_split"
    return f"cv{cv['folds']}_mean_of_{inner}" if cv.get("folds") else inner


def unranked_reason(jobs: list[Job], metric: str) -> Optional[str]:
    """Why `metric` cannot rank these jobs, or None: a val/* metric measured under different protocols."""
    if not metric.startswith("val/"):
        return None
    groups: dict[str, list[str]] = {}
    for job in jobs:
        if job.status == "completed" and job.value(metric) is not None:
            groups.setdefault(job.protocol or "unknown", []).append(job.name)
    if len(groups) < 2:
        return None
    shown = "; ".join(f"{protocol} in job(s) {', '.join(names[:6])}" for protocol, names in sorted(groups.items()))
    return (
        f"Not ranked: {metric} is measured differently across these jobs ({shown}); e.g. the probe's inner cross-validation "
        f"over train + val is not a validation-split accuracy. Compare them on the same test images (transferlab-report <sweep> --metric test/acc), "
        "or sweep one protocol at a time (finetune.select_c=val puts the probe on the validation split)."
    )


def _sweep_settings(jobs: list[Job]) -> tuple[str, str, Optional[set[str]]]:
    """(optimised metric, direction, log-scale parameters) from the jobs' saved Hydra configs."""
    for job in jobs:
        config, hydra = _yaml(job.path / ".hydra" / "config.yaml") or {}, _yaml(job.path / ".hydra" / "hydra.yaml") or {}
        multilabel = ((config.get("data") or {}).get("task")) == "multilabel"
        metric = task_metric(config.get("optimized_metric"), multilabel)  # a multi-label sweep optimises val/map
        if metric:
            sweeper = (hydra.get("hydra") or {}).get("sweeper") or {}
            direction = sweeper.get("direction")
            direction = direction[0] if isinstance(direction, list) else direction
            guess = "minimize" if any(w in metric for w in ("loss", "err")) else "maximize"
            params = sweeper.get("params")
            log_scale = {k for k, v in params.items() if "log" in str(v)} if isinstance(params, dict) else None
            return metric, str(direction or guess), log_scale
    return "val/acc_best", "maximize", None


def _curve_metrics(job_dir: Path) -> dict[str, Any]:
    """val/acc of a job that ended before metrics.json (pruned, killed), from its csv/metrics.csv."""
    try:
        with open(job_dir / "csv" / "metrics.csv", newline="") as fh:
            values = [float(r["val/acc"]) for r in csv.DictReader(fh) if r.get("val/acc")]
    except (OSError, KeyError, ValueError):
        return {}
    return {"val/acc": values[-1], "val/acc_best": max(values), "epochs": len(values)} if values else {}


def _sort_key(job: Job, metric: str, direction: str) -> tuple:
    order = {"completed": 0, "pruned": 1, "incomplete": 2, "interrupted": 3, "failed": 4}
    value = job.value(metric)
    score = (value if direction == "minimize" else -value) if value is not None else math.inf
    return order.get(job.status, 5), score, natural(job.name)


def natural(name: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in name.replace("/", " ").split())


def collect(sweep_dir: str | Path, metric: Optional[str] = None, direction: Optional[str] = None) -> Sweep:
    path = Path(sweep_dir)
    if not path.is_dir():
        raise DataError(f"{path} is not a folder; give the sweep folder (hydra.sweep.dir) of a multirun")
    jobs = [read_job(d, path) for d in _job_dirs(path)]
    if not jobs:
        raise DataError(f"{path} holds no job folders (.hydra/overrides.yaml); is it a multirun's sweep dir?")
    found_metric, found_direction, log_scale = _sweep_settings(jobs)
    metric, direction = metric or found_metric, direction or found_direction
    unranked = unranked_reason(jobs, metric)
    jobs.sort(key=lambda j: _sort_key(j, metric, direction) if not unranked else ({"completed": 0}.get(j.status, 1), natural(j.name)))
    keys = list(dict.fromkeys(k for j in jobs for k in j.overrides))
    swept = [k for k in keys if len({j.overrides.get(k) for j in jobs}) > 1]
    return Sweep(path, jobs, metric, direction, swept, log_scale, unranked)


def columns(sweep: Sweep) -> tuple[list[str], list[str]]:
    keys = list(dict.fromkeys(k for j in sweep.jobs for k in j.overrides))
    names = list(dict.fromkeys(k for j in sweep.jobs for k, v in j.metrics.items() if not isinstance(v, list)))  # intervals go with their metric
    first = [sweep.metric] if sweep.metric in names else []
    rank = {"val": 0, "test": 1, "adv": 2}
    metrics = first + sorted((n for n in names if n != sweep.metric), key=lambda n: (rank.get(n.split("/")[0], 3), n))
    return keys, metrics


def cell(value: Any) -> str:
    """Short text for tables: numbers (also numeric override strings) to 4 significant digits."""
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value
        return f"{number:.4g}" if "." in value or "e" in value.lower() else value
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def with_interval(job: Job, metric: str) -> str:
    """`0.9189 [0.8514, 0.973]`: the value and its 95 % interval where the run computed one; a cross-validation's
    fold means as `0.919 ± 0.043` (std over the folds)."""
    interval, spread = job.metrics.get(f"{metric}_ci95"), job.metrics.get(f"{metric}_std")
    text = cell(job.metrics.get(metric))
    if text and isinstance(interval, list) and len(interval) == 2:
        text += f" [{cell(float(interval[0]))}, {cell(float(interval[1]))}]"
    elif text and isinstance(spread, (int, float)):
        text += f" ± {cell(float(spread))}"
    return text


def headline(sweep: Sweep) -> str:
    counts = ", ".join(f"{sweep.count(s)} {s}" for s in ("completed", "pruned", "failed", "incomplete", "interrupted") if sweep.count(s))
    best = sweep.best
    text = f"{len(sweep.jobs)} jobs: {counts}."
    if sweep.unranked:
        text += " " + sweep.unranked
    if best:
        text += f" Best ({sweep.direction} {sweep.metric}): job {best.name}, {sweep.metric} = {best.value(sweep.metric):.4g}"
        text += f" ({', '.join(f'{k}={cell(best.overrides[k])}' for k in sweep.swept if k in best.overrides) or 'defaults'})."
    return text
