"""Settings of every metarec process, and the only module that knows environment variable names.

Why one module: the consumer, the aggregator, the producer and the CLIs must agree on
names, defaults and validation, and the README's configuration table must not drift from
the code. :data:`SETTINGS` is that single table; :class:`Settings`, the argparse flags
(:func:`add_arguments`) and the docs (:func:`markdown_table`) are all derived from it.

Precedence is explicit override (a CLI flag) > ``METAREC_<NAME>`` > default. Every value is
validated at start, and a bad one raises :class:`~metarec.errors.ConfigError` with one line
naming the setting, its environment variable and flag, the bad value and what is expected.
An empty environment variable counts as unset, so that ``VAR: ${VAR:-}`` in a compose file
means "use the default".

librdkafka settings pass through: ``METAREC_KAFKA_SECURITY_PROTOCOL=SASL_SSL`` becomes
``security.protocol``; :meth:`Settings.kafka_config` merges them into a client config.
Secrets never reach logs: ``repr`` and :meth:`Settings.redacted` mask them.

>>> s = Settings.from_env({"METAREC_TOP_K": "50"}, overrides={"group_id": "g1"})
>>> s.top_k, s.group_id, s.events_topic
(50, 'g1', 'metarec.events')
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import re
import types
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from metarec.core.events import (
    DEFAULT_EVENT_WEIGHTS,
    MAX_FEATURES,
    MAX_FUTURE_SKEW_MS,
    MAX_ID_BYTES,
    MAX_RECORD_BYTES,
    MIN_EVENT_TS_MS,
    Limits,
)
from metarec.errors import ConfigError

__all__ = [
    "CLUSTER_SCHEMES",
    "DEFAULT_HISTORY_LENGTH",
    "DEFAULT_MIN_EVENTS_FOR_MODEL",
    "DEFAULT_RETRAIN_EVENTS",
    "DEFAULT_TOP_K",
    "DEFAULT_WINDOW_EVENTS",
    "ENV_PREFIX",
    "EXACT_MAX_ITEMS",
    "GROUP_DEFAULTS",
    "KAFKA_ENV_PREFIX",
    "SETTINGS",
    "SettingSpec",
    "Settings",
    "add_arguments",
    "incremental_rebalancing",
    "markdown_table",
    "redact_url",
    "setting_from_env",
    "settings_from_args",
]

ENV_PREFIX = "METAREC_"
#: ``METAREC_KAFKA_<NAME>`` passes ``<name>`` through to librdkafka, except the bootstrap.
KAFKA_ENV_PREFIX = "METAREC_KAFKA_"
KAFKA_OPTIONS_ENV = "METAREC_KAFKA_<NAME>"
KAFKA_OPTIONS_FLAG = "--kafka-option"
MASK = "***"
#: Substrings of a librdkafka setting name that mark its value as a secret.
_SECRET_MARKERS = ("password", "secret", "key", "token", "sasl.jaas")
#: librdkafka names that have a first-class setting; passing them through would let two
#: places disagree about, for example, which cluster a process talks to.
_RESERVED_KAFKA = {
    "bootstrap.servers": "METAREC_KAFKA_BOOTSTRAP",
    "metadata.broker.list": "METAREC_KAFKA_BOOTSTRAP",
    "group.id": "METAREC_GROUP_ID or METAREC_AGGREGATOR_GROUP_ID",
}
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_TOPIC_RE = re.compile(r"[A-Za-z0-9._-]{1,249}")
_EVENT_TYPE_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_REDIS_SCHEMES = ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster")
#: URL schemes that select a Redis Cluster (redis-py's cluster client); the rest of the URL
#: names one node to discover the cluster from, as ``redis://`` names a single server.
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
_DAY_S = 24 * 3600
#: Group settings of every metarec consumer group (the consumers', the aggregator's), the
#: one place they are written: ``METAREC_KAFKA_*`` overrides them. librdkafka's 45 s
#: session timeout would make a lost member's partitions wait 45 s for a new owner; 6 s is
#: the least Apache Kafka accepts (``group.min.session.timeout.ms``), and on the local
#: Tansu broker, which keeps a join phase open ~session.timeout.ms / 2, it keeps joins
#: to a few seconds. A new group starts at the log's beginning: no event is skipped.
GROUP_DEFAULTS: types.MappingProxyType[str, str] = types.MappingProxyType(
    {
        "session.timeout.ms": "6000",
        "heartbeat.interval.ms": "500",
        "auto.offset.reset": "earliest",
    }
)

# Defaults that the core objects (the learner, the retraining schedule) share with the
# settings table, so that a library user and a deployed service start from the same ones.
#: Catalogues up to this size are scored exactly (every item, every list): below it a
#: dense row costs less than gathering candidates does (:mod:`metarec.core.candidates`).
EXACT_MAX_ITEMS = 20_000
DEFAULT_TOP_K = 20
DEFAULT_HISTORY_LENGTH = 50
#: Events the window needs before the first model (and the new regime after a drift
#: before the retraining on it): fewer teach the model nothing a trending list does not.
DEFAULT_MIN_EVENTS_FOR_MODEL = 2000
#: New events between two scheduled retrainings: a tenth of a 100k-event stream, seconds
#: of a busy service; each cycle warm-starts from the last model, so frequent ones are cheap.
DEFAULT_RETRAIN_EVENTS = 10_000
DEFAULT_WINDOW_EVENTS = 200_000


# --- parsers: each turns a raw value (str from env/flags, or a typed override) into the
# --- setting's type, or raises ValueError whose text says what is expected.


def _ttl_parser(least: int, hi: int) -> Callable[[object], int]:
    """0 (off) or a TTL of at least ``least`` seconds."""
    within = _int_parser(0, hi)
    expected = f"0 (never) or an integer from {least} to {hi}"

    def parse(raw: object) -> int:
        try:
            value = within(raw)
        except ValueError:
            raise ValueError(expected) from None
        if 0 < value < least:
            raise ValueError(expected)
        return value

    return parse


def _int_parser(lo: int, hi: int) -> Callable[[object], int]:
    expected = f"an integer from {lo} to {hi}"

    def parse(raw: object) -> int:
        if isinstance(raw, bool):
            raise ValueError(expected)
        if isinstance(raw, int):
            value = raw
        elif isinstance(raw, str):
            try:
                value = int(raw.strip())
            except ValueError:
                raise ValueError(expected) from None
        else:
            raise ValueError(expected)
        if not lo <= value <= hi:
            raise ValueError(expected)
        return value

    return parse


def _name_parser(expected: str, max_len: int = 255) -> Callable[[object], str]:
    def parse(raw: object) -> str:
        if not isinstance(raw, str) or not raw or len(raw) > max_len:
            raise ValueError(expected)
        if any(c.isspace() or ord(c) < 32 for c in raw):
            raise ValueError(expected)
        return raw

    return parse


def _parse_topic(raw: object) -> str:
    expected = "a Kafka topic name: 1-249 of letters, digits, '.', '_' and '-'"
    if not isinstance(raw, str) or not _TOPIC_RE.fullmatch(raw) or raw in (".", ".."):
        raise ValueError(expected)
    return raw


def _parse_bootstrap(raw: object) -> str:
    expected = "a comma-separated list of host:port, such as '127.0.0.1:9092'"
    if not isinstance(raw, str):
        raise ValueError(expected)
    servers = [s.strip() for s in raw.split(",")]
    for server in servers:
        hostport = server.split("://", 1)[-1]  # librdkafka accepts a protocol prefix
        host, sep, port = hostport.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(expected)
        if any(c.isspace() for c in host):
            raise ValueError(expected)
    return ",".join(servers)


def _parse_redis_url(raw: object) -> str:
    expected = (
        "a redis://, rediss://, unix:// URL, such as 'redis://user:pass@host:6379/0', "
        "or a redis+cluster:// (rediss+cluster:// for TLS) URL of one cluster node"
    )
    if not isinstance(raw, str):
        raise ValueError(expected)
    userinfo = raw.partition("://")[2].rpartition("@")[0]
    if raw.count("@") > 1 or "#" in raw or any(c in userinfo for c in "/?"):
        raise ValueError(
            expected + "; percent-encode '@', '/', '?' and '#' in the user "
            "and password (%40, %2F, %3F, %23)"
        )
    try:
        parts = urlsplit(raw)
        port = parts.port  # raises ValueError on a non-numeric port
    except ValueError:
        raise ValueError(expected) from None
    if parts.scheme not in _REDIS_SCHEMES:
        raise ValueError(expected)
    if parts.scheme == "unix":
        if not parts.path:
            raise ValueError(expected)
        return raw
    if not parts.hostname or (port is not None and not 0 < port < 65536):
        raise ValueError(expected)
    db = parts.path.lstrip("/")
    if db and not db.isdigit():
        raise ValueError(expected + " (the path, if any, is the database number)")
    if parts.scheme in CLUSTER_SCHEMES and db not in ("", "0"):
        raise ValueError(expected + " (a Redis Cluster has database 0 only)")
    return raw


def _parse_reset_policy(raw: object) -> str:
    expected = "replay (go on from the new log's start) or skip (from its end)"
    if not isinstance(raw, str) or raw.strip().lower() not in ("replay", "skip"):
        raise ValueError(expected)
    return raw.strip().lower()


def _parse_log_level(raw: object) -> str:
    expected = "one of " + ", ".join(_LOG_LEVELS)
    if not isinstance(raw, str) or raw.strip().upper() not in _LOG_LEVELS:
        raise ValueError(expected)
    return raw.strip().upper()


def _parse_event_types(raw: object) -> Mapping[str, float]:
    expected = (
        "comma-separated TYPE:WEIGHT pairs with non-zero finite weights, at least one "
        "positive, such as 'click:1,like:2,dislike:-1'"
    )
    pairs: list[tuple[object, object]]
    if isinstance(raw, Mapping):
        pairs = list(raw.items())
    elif isinstance(raw, str):
        pairs = []
        for chunk in raw.split(","):
            name, sep, weight = chunk.partition(":")
            if not sep:
                raise ValueError(expected)
            pairs.append((name.strip(), weight.strip()))
    else:
        raise ValueError(expected)
    out: dict[str, float] = {}
    for etype, raw_weight in pairs:
        if not isinstance(etype, str) or not _EVENT_TYPE_RE.fullmatch(etype) or etype in out:
            raise ValueError(expected + " (type names are unique [A-Za-z0-9_.-] words)")
        try:
            value = float(raw_weight)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise ValueError(expected) from None
        if isinstance(raw_weight, bool) or not math.isfinite(value) or value == 0.0:
            raise ValueError(expected)
        out[etype] = value
    if not any(w > 0 for w in out.values()):
        raise ValueError(expected)
    return types.MappingProxyType(out)


def _format_event_types(value: object) -> str:
    assert isinstance(value, Mapping)
    return ",".join(f"{k}:{v:g}" for k, v in value.items())


def redact_url(url: str) -> str:
    """``url`` with its password (userinfo or a ``password`` query parameter) masked.

    Why not ``urlsplit``: a password with an unencoded ``@``, ``/`` or ``#`` makes the
    parser cut the URL in the wrong place, and half of the password would be shown. The
    host never contains ``@``, so everything up to the *last* ``@`` is the userinfo.

    >>> redact_url("rediss://app:s3cret@cache:6380/1")
    'rediss://app:***@cache:6380/1'
    >>> redact_url("redis://app:x@y/z#Secret@127.0.0.1:6379/0")
    'redis://app:***@127.0.0.1:6379/0'
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return MASK if ("@" in url or "password" in url.lower()) else url
    userinfo, at, hostpart = rest.rpartition("@")
    if at:
        user, colon, _ = userinfo.partition(":")
        rest = f"{user}:{MASK}@{hostpart}" if colon else f"{MASK}@{hostpart}"
    head, qmark, query = rest.partition("?")
    if qmark and "password" in query.lower():
        query = query.partition("#")[0]
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, MASK if "password" in k.lower() else v) for k, v in pairs], safe="*")
        rest = f"{head}?{query}"
    return f"{scheme}://{rest}"


