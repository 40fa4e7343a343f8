"""Who may use transferlab-serve: API keys (Bearer), a per-address rate limit, and the checks made before binding.

Keys come from `api_key` (or the TRANSFERLAB_API_KEY environment variable) and `api_keys_file` (one per line,
`#` comments), are compared in constant time against every key, and are never logged: the job's log and the
files under <run>/.hydra/ mask them (core.redaction). /health, the page, /docs and /openapi.json stay open, so a
load balancer and a person can find out what the server is without a key.
"""

from __future__ import annotations

import hmac
import ipaddress
import time
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Optional

from transferlab.core.errors import ConfigError

MIN_KEY_LENGTH = 16
MAKE_ONE = "make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"


def read_keys(api_key: Optional[str], api_keys_file: Optional[str]) -> tuple[str, ...]:
    """Every accepted key; none means the server is open. A short key or an unreadable file is a config error."""
    labelled = [("api_key (or TRANSFERLAB_API_KEY)", api_key)] if api_key else []
    if api_keys_file:
        path = Path(api_keys_file).expanduser()
        if not path.is_file():
            raise ConfigError(f"api_keys_file: {path} is not a file; give a file with one key per line")
        lines = enumerate(path.read_text().splitlines(), start=1)
        from_file = [(f"api_keys_file line {n}", line.strip()) for n, line in lines if line.strip() and not line.lstrip().startswith("#")]
        if not from_file:
            raise ConfigError(f"api_keys_file: {path} holds no key; write one key per line ({MAKE_ONE})")
        labelled += from_file
    for where, key in labelled:
        if len(key) < MIN_KEY_LENGTH:
            raise ConfigError(f"{where}: a key needs at least {MIN_KEY_LENGTH} characters; {MAKE_ONE}")
    return tuple(key for _, key in labelled)


class Keys:
    """`allows(presented)`: constant time in the key presented, whichever key (if any) it matches."""

    def __init__(self, keys: tuple[str, ...]) -> None:
        self.keys = [key.encode() for key in keys]

    def __bool__(self) -> bool:
        return bool(self.keys)

    def allows(self, presented: Optional[str]) -> bool:
        given = (presented or "").encode()
        matched = False
        for key in self.keys:
            matched |= hmac.compare_digest(given, key)
        return matched


class RateLimit:
    """A token bucket per client address: `per_minute` requests, refilled continuously, bursts up to `per_minute`.

    At most `max_clients` addresses are remembered (the least recently seen is forgotten), so a flood of source
    addresses cannot grow it without bound."""

    def __init__(self, per_minute: float, max_clients: int = 10_000, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute, self.max_clients, self.clock = per_minute, max_clients, clock
        self.buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def wait(self, address: str) -> float:
        """0 when a request from `address` may go now (and counts it), else the seconds until one may."""
        now = self.clock()
        tokens, then = self.buckets.pop(address, (self.per_minute, now))
        tokens = min(self.per_minute, tokens + (now - then) * self.per_minute / 60)
        allowed = tokens >= 1
        self.buckets[address] = (tokens - 1 if allowed else tokens, now)
        while len(self.buckets) > self.max_clients:
            self.buckets.popitem(last=False)
        return 0.0 if allowed else (1 - tokens) * 60 / self.per_minute


def is_loopback(host: str) -> bool:
    """True for addresses only this machine reaches (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to a public address


def exposure_warning(host: str, keyed: bool, tls: bool) -> Optional[str]:
    """The loud warning for a server other machines can reach without a key, or with a key sent in clear text."""
    if is_loopback(host):
        return None
    if not keyed:
        return (
            f"host={host}: EVERY MACHINE THAT REACHES THIS ADDRESS CAN USE THE MODEL. No API key is set: set api_key "
            "(or TRANSFERLAB_API_KEY) or api_keys_file, and ssl_certfile/ssl_keyfile or a TLS proxy in front"
        )
    if not tls:
        return f"host={host}: API keys travel in clear text without TLS; set ssl_certfile/ssl_keyfile or put a TLS proxy in front"
    return None


def check_tls(certfile: Optional[str], keyfile: Optional[str]) -> bool:
    """Whether TLS is on; both files are needed and must exist (a config error names the one missing)."""
    if not certfile and not keyfile:
        return False
    for key, value in (("ssl_certfile", certfile), ("ssl_keyfile", keyfile)):
        if not value:
            raise ConfigError(f"{key}: missing; HTTPS needs both ssl_certfile and ssl_keyfile (PEM files)")
        if not Path(value).expanduser().is_file():
            raise ConfigError(f"{key}: {value} is not a file; give the PEM file")
    return True
