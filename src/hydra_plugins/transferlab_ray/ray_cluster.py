"""Joining (or starting) the Ray cluster of a sweep and what each job asks it for; bad settings as one line.

`hydra.launcher.address`: null starts a local cluster for the sweep (it ends with the command), `auto` joins the
cluster this machine is part of, `host:port` a running head (`ray start --head` prints it), `ray://host:port`
through Ray Client. An address nobody answers at is the user's input: ConfigError (exit 2), before Ray's own
retries (a minute or more of them); a Ray that refuses to talk to this one (another version) is the machine's.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import socket
from typing import Any

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0


def number(settings: dict[str, Any], key: str) -> float:
    """A resource setting as a number >= 0 (null = 0)."""
    from transferlab.core.errors import ConfigError

    value = settings.get(key)
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ConfigError(f"hydra.launcher.{key}: expected a number >= 0, got {value!r}")
    return float(value)


def check_reachable(address: str) -> None:
    """Fail at once, with what to do, when nothing listens at host:port (Ray itself would retry for minutes)."""
    from transferlab.core.errors import ConfigError

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"hydra.launcher.address={address}: expected host:port of a Ray head (e.g. 10.0.0.5:6379), auto, or null (a local cluster)")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise ConfigError(
            f"hydra.launcher.address={address}: no Ray cluster answers at {host}:{port} ({exc.strerror or exc}); start one there with "
            f"`ray start --head --port={port}`, or set hydra.launcher.address=null to start a local one for this sweep"
        ) from None


def connect(settings: dict[str, Any]) -> str:
    """ray.init for the sweep (once: later batches reuse the connection); returns where the jobs run, for the log."""
    import ray

    address = settings.get("address")
    if ray.is_initialized():
        return str(address or "the local Ray cluster")
    if address in (None, "", "local"):
        ray.init(include_dashboard=False, log_to_driver=True)
        check_fits(settings, local=True)
        return "a local Ray cluster started for this sweep"
    address = str(address)
    if address != "auto":
        check_reachable(address)
    try:
        ray.init(address=address, log_to_driver=True)
    except (ConnectionError, RuntimeError, ray.exceptions.RayError) as exc:
        raise connect_error(address, exc) from None
    check_fits(settings, local=False)
    return address


def connect_error(address: str, exc: Exception) -> Exception:
    """Why ray.init could not join the cluster, as one line: nobody there or no token (the input, exit 2), or a Ray
    that will not talk to this one, e.g. another version (the machine, exit 1)."""
    from transferlab.core.errors import ConfigError, ResourceError, one_line

    reason = one_line(exc).rstrip(".")
    if type(exc).__name__ == "AuthenticationError":  # token authentication on (newer Ray), no token here
        return ConfigError(f"hydra.launcher.address={address}: {reason}")
    if isinstance(exc, ConnectionError):
        hint = (
            "or set hydra.launcher.address=null for a local cluster"
            if address == "auto"
            else "a cluster with token authentication also needs its token here (RAY_AUTH_TOKEN=<`ray get-auth-token` on the head>)"
        )
        return ConfigError(f"hydra.launcher.address={address}: {reason}; {hint}")
    if isinstance(exc, RuntimeError):  # "Version mismatch: the cluster was started with Ray 2.x, Python 3.y ..."
        return ResourceError(f"hydra.launcher.address={address}: {reason}")
    return exc


def check_fits(settings: dict[str, Any], local: bool) -> None:
    """A job that no node can hold would wait forever: an error for the local cluster, a warning for a running one
    (an autoscaler may add such a node when the jobs ask for it)."""
    import ray

    from transferlab.core.errors import ConfigError

    need = {"CPU": number(settings, "num_cpus"), "GPU": number(settings, "num_gpus"), "memory": number(settings, "memory_gb") * 2**30}
    nodes = [node.get("Resources", {}) for node in ray.nodes() if node.get("Alive")]
    if any(all(res.get(k, 0) >= v for k, v in need.items() if v) for res in nodes):
        return
    largest: dict[str, float] = max(nodes, key=lambda res: (res.get("GPU", 0), res.get("CPU", 0)), default={})
    message = (
        f"hydra.launcher.num_cpus={need['CPU']:g} num_gpus={need['GPU']:g} memory_gb={need['memory'] / 2**30:g}: no node of the Ray "
        f"cluster has that much (the largest: {largest.get('CPU', 0):g} CPUs, {largest.get('GPU', 0):g} GPUs, {largest.get('memory', 0) / 2**30:.1f} GB)"
    )
    if local:
        raise ConfigError(message + "; lower them")
    log.warning("%s; the jobs wait until the cluster gets such a node", message)


def job_environment(settings: dict[str, Any]) -> dict[str, str]:
    """The variables each job gets: those of the sweep command named by `forward_env` (patterns match non-secret
    names only; a secret is forwarded when listed by its exact name), then `env_vars`."""
    from transferlab.core.redaction import is_secret_name

    patterns = [str(p) for p in settings.get("forward_env") or []]
    env = {
        name: value
        for name, value in os.environ.items()
        if name in patterns or (not is_secret_name(name) and any(fnmatch.fnmatchcase(name, p) for p in patterns))
    }
    env.update({str(k): str(v) for k, v in (settings.get("env_vars") or {}).items() if v is not None})
    return env


def task_options(settings: dict[str, Any]) -> dict[str, Any]:
    """Ray's options for every job: its resources, its environment, one fresh worker process, no retries (a job
    whose worker died is recorded as failed; re-running it is the user's call: `ckpt_path=last`)."""
    runtime_env = dict(settings.get("runtime_env") or {})
    runtime_env["env_vars"] = {**job_environment(settings), **(runtime_env.get("env_vars") or {})}
    options: dict[str, Any] = {
        "num_cpus": number(settings, "num_cpus"),
        "num_gpus": number(settings, "num_gpus"),
        "max_calls": 1,
        "max_retries": 0,
        "retry_exceptions": False,
        "runtime_env": runtime_env,
        "name": "transferlab-job",
    }
    if number(settings, "memory_gb"):
        options["memory"] = int(number(settings, "memory_gb") * 2**30)
    return options
