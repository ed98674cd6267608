"""JSON-lines logging: every line parses, carries the base and extra fields, and only once."""

from __future__ import annotations

import io
import json
import logging
import re
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest

from metarec.errors import ConfigError
from metarec.logs import HANDLER_NAME, TF_CPP_MIN_LOG_LEVEL, JsonFormatter, configure_logging

ISO_MS_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


@pytest.fixture(autouse=True)
def restore_root_logger() -> Iterator[None]:
    """Undo configure_logging: its handler, the root level and the warnings capture."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(False)


def lines(buf: io.StringIO) -> list[dict[str, Any]]:
    text = buf.getvalue()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def test_every_line_is_json_with_the_base_fields() -> None:
    buf = io.StringIO()
    configure_logging("DEBUG", stream=buf, service="consumer")
    log = logging.getLogger("metarec.test.logs")
    log.debug("first")
    log.info("with %s and\nnewline", "args")
    out = lines(buf)
    assert [o["msg"] for o in out] == ["first", "with args and\nnewline"]
    for obj in out:
        assert list(obj)[:5] == ["ts", "level", "logger", "service", "msg"]
        assert ISO_MS_UTC.fullmatch(obj["ts"])
        assert obj["logger"] == "metarec.test.logs"
        assert obj["service"] == "consumer"
        assert "exc" not in obj
    assert [o["level"] for o in out] == ["DEBUG", "INFO"]


def test_timestamp_is_the_records_time_in_utc() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
    record.created = datetime(2024, 5, 1, 12, 0, 0, 123_000, tzinfo=UTC).timestamp()
    assert json.loads(JsonFormatter().format(record))["ts"] == "2024-05-01T12:00:00.123Z"


def test_extra_fields_are_made_json_safe() -> None:
    buf = io.StringIO()
    configure_logging(stream=buf)

    class Opaque:
        def __str__(self) -> str:
            return "opaque!"

    logging.getLogger("metarec.test").info(
        "stats",
        extra={
            "events": np.int64(12),
            "p99": np.float32(0.5),
            "ok": np.bool_(True),
            "lag": None,
            "partitions": [0, np.int32(1)],
            "nested": {"a": (1, 2), 3: "b"},
            "arr": np.arange(3),
            "nan": float("nan"),
            "inf": np.float64("inf"),
            "obj": Opaque(),
            "bytes": b"\xff",
            "text": "é",
        },
    )
    [obj] = lines(buf)
    assert obj["events"] == 12 and isinstance(obj["events"], int)
    assert obj["p99"] == 0.5
    assert obj["ok"] is True
    assert obj["lag"] is None
    assert obj["partitions"] == [0, 1]
    assert obj["nested"] == {"a": [1, 2], "3": "b"}
    assert obj["arr"] == [0, 1, 2]
    assert obj["nan"] == "nan" and obj["inf"] == "inf"
    assert obj["obj"] == "opaque!"
    assert obj["bytes"] == "b'\\xff'"
    assert obj["text"] == "é"


def test_extra_fields_cannot_replace_base_fields() -> None:
    buf = io.StringIO()
    configure_logging(stream=buf, service="svc")
    logging.getLogger("metarec.test").info("m", extra={"service": "fake", "level": "x"})
    [obj] = lines(buf)
    assert obj["service"] == "svc" and obj["service_"] == "fake"
    assert obj["level"] == "INFO" and obj["level_"] == "x"


def test_exception_traceback_is_one_field() -> None:
    buf = io.StringIO()
    configure_logging(stream=buf)
    try:
        raise KeyError("boom")
    except KeyError:
        logging.getLogger("metarec.test").exception("batch failed", extra={"batch": 3})
    [obj] = lines(buf)
    assert obj["level"] == "ERROR"
    assert obj["msg"] == "batch failed" and obj["batch"] == 3
    assert obj["exc"].startswith("Traceback (most recent call last):")
    assert "KeyError: 'boom'" in obj["exc"]


def test_configure_twice_installs_one_handler_with_the_new_settings() -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging("INFO", stream=first, service="a")
    configure_logging("WARNING", stream=second, service="b")
    root = logging.getLogger()
    assert [h.get_name() for h in root.handlers].count(HANDLER_NAME) == 1
    log = logging.getLogger("metarec.test")
    log.info("dropped at WARNING")
    log.warning("kept")
    assert first.getvalue() == ""
    [obj] = lines(second)
    assert (obj["msg"], obj["service"]) == ("kept", "b")


def test_invalid_level_names_the_setting() -> None:
    with pytest.raises(ConfigError, match="METAREC_LOG_LEVEL"):
        configure_logging("LOUD", stream=io.StringIO())


def test_tensorflow_cpp_logs_silenced_unless_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    configure_logging(stream=io.StringIO())
    import os

    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == TF_CPP_MIN_LOG_LEVEL == "3"
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")
    configure_logging(stream=io.StringIO())
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "0"


def test_warnings_are_logged_as_json() -> None:
    buf = io.StringIO()
    configure_logging(stream=buf)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("old API", DeprecationWarning, stacklevel=1)
    [obj] = lines(buf)
    assert obj["logger"] == "py.warnings" and obj["level"] == "WARNING"
    assert "DeprecationWarning: old API" in obj["msg"]
