"""A team's own event log as a :class:`~metarec.data.dataset.Dataset`.

Before deploying metarec, a team can compare it with the baselines on a dump of its own
``metarec.events`` topic: ``metarec eval --data events.jsonl``. Two formats are read:

* **JSON lines**, one record per line, exactly as published to the topics: events
  (``{"user", "item", "type", "ts", "domain", "event_id"}``), and, optionally, item records
  (``{"item", "domain", "features", "ts"}``) and user records (``{"user", "features",
  "ts"}``) mixed in. A record is an event when it has ``type``, an item record when it has
  ``item`` and no ``user``, a user record when it has ``user`` and no ``item``.
* **CSV** with a header naming its columns: ``user,item,type,ts`` and optionally
  ``domain`` and ``event_id`` (any order); events only.

Item and user records can also come in files of their own (JSON lines). Every record is
checked as the consumer checks it (:mod:`metarec.core.events`); one that the consumer would
dead-letter stops the load with an error naming the file, the line and the fault. A file has
no record timestamps to fall back on, so every event needs ``ts`` (epoch milliseconds).
Events are put in timestamp order (a dump of several partitions interleaves them), ties
keeping their order in the file. Files ending in ``.gz`` are read compressed.

>>> import tempfile, pathlib
>>> folder = pathlib.Path(tempfile.mkdtemp())
>>> _ = (folder / "log.csv").write_text("user,item,type,ts\\nu1,a,click,1700000000000\\n")
>>> ds = load_event_log(folder / "log.csv")
>>> ds.name, [(e.user, e.item, e.type) for e in ds.events]
('log', [('u1', 'a', 'click')])
"""

from __future__ import annotations

import csv
import functools
import gzip
import io
import json
from collections.abc import Callable, Iterator, Mapping
from operator import attrgetter
from pathlib import Path
from typing import Any, TypeVar

from metarec.core.events import (
    DEFAULT_EVENT_WEIGHTS,
    LIMITS,
    Event,
    ItemRecord,
    Limits,
    UserRecord,
    decode_item,
    decode_user,
    load_record,
    validate_event,
)
from metarec.data.dataset import Dataset
from metarec.errors import DataError, InvalidEvent

__all__ = ["CSV_COLUMNS", "REQUIRED_CSV_COLUMNS", "load_event_log"]

T = TypeVar("T")

#: The columns an events CSV may have, and those it must have.
CSV_COLUMNS = ("user", "item", "type", "ts", "domain", "event_id")
REQUIRED_CSV_COLUMNS = ("user", "item", "type", "ts")


def load_event_log(
    path: str | Path,
    *,
    items: str | Path | None = None,
    users: str | Path | None = None,
    event_types: Mapping[str, float] = DEFAULT_EVENT_WEIGHTS,
    limits: Limits = LIMITS,
) -> Dataset:
    """Read the events at ``path`` (CSV when it ends in ``.csv`` or ``.csv.gz``, JSON lines
    otherwise), plus item and user records from ``items`` and ``users`` (JSON lines).

    Raises :class:`~metarec.errors.DataError` naming the file and line of the first
    malformed record, or when the file holds no event.
    """
    path = Path(path)
    events: list[Event] = []
    item_records: list[ItemRecord] = []
    user_records: list[UserRecord] = []
    if _suffix(path) == ".csv":
        events = list(_csv_events(path, event_types, limits))
    else:
        for where, obj in _json_lines(path, limits):
            kind = _kind(obj)
            if kind == "event":
                events.append(
                    _checked(
                        where,
                        functools.partial(
                            validate_event, obj, event_types=event_types, limits=limits
                        ),
                    )
                )
            elif kind == "item":
                item_records.append(
                    _checked(where, functools.partial(decode_item, json.dumps(obj), limits=limits))
                )
            else:
                user_records.append(
                    _checked(where, functools.partial(decode_user, json.dumps(obj), limits=limits))
                )
    if items is not None:
        for where, obj in _json_lines(Path(items), limits):
            item_records.append(
                _checked(where, functools.partial(decode_item, json.dumps(obj), limits=limits))
            )
    if users is not None:
        for where, obj in _json_lines(Path(users), limits):
            user_records.append(
                _checked(where, functools.partial(decode_user, json.dumps(obj), limits=limits))
            )
    if not events:
        raise DataError(f"{path}: no events (an event log needs at least one event record)")
    events.sort(key=attrgetter("ts"))  # stable: ties keep their order in the file
    return Dataset(_name(path), events, item_records, user_records)


