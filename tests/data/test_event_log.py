"""A team's own event log: both formats, records mixed in or beside, errors by line."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from metarec.data.event_log import load_event_log
from metarec.data.registry import load_dataset
from metarec.errors import DataError

#: A plausible event time (epoch ms, 2023): the consumer refuses times before 1990.
T0 = 1_700_000_000_000


def _jsonl(path: Path, *records: object) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_json_lines_as_published_with_records_mixed_in(tmp_path: Path) -> None:
    log = _jsonl(
        tmp_path / "dump.jsonl",
        {"user": "u1", "item": "b", "type": "like", "ts": T0 + 2000, "domain": "books"},
        {"item": "b", "domain": "books", "features": ["genre:sf"], "ts": 0},
        {"user": "u1", "features": ["age:30"], "ts": 0},
        {"user": "u2", "item": "a", "type": "click", "ts": T0 + 1000, "event_id": "e-7"},
    )
    ds = load_event_log(log)
    assert ds.name == "dump"
    # Timestamp order: a dump of several partitions interleaves them.
    assert [(e.user, e.item, e.type, e.ts) for e in ds.events] == [
        ("u2", "a", "click", T0 + 1000),
        ("u1", "b", "like", T0 + 2000),
    ]
    assert ds.events[0].event_id == "e-7" and ds.events[1].domain == "books"
    assert [(r.item, r.features) for r in ds.items] == [("b", ("genre:sf",))]
    assert [(r.user, r.features) for r in ds.users] == [("u1", ("age:30",))]


def test_ties_keep_their_order_in_the_file(tmp_path: Path) -> None:
    log = _jsonl(
        tmp_path / "t.jsonl",
        *({"user": "u", "item": f"i{k}", "type": "click", "ts": T0} for k in range(5)),
    )
    assert [e.item for e in load_event_log(log).events] == ["i0", "i1", "i2", "i3", "i4"]


def test_csv_in_any_column_order_gzipped_with_optional_domain(tmp_path: Path) -> None:
    path = tmp_path / "events.csv.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(
            "ts,type,item,user,domain\n1700000000010,like,a,u1,\n1700000000020,click,b,u2,books\n\n"
        )
    ds = load_event_log(path)
    assert ds.name == "events"
    assert [(e.user, e.item, e.type, e.ts) for e in ds.events] == [
        ("u1", "a", "like", T0 + 10),
        ("u2", "b", "click", T0 + 20),
    ]
    assert ds.events[1].domain == "books"


def test_item_and_user_files_beside_the_events(tmp_path: Path) -> None:
    log = tmp_path / "e.csv"
    log.write_text("user,item,type,ts\nu1,a,click,1700000000001\n")
    items = _jsonl(tmp_path / "items.jsonl", {"item": "a", "features": ["x"], "ts": 0})
    users = _jsonl(tmp_path / "users.jsonl", {"user": "u1", "features": ["y"], "ts": 0})
    ds = load_dataset(str(log), items=items, users=users)
    assert [r.item for r in ds.items] == ["a"] and [r.user for r in ds.users] == ["u1"]


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (
            '{"user":"u","item":"a","type":"click","ts":1700000000001}\n{"user":"u","item":',
            r"e\.jsonl:2: record is not JSON",
        ),
        (
            '{"user":"u","item":"a","type":"click","ts":1700000000001}\n\n[1, 2]\n',
            r"e\.jsonl:3: record must be a JSON object",
        ),
        ('{"user":"u","item":"a","type":"explode","ts":1700000000001}\n', r"e\.jsonl:1: .*explode"),
        ('{"user":"u","item":"a","type":"click"}\n', r"e\.jsonl:1: .*ts"),
        (
            '{"user":"u","item":"a","type":"click","ts":1700000000001}\n{"user":"u","ts":1700000000001}\n{"item":"x","user":"v"}\n',
            r"e\.jsonl:3: ",
        ),
    ],
)
def test_a_malformed_json_record_names_its_line(tmp_path: Path, text: str, error: str) -> None:
    path = tmp_path / "e.jsonl"
    path.write_text(text)
    with pytest.raises(DataError, match=error):
        load_event_log(path)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("", r"empty file"),
        ("user,item,ts\n", r"e\.csv:1: the header must name"),
        ("user,item,type,ts,color\n", r"e\.csv:1: the header must name"),
        (
            "user,item,type,ts\nu,a,click,1700000000001\nu,a,click\n",
            r"e\.csv:3: 3 fields, the header has 4",
        ),
        ("user,item,type,ts\nu,a,click,yesterday\n", r"e\.csv:2: field 'ts' must be integer"),
        ("user,item,type,ts\nu,a,click,1700000000001\n,a,click,1700000000002\n", r"e\.csv:3: "),
    ],
)
def test_a_malformed_csv_row_names_its_line(tmp_path: Path, text: str, error: str) -> None:
    path = tmp_path / "e.csv"
    path.write_text(text)
    with pytest.raises(DataError, match=error):
        load_event_log(path)


def test_no_events_and_unreadable_files_are_errors(tmp_path: Path) -> None:
    only_items = _jsonl(tmp_path / "items.jsonl", {"item": "a", "ts": 0})
    with pytest.raises(DataError, match="no events"):
        load_event_log(only_items)
    binary = tmp_path / "b.jsonl"
    binary.write_bytes(b'{"user":"u","item":"a","type":"click","ts":1700000000001}\n\xff\xfe\n')
    with pytest.raises(DataError, match=r"b\.jsonl:2: not UTF-8"):
        load_event_log(binary)
    with pytest.raises(DataError, match="cannot read"):
        load_event_log(tmp_path / "missing.jsonl")


def test_record_files_need_an_event_log(tmp_path: Path) -> None:
    items = _jsonl(tmp_path / "items.jsonl", {"item": "a", "ts": 0})
    with pytest.raises(DataError, match="event log file only"):
        load_dataset("synthetic-small", items=items)
