"""Settings: precedence, validation messages, Kafka pass-through, typos, secrets, docs."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from metarec.config import (
    SETTINGS,
    Settings,
    add_arguments,
    markdown_table,
    redact_url,
    settings_from_args,
)
from metarec.errors import ConfigError


def test_defaults_from_an_empty_environment() -> None:
    s = Settings.from_env({})
    assert s.kafka_bootstrap == "127.0.0.1:9092"
    assert s.redis_url == "redis://127.0.0.1:6379/0"
    assert s.key_prefix == "metarec:"
    assert (s.events_topic, s.items_topic, s.users_topic) == (
        "metarec.events",
        "metarec.items",
        "metarec.users",
    )
    assert s.dlq_topic == "metarec.events.dlq"
    assert s.top_k == 20
    assert dict(s.event_types) == {"click": 1.0, "like": 2.0, "dislike": -1.0}
    assert s.kafka_options == {}


def test_precedence_flag_over_env_over_default() -> None:
    env = {"METAREC_TOP_K": "30", "METAREC_GROUP_ID": "from-env"}
    s = Settings.from_env(env, overrides={"top_k": "40", "group_id": None})
    assert s.top_k == 40  # the explicit override wins
    assert s.group_id == "from-env"  # None (an unset flag) falls through to the env
    assert s.batch_size == 500  # neither: the default


def test_empty_env_var_counts_as_unset() -> None:
    assert Settings.from_env({"METAREC_TOP_K": ""}).top_k == 20


def test_typed_overrides_are_validated_too() -> None:
    assert Settings.from_env({}, {"top_k": 7}).top_k == 7
    with pytest.raises(ConfigError, match="top_k"):
        Settings.from_env({}, {"top_k": True})


@pytest.mark.parametrize(
    ("env", "value", "expected"),
    [
        ("METAREC_TOP_K", "0", "an integer from 1 to 1000"),
        ("METAREC_TOP_K", "ten", "an integer from 1 to 1000"),
        ("METAREC_BATCH_SIZE", "-1", "an integer"),
        ("METAREC_KAFKA_BOOTSTRAP", "localhost", "host:port"),
        ("METAREC_REDIS_URL", "http://127.0.0.1:6379", "redis://, rediss://"),
        ("METAREC_REDIS_URL", "redis://h:6379/db", "database number"),
        ("METAREC_EVENTS_TOPIC", "has space", "Kafka topic name"),
        ("METAREC_EVENT_TYPES", "click=1", "TYPE:WEIGHT"),
        ("METAREC_EVENT_TYPES", "dislike:-1", "at least one positive"),
        ("METAREC_EVENT_TYPES", "click:1,click:2", "unique"),
        ("METAREC_EVENT_TYPES", "click:0", "non-zero"),
        ("METAREC_LOG_LEVEL", "loud", "DEBUG, INFO, WARNING, ERROR"),
        ("METAREC_KEY_PREFIX", "a b", "prefix"),
    ],
)
def test_invalid_value_names_setting_env_flag_value_and_expectation(
    env: str, value: str, expected: str
) -> None:
    spec = next(s for s in SETTINGS if s.env == env)
    with pytest.raises(ConfigError) as info:
        Settings.from_env({env: value})
    message = str(info.value)
    assert "\n" not in message
    for part in (spec.name, spec.env, spec.flag, repr(value), expected):
        assert part in message, (part, message)


def test_flag_source_is_named_when_the_flag_was_bad() -> None:
    with pytest.raises(ConfigError, match=r"--top-k='0'"):
        Settings.from_env({"METAREC_TOP_K": "5"}, {"top_k": "0"})


def test_valid_values_are_normalized() -> None:
    s = Settings.from_env(
        {
            "METAREC_LOG_LEVEL": "debug",
            "METAREC_EVENT_TYPES": " click:1 , buy:5 ",
            "METAREC_REDIS_URL": "rediss://app:pw@cache.internal:6380/2",
            "METAREC_KAFKA_BOOTSTRAP": "k1:9092, k2:9093",
        }
    )
    assert s.log_level == "DEBUG"
    assert dict(s.event_types) == {"click": 1.0, "buy": 5.0}
    assert s.redis_url == "rediss://app:pw@cache.internal:6380/2"
    assert s.kafka_bootstrap == "k1:9092,k2:9093"


def test_kafka_pass_through_maps_names_and_merges() -> None:
    env = {
        "METAREC_KAFKA_BOOTSTRAP": "broker:9092",
        "METAREC_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "METAREC_KAFKA_SASL_PASSWORD": "pw",
        "METAREC_KAFKA_LINGER_MS": "20",
    }
    s = Settings.from_env(env, {"kafka_options": {"acks": "all"}})
    assert s.kafka_options == {
        "security.protocol": "SASL_SSL",
        "sasl.password": "pw",
        "linger.ms": "20",
        "acks": "all",
    }
    config = s.kafka_config(group_id="g", enable_auto_commit=False, linger_ms=1)
    assert config["bootstrap.servers"] == "broker:9092"
    assert config["security.protocol"] == "SASL_SSL"
    assert config["group.id"] == "g"
    assert config["enable.auto.commit"] == "false"
    assert config["linger.ms"] == "1"  # the code's explicit requirement wins
    assert all(isinstance(v, str) for v in config.values())


@pytest.mark.parametrize(
    ("var", "suggestion"),
    [
        ("METAREC_TOPK", "METAREC_TOP_K"),
        ("METAREC_REDIS", "METAREC_REDIS_URL"),
        ("METAREC_EVENT_TOPIC", "METAREC_EVENTS_TOPIC"),
        ("METAREC_KAFKA_BOOTSTAP", "METAREC_KAFKA_BOOTSTRAP"),
        ("METAREC_KAFKA_BOOTSTRAP_SERVERS", "METAREC_KAFKA_BOOTSTRAP"),
    ],
)
def test_unknown_variable_suggests_the_closest_name(var: str, suggestion: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({var: "x"})
    assert var in str(info.value)
    assert suggestion in str(info.value)


def test_unknown_variable_without_close_match_still_fails() -> None:
    with pytest.raises(ConfigError, match="METAREC_ZZZ"):
        Settings.from_env({"METAREC_ZZZ": "1"})


def test_other_variables_are_ignored() -> None:
    assert Settings.from_env({"PATH": "/bin", "metarec_top_k": "x"}).top_k == 20


def test_pass_through_cannot_set_group_id() -> None:
    with pytest.raises(ConfigError, match="METAREC_GROUP_ID"):
        Settings.from_env({"METAREC_KAFKA_GROUP_ID": "g"})


def test_unknown_override_is_rejected() -> None:
    with pytest.raises(ConfigError, match="top_k"):
        Settings.from_env({}, {"topk": 3})


def test_secrets_are_masked_in_repr_and_redacted() -> None:
    env = {
        "METAREC_REDIS_URL": "rediss://app:hunter2@cache:6380/0",
        "METAREC_KAFKA_SASL_PASSWORD": "pw-secret-1",
        "METAREC_KAFKA_SASL_JAAS_CONFIG": "jaas-secret-2",
        "METAREC_KAFKA_SSL_KEY_PASSWORD": "secret-3",
        "METAREC_KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET": "secret-4",
        "METAREC_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
    }
    s = Settings.from_env(env)
    red = s.redacted()
    text = repr(s) + str(s) + str(red)
    for secret in ("hunter2", "pw-secret-1", "jaas-secret-2", "secret-3", "secret-4"):
        assert secret not in text
    assert red["redis_url"] == "rediss://app:***@cache:6380/0"
    options = red["kafka_options"]
    assert isinstance(options, dict)
    assert options["security.protocol"] == "SASL_SSL"  # not a secret: shown
    # the real values are still there for the clients
    assert s.kafka_config()["sasl.password"] == "pw-secret-1"


def test_invalid_secret_value_is_masked_in_the_error() -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"METAREC_REDIS_URL": "http://app:hunter2@cache:6379"})
    assert "hunter2" not in str(info.value)


def test_redact_url_masks_query_passwords() -> None:
    assert "s3" not in redact_url("redis://h:6379/0?password=s3")
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


def test_settings_is_frozen_and_replace_validates() -> None:
    s = Settings.from_env({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.top_k = 5  # type: ignore[misc]
    assert s.replace(top_k=5).top_k == 5
    with pytest.raises(ConfigError, match="top_k"):
        s.replace(top_k=0)


def test_argparse_flags_cover_every_setting_and_feed_settings() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    help_text = parser.format_help()
    for spec in SETTINGS:
        assert spec.flag in help_text
    args = parser.parse_args(
        [
            "--top-k",
            "3",
            "--kafka-bootstrap",
            "b:1",
            "--kafka-option",
            "acks=all",
            "--kafka-option",
            "linger.ms=0",
        ]
    )
    s = settings_from_args(args, environ={"METAREC_TOP_K": "9", "METAREC_GROUP_ID": "env-g"})
    assert (s.top_k, s.kafka_bootstrap, s.group_id) == (3, "b:1", "env-g")
    assert s.kafka_options == {"acks": "all", "linger.ms": "0"}


def test_malformed_kafka_option_flag() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(ConfigError, match="NAME=VALUE"):
        settings_from_args(parser.parse_args(["--kafka-option", "acks"]), environ={})


def test_markdown_table_lists_every_env_var_and_flag() -> None:
    table = markdown_table()
    for spec in SETTINGS:
        assert f"`{spec.env}`" in table
        assert f"`{spec.flag}`" in table
    assert "METAREC_KAFKA_<NAME>" in table
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert len(rows) == len(SETTINGS) + 1
    assert all(row.count("|") == 7 for row in rows)


def test_table_rows_are_machine_readable_and_defaults_parse() -> None:
    for spec in SETTINGS:
        row = spec.row()
        assert set(row) == {"name", "env", "flag", "type", "default", "help"}
        # The documented default, fed back through the parser, gives the default.
        assert spec.parse(row["default"]) == spec.default, spec.name


def test_a_cluster_url_is_accepted_checked_and_redacted() -> None:
    url = "rediss+cluster://app:s3cret@node-1.internal:7000?ssl_cert_reqs=required"
    s = Settings.from_env({"METAREC_REDIS_URL": url})
    assert s.redis_url == url
    assert "s3cret" not in str(s.redacted())
    assert redact_url(url).startswith("rediss+cluster://app:***@node-1.internal:7000")
    assert Settings.from_env({"METAREC_REDIS_URL": "redis+cluster://h:7000/0"}).redis_url
    with pytest.raises(ConfigError, match="database 0 only"):
        Settings.from_env({"METAREC_REDIS_URL": "redis+cluster://h:7000/1"})
    with pytest.raises(ConfigError, match=r"redis\+cluster://"):
        Settings.from_env({"METAREC_REDIS_URL": "cluster://h:7000"})


@pytest.mark.parametrize(
    ("raw", "ok"),
    [
        ("0", True),
        ("86400", True),
        ("31536000", True),
        ("3600", False),
        ("1", False),
        ("-1", False),
        ("day", False),
    ],
)
def test_a_state_ttl_is_off_or_at_least_a_day(raw: str, ok: bool) -> None:
    if ok:
        assert Settings.from_env({"METAREC_STATE_TTL_S": raw}).state_ttl_s == int(raw)
    else:
        with pytest.raises(ConfigError, match=r"METAREC_STATE_TTL_S.*0 \(never\) or an integer"):
            Settings.from_env({"METAREC_STATE_TTL_S": raw})
