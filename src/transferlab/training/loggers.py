"""Logger set-up: a CSV logger that survives resuming, W&B that goes offline by itself without a key, and MLflow
runs named and grouped per sweep, with the run's files as artefacts.

Multi-label metric names carry label names (`test/ap/<label>`); MLflow refuses characters beyond letters, digits,
`_ - . /` and spaces, and names with empty or dot segments, and Lightning's MLFlowLogger deletes the refused ones,
so `猫` and `犬` both became `test/ap/` and failed the run. `logger=mlflow` gets MLFlowLogger below (resolve_mlflow),
which names every metric and parameter by `mlflow_keys`; CSV, TensorBoard and W&B take any name unchanged."""

from __future__ import annotations

import csv
import hashlib
import netrc
import os
import re
import unicodedata
from argparse import Namespace
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import yaml
from lightning.pytorch.loggers import Logger
from lightning.pytorch.loggers import MLFlowLogger as LightningMLFlowLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from transferlab.core.context import is_global_zero, sweep_identity
from transferlab.core.errors import require_packages
from transferlab.core.redaction import redact


class ResumableCSVLogger(Logger):
    """<save_dir>/<name>/metrics.csv (one row per logging step, Lightning's CSV layout) and hparams.yaml.

    Lightning's CSVLogger deletes an existing metrics.csv when a run starts in the same folder (since 2.2.1,
    Lightning-AI/pytorch-lightning PR #19446); a resumed run must continue it. This one is built on Lightning's
    public Logger interface, so no Lightning internal is patched: rows of earlier (interrupted) runs in the same
    folder are kept, and a new column rewrites the file with the wider header.
    """

    flush_every_n_steps = 50  # rows kept in memory before they are appended to metrics.csv (and at the end of the run)

    def __init__(self, *, save_dir: str, name: str, version: str) -> None:
        """Values: conf/logger/csv.yaml."""
        super().__init__()
        self._save_dir, self._name, self._version = str(save_dir), name, version
        self._rows: list[dict[str, Any]] = []
        self._hparams: dict[str, Any] = {}

    @property
    def name(self) -> str:
        return self._name

    @property
    def version(self) -> str:
        return self._version

    @property
    def save_dir(self) -> str:
        return self._save_dir

    @property
    def log_dir(self) -> str:
        return str(Path(self._save_dir, self._name, self._version))

    @property
    def metrics_file(self) -> Path:
        return Path(self.log_dir) / "metrics.csv"

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        values = vars(params) if isinstance(params, Namespace) else dict(params or {})
        self._hparams.update({str(k): v if isinstance(v, (int, float, str, bool, type(None), list, dict)) else str(v) for k, v in values.items()})
        Path(self.log_dir).mkdir(parents=True, exist_ok=True)
        (Path(self.log_dir) / "hparams.yaml").write_text(yaml.safe_dump(redact(self._hparams), sort_keys=True))

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
        row = {k: (v.item() if hasattr(v, "item") else v) for k, v in metrics.items()}
        self._rows.append({**row, "step": step if step is not None else len(self._rows)})
        if len(self._rows) >= self.flush_every_n_steps:
            self.save()

    @rank_zero_only
    def save(self) -> None:
        if not self._rows:
            return
        earlier: list[dict[str, Any]] = []
        header: list[str] = []
        if self.metrics_file.is_file():
            with open(self.metrics_file, newline="") as fh:
                reader = csv.DictReader(fh)
                header = list(reader.fieldnames or [])
                earlier = list(reader) if not set().union(*self._rows) <= set(header) else []
        keys = sorted(set(header).union(*self._rows))
        self.metrics_file.parent.mkdir(parents=True, exist_ok=True)
        rewrite = keys != header
        with open(self.metrics_file, "w" if rewrite else "a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=keys)
            if rewrite:
                writer.writeheader()
                writer.writerows(earlier)
            writer.writerows(self._rows)
        self._rows = []

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self.save()

    @rank_zero_only
    def log_final(self, values: dict[str, Any]) -> None:
        """The run's final figures (every key of metrics.json) as <log_dir>/final_metrics.csv, one `key,value` row each:
        metrics.csv keeps one row per logging step, so its epoch curves stay what they were."""
        Path(self.log_dir).mkdir(parents=True, exist_ok=True)
        with open(Path(self.log_dir) / "final_metrics.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["key", "value"])
            writer.writerows(sorted(values.items()))


def wandb_has_credentials() -> bool:
    """An API key in the environment or in ~/.netrc (where `wandb login` puts it)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


REFUSED = re.compile(r"[^A-Za-z0-9_/. -]")  # what MLflow takes on every system and Lightning's MLFlowLogger keeps
MAX_KEY = 250  # MLflow's longest metric / parameter name


def _valid(key: str) -> bool:
    return not REFUSED.search(key) and all(s not in ("", ".", "..") for s in key.split("/")) and 0 < len(key) <= MAX_KEY


def hashed_key(key: str) -> str:
    """A valid name that differs between different keys: refused characters as `_`, empty / dot segments as `_`,
    a 6-digit hash of the original appended."""
    folded = "".join(c for c in unicodedata.normalize("NFKD", key) if not unicodedata.combining(c))
    safe = "/".join("_" if p in ("", ".", "..") else p for p in (REFUSED.sub("_", part) for part in folded.split("/")))
    return f"{safe[: MAX_KEY - 7]}-{hashlib.sha1(key.encode()).hexdigest()[:6]}"


def mlflow_key(key: str) -> str:
    """`key` as an MLflow metric / parameter name, the same for the same key in every run: unchanged when MLflow
    takes it; else, as Lightning's logger has always named it, without the refused ASCII characters
    (`adv/fgsm_acc@eps=4/255` -> `adv/fgsm_acceps4/255`) and with accents dropped (`café` -> `cafe`); where that
    loses a whole character of another script, or leaves an empty or dot segment, `hashed_key`."""
    if _valid(key):
        return key
    folded = "".join(c for c in unicodedata.normalize("NFKD", key) if not unicodedata.combining(c))
    stripped = REFUSED.sub("", folded)
    return stripped if folded.isascii() and _valid(stripped) else hashed_key(key)


def mlflow_keys(keys: list[str]) -> dict[str, str]:
    """{key: its MLflow name} for the keys logged together; two keys that would share a name get hashed ones."""
    found = {key: mlflow_key(key) for key in keys}
    shared = {name for name in found.values() if list(found.values()).count(name) > 1}
    return {key: hashed_key(key) if name in shared and name != key else name for key, name in found.items()}


class MLFlowLogger(LightningMLFlowLogger):
    """Lightning's MLFlowLogger with every metric and parameter name made valid by `mlflow_keys` (label names)."""

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: Optional[int] = None) -> None:
        names = mlflow_keys([str(k) for k in metrics])
        super().log_metrics({names[str(k)]: v for k, v in metrics.items()}, step=step)

    @rank_zero_only
    def log_hyperparams(self, params: Any) -> None:
        values = flat_hparams(vars(params) if isinstance(params, Namespace) else dict(params or {}))
        names = mlflow_keys(list(values))
        super().log_hyperparams({names[k]: v for k, v in values.items()})


MLFLOW_TARGETS = ("lightning.pytorch.loggers.MLFlowLogger", "lightning.pytorch.loggers.mlflow.MLFlowLogger")


def resolve_mlflow(node: DictConfig, run_name: str, task_name: str, tags: list[str]) -> None:
    """experiment `auto` (one per sweep), run name, transferlab's tags, Lightning's logger swapped for MLFlowLogger
    above (valid names for label metrics); mlflow itself must be installed."""
    require_packages("logger=mlflow", "mlflow", "mlflow")
    sweep = sweep_identity()
    with open_dict(node):
        if node.get("_target_") in MLFLOW_TARGETS:
            node["_target_"] = f"{__name__}.MLFlowLogger"
        if node.get("experiment_name") in (None, "auto"):
            node.experiment_name = f"{task_name}/{sweep[0]}" if sweep else task_name
        if not node.get("run_name"):
            node.run_name = sweep[1] if sweep else run_name
        if node.get("tags") is None:
            found = {"transferlab.task": task_name, "transferlab.tags": ",".join(map(str, tags))}
            if sweep:
                found.update({"transferlab.sweep": sweep[0], "transferlab.job": sweep[1]})
            node.tags = redact(found)
        node.run_name, node.experiment_name = redact(node.run_name), redact(node.experiment_name)
        uri, location = str(node.get("tracking_uri") or ""), node.get("artifact_location")
        if uri.startswith("sqlite:///"):  # a local store: its folder must exist, its artefacts need an absolute place
            Path(uri.removeprefix("sqlite:///")).expanduser().parent.mkdir(parents=True, exist_ok=True)
        if location and "://" not in str(location):
            node.artifact_location = Path(str(location)).expanduser().resolve().as_uri()


def resolve_logger_config(logger_cfg: DictConfig | None, run_name: str, task_name: str = "train", tags: Optional[list[str]] = None) -> None:
    """Fill `offline: auto`, an empty W&B run name and, in a sweep, an empty group (one per sweep) in place; the
    same for MLflow (experiment per sweep, run name, tags)."""
    for node in (logger_cfg or {}).values():
        if isinstance(node, DictConfig) and str(node.get("_target_", "")).endswith("MLFlowLogger"):
            resolve_mlflow(node, run_name, task_name, list(tags or []))
        if isinstance(node, DictConfig) and str(node.get("_target_", "")).endswith("WandbLogger"):
            sweep = sweep_identity()
            with open_dict(node):
                if node.get("offline") == "auto":
                    node.offline = os.environ.get("WANDB_MODE") == "offline" or not wandb_has_credentials()
                if not node.get("name"):
                    node.name = sweep[1] if sweep else run_name
                if sweep and not node.get("group"):
                    node.group = sweep[0]
                for key in ("name", "group", "notes", "tags", "job_type"):  # shown on wandb.ai: credentials masked
                    if node.get(key) is not None:
                        node[key] = redact(OmegaConf.to_container(node[key], resolve=True) if isinstance(node[key], ListConfig) else node[key])


# What a run leaves behind that an MLflow run keeps as artefacts, when the files exist (per_label_metrics.csv to
# most_missed.csv: a multi-label run's).
RUN_FILES = tuple(
    """metrics.json config.yaml confusion_matrix.png confusion_matrix.csv per_class_accuracy.csv reliability_diagram.png
    per_label_metrics.csv precision_recall.png most_missed.png most_missed.csv test_predictions.csv report.html checkpoints/best.ckpt""".split()
)


@rank_zero_only
def log_run_files(loggers: list[Logger], out_dir: Path) -> None:
    """The run's results, and its best (calibrated) checkpoint, as artefacts of its MLflow run."""
    for lg in loggers:
        if type(lg).__name__ == "MLFlowLogger":
            client, run_id = lg.experiment, lg.run_id  # type: ignore[attr-defined]
            for name in RUN_FILES:
                file = out_dir / name
                if file.is_file():
                    client.log_artifact(run_id, str(file), artifact_path=str(Path(name).parent) if "/" in name else None)


def log_final_metrics(loggers: list[Logger], metrics: dict[str, Any], step: int) -> None:
    """Every key of metrics.json to every logger, whatever computed it (the probe's inner-fold val/*, calibration,
    intervals): numbers as metrics at `step`, an interval [low, high] as `<key>_low` / `<key>_high`, text (a
    checkpoint path, `calibration/rule`) as a parameter named `metrics.json/<key>`. Rank 0 only."""
    if not loggers or not is_global_zero():
        return
    numbers: dict[str, float] = {}
    texts: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, (bool, int, float)):
            numbers[key] = float(value)
        elif isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value):
            numbers[f"{key}_low"], numbers[f"{key}_high"] = float(value[0]), float(value[1])
        elif value is not None:
            texts[key] = value if isinstance(value, (str, int, float, bool)) else str(value)
    texts = redact(texts)
    for lg in loggers:
        if isinstance(lg, ResumableCSVLogger):
            lg.log_final({**numbers, **texts})
            continue
        lg.log_metrics(numbers, step=step)
        if texts:
            lg.log_hyperparams({f"metrics.json/{key}": value for key, value in texts.items()})
        lg.save()


def finish_loggers(loggers: list[Logger]) -> None:
    """Close W&B runs so each job of a multirun gets its own, finished run."""
    for lg in loggers:
        if type(lg).__name__ == "WandbLogger":
            import wandb

            if wandb.run is not None:
                wandb.finish()


def flat_hparams(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_hparams(value, f"{name}/"))
        else:
            out[name] = value if isinstance(value, (int, float, str, bool)) or value is None else str(value)
    return out
