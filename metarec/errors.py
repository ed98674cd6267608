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
    "StaleOffset",
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
    which is how a zombie consumer's batch is fenced off.
    """
