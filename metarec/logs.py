"""Structured logging: one JSON object per line, for every metarec process.

Why JSON lines: the consumer's stats line, DLQ decisions and errors are read by log
pipelines (and by people with ``jq``), which need fields, not prose to parse. Every line
has ``ts`` (ISO-8601 UTC, milliseconds), ``level``, ``logger``, ``service`` and ``msg``;
fields passed as ``extra={...}`` are added as they are, made JSON-safe (numpy scalars
become Python numbers, non-finite floats and other unserializable values become strings);
``exc`` holds the formatted traceback when ``exc_info`` is set (``stack`` the stack when
``stack_info`` is); record attributes starting with ``_`` are skipped. Nothing else is
added: the formatter writes only what the log call gave it, so it cannot leak settings or
secrets that the caller did not pass.

:func:`configure_logging` is for process entry points (CLIs, the consumer, the
aggregator); the library itself only calls ``logging.getLogger(__name__)``.

>>> import io
>>> buf = io.StringIO()
>>> handler = logging.StreamHandler(buf)
>>> handler.setFormatter(JsonFormatter(service="demo"))
>>> log = logging.getLogger("metarec.doctest.logs")
>>> log.addHandler(handler); log.propagate = False
>>> log.warning("lag high", extra={"lag": 120})
>>> line = json.loads(buf.getvalue())
>>> line["msg"], line["lag"], line["service"], line["level"]
('lag high', 120, 'demo', 'WARNING')
>>> log.removeHandler(handler); log.propagate = True
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final, TextIO

import numpy as np

from metarec.errors import ConfigError

__all__ = [
    "BASE_FIELDS",
    "JsonFormatter",
    "RepeatFilter",
    "Throttle",
    "configure_logging",
    "fatal",
    "kafka_logger",
]

#: The fields every line has, in this order; an ``extra`` field with one of these names
#: is written as ``<name>_`` so that it can never replace them.
BASE_FIELDS: Final = ("ts", "level", "logger", "service", "msg", "exc", "stack")
#: TensorFlow's C++ log level used unless the environment already sets one. Its C++ lines
#: are not JSON and would break one-object-per-line output, so all but FATAL are dropped:
#: the start-up chatter (CPU features, plugin and cuDNN registration) is noise, and an
#: error that matters reaches Python as an exception, which is logged as JSON. Set
#: ``TF_CPP_MIN_LOG_LEVEL=0`` by hand to see them while debugging TensorFlow itself.
TF_CPP_MIN_LOG_LEVEL: Final = "3"
#: Name of the handler :func:`configure_logging` installs, so a second call finds it.
HANDLER_NAME: Final = "metarec.json"
#: How deep nested ``extra`` values are converted; deeper (or cyclic) parts become strings.
_MAX_DEPTH: Final = 8
#: Attributes every LogRecord has; anything else on a record came from ``extra``.
#: A librdkafka log line repeated within this many seconds is dropped: with the broker
#: down it logs the same connection failure every reconnect backoff (tens of ms).
REPEAT_LOG_WINDOW_S: Final = 30.0
_REPEATS_TRACKED: Final = 256
_RECORD_ATTRS: Final = frozenset(
    logging.LogRecord("", logging.INFO, "", 0, "", None, None).__dict__
) | {"message", "asctime", "taskName"}


def _jsonable(value: Any, depth: int = 0) -> Any:
    """``value`` as plain JSON types: strict JSON has no NaN, numpy scalars, sets or bytes."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, np.generic):
        return _jsonable(value.item(), depth)
    if depth >= _MAX_DEPTH:
        return str(value)
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist(), depth + 1)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v, depth + 1) for v in value]
    return str(value)