def _is_secret_kafka_option(name: str) -> bool:
    return any(marker in name.lower() for marker in _SECRET_MARKERS)


@dataclass(frozen=True)
class SettingSpec:
    """One row of the settings table: name, type, default, help and validation.

    Parameters
    ----------
    name
        Field name on :class:`Settings`; the env var is ``METAREC_`` + upper case, the
        flag ``--`` + dashes.
    kind
        Short type name for the docs.
    default
        The typed default value.
    help
        One sentence for ``--help`` and the README.
    parse
        Turns a raw value into the typed value or raises ``ValueError`` saying what is
        expected.
    fmt
        Turns a typed value back into the text form accepted by ``parse``.
    secret
        Whether the value may hold a secret (masked in logs and errors).

    Examples
    --------
    >>> spec = next(s for s in SETTINGS if s.name == "top_k")
    >>> spec.env, spec.flag, spec.parse("7")
    ('METAREC_TOP_K', '--top-k', 7)
    """

    name: str
    kind: str
    default: object
    help: str
    parse: Callable[[object], object]
    fmt: Callable[[object], str] = str
    secret: bool = False

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def display(self, value: object) -> str:
        """The value as it may appear in logs and error messages."""
        text = self.fmt(value) if not isinstance(value, str) else value
        return redact_url(text) if self.secret else text

    def row(self) -> dict[str, str]:
        """The machine-readable form of this row (for docs and ``metarec config``)."""
        return {
            "name": self.name,
            "env": self.env,
            "flag": self.flag,
            "type": self.kind,
            "default": self.display(self.default),
            "help": self.help,
        }


