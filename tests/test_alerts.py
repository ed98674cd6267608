"""deploy/monitoring/alerts.yml: the alerts fire when they should, and only then, checked
by Prometheus's own rule tester on the series a consumer exports (alerts.test.yml)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.monitoring_series import MONITORING

pytestmark = pytest.mark.slow


def test_the_stale_model_and_no_model_alerts_fire_on_their_cases_only() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is missing: scripts/system-packages.sh installs Debian's prometheus")
    done = subprocess.run(
        [promtool, "test", "rules", "alerts.test.yml"],
        cwd=MONITORING,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout + done.stderr, done.stdout + done.stderr


def test_every_alert_rule_is_valid_promql() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is missing: scripts/system-packages.sh installs Debian's prometheus")
    done = subprocess.run(
        [promtool, "check", "rules", "alerts.yml"],
        cwd=MONITORING,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
