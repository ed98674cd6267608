"""The ``metarec`` command as an operator meets it when something is wrong: one line, and
an exit status that says whether to fix a setting (2) or wait for Redis or the broker (3)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from metarec.cli import COMMAND_SETTINGS, EXIT_CONFIG, EXIT_FAILED, EXIT_UNAVAILABLE
from metarec.services.store import RedisStore
from tests.consumer.system import make_model

# Processes: left out of `make test-fast`.
pytestmark = pytest.mark.slow

ONE_SHOT = [
    ["recs", "u1"],
    ["user", "reset", "u1"],
    ["model", "list"],
    ["model", "rollback", "1"],
    ["dlq", "replay", "--dry-run"],
    ["aggregate", "--now"],
]


def _closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def _run(*argv: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("METAREC_")}
    return subprocess.run(
        [sys.executable, "-m", "metarec.cli", *argv],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )


def _one_critical_line(proc: subprocess.CompletedProcess[str]) -> dict[str, str]:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-2000:]
    line: dict[str, str] = json.loads(lines[0])
    assert line["level"] == "CRITICAL"
    return line


@pytest.mark.parametrize("argv", ONE_SHOT, ids=" ".join)
def test_an_unreachable_redis_is_one_line_and_exit_3(argv: list[str]) -> None:
    port = _closed_port()
    started = time.monotonic()
    proc = _run(
        *argv,
        METAREC_REDIS_URL=f"redis://127.0.0.1:{port}/0",
        METAREC_KAFKA_BOOTSTRAP=f"127.0.0.1:{_closed_port()}",
    )
    assert proc.returncode == EXIT_UNAVAILABLE, proc.stderr[-2000:]
    line = _one_critical_line(proc)
    if argv[0] == "dlq":  # reads the dead-letter topic before it touches Redis
        assert "METAREC_KAFKA_BOOTSTRAP did not answer" in line["msg"]
    else:
        assert "METAREC_REDIS_URL did not answer" in line["msg"] and str(port) in line["error"]
    assert proc.stdout == ""
    assert time.monotonic() - started < 30  # no retrying like a service (120 s)


def test_refused_credentials_are_one_line_and_exit_2(redis_url: str) -> None:
    host = redis_url.split("://", 1)[1].split("/", 1)[0].rpartition("@")[2]
    url = f"redis://metarec-no-such-user:not-the-password@{host}/0"
    proc = _run("model", "list", METAREC_REDIS_URL=url)
    assert proc.returncode == EXIT_CONFIG, proc.stderr[-2000:]
    line = _one_critical_line(proc)
    assert "refused" in line["msg"] and "not-the-password" not in proc.stderr


def test_an_unreachable_broker_is_one_line_and_exit_3(redis_url: str) -> None:
    port = _closed_port()
    proc = _run(
        "dlq", "inspect", METAREC_KAFKA_BOOTSTRAP=f"127.0.0.1:{port}", METAREC_REDIS_URL=redis_url
    )
    assert proc.returncode == EXIT_UNAVAILABLE, proc.stderr[-2000:]
    assert "METAREC_KAFKA_BOOTSTRAP did not answer" in _one_critical_line(proc)["msg"]


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["model", "rollback", "0"], "0 is not at least 1"),
        (["model", "rollback", "-3"], "-3 is not at least 1"),
        (["model", "rollback", "two"], "'two' is not a whole number"),
        (["dlq", "inspect", "--limit", "0"], "0 is not at least 1"),
        (["dlq", "inspect", "--limit", "-1"], "-1 is not at least 1"),
    ],
)
def test_invalid_arguments_exit_2_naming_the_argument(argv: list[str], says: str) -> None:
    proc = _run(*argv)
    assert proc.returncode == EXIT_CONFIG
    assert proc.stderr.strip().splitlines()[-1].endswith(says)


def test_rolling_back_to_a_missing_version_names_the_stored_ones(
    redis_url: str, redis_client: redis.Redis[bytes], key_prefix: str
) -> None:
    store = RedisStore(redis_client, prefix=key_prefix)
    version = store.publish_model(make_model(["a", "b"], ["default"], seed=1).to_bytes())
    proc = _run(
        "model",
        "rollback",
        str(version + 5),
        METAREC_REDIS_URL=redis_url,
        METAREC_KEY_PREFIX=key_prefix,
    )
    assert proc.returncode == EXIT_FAILED
    error = _one_critical_line(proc)["error"]
    assert error.endswith(f"stored versions: {version}") and "()" not in error


def test_dev_up_status_down_all_speak_text(redis_url: str, tmp_path: Path) -> None:
    env = {
        "METAREC_KAFKA_BOOTSTRAP": f"127.0.0.1:{_closed_port()}",
        "METAREC_REDIS_URL": redis_url,
    }
    state = str(tmp_path / "dev")
    try:
        up = _run("dev", "up", "--state-dir", state, **env)
        assert up.returncode == 0, up.stderr[-2000:]
        assert up.stdout.startswith("broker  127.0.0.1:")
        status = _run("dev", "status", "--state-dir", state, **env)
        assert status.returncode == 0 and status.stdout.strip().endswith("healthy")
    finally:
        down = _run("dev", "down", "--state-dir", state, **env)
    assert down.returncode == 0, down.stderr[-2000:]
    assert down.stdout.startswith("stopped       broker 127.0.0.1:"), down.stdout
    assert not down.stdout.lstrip().startswith("{")
    again = _run("dev", "down", "--state-dir", state, **env)
    assert again.stdout.startswith("nothing to stop")


def test_recs_before_any_event_says_nothing_is_served_and_why(
    redis_url: str, key_prefix: str
) -> None:
    proc = _run(
        "recs",
        "nobody",
        "--domain",
        "books",
        METAREC_REDIS_URL=redis_url,
        METAREC_KEY_PREFIX=key_prefix,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    served = json.loads(proc.stdout)["served"]
    assert (served["source"], served["items"]) == (None, [])
    assert "no consumer has applied an event" in served["why"]


@pytest.mark.parametrize(
    "argv",
    [
        ["recs", "u1"],
        ["user", "reset", "u1"],
        ["model", "list"],
        ["dlq", "inspect"],
        ["topics"],
        ["dev", "status"],
    ],
    ids=" ".join,
)
def test_a_one_shot_commands_help_shows_only_the_settings_it_reads(argv: list[str]) -> None:
    shown = _run(argv[0], "--help").stdout
    assert "--top-k" not in shown and "--history-length" not in shown
    assert all(f"--{name.replace('_', '-')}" in shown for name in COMMAND_SETTINGS[argv[0]])
    refused = _run(*argv, "--top-k", "3")
    assert refused.returncode == EXIT_CONFIG and "unrecognized arguments: --top-k" in (
        refused.stderr
    )


def test_the_services_still_take_every_setting() -> None:
    shown = _run("consume", "--help").stdout
    assert "--top-k" in shown and "--history-length" in shown and "--kafka-option" in shown