def _id_spec(name: str, default: str, help_: str) -> SettingSpec:
    return SettingSpec(
        name,
        "str",
        default,
        help_,
        _name_parser("a non-empty name without spaces or control characters"),
    )


def _topic_spec(name: str, default: str, help_: str) -> SettingSpec:
    return SettingSpec(name, "topic", default, help_, _parse_topic)


def _int_spec(name: str, default: int, lo: int, hi: int, help_: str) -> SettingSpec:
    return SettingSpec(name, "int", default, help_, _int_parser(lo, hi))


#: The settings table: the single source of names, defaults, validation and help.
SETTINGS: tuple[SettingSpec, ...] = (
    SettingSpec(
        "kafka_bootstrap",
        "host:port,...",
        "127.0.0.1:9092",
        "Kafka bootstrap servers.",
        _parse_bootstrap,
    ),
    SettingSpec(
        "redis_url",
        "url",
        "redis://127.0.0.1:6379/0",
        "Redis URL (redis://, rediss:// for TLS, unix://; redis+cluster:// or "
        "rediss+cluster:// and one node for a Redis Cluster); user:password@ allowed.",
        _parse_redis_url,
        secret=True,
    ),
    _int_spec(
        "redis_retry_s",
        120,
        0,
        _DAY_S,
        "How long a consumer or the aggregator retries an unavailable Redis before it "
        "exits (keep it under librdkafka's max.poll.interval.ms, 300 s).",
    ),
    SettingSpec(
        "key_prefix",
        "str",
        "metarec:",
        "Prefix of every Redis key metarec writes.",
        _name_parser("a non-empty prefix without spaces, such as 'metarec:'", 128),
    ),
    _id_spec("group_id", "metarec-consumer", "Kafka consumer group of the consumer service."),
    _id_spec(
        "aggregator_group_id",
        "metarec-aggregator",
        "Kafka consumer group of the aggregator's replay window.",
    ),
    _topic_spec("events_topic", "metarec.events", "Topic of user events (key: user id)."),
    _topic_spec("items_topic", "metarec.items", "Topic of item metadata (key: item id)."),
    _topic_spec("users_topic", "metarec.users", "Topic of user profiles (key: user id)."),
    _topic_spec(
        "dlq_topic",
        "metarec.events.dlq",
        "Dead-letter topic for records that could not be processed.",
    ),
    _topic_spec("model_topic", "metarec.model", "Topic announcing new model versions."),
    SettingSpec(
        "log_reset_policy",
        "policy",
        "replay",
        "When the events topic is a new log (broker reset, topic recreated): replay "
        "it from its start, or skip to its end.",
        _parse_reset_policy,
    ),
    _int_spec("top_k", DEFAULT_TOP_K, 1, 1000, "Length of each user's recommendation list."),
    _int_spec(
        "exact_max_items",
        EXACT_MAX_ITEMS,
        0,
        100_000_000,
        "Catalogues up to this size score every item for every list; bigger ones "
        "score each user's candidates (neighbours, trending, an item index).",
    ),
    _int_spec("batch_size", 500, 1, 100_000, "Most records taken per consume call."),
    # Short on purpose: under load a batch fills at once; at low load a long wait is
    # pure produce-to-list latency (measured: p50 113 ms at 100 ms, 43 ms at 20 ms; with 2
    # consumers at 5,000 events/s, p99 207 ms at 20 ms and 87 ms at 5 ms).
    _int_spec(
        "batch_timeout_ms", 5, 0, 60_000, "Longest wait in milliseconds for a batch to fill."
    ),
    _int_spec(
        "partitions",
        6,
        1,
        1024,
        "Partitions of the events topic that 'metarec topics' and 'dev up' create: "
        "the most consumer processes that can share the work.",
    ),
    _int_spec(
        "events_retention_hours",
        7 * 24,
        1,
        10 * 365 * 24,
        "Retention of the events topic that 'metarec topics' creates; must cover the "
        "time the aggregator's last METAREC_WINDOW_EVENTS events span.",
    ),
    _int_spec(
        "history_length",
        DEFAULT_HISTORY_LENGTH,
        1,
        10_000,
        "Events kept per user, to re-derive the user after a model change.",
    ),
    _int_spec(
        "recs_ttl_s", 0, 0, 365 * _DAY_S, "TTL in seconds of recs:{user} keys; 0 means no expiry."
    ),
    SettingSpec(
        "state_ttl_s",
        "int",
        0,
        "Forget users inactive this long: the TTL in seconds of a user's state "
        "(renewed by each of their events; a user seen again starts afresh). 0 "
        "means never; else at least a day, so that no state expires while a "
        "replay of its events may still come.",
        _ttl_parser(_DAY_S, 10 * 365 * _DAY_S),
    ),
    _int_spec(
        "metrics_port",
        0,
        0,
        65535,
        "Port of the /metrics, /healthz and /readyz endpoints of a consumer or the "
        "aggregator; 0 turns them off.",
    ),
    _int_spec(
        "stats_interval_s", 10, 0, _DAY_S, "Seconds between stats log lines; 0 turns them off."
    ),
    _int_spec(
        "retrain_events",
        DEFAULT_RETRAIN_EVENTS,
        1,
        10**9,
        "New events between two retrainings of the meta-model by the aggregator.",
    ),
    _int_spec(
        "aggregate_interval_s",
        0,
        0,
        _DAY_S,
        "Also retrain after this many seconds if any event came in; 0 turns it off "
        "(metarec eval has no wall clock, so it cannot measure this trigger).",
    ),
    _int_spec(
        "min_events_for_model",
        DEFAULT_MIN_EVENTS_FOR_MODEL,
        0,
        10**9,
        "Events the aggregator needs in its window before it trains a model, and "
        "since a detected change before it retrains on the new regime.",
    ),
    _int_spec(
        "window_events",
        DEFAULT_WINDOW_EVENTS,
        1,
        10**8,
        "Size of the aggregator's bounded replay window, in events.",
    ),
    SettingSpec(
        "event_types",
        "TYPE:WEIGHT,...",
        types.MappingProxyType(dict(DEFAULT_EVENT_WEIGHTS)),
        "Accepted event types and their weights; a negative weight is a dislike.",
        _parse_event_types,
        _format_event_types,
    ),
    _int_spec(
        "event_ts_min_ms",
        MIN_EVENT_TS_MS,
        0,
        2**62,
        "Earliest accepted event time, epoch ms (default 1990-01-01); earlier events "
        "go to the dead-letter topic.",
    ),
    _int_spec(
        "event_max_future_s",
        MAX_FUTURE_SKEW_MS // 1000,
        0,
        365 * _DAY_S,
        "How far ahead of the consumer's clock an event time may be, in seconds; "
        "later ones go to the dead-letter topic.",
    ),
    _int_spec(
        "max_record_bytes",
        MAX_RECORD_BYTES,
        256,
        16 * 1024 * 1024,
        "Largest record accepted, in bytes; larger ones go to the dead-letter topic.",
    ),
    _int_spec(
        "max_id_bytes",
        MAX_ID_BYTES,
        8,
        4096,
        "Longest user, item, domain or event id accepted, in UTF-8 bytes.",
    ),
    _int_spec(
        "max_features", MAX_FEATURES, 0, 100_000, "Most features an item or user record may list."
    ),
    SettingSpec(
        "log_level", "level", "INFO", "One of DEBUG, INFO, WARNING, ERROR.", _parse_log_level
    ),
    _int_spec("seed", 0, 0, 2**32 - 1, "Seed of every random generator."),
)
_BY_NAME = {spec.name: spec for spec in SETTINGS}
_BY_ENV = {spec.env: spec for spec in SETTINGS}
_KAFKA_OPTIONS_HELP = (
    "librdkafka setting passed through to every Kafka client; NAME is the setting with "
    "dots as underscores (METAREC_KAFKA_SASL_PASSWORD is sasl.password). Repeatable flag."
)


