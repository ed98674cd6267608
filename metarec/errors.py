"""The one exception hierarchy of metarec.

Every error a user can cause says which value was wrong and how to fix it.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DataError",
    "InvalidEvent",
    "MetarecError",
    "ModelError",
    "PendingBatch",
    "StaleOffset",
    "UserConflict",
]


class MetarecError(Exception):
    """Base class of every error metarec raises on purpose."""


class ConfigError(MetarecError):
    """A setting is missing or invalid; raised at start, before any work."""


class InvalidEvent(MetarecError):
    """A record on an input topic does not follow the event contract (README, "Publishing
    events")."""


class DataError(MetarecError):
    """A dataset on disk is missing or not in a format metarec can read."""


class ModelError(MetarecError):
    """A model artifact is missing, corrupt or incompatible with this code."""


class StaleOffset(MetarecError):
    """A batch was written against an offset that another writer has moved past.

    Raised by the state store when the compare-and-set on a partition's offset fails,
    which is how a zombie consumer's batch is fenced off. ``stored`` is the offset found
    (None: none stored).
    """

    def __init__(self, message: str, stored: int | None = None) -> None:
        super().__init__(message)
        self.stored = stored


class UserConflict(MetarecError):
    """Another writer changed some of a batch's users since they were loaded.

    Raised by the state store when a user's state guard fails (the user's events arrive on
    two partitions owned by two consumers at once); the batch is redone from the users'
    stored states. On a single Redis nothing was written; on a Redis Cluster the other
    users were written, each with the offset it has applied, so the redo skips them.
    ``users`` are the users that changed.
    """

    def __init__(self, message: str, users: list[str]) -> None:
        super().__init__(message)
        self.users = users


class LogReplaced(StaleOffset):
    """The stored offsets were rebased onto a new log (a broker reset, a recreated topic)
    since the writer last checked: its batch belongs to the old log and was not written."""


class PendingBatch(MetarecError):
    """A partition's earlier batch is half-written and ends at another offset (Redis Cluster).

    On a cluster a batch is written in steps (docs/REDIS_KEYS.md). When the writer of a
    batch stopped between them, the partition's next batch must end where that one ended,
    ``pending``, or some events would count twice in the shared trending counts and partial
    sums. Nothing was written: consume again from the stored offset up to ``pending``.
    """

    def __init__(self, message: str, pending: int) -> None:
        super().__init__(message)
        self.pending = pending
