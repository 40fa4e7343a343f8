"""Logger set-up: a CSV logger that survives resuming, and W&B that goes offline by itself without a key."""

from __future__ import annotations

import csv
import netrc
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from transferlab.redaction import redact


class _AppendingWriter(ExperimentWriter):
    """Lightning's writer deletes an existing metrics.csv; a resumed run must continue it instead."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as fh:
                self.metrics_keys = sorted(next(csv.reader(fh), []))


class ResumableCSVLogger(CSVLogger):
    """CSVLogger whose metrics.csv keeps the rows of earlier (interrupted) runs in the same folder."""

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def wandb_has_credentials() -> bool:
    """An API key in the environment or in ~/.netrc (where `wandb login` puts it)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def sweep_identity() -> tuple[str, str] | None:
    """(group, run name) of this job when it is part of a multirun: the sweep folder, the job's overrides."""
    from hydra.core.hydra_config import HydraConfig

    from transferlab.sweep import in_sweep

    if not in_sweep():
        return None
    hydra_cfg = HydraConfig.get()
    sweep_dir = Path(hydra_cfg.sweep.dir)
    group = f"{sweep_dir.parent.name}/{sweep_dir.name}" if sweep_dir.parent.name not in ("", ".") else sweep_dir.name
    return group, f"{hydra_cfg.job.num}: {hydra_cfg.job.override_dirname or 'defaults'}"[:120]


def resolve_logger_config(logger_cfg: DictConfig | None, run_name: str) -> None:
    """Fill `offline: auto`, an empty W&B run name and, in a sweep, an empty group (one per sweep) in place."""
    for node in (logger_cfg or {}).values():
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