def _checked(where: str, decode: Callable[[], T]) -> T:
    """``decode()``, its :class:`InvalidEvent` turned into a :class:`DataError` at ``where``."""
    try:
        return decode()
    except InvalidEvent as exc:
        raise DataError(f"{where}: {exc}") from None


def _suffix(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def _name(path: Path) -> str:
    name = path.name
    for suffix in reversed(path.suffixes):
        name = name.removesuffix(suffix)
    return name or path.name


def _open(path: Path) -> io.BufferedIOBase:
    try:
        if path.suffix.lower() == ".gz":
            return gzip.open(path, "rb")
        return path.open("rb")
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """Numbered lines, decoded one at a time so that a bad byte is reported by its line."""
    with _open(path) as f:
        number = 0
        try:
            for number, raw in enumerate(f, 1):
                yield number, raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}:{number}: not UTF-8 ({exc.reason})") from None
        except (OSError, EOFError) as exc:
            raise DataError(f"{path}:{number + 1}: cannot read on: {exc}") from None


def _json_lines(path: Path, limits: Limits) -> Iterator[tuple[str, dict[str, Any]]]:
    for number, line in _lines(path):
        text = line.strip()
        if not text:
            continue
        where = f"{path}:{number}"
        obj = _checked(where, functools.partial(load_record, text, limits))
        yield where, obj


def _kind(obj: Mapping[str, object]) -> str:
    if "type" in obj:
        return "event"
    if "item" in obj and "user" not in obj:
        return "item"
    if "user" in obj and "item" not in obj:
        return "user"
    return "event"  # validated as one, so the error names what is missing


def _csv_events(path: Path, event_types: Mapping[str, float], limits: Limits) -> Iterator[Event]:
    lines = _lines(path)
    rows = csv.reader(text for _, text in lines)
    try:
        header = next(rows)
    except StopIteration:
        raise DataError(f"{path}: empty file; expected a header line") from None
    except csv.Error as exc:
        raise DataError(f"{path}:1: {exc}") from None
    columns = [c.strip() for c in header]
    unknown = [c for c in columns if c not in CSV_COLUMNS]
    missing = [c for c in REQUIRED_CSV_COLUMNS if c not in columns]
    if unknown or missing or len(set(columns)) != len(columns):
        raise DataError(
            f"{path}:1: the header must name the columns {','.join(REQUIRED_CSV_COLUMNS)} "
            f"and optionally domain, event_id, each once; got {','.join(columns)!r}"
        )
    number = 1
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except csv.Error as exc:
            raise DataError(f"{path}:{number + 1}: {exc}") from None
        number = rows.line_num
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        where = f"{path}:{number}"
        if len(row) != len(columns):
            raise DataError(f"{where}: {len(row)} fields, the header has {len(columns)}")
        obj: dict[str, object] = dict(zip(columns, row, strict=True))
        ts = str(obj["ts"]).strip()
        if not ts.lstrip("-").isdigit():
            raise DataError(f"{where}: field 'ts' must be integer epoch milliseconds, got {ts!r}")
        obj["ts"] = int(ts)
        if obj.get("event_id") == "":
            obj["event_id"] = None
        if obj.get("domain") == "":
            del obj["domain"]
        try:
            yield validate_event(obj, event_types=event_types, limits=limits)
        except InvalidEvent as exc:
            raise DataError(f"{where}: {exc}") from None
