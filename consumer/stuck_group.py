"""Telling a stuck consumer group from an idle member.

Why: a member may own no partition for two very different reasons. With more members than
partitions it is a spare, and the others apply the events; that is fine. But a broker can
also stop assigning anything to a group (on Tansu, after every member left within a moment;
after topics were re-created under members that had already joined): then every member
owns nothing, the events wait, and nothing changes for minutes. The difference shows in
the stored offsets: while any member applies events, their sum moves.

So a member is *stuck* when, for :data:`STUCK_AFTER_S`, it owned no partition, events
waited in the topic, and the stored offsets did not move. The consumer then moves the
whole group to a new Kafka group id (offsets live in Redis, so nothing is lost or
repeated), and the clock starts again for the new group.

>>> watch = StuckGroup(after_s=30)
>>> watch.observe(0.0, owns=False, waiting=100, applied=5)
False
>>> watch.observe(29.0, owns=False, waiting=100, applied=5)
False
>>> watch.observe(31.0, owns=False, waiting=100, applied=5)
True
>>> watch.observe(40.0, owns=False, waiting=100, applied=9)  # someone applies events
False
"""

from __future__ import annotations

from typing import Final

__all__ = ["STUCK_AFTER_S", "StuckGroup"]

#: Seconds of owning nothing while events wait and none are applied before a member
#: calls its group stuck.
STUCK_AFTER_S: Final = 30.0


class StuckGroup:
    """Watches one member's assignment against the group's progress."""

    def __init__(self, after_s: float = STUCK_AFTER_S) -> None:
        self.after_s = after_s
        self._since: float | None = None  # owning nothing while events wait, since
        self._applied = 0  # the stored offsets' sum then

    def observe(self, now: float, *, owns: bool, waiting: int, applied: int) -> bool:
        """Whether the group is stuck, given what a topic check found: ``owns`` (this
        member owns a partition of the events topic), ``waiting`` (records in the topic
        not yet applied) and ``applied`` (the stored offsets' sum)."""
        if owns or waiting <= 0:
            self._since = None
            return False
        if self._since is None or applied != self._applied:
            self._since, self._applied = now, applied
            return False
        return now - self._since >= self.after_s

    def moved(self, now: float) -> None:
        """The member joined a new Kafka group: give it as long as the old one had."""
        if self._since is not None:
            self._since = now

    def stuck_for(self, now: float) -> float:
        """Seconds this member has owned nothing while events waited unapplied (0: not)."""
        return 0.0 if self._since is None else now - self._since
