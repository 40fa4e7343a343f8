"""Keep credentials out of everything a run leaves behind: configs, logs, checkpoints, logger metadata.

A secret is the value of `WANDB_API_KEY` or of any environment variable whose name ends in `_KEY`, `_TOKEN`,
`_SECRET` or `_PASSWORD`. Configs may use them (`${oc.env:HF_TOKEN}` in a download URL); what is written to disk
or sent to a logger has every such value replaced by `***`. Redaction is by value, so a secret typed literally
on the command line is caught as well, as long as it is also in the environment.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

SECRET_SUFFIXES = ("_KEY", "_TOKEN", "_SECRET", "_PASSWORD")
MASK = "***"
MIN_LENGTH = 6  # shorter values ("1", "true") would mask ordinary text


def is_secret_name(name: str) -> bool:
    return name.upper() == "WANDB_API_KEY" or name.upper().endswith(SECRET_SUFFIXES)


def secret_values() -> list[str]:
    """Longest first, so a secret that contains another is masked whole."""
    values = {v for k, v in os.environ.items() if is_secret_name(k) and len(v) >= MIN_LENGTH}
    return sorted(values, key=len, reverse=True)


def redact(value: Any, secrets: list[str] | None = None) -> Any:
    """The same structure (dicts, lists, tuples, strings) with every secret value masked."""
    secrets = secret_values() if secrets is None else secrets
    if not secrets:
        return value
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, MASK)
        return value
    if isinstance(value, dict):
        return {redact(k, secrets): redact(v, secrets) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v, secrets) for v in value)
    return value


class RedactingFilter(logging.Filter):
    """Masks secrets in every record passing through a handler (console, Hydra's <run>/<task>.log)."""

    def filter(self, record: logging.LogRecord) -> bool:
        secrets = secret_values()
        if secrets:
            message = record.getMessage()
            masked = redact(message, secrets)
            if masked != message:
                record.msg, record.args = masked, None
        return True


def install_log_redaction() -> None:
    """On every handler of the root logger (where Hydra puts its console and file handlers)."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())


def scrub_files(folder: Path, pattern: str = "*.yaml") -> None:
    """Rewrite files that contain a secret (Hydra's .hydra/overrides.yaml keeps the command line as typed)."""
    secrets = secret_values()
    if not secrets or not folder.is_dir():
        return
    for file in folder.glob(pattern):
        text = file.read_text(errors="replace")
        masked = redact(text, secrets)
        if masked != text:
            file.write_text(masked)