def _utc_iso_ms(created: float) -> str:
    """ISO-8601 UTC with milliseconds and a ``Z``, e.g. ``2024-05-01T12:00:00.123Z``."""
    stamp = datetime.fromtimestamp(created, tz=UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    """Formats each record as one line of JSON with the base fields and the ``extra`` ones.

    Parameters
    ----------
    service
        Written as ``service`` on every line, so that lines of the consumer, the
        aggregator and the CLIs can be told apart after they are merged.

    Examples
    --------
    >>> record = logging.LogRecord("metarec.consumer", logging.INFO, __file__, 1,
    ...                            "batch %d done", (7,), None)
    >>> record.events = np.int64(500)
    >>> obj = json.loads(JsonFormatter(service="consumer").format(record))
    >>> obj["msg"], obj["events"], obj["logger"], obj["ts"].endswith("Z")
    ('batch 7 done', 500, 'metarec.consumer', True)
    """

    def __init__(self, service: str = "metarec") -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "ts": _utc_iso_ms(record.created),
            "level": record.levelname,
            "logger": record.name,
            "service": self.service,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            obj["exc"] = record.exc_text
        if record.stack_info:
            obj["stack"] = self.formatStack(record.stack_info)
        for key, value in record.__dict__.items():
            if key in _RECORD_ATTRS or key.startswith("_"):
                continue
            name = f"{key}_" if key in BASE_FIELDS else key
            obj[name] = _jsonable(value)
        try:
            return json.dumps(obj, ensure_ascii=False, allow_nan=False, default=str)
        except (TypeError, ValueError):  # e.g. a __str__ that raises: keep the base fields
            return json.dumps({k: _jsonable(obj.get(k)) for k in BASE_FIELDS if k in obj})


def _level_number(level: str) -> int:
    number = logging.getLevelNamesMapping().get(str(level).strip().upper())
    if number is None:
        raise ConfigError(
            f"invalid log level {level!r}; expected one of DEBUG, INFO, WARNING, ERROR "
            "(env METAREC_LOG_LEVEL, flag --log-level)"
        )
    return number


def configure_logging(
    level: str = "INFO",
    stream: TextIO | None = None,
    service: str = "metarec",
) -> None:
    """Send every log record of this process to ``stream`` as JSON lines.

    Why at the entry point only: a library that configures logging takes the choice away
    from whoever embeds it. Calling this again replaces its own handler (new level, stream
    or service) instead of adding a second one; handlers that others installed on the
    root logger (a test harness, for instance) are left alone.

    It also routes :mod:`warnings` through the ``py.warnings`` logger, and sets
    ``TF_CPP_MIN_LOG_LEVEL`` (:data:`TF_CPP_MIN_LOG_LEVEL`) unless the environment sets
    it already; TensorFlow reads
    that when it is first imported, so call this before importing TensorFlow.

    Parameters
    ----------
    level
        Root level name: DEBUG, INFO, WARNING or ERROR (any case).
    stream
        Where lines go; ``None`` means ``sys.stderr`` as it is at the time of the call.
    service
        The ``service`` field of every line.

    Raises
    ------
    ConfigError
        When ``level`` is not a level name.
    """
    number = _level_number(level)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", TF_CPP_MIN_LOG_LEVEL)
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.set_name(HANDLER_NAME)
    handler.setFormatter(JsonFormatter(service=service))
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == HANDLER_NAME]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(number)
    logging.captureWarnings(True)


class RepeatFilter(logging.Filter):
    """Drops a message already seen within the last ``window`` seconds (bounded memory).

    >>> f = RepeatFilter(window=30.0)
    >>> rec = logging.LogRecord("k", logging.ERROR, "", 0, "Connect failed", None, None)
    >>> f.filter(rec), f.filter(rec)
    (True, False)
    """

    def __init__(self, window: float = REPEAT_LOG_WINDOW_S) -> None:
        super().__init__()
        self.window = window
        self._seen: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        now = time.monotonic()
        text = record.getMessage()
        last = self._seen.get(text)
        if last is not None and now - last < self.window:
            return False
        if len(self._seen) >= _REPEATS_TRACKED:
            self._seen.clear()
        self._seen[text] = now
        return True


def kafka_logger(client: str) -> logging.Logger:
    """The logger that a librdkafka client of ``client`` kind (consumer, producer...) logs
    to, with repeats dropped: one line per problem, not one per reconnect attempt."""
    logger = logging.getLogger(f"metarec.kafka.{client}")
    if not any(isinstance(f, RepeatFilter) for f in logger.filters):
        logger.addFilter(RepeatFilter())
    return logger


class Throttle:
    """Lets a repeated warning through at most once per ``every_s`` seconds.

    >>> t = Throttle(every_s=60.0)
    >>> t.allow(0.0), t.allow(1.0), t.allow(61.0)
    (True, False, True)
    """

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self._next = -math.inf

    def allow(self, now: float) -> bool:
        if now < self._next:
            return False
        self._next = now + self.every_s
        return True


def fatal(
    message: str, service: str = "metarec", stream: TextIO | None = None, **fields: Any
) -> None:
    """Write one CRITICAL JSON line, whether or not logging is configured yet: how a
    process that cannot start (or must stop) says why, in the format of all its lines."""
    record = logging.LogRecord("metarec", logging.CRITICAL, "", 0, message, None, None)
    record.__dict__.update(fields)
    out = sys.stderr if stream is None else stream
    out.write(JsonFormatter(service=service).format(record) + "\n")
    out.flush()
