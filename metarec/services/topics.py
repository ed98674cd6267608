"""The project's Kafka topics: partition counts and topic configs, in one definition.

Why one place: ``metarec dev up``, ``metarec topics`` (which docker-compose.yml's
``kafka-init`` and the Kubernetes example run) and the tests must create the same topics,
or a deployment gets a partition count nobody planned for. Names come from the settings;
what each topic needs comes from its role:

* events: :attr:`~metarec.config.Settings.partitions` partitions (the most consumer
  processes that can share the work), kept ``events_retention_hours``: the aggregator
  rebuilds its window from this topic after a restart, so retention must cover the time
  its last ``window_events`` events span;
* items and users: keyed latest-state records, so compacted (a key's last record is kept
  however old), 3 partitions;
* the dead-letter and model topics: one partition each, low volume.

>>> from metarec.config import Settings
>>> plan = topic_plan(Settings.from_env({}))
>>> {name: spec.partitions for name, spec in plan.items()}
{'metarec.events': 6, 'metarec.items': 3, 'metarec.users': 3, 'metarec.events.dlq': 1, 'metarec.model': 1}
>>> plan["metarec.items"].config
{'cleanup.policy': 'compact'}
"""  # noqa: E501

from __future__ import annotations

from dataclasses import dataclass, field

from metarec.config import Settings

__all__ = ["LATEST_STATE_PARTITIONS", "TopicSpec", "topic_plan"]

#: Items and users topics: compacted, read whole by every consumer; a few partitions let
#: producers of metadata write in parallel.
LATEST_STATE_PARTITIONS = 3
_COMPACT = {"cleanup.policy": "compact"}
_HOUR_MS = 3_600_000


@dataclass(frozen=True)
class TopicSpec:
    """Partitions and topic-level configs (Kafka's names) of one topic."""

    partitions: int
    config: dict[str, str] = field(default_factory=dict)


def topic_plan(settings: Settings) -> dict[str, TopicSpec]:
    """Every topic the services use, by name, as it should be created."""
    return {
        settings.events_topic: TopicSpec(
            settings.partitions, {"retention.ms": str(settings.events_retention_hours * _HOUR_MS)}
        ),
        settings.items_topic: TopicSpec(LATEST_STATE_PARTITIONS, dict(_COMPACT)),
        settings.users_topic: TopicSpec(LATEST_STATE_PARTITIONS, dict(_COMPACT)),
        settings.dlq_topic: TopicSpec(1),
        settings.model_topic: TopicSpec(1),
    }
