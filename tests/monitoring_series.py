"""The series the shipped dashboard and alert rules (deploy/monitoring/) query, for the
tests that check a running consumer and aggregator export them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

MONITORING = Path(__file__).resolve().parent.parent / "deploy" / "monitoring"
#: Series both processes export; the others are one process's own (metarec_aggregator_*:
#: the aggregator's).
COMMON = frozenset(
    {
        "metarec_model_version",
        "metarec_model_age_seconds",
        "metarec_last_loop_timestamp_seconds",
        "metarec_redis_errors",
        "metarec_redis_outages",
        "metarec_kafka_errors",
    }
)


def family(name: str) -> str:
    """A sample's or query's series name without the suffix of its type."""
    return re.sub(r"_(total|bucket|count|sum|created)$", "", name)


def queried() -> set[str]:
    """Every metarec series an alert rule or a dashboard panel queries."""
    rules = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    dashboard = json.loads((MONITORING / "grafana" / "dashboards" / "metarec.json").read_text())
    exprs += [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    return {family(n) for e in exprs for n in re.findall(r"metarec_[a-z_]+", e)}


def exported(text: str) -> set[str]:
    """The series families in a ``/metrics`` page."""
    return {family(line.split()[2]) for line in text.splitlines() if line.startswith("# HELP ")}


def expected_of(process: str) -> set[str]:
    """What ``process`` ("consumer" or "aggregator") must export of :func:`queried`."""
    own = {n for n in queried() if n.startswith("metarec_aggregator_")}
    if process == "aggregator":
        return own | (queried() & COMMON)
    return queried() - own