@dataclass(frozen=True, repr=False)
class Settings:
    """Validated settings of one metarec process; build with :meth:`from_env`.

    Fields mirror :data:`SETTINGS`, plus ``kafka_options``: the librdkafka pass-through.

    Examples
    --------
    >>> env = {"METAREC_REDIS_URL": "redis://app:hunter2@cache:6379/0",
    ...        "METAREC_KAFKA_SASL_PASSWORD": "pw"}
    >>> s = Settings.from_env(env, overrides={"top_k": 10})
    >>> s.top_k, s.kafka_config()["sasl.password"]
    (10, 'pw')
    >>> "hunter2" in repr(s) or "'pw'" in repr(s)
    False
    >>> Settings.from_env({"METAREC_TOP_K": "0"})
    Traceback (most recent call last):
    ...
    metarec.errors.ConfigError: invalid top_k: METAREC_TOP_K='0'; expected an integer from 1 to 1000 (env METAREC_TOP_K, flag --top-k)
    """  # noqa: E501

    kafka_bootstrap: str
    redis_url: str
    redis_retry_s: int
    key_prefix: str
    group_id: str
    aggregator_group_id: str
    events_topic: str
    items_topic: str
    users_topic: str
    dlq_topic: str
    model_topic: str
    log_reset_policy: str
    top_k: int
    exact_max_items: int
    batch_size: int
    batch_timeout_ms: int
    partitions: int
    events_retention_hours: int
    history_length: int
    recs_ttl_s: int
    state_ttl_s: int
    metrics_port: int
    stats_interval_s: int
    retrain_events: int
    aggregate_interval_s: int
    min_events_for_model: int
    window_events: int
    event_types: Mapping[str, float] = field(hash=False)
    event_ts_min_ms: int
    event_max_future_s: int
    max_record_bytes: int
    max_id_bytes: int
    max_features: int
    log_level: str
    seed: int
    kafka_options: Mapping[str, str] = field(
        default_factory=lambda: types.MappingProxyType({}), hash=False
    )

    @classmethod
    def defaults(cls) -> Settings:
        """Every setting at its default, whatever the environment says."""
        return cls.from_env({})

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] = os.environ,
        overrides: Mapping[str, object] | None = None,
    ) -> Settings:
        """Resolve every setting: ``overrides`` > ``environ`` > default, then validate.

        ``overrides`` keys are setting names (``None`` values are ignored, as argparse
        leaves unset flags); ``kafka_options`` in it is a mapping of librdkafka names that
        goes on top of the ``METAREC_KAFKA_*`` pass-through. Raises :class:`ConfigError`
        for an invalid value or an unknown ``METAREC_*`` variable.
        """
        overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
        unknown = sorted(set(overrides) - set(_BY_NAME) - {"kafka_options"})
        if unknown:
            raise ConfigError(f"unknown setting {unknown[0]!r}{_suggest(unknown[0], _BY_NAME)}")
        kafka_env = _kafka_options_from_env(environ)
        values: dict[str, object] = {}
        for spec in SETTINGS:
            if spec.name in overrides:
                raw, source = overrides[spec.name], spec.flag
            elif environ.get(spec.env, ""):
                raw, source = environ[spec.env], spec.env
            else:
                raw, source = spec.default, "default"
            values[spec.name] = _parse(spec, raw, source)
        extra = overrides.get("kafka_options", {})
        if not isinstance(extra, Mapping):
            raise ConfigError(f"invalid kafka_options: expected a mapping, got {extra!r}")
        kafka_flag = {
            _check_kafka_name(str(k), KAFKA_OPTIONS_FLAG): _kafka_value(v) for k, v in extra.items()
        }
        values["kafka_options"] = types.MappingProxyType({**kafka_env, **kafka_flag})
        return cls(**values)  # type: ignore[arg-type]  # keys/types checked by the table

    def replace(self, **changes: object) -> Settings:
        """A copy with ``changes`` applied, validated like flags.

        >>> Settings.from_env({}).replace(top_k="5").top_k
        5
        """
        base = {spec.name: getattr(self, spec.name) for spec in SETTINGS}
        base["kafka_options"] = self.kafka_options
        return Settings.from_env({}, {**base, **changes})

    def kafka_config(self, **extra: str | int | float | bool) -> dict[str, str]:
        """A librdkafka config: ``bootstrap.servers``, then the pass-through, then ``extra``.

        ``extra`` is what the calling code requires and so wins; its names may use
        underscores for dots (``group_id="g"`` is ``group.id``).
        """
        config = {"bootstrap.servers": self.kafka_bootstrap, **self.kafka_options}
        for name, value in extra.items():
            config[name.replace("_", ".")] = _kafka_value(value)
        return config

    def group_config(self, group_id: str, **extra: str | int | float | bool) -> dict[str, str]:
        """A librdkafka config for a member of ``group_id``: :data:`GROUP_DEFAULTS`, then
        the pass-through (``METAREC_KAFKA_*`` overrides the defaults), then ``group.id``
        and ``extra``, which the calling code requires.

        >>> Settings.from_env({}).group_config("g")["session.timeout.ms"]
        '6000'
        >>> Settings.from_env({"METAREC_KAFKA_SESSION_TIMEOUT_MS": "10000"}).group_config(
        ...     "g")["session.timeout.ms"]
        '10000'
        """
        config = {**GROUP_DEFAULTS, **self.kafka_config(), "group.id": group_id}
        for name, value in extra.items():
            config[name.replace("_", ".")] = _kafka_value(value)
        return config

    def limits(self) -> Limits:
        """What records may be (:class:`metarec.core.events.Limits`), from these settings."""
        return Limits(
            max_record_bytes=self.max_record_bytes,
            max_id_bytes=self.max_id_bytes,
            max_features=self.max_features,
            min_ts=self.event_ts_min_ms,
            max_future_ms=self.event_max_future_s * 1000,
        )

    def event_checks(self, now_ms: int | None) -> dict[str, Any]:
        """The keyword arguments of :func:`metarec.core.events.decode_event` that these settings
        fix: the accepted types and the limits, with the time window at ``now_ms``."""
        return {"event_types": self.event_types, "now_ms": now_ms, "limits": self.limits()}

    def redacted(self) -> dict[str, object]:
        """Every setting, with secrets masked: safe to log."""
        out: dict[str, object] = {}
        for spec in SETTINGS:
            value = getattr(self, spec.name)
            if spec.secret:
                out[spec.name] = spec.display(value)
            elif isinstance(value, Mapping):
                out[spec.name] = dict(value)
            else:
                out[spec.name] = value
        out["kafka_options"] = {
            k: MASK if _is_secret_kafka_option(k) else v for k, v in self.kafka_options.items()
        }
        return out

    def __repr__(self) -> str:
        body = ", ".join(f"{k}={v!r}" for k, v in self.redacted().items())
        return f"Settings({body})"

    def __reduce__(self) -> tuple[object, tuple[dict[str, object]]]:
        """Pickled by value: ``metarec eval`` hands the caller's settings to its workers."""
        values: dict[str, object] = {spec.name: getattr(self, spec.name) for spec in SETTINGS}
        values["event_types"] = dict(self.event_types)
        values["kafka_options"] = dict(self.kafka_options)
        return (_from_values, (values,))


