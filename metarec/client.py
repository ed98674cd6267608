"""Reading lists, as apps do: a user's own list, else a fallback, in one round trip.

The read rule (docs/ARCHITECTURE.md, "Reading lists"): ``GET recs:{user}``; when the user
has none yet (no event applied, or their list expired) or it holds no items (a list ranked
before there was anything to rank), the fallback list of the domain the app is showing,
``fallback:{domain}``, which the consumers refresh every few seconds with what a newcomer
to that domain would be served; when that domain has no fallback with items yet, the
global one, ``fallback``, the best of every domain's. Withdrawn items (``"available":
false`` in their item record) are left out of whatever is read, at once: a stored list
may be older than the withdrawal. :class:`Recommendations` asks for all of it in one
pipelined round trip (``MGET`` of the users' keys for many users) and returns typed
results, so an app never needs to know the key layout, single Redis or Cluster.

This module needs only ``redis``; it imports nothing of the consumer.

>>> import json
>>> raw = json.dumps({"user": "u1", "items": ["a", "b"], "scores": [2.5, 1.0],
...                   "model_version": 3, "events": 7, "updated_ms": 1700000000000})
>>> recs = parse_list(raw.encode(), source="user")
>>> recs.items, recs.source, recs.events
(['a', 'b'], 'user', 7)
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import redis

from metarec.config import CLUSTER_SCHEMES, Settings, setting_from_env
from metarec.core.events import DEFAULT_DOMAIN
from metarec.services.cluster_store import cluster_key
from metarec.services.store import DEFAULT_PREFIX, plain_key

__all__ = ["RecList", "Recommendations", "parse_list"]

Source = Literal["user", "fallback"]


@dataclass(frozen=True)
class RecList:
    """A list as apps read it: item ids best first, their scores, and where it came from.

    ``source`` is ``"user"`` for the user's own list and ``"fallback"`` for their domain's
    non-personal list; ``user`` is None and ``events`` 0 for a fallback.
    """

    items: list[str]
    scores: list[float]
    model_version: int | None
    updated_ms: int
    source: Source
    user: str | None = None
    domain: str | None = None
    events: int = 0


def parse_list(raw: bytes, source: Source, domain: str | None = None) -> RecList:
    """A stored list's JSON (a user's or a fallback) as a :class:`RecList`; for a user's
    list and a ``domain``, that domain's list (empty when the record has none for it).

    A user's record holds the best items of every domain (``items``) and, when the
    catalogue has more than one domain, each domain's best (``domains``); with one
    domain, ``domain`` names it and ``items`` is its list.
    """
    doc: dict[str, Any] = json.loads(raw)
    shelf: dict[str, Any] = doc
    if domain is not None and source == "user":
        if "domains" in doc:
            shelf = doc["domains"].get(domain) or {"items": [], "scores": []}
        elif doc.get("domain", domain) != domain:
            shelf = {"items": [], "scores": []}
    return RecList(
        items=[str(i) for i in shelf["items"]],
        scores=[float(s) for s in shelf["scores"]],
        model_version=doc.get("model_version"),
        updated_ms=int(doc.get("updated_ms", 0)),
        source=source,
        user=doc.get("user"),
        domain=domain if domain is not None else doc.get("domain"),
        events=int(doc.get("events", 0)),
    )


def _available(recs: RecList, gone: frozenset[str]) -> RecList:
    """``recs`` without the withdrawn items (a stored list may predate a withdrawal)."""
    if not gone or gone.isdisjoint(recs.items):
        return recs
    keep = [i for i, item in enumerate(recs.items) if item not in gone]
    return dataclasses.replace(
        recs, items=[recs.items[i] for i in keep], scores=[recs.scores[i] for i in keep]
    )


class Recommendations:
    """Lists for apps: each user's own, else the domain's fallback, in one round trip.

    Parameters
    ----------
    client
        A ``redis.Redis`` (or ``redis.RedisCluster``) client of the deployment's Redis.
    prefix
        ``METAREC_KEY_PREFIX`` of the deployment (``from_url`` reads it from the
        environment, as the services do, unless given).
    cluster
        Whether ``client`` talks to a Redis Cluster, whose keys carry hash tags.

    Examples
    --------
    In an app (it needs the deployment's Redis, so it is not run as a doctest)::

        recs = Recommendations.from_url("redis://redis:6379/0")
        shown = recs.get("u42", domain="books")      # RecList; None before any event
        page = recs.get_many(["u1", "u2"], domain="books")
    """

    def __init__(self, client: Any, *, prefix: str = DEFAULT_PREFIX, cluster: bool = False) -> None:
        self.client = client
        self.prefix = prefix
        self.cluster = cluster
        # The withdrawn items as last read, and the version of the set they are.
        self._withdrawn: tuple[int, frozenset[str]] = (0, frozenset())

    @classmethod
    def from_url(
        cls, url: str, *, prefix: str | None = None, timeout_s: float = 2.0
    ) -> Recommendations:
        """A reader on a new client for ``url`` (``redis+cluster://`` for a Cluster), with
        timeouts, so that a stalled Redis fails a read instead of hanging the app.

        ``prefix`` defaults to ``METAREC_KEY_PREFIX`` (validated like the services', a
        :class:`~metarec.errors.ConfigError` if invalid), else ``metarec:``: an app
        configured like its deployment reads that deployment's keys.
        """
        if prefix is None:
            prefix = str(setting_from_env("key_prefix"))
        scheme, sep, rest = url.partition("://")
        if scheme in CLUSTER_SCHEMES:
            client: Any = redis.RedisCluster.from_url(
                scheme.partition("+")[0] + sep + rest,
                socket_timeout=timeout_s,
                socket_connect_timeout=timeout_s,
            )
            return cls(client, prefix=prefix, cluster=True)
        return cls(
            redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s),
            prefix=prefix,
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> Recommendations:
        """A reader for the deployment that ``METAREC_*`` describes."""
        return cls.from_url(settings.redis_url, prefix=settings.key_prefix)

    def recs_key(self, user: str) -> str:
        return self._key("recs", user)

    def fallback_key(self, domain: str) -> str:
        return self._key("fallback", domain)

    def global_fallback_key(self) -> str:
        return self._key("fallback")

    def get(self, user: str, domain: str | None = None) -> RecList | None:
        """``user``'s list of ``domain``'s items (None: of every domain), else the
        domain's fallback, else the global fallback; None only before any consumer has
        applied an event."""
        pipe = self.client.pipeline(transaction=False)
        pipe.get(self.recs_key(user))
        pipe.get(self.fallback_key(domain if domain is not None else DEFAULT_DOMAIN))
        pipe.get(self.global_fallback_key())
        pipe.get(self._key("withdrawn", "version"))
        own, fallback, everywhere, version = pipe.execute()
        gone = self._withdrawn_items(version)
        if domain is None:
            fallback = None  # every domain's: the global fallback
        return self._pick(own, domain, self._fallback(fallback, everywhere, gone), gone)

    def get_many(
        self,
        users: Sequence[str],
        domain: str | None = None,
    ) -> dict[str, RecList | None]:
        """:meth:`get` for many users of one domain: one ``MGET`` (a pipeline of ``GET``\\ s
        on a Cluster, whose ``MGET`` may not span slots) and the fallback, together."""
        users = list(dict.fromkeys(users))
        if not users:
            return {}
        pipe = self.client.pipeline(transaction=False)
        if self.cluster:
            for user in users:
                pipe.get(self.recs_key(user))
        else:
            pipe.mget([self.recs_key(u) for u in users])
        pipe.get(self.fallback_key(domain if domain is not None else DEFAULT_DOMAIN))
        pipe.get(self.global_fallback_key())
        pipe.get(self._key("withdrawn", "version"))
        replies = pipe.execute()
        own = replies[:-3] if self.cluster else replies[0]
        gone = self._withdrawn_items(replies[-1])
        fallback = self._fallback(None if domain is None else replies[-3], replies[-2], gone)
        return {
            user: self._pick(raw, domain, fallback, gone)
            for user, raw in zip(users, own, strict=True)
        }

    def _withdrawn_items(self, version: bytes | None) -> frozenset[str]:
        """The withdrawn item ids, read again only when their version has moved on."""
        number = 0 if version is None else int(version)
        if number != self._withdrawn[0]:
            members = self.client.smembers(self._key("withdrawn"))
            self._withdrawn = (number, frozenset(m.decode() for m in members))
        return self._withdrawn[1]

    @staticmethod
    def _fallback(
        domain: bytes | None, everywhere: bytes | None, gone: frozenset[str]
    ) -> RecList | None:
        """The domain's fallback unless it is missing or empty, else the global one."""
        mine = _available(parse_list(domain, "fallback"), gone) if domain else None
        if mine is not None and mine.items:
            return mine
        return _available(parse_list(everywhere, "fallback"), gone) if everywhere else mine

    @staticmethod
    def _pick(
        own: bytes | None, domain: str | None, fallback: RecList | None, gone: frozenset[str]
    ) -> RecList | None:
        """The user's list of ``domain`` unless it is missing or empty, else the fallback;
        an empty list of the user's when there is no fallback; None when there is neither."""
        mine = _available(parse_list(own, "user", domain), gone) if own else None
        if mine is not None and mine.items:
            return mine
        return fallback if fallback is not None else mine

    def _key(self, *parts: object) -> str:
        return cluster_key(self.prefix, parts) if self.cluster else plain_key(self.prefix, parts)
