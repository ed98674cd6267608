"""deploy/monitoring/alerts.yml: the alerts fire when they should, and only then, checked
by Prometheus's own rule tester on the series a consumer exports (alerts.test.yml)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.monitoring_series import MONITORING

pytestmark = pytest.mark.slow


def promtool(*args: str) -> str:
    """Run promtool in deploy/monitoring; fail with its output unless it succeeds."""
    exe = shutil.which("promtool")
    if exe is None:
        pytest.fail("promtool is missing: scripts/system-packages.sh installs Debian's prometheus")
    done = subprocess.run([exe, *args], cwd=MONITORING, capture_output=True, text=True, timeout=120)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    return out


def test_the_stale_model_and_no_model_alerts_fire_on_their_cases_only() -> None:
    assert "SUCCESS" in promtool("test", "rules", "alerts.test.yml")


def test_every_alert_rule_is_valid_promql() -> None:
    assert "SUCCESS" in promtool("check", "rules", "alerts.yml")