def setting_from_env(name: str, environ: Mapping[str, str] | None = None) -> object:
    """One setting as the services read it: from its ``METAREC_*`` variable, validated,
    else its default. For code that needs one value, not a whole deployment's (an app's
    read client needs the key prefix, not the broker).

    >>> setting_from_env("key_prefix", {"METAREC_KEY_PREFIX": "shop:"})
    'shop:'
    >>> setting_from_env("key_prefix", {})
    'metarec:'
    """
    spec = _BY_NAME[name]
    env = os.environ if environ is None else environ
    return _parse(spec, env[spec.env], spec.env) if spec.env in env else spec.default


def _from_values(values: dict[str, object]) -> Settings:
    return Settings.from_env({}, values)


def _parse(spec: SettingSpec, raw: object, source: str) -> object:
    try:
        return spec.parse(raw)
    except ValueError as exc:
        shown = spec.display(raw) if isinstance(raw, str) else repr(raw)
        origin = f"{source}={shown!r}" if isinstance(raw, str) else f"{source} {shown}"
        raise ConfigError(
            f"invalid {spec.name}: {origin}; expected {exc} (env {spec.env}, flag {spec.flag})"
        ) from None


def _suggest(name: str, known: Iterable[str]) -> str:
    # Compare without the shared prefix, which would make every name look alike.
    def bare(n: str) -> str:
        return n.removeprefix(ENV_PREFIX).lower()

    by_bare = {bare(k): k for k in known}
    close = difflib.get_close_matches(bare(name), list(by_bare), n=1, cutoff=0.6)
    return f"; did you mean {by_bare[close[0]]}?" if close else ""


