"""docs/schema/*.json against the consumer's own validation (metarec.core.events).

Why: apps in other languages validate with the published JSON Schemas, and the consumer
dead-letters what its decoder refuses; the two must agree, or an app's "valid" record is
dead-lettered. Records are drawn from pools of good and bad values per field (hypothesis),
and every one must get the same verdict from both, except for what a schema cannot express
and the schemas' descriptions name: ids over 256 UTF-8 bytes, records over 64 KiB,
timestamps far ahead of the consumer's clock, lone surrogates.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from referencing import Registry, Resource

from metarec.core.events import (
    SCHEMA_VERSION,
    Event,
    ItemRecord,
    UserRecord,
    decode_event,
    decode_item,
    decode_user,
    encode_event,
    encode_item,
    encode_user,
)
from metarec.errors import InvalidEvent

SCHEMAS = Path(__file__).resolve().parents[2] / "docs" / "schema"
NOW_MS = 1_800_000_000_000
MISSING = object()


def _validators() -> dict[str, Draft202012Validator]:
    docs = {
        name: json.loads((SCHEMAS / f"{name}.json").read_text(encoding="utf-8"))
        for name in ("event", "item", "user")
    }
    registry: Registry[Any] = Registry().with_resources(
        (doc["$id"], Resource.from_contents(doc)) for doc in docs.values()
    )
    for doc in docs.values():
        Draft202012Validator.check_schema(doc)
    return {name: Draft202012Validator(doc, registry=registry) for name, doc in docs.items()}


VALIDATORS = _validators()
DECODERS = {
    # As the consumer calls them: the Kafka record's timestamp stands in for a missing ts.
    "event": lambda raw: decode_event(raw, now_ms=NOW_MS, default_ts=NOW_MS),
    "item": lambda raw: decode_item(raw, default_ts=NOW_MS),
    "user": lambda raw: decode_user(raw, default_ts=NOW_MS),
}

IDS = st.sampled_from(
    [
        "u1",
        "book-7",
        "Ünïcødé id",
        "a b",
        "x" * 256,
        "x" * 257,
        "",
        " u",
        "u ",
        "u\n",
        "u\tv",
        "\x00",
        "u\x1f",
        "\u00a0u",
        7,
        None,
        True,
        ["u"],
        {"u": 1},
    ]
)
TYPES = st.sampled_from(["click", "like", "dislike", "Like", "", "view", 1, None])
TIMESTAMPS = st.sampled_from(
    [
        1_700_000_000_000,
        631_152_000_000,
        631_151_999_999,
        1_700_000_000,
        1.7e12,
        1.5,
        -5,
        0,
        "1700000000000",
        True,
        None,
        float("inf"),
    ]
)
VERSIONS = st.sampled_from([1, 1.0, 2, 0, "1", True, None])
FEATURES = st.sampled_from(
    [[], ["genre:x"], ["a", "b"], [""], ["a", 1], "genre:x", ["f"] * 256, ["f"] * 257, None]
)


def record(draw: st.DrawFn, fields: dict[str, st.SearchStrategy[Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, values in fields.items():
        value = draw(st.one_of(st.just(MISSING), values))
        if value is not MISSING:
            out[name] = value
    return out


@st.composite
def events(draw: st.DrawFn) -> dict[str, Any]:
    return record(
        draw,
        {
            "user": IDS,
            "item": IDS,
            "type": TYPES,
            "ts": TIMESTAMPS,
            "domain": IDS,
            "event_id": IDS,
            "schema_version": VERSIONS,
        },
    )


@st.composite
def items(draw: st.DrawFn) -> dict[str, Any]:
    return record(
        draw,
        {
            "item": IDS,
            "domain": IDS,
            "features": FEATURES,
            "ts": TIMESTAMPS,
            "schema_version": VERSIONS,
            "available": st.sampled_from([True, False, None, 0, 1, "false"]),
        },
    )


@st.composite
def users(draw: st.DrawFn) -> dict[str, Any]:
    return record(
        draw, {"user": IDS, "features": FEATURES, "ts": TIMESTAMPS, "schema_version": VERSIONS}
    )


def verdicts(kind: str, obj: dict[str, Any]) -> tuple[bool, str | None]:
    """(the schema accepts, the consumer's reason to refuse or None)."""
    schema_ok = VALIDATORS[kind].is_valid(obj)
    try:
        DECODERS[kind](json.dumps(obj).encode())
    except InvalidEvent as exc:
        return schema_ok, str(exc)
    return schema_ok, None


def _json_safe(obj: dict[str, Any]) -> bool:
    return all(
        not ((isinstance(v, float) and v != v) or v in (float("inf"), float("-inf")))
        for v in obj.values()
        if isinstance(v, float)
    )


@pytest.mark.parametrize(
    ("kind", "strategy"), [("event", events()), ("item", items()), ("user", users())]
)
def test_the_schema_and_the_consumer_agree_on_every_record(
    kind: str, strategy: st.SearchStrategy[dict[str, Any]]
) -> None:
    @settings(max_examples=600, deadline=None)
    @given(strategy)
    def check(obj: dict[str, Any]) -> None:
        schema_ok, refused = verdicts(kind, obj)
        # Infinity is not JSON; Python writes it anyway, and the consumer refuses it.
        if not _json_safe(obj):
            assert refused is not None
            return
        assert schema_ok == (refused is None), (
            f"schema {'accepts' if schema_ok else 'refuses'} {obj!r}; consumer: "
            f"{refused or 'accepts'}"
        )

    check()


@pytest.mark.parametrize(
    ("obj", "because"),
    [
        ({"user": "é" * 200, "item": "i", "type": "like", "ts": NOW_MS}, "longer than 256 bytes"),
        ({"user": "u", "item": "i", "type": "like", "ts": NOW_MS + 2 * 86_400_000}, "future"),
        (
            {"user": "u", "item": "i", "type": "like", "ts": NOW_MS, "pad": "x" * 70_000},
            "over the 65536 limit",
        ),
    ],
)
def test_what_only_the_consumer_checks_is_what_the_schema_says_it_does(
    obj: dict[str, Any], because: str
) -> None:
    schema_ok, refused = verdicts("event", obj)
    assert schema_ok and refused is not None and because in refused
    described = VALIDATORS["event"].schema["description"]
    assert all(words in described for words in ("64 KiB", "256 UTF-8 bytes", "a day ahead"))


def test_what_the_project_writes_is_valid_against_the_schemas() -> None:
    cases = [
        ("event", encode_event(Event("u1", "i1", "like", NOW_MS, "books", "e-1"))),
        ("item", encode_item(ItemRecord("i1", "books", ("genre:x",), NOW_MS))),
        ("user", encode_user(UserRecord("u1", ("age:30",), NOW_MS))),
    ]
    for kind, raw in cases:
        obj = json.loads(raw)
        assert VALIDATORS[kind].is_valid(obj), kind
        assert VALIDATORS[kind].is_valid({**obj, "schema_version": SCHEMA_VERSION}), kind
        assert not VALIDATORS[kind].is_valid({**obj, "schema_version": SCHEMA_VERSION + 1})
