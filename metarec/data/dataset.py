"""A replayable dataset: the events of a stream plus the item and user metadata.

Loaders (:mod:`metarec.data.movielens`, :mod:`metarec.data.synthetic`) all produce a
:class:`Dataset`,
which is what ``producer replay`` publishes and what ``metarec eval`` scores. Events are in
timestamp order (ties keep their order in the source).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from metarec.core.events import Event, ItemRecord, UserRecord

__all__ = ["Dataset"]


@dataclass(frozen=True)
class Dataset:
    """Events in timestamp order, with the metadata records that describe items and users.

    ``scenario`` holds facts a generator knows about its own stream (for example the
    timestamp of an injected preference change), for the scenarios of ``metarec eval``.
    """

    name: str
    events: list[Event]
    items: list[ItemRecord] = field(default_factory=list)
    users: list[UserRecord] = field(default_factory=list)
    scenario: dict[str, object] = field(default_factory=dict)
