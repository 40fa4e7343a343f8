"""Keep credentials out of everything a run leaves behind: configs, logs, checkpoints, logger metadata.

A secret is the value of `WANDB_API_KEY` or of any environment variable whose name ends in `_KEY`, `_TOKEN`,
`_SECRET` or `_PASSWORD`, and the value of any config key with such a name (`api_key=...` typed on the command line).
Configs may use them (`${oc.env:HF_TOKEN}` in a download URL); what is written to disk or sent to a logger has
every such value replaced by `***`. Redaction is by value, so a secret is caught wherever it is repeated.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

SECRET_SUFFIXES = ("_KEY", "_TOKEN", "_SECRET", "_PASSWORD")
MASK = "***"
MIN_LENGTH = 6  # shorter values ("1", "true") would mask ordinary text


def is_secret_name(name: str) -> bool:
    return name.upper() == "WANDB_API_KEY" or name.upper().endswith(SECRET_SUFFIXES)


def secret_values(extra: Iterable[str] = ()) -> list[str]:
    """The environment's secrets and `extra` ones, longest first, so a secret that contains another is masked whole."""
    values = {v for k, v in os.environ.items() if is_secret_name(k)} | set(extra)
    return sorted((v for v in values if len(v) >= MIN_LENGTH), key=len, reverse=True)


def config_secrets(config: Any) -> tuple[str, ...]:
    """String values of secret-named keys (`api_key`, `hf_token`, ...) anywhere in a plain, unresolved config
    container; an interpolation (`${oc.env:TRANSFERLAB_API_KEY}`) is not a secret, the variable it reads is one."""
    found: list[str] = []
    if isinstance(config, Mapping):
        for key, value in config.items():
            if isinstance(value, str) and is_secret_name(str(key)) and not value.startswith("${"):
                found.append(value)
            else:
                found.extend(config_secrets(value))
    elif isinstance(config, (list, tuple)):
        for value in config:
            found.extend(config_secrets(value))
    return tuple(found)


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

    def __init__(self, extra: Iterable[str] = ()) -> None:
        super().__init__()
        self.extra = tuple(extra)

    def filter(self, record: logging.LogRecord) -> bool:
        secrets = secret_values(self.extra)
        if secrets:
            message = record.getMessage()
            masked = redact(message, secrets)
            if masked != message:
                record.msg, record.args = masked, None
        return True


def install_log_redaction(extra: Iterable[str] = ()) -> None:
    """On every handler of the root logger (where Hydra puts its console and file handlers); `extra`: this job's
    secrets from its config, replacing an earlier job's."""
    for handler in logging.getLogger().handlers:
        for old in [f for f in handler.filters if isinstance(f, RedactingFilter)]:
            handler.removeFilter(old)
        handler.addFilter(RedactingFilter(extra))


def scrub_files(folder: Path, pattern: str = "*.yaml", extra: Iterable[str] = ()) -> None:
    """Rewrite files that contain a secret (Hydra's .hydra/overrides.yaml keeps the command line as typed)."""
    secrets = secret_values(extra)
    if not secrets or not folder.is_dir():
        return
    for file in folder.glob(pattern):
        text = file.read_text(errors="replace")
        masked = redact(text, secrets)
        if masked != text:
            file.write_text(masked)