def _kafka_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _check_kafka_name(name: str, source: str) -> str:
    if not name or any(c.isspace() for c in name):
        raise ConfigError(f"invalid librdkafka setting name {name!r} from {source}")
    if name in _RESERVED_KAFKA:
        raise ConfigError(
            f"{source} sets librdkafka {name!r}, which metarec sets itself; "
            f"use {_RESERVED_KAFKA[name]} instead"
        )
    return name


def _kafka_options_from_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The ``METAREC_KAFKA_*`` pass-through; also rejects unknown ``METAREC_*`` names."""
    bootstrap_env = _BY_NAME["kafka_bootstrap"].env
    options: dict[str, str] = {}
    for var in sorted(environ):
        if not var.startswith(ENV_PREFIX) or var in _BY_ENV:
            continue
        if not var.startswith(KAFKA_ENV_PREFIX):
            raise ConfigError(
                f"unknown environment variable {var}{_suggest(var, _BY_ENV)}"
                " (see the configuration table in README.md)"
            )
        suffix = var[len(KAFKA_ENV_PREFIX) :]
        if difflib.SequenceMatcher(None, suffix, "BOOTSTRAP").ratio() >= 0.8:
            raise ConfigError(f"unknown environment variable {var}; did you mean {bootstrap_env}?")
        if environ[var]:
            name = _check_kafka_name(suffix.lower().replace("_", "."), var)
            options[name] = environ[var]
    return options


def add_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    only: Collection[str] | None = None,
) -> None:
    """Add one ``--flag`` per setting (default ``None``: unset flags leave env/default);
    with ``only``, for those settings alone (a command's ``--help`` shows what it reads;
    the environment still configures everything, validated as always).

    >>> p = argparse.ArgumentParser()
    >>> add_arguments(p)
    >>> settings_from_args(p.parse_args(["--top-k", "3"]), environ={}).top_k
    3
    """
    unknown = set(only or ()) - set(_BY_NAME)
    if unknown:
        raise ValueError(f"no settings named {sorted(unknown)}")
    for spec in SETTINGS:
        if only is not None and spec.name not in only:
            continue
        help_ = f"{spec.help} Env {spec.env}; default {spec.display(spec.default)}."
        parser.add_argument(
            spec.flag,
            dest=spec.name,
            metavar=spec.kind.upper(),
            default=None,
            help=help_.replace("%", "%%"),
        )
    if only is not None and "kafka_bootstrap" not in only:
        return
    parser.add_argument(
        KAFKA_OPTIONS_FLAG,
        dest="kafka_options",
        action="append",
        metavar="NAME=VALUE",
        default=None,
        help=f"{_KAFKA_OPTIONS_HELP} Env {KAFKA_OPTIONS_ENV}.",
    )


def settings_from_args(
    args: argparse.Namespace, environ: Mapping[str, str] = os.environ
) -> Settings:
    """:class:`Settings` from parsed flags (see :func:`add_arguments`) over ``environ``."""
    overrides: dict[str, object] = {spec.name: getattr(args, spec.name, None) for spec in SETTINGS}
    options: dict[str, str] = {}
    for item in getattr(args, "kafka_options", None) or []:
        name, sep, value = str(item).partition("=")
        if not sep or not name.strip():
            raise ConfigError(
                f"invalid {KAFKA_OPTIONS_FLAG} {item!r}; expected NAME=VALUE, such as "
                "security.protocol=SASL_SSL"
            )
        options[name.strip()] = value
    overrides["kafka_options"] = options
    return Settings.from_env(environ, overrides)


def markdown_table() -> str:
    """The README's configuration table, generated from :data:`SETTINGS`."""
    lines = [
        "| Setting | Environment variable | Flag | Type | Default | Description |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for spec in SETTINGS:
        r = spec.row()
        lines.append(
            f"| `{r['name']}` | `{r['env']}` | `{r['flag']}` | {r['type']} "
            f"| `{r['default']}` | {r['help'].replace('|', '&#124;')} |"
        )
    lines.append(
        f"| `kafka_options` | `{KAFKA_OPTIONS_ENV}` | `{KAFKA_OPTIONS_FLAG} NAME=VALUE` "
        f"| str | | {_KAFKA_OPTIONS_HELP} |"
    )
    return "\n".join(lines) + "\n"


def _check_table_matches_settings() -> None:
    # Why at import: a field added to Settings but not to SETTINGS (or the reverse) would
    # silently never be configurable; failing at import catches it in every test run.
    names = [f.name for f in dataclasses.fields(Settings)]
    assert names == [s.name for s in SETTINGS] + ["kafka_options"], names


_check_table_matches_settings()


if __name__ == "__main__":  # python -m metarec.config > docs table
    print(markdown_table(), end="")


def incremental_rebalancing(config: Mapping[str, str]) -> bool:
    """Whether a consumer with ``config`` gets incremental (cooperative) assignments.

    Its rebalance callbacks must then use ``incremental_assign``/``incremental_unassign``:
    librdkafka refuses a plain ``assign`` there (``_STATE``, which crashed the consumer).
    The Python client does not expose librdkafka's ``rebalance_protocol()``, hence this.

    >>> incremental_rebalancing({"partition.assignment.strategy": "cooperative-sticky"})
    True
    >>> incremental_rebalancing({"partition.assignment.strategy": "range"})
    False
    """
    return (
        "cooperative" in config.get("partition.assignment.strategy", "")
        or config.get("group.protocol", "classic") == "consumer"
    )
