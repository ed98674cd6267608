"""The state store on a Redis Cluster: its key layout and its batch commit in three steps.

Why a different commit: on a cluster a Lua script may only touch keys of one hash slot, and
a batch's users are spread over every slot (apps read ``recs:{user}`` with one plain GET,
so users cannot share a slot). The single-Redis commit, one script for the whole batch, is
split here into steps that are each atomic and each safe to run again:

1. **begin** (the stream slot): check the topic id and that the partition's stored offset
   is the batch's ``expected_offset``; add the batch's trending counts and partial sums;
   record ``pending`` = the batch's next offset. If a ``pending`` above the stored offset
   is already there, an earlier writer got this far with this batch: its shared effects
   are kept, not added again (a ``pending`` other than this batch's end is
   :class:`~metarec.errors.PendingBatch`: the consumer first finishes that batch);
2. **users** (one script per user, in the user's slot, pipelined): the user's state guard
   (the event count it had when loaded), then the state, the list and the user's *applied
   offset* of this partition (``done:{u:USER}``, field ``TOPIC:PARTITION``, value the
   batch's next offset and the topic id) together. A user whose applied offset already
   reaches the batch's end is left alone: its events are in its state;
3. **end** (the stream slot): check the topic id and the stored offset again, set the
   offset to the batch's next offset and clear ``pending``.

A consumer reads each user's applied offset after the state (:meth:`ClusterCommit.marks`)
and adapts the user only to events at or past it, so a batch consumed again after a crash
between two steps skips what users already have; the exactly-once argument is written out
in docs/REDIS_KEYS.md ("Redis Cluster").

>>> cluster_key("metarec:", ("recs", "alice"))
'metarec:recs:{u:alice}'
>>> cluster_key("metarec:", ("offset", "events", 0))
'metarec:{stream}:offset:events:0'
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, cast

import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.cluster import RedisCluster
from redis.exceptions import RedisClusterException
from redis.retry import Retry

from metarec.core.reptile import PartialSums
from metarec.core.trending import Channel
from metarec.core.user_state import COUNT_AT
from metarec.errors import (
    ConfigError,
    LogReplaced,
    MetarecError,
    PendingBatch,
    StaleOffset,
    UserConflict,
)
from metarec.services.store import (
    DEFAULT_PREFIX,
    PUT_LUA,
    SOCKET_TIMEOUT_S,
    TRENDING_LUA,
    RedisStore,
)

__all__ = [
    "GROUPS",
    "USER_KINDS",
    "ClusterCommit",
    "ClusterStore",
    "ClusterUnreachable",
    "cluster_key",
    "parse_mark",
]

#: Per-user keys: a user's state, list, profile and applied offsets share the user's slot
#: (the hash tag ``{u:USER}``; the ``u:`` keeps the tag non-empty for ids starting with
#: ``}``), so that one script writes them together.
USER_KINDS: Final = frozenset({"user", "recs", "profile", "done"})
#: Shared keys that scripts or transactions use together, by the hash tag of their slot.
#: The stream slot holds everything a batch's begin and end steps touch.
GROUPS: Final = {
    "offset": "stream",
    "topic-id": "stream",
    "pending": "stream",
    "trend": "stream",
    "partials": "stream",
    "items": "items",
    "model": "model",
    "consumer": "consumers",
    "consumers": "consumers",
    "aggregate": "aggregate",
}


def cluster_key(prefix: str, parts: Sequence[object]) -> str:
    """The key of ``parts`` under ``prefix`` in the cluster layout (docs/REDIS_KEYS.md)."""
    head = str(parts[0])
    if head in USER_KINDS and len(parts) == 2:
        return f"{prefix}{head}:{{u:{parts[1]}}}"
    rest = ":".join(str(p) for p in parts)
    group = GROUPS.get(head)
    return f"{prefix}{{{group}}}:{rest}" if group else prefix + rest


def parse_mark(raw: bytes | str | None, topic_id: str | None) -> int:
    """The applied offset a ``done`` field holds for the log ``topic_id`` (0: none).

    A mark of another log (the topic was recreated and the offsets rebased) means nothing
    in this one, so it counts as none.

    >>> parse_mark(b"120 Zm9v", "Zm9v"), parse_mark(b"120 Zm9v", "YmFy"), parse_mark(None, "")
    (120, 0, 0)
    """
    if raw is None:
        return 0
    text = raw.decode("ascii") if isinstance(raw, bytes) else raw
    mark, _, log_id = text.partition(" ")
    return int(mark) if log_id == (topic_id or "") else 0


# KEYS: offset, trend:meta, partials, partials:index, pending, one trend:{channel} hash per
#       channel, and last topic-id:{topic}.
# ARGV: expected ('' = none stored), next, #channels, #partials, events (the clock's
#       advance), then per channel its name, half-life and number of (item, weight) pairs,
#       every channel's pairs in channel order, the partial (field, inc) pairs, and last
#       the topic id the offsets must refer to ('' = unchecked).
# Replies {1, clock} when the shared effects were added and pending set, {5, clock} when
# a pending batch reaching at least `next` already added them, {4, pending} when a pending
# batch ends before `next`, {0, stored offset} when fenced, {3, stored topic id} when the
# offsets were rebased onto a new log. Checks come before the first write.
_BEGIN_LUA: Final = (
    "#!lua"
    + TRENDING_LUA
    + """
local topic_id = ARGV[#ARGV]
if topic_id ~= '' then
  local current = redis.call('GET', KEYS[#KEYS]) or ''
  if current ~= topic_id then return {3, current} end
end
local stored = redis.call('GET', KEYS[1])
if (ARGV[1] == '' and stored) or (ARGV[1] ~= '' and stored ~= ARGV[1]) then
  return {0, stored or ''}
end
local pending = tonumber(redis.call('GET', KEYS[5]) or '-1')
if pending > tonumber(stored or '-1') then
  if tonumber(ARGV[2]) <= pending then
    return {5, tonumber(redis.call('HGET', KEYS[2], 'clock') or '0')}
  end
  return {4, pending}
end
local nc, nq, events = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local a = 5 + 3 * nc
local clock
clock, a = add_trending(2, 5, 3, nc, a, events)
for i = 1, nq do redis.call('HINCRBYFLOAT', KEYS[3], ARGV[a + 2 * i - 1], ARGV[a + 2 * i]) end
if nq > 0 then redis.call('SADD', KEYS[4], KEYS[3]) end
redis.call('SET', KEYS[5], ARGV[2])
return {1, clock}
"""
)

# KEYS: offset, pending, topic-id. ARGV: expected ('' = none), next, topic id ('' =
# unchecked). Replies {1}, {0, stored offset} when fenced, {3, stored id} when rebased.
_END_LUA: Final = """#!lua
if ARGV[3] ~= '' then
  local current = redis.call('GET', KEYS[3]) or ''
  if current ~= ARGV[3] then return {3, current} end
end
local stored = redis.call('GET', KEYS[1])
if (ARGV[1] == '' and stored) or (ARGV[1] ~= '' and stored ~= ARGV[1]) then
  return {0, stored or ''}
end
redis.call('SET', KEYS[1], ARGV[2])
local pending = redis.call('GET', KEYS[2])
if pending and tonumber(pending) <= tonumber(ARGV[2]) then redis.call('DEL', KEYS[2]) end
return {1}
"""

# KEYS: offset, topic-id, trend:meta. ARGV: expected, topic id. The fence of a refresh
# (a batch that consumes nothing): {1, clock}, or {0, stored} / {3, stored id} as above.
_CHECK_LUA: Final = """#!lua
if ARGV[2] ~= '' then
  local current = redis.call('GET', KEYS[2]) or ''
  if current ~= ARGV[2] then return {3, current} end
end
local stored = redis.call('GET', KEYS[1])
if (ARGV[1] == '' and stored) or (ARGV[1] ~= '' and stored ~= ARGV[1]) then
  return {0, stored or ''}
end
return {1, tonumber(redis.call('HGET', KEYS[3], 'clock') or '0')}
"""

# KEYS: the user's state, list and applied offsets. ARGV: field ('' = the batch applies no
# events), mark (next offset), topic id, guard ('*' = unchecked, '' = no state may be
# stored, else the 4 count bytes), the count's byte offset, 'LIST_TTL/STATE_TTL' (seconds,
# 0 = none; the state's also applies to the applied offsets), '1' if a state is given, the
# state, '1' if a list is given, the list.
# Replies 1 when written, 2 when the user's applied offset already reaches the mark (its
# events are in its state: nothing written), 0 when the guard failed (nothing written).
_USER_LUA: Final = (
    "#!lua"
    + PUT_LUA
    + """
local field = ARGV[1]
if field ~= '' and ARGV[7] == '1' then
  local have = redis.call('HGET', KEYS[3], field)
  if have then
    local mark, id = string.match(have, '^(%d+) (.*)$')
    if id == ARGV[3] and tonumber(mark) >= tonumber(ARGV[2]) then return 2 end
  end
end
local guard = ARGV[4]
if guard ~= '*' then
  local at = tonumber(ARGV[5])
  if redis.call('GETRANGE', KEYS[1], at, at + 3) ~= guard then return 0 end
end
local ttl, sttl = ttls(ARGV[6])
if ARGV[7] == '1' then put(KEYS[1], ARGV[8], sttl) end
if ARGV[9] == '1' then put(KEYS[2], ARGV[10], ttl) end
if field ~= '' and ARGV[7] == '1' then
  redis.call('HSET', KEYS[3], field, ARGV[2] .. ' ' .. ARGV[3])
  if sttl > 0 then redis.call('EXPIRE', KEYS[3], sttl) end
end
return 1
"""
)

_USER_SHA: Final = hashlib.sha1(_USER_LUA.encode()).hexdigest()  # noqa: S324 - Redis's id

# KEYS: topic-id, then n offset keys, then their n pending keys. ARGV: the id seen ('' =
# none), the new id, each partition's offset to go on from ('' = leave it). A pending
# batch of the old log means nothing in the new one, so it goes with the old offset.
_REBASE_LUA: Final = """#!lua
local stored = redis.call('GET', KEYS[1]) or ''
if stored ~= ARGV[1] then return {0, stored} end
redis.call('SET', KEYS[1], ARGV[2])
local n = (#KEYS - 1) / 2
for i = 1, n do
  if ARGV[i + 2] ~= '' then
    redis.call('SET', KEYS[1 + i], ARGV[i + 2])
    redis.call('DEL', KEYS[1 + n + i])
  end
end
return {1}
"""


def _offset_arg(offset: int | None) -> str:
    return "" if offset is None else str(int(offset))


def _text(raw: bytes | str) -> str:
    return raw.decode("utf-8") if isinstance(raw, bytes) else raw


class ClusterCommit:
    """The batch commit of :class:`metarec.services.store.RedisStore` on a Redis Cluster.

    Parameters
    ----------
    client
        The store's cluster client (``RedisCluster``, typed as the commands it shares with
        the single-server client).
    key
        The store's key function (:func:`cluster_key` under its prefix).

    ``crash_point`` is called with ``"begun"`` after step 1 and ``"users"`` after step 2;
    it does nothing, and exists so that tests can stop a commit between its steps.

    Examples
    --------
    Nothing is sent before the first call (tests/services/test_cluster_integration.py
    runs it on a real cluster); a test stops a commit between two steps like this:

    >>> import redis
    >>> commit = ClusterCommit(redis.Redis(), lambda *p: cluster_key("demo:", p))
    >>> def stop(step: str) -> None:
    ...     if step == "users":
    ...         raise KeyboardInterrupt("crash before the offset moves")
    >>> commit.crash_point = stop
    """

    def __init__(self, client: redis.Redis[bytes], key: Callable[..., str]) -> None:
        self.client = client
        self._k = key
        self._begin = client.register_script(_BEGIN_LUA)
        self._end = client.register_script(_END_LUA)
        self._check = client.register_script(_CHECK_LUA)
        self._rebase = client.register_script(_REBASE_LUA)
        self.crash_point: Callable[[str], None] = lambda step: None

    def marks(
        self, topic: str, partition: int, users: Sequence[str], topic_id: str | None
    ) -> dict[str, int]:
        """Each user's applied offset of ``topic[partition]`` (0: none), one round trip."""
        if not users:
            return {}
        pipe = self.client.pipeline(transaction=False)
        for u in users:
            pipe.hget(self._k("done", u), f"{topic}:{partition}")
        return {u: parse_mark(raw, topic_id) for u, raw in zip(users, pipe.execute(), strict=True)}

    def rebase(
        self, topic: str, seen_id: str | None, new_id: str, offsets: Mapping[int, int | None]
    ) -> bool:
        """:meth:`metarec.services.store.RedisStore.rebase_offsets`, which also drops the rebased
        partitions' pending batches (they belong to the old log)."""
        parts = sorted(offsets)
        keys = (
            [self._k("topic-id", topic)]
            + [self._k("offset", topic, p) for p in parts]
            + [self._k("pending", topic, p) for p in parts]
        )
        args = [seen_id or "", new_id] + [_offset_arg(offsets[p]) for p in parts]
        status, *_ = self._rebase(keys=keys, args=args)
        return bool(status == 1)

    def commit(
        self,
        topic: str,
        partition: int,
        expected: int | None,
        nxt: int,
        *,
        states: Mapping[str, bytes],
        recs: Mapping[str, bytes],
        recs_ttl_s: int,
        guards: Mapping[str, bytes],
        skip_conflicts: bool,
        topic_id: str | None,
        shared: list[str],
        channel_keys: list[str],
        state_ttl_s: int = 0,
    ) -> int:
        """Steps 1-3 of the module docstring; ``shared`` is the begin script's ARGV from
        ``#channels`` to the partial pairs (the single-Redis commit's encoding).

        Returns the trending clock, raises as
        :meth:`metarec.services.store.RedisStore.commit_batch`.
        """
        where = f"{topic}[{partition}]"
        exp = "" if expected is None else str(int(expected))
        tid = topic_id or ""
        offset_key, tid_key = self._k("offset", topic, partition), self._k("topic-id", topic)
        refresh = expected is not None and nxt == expected
        has_shared = (
            shared[2] != "0"
            or shared[1] != "0"
            or any(shared[5 + 3 * c] != "0" for c in range(int(shared[0])))
        )
        if refresh and not has_shared:
            reply = self._check(
                keys=[offset_key, tid_key, self._k("trend", "meta")], args=[exp, tid]
            )
            self._raise(reply, where, expected, topic_id)
            clock = int(reply[1])
        else:
            keys = [
                offset_key,
                self._k("trend", "meta"),
                self._k("partials", topic, partition),
                self._k("partials", "index"),
                self._k("pending", topic, partition),
                *channel_keys,
                tid_key,
            ]
            reply = self._begin(keys=keys, args=[exp, str(int(nxt)), *shared, tid])
            if reply[0] == 4:
                raise PendingBatch(
                    f"{where}: a batch up to offset {int(reply[1])} was half-written by an "
                    f"earlier writer; finish it first: consume from {exp or 'the start'} up "
                    f"to {int(reply[1])} and commit that",
                    int(reply[1]),
                )
            self._raise(reply, where, expected, topic_id)
            clock = int(reply[1])
        self.crash_point("begun")
        field = "" if refresh else f"{topic}:{partition}"
        conflicts = self._write_users(
            field, str(int(nxt)), tid, states, recs, f"{int(recs_ttl_s)}/{int(state_ttl_s)}", guards
        )
        if conflicts and not skip_conflicts:
            raise UserConflict(
                f"{where}: {len(conflicts)} users changed since they were loaded (first: "
                f"{conflicts[0]!r}); their events arrive on more than one partition. The "
                "other users were written; redo the batch from the stored states",
                conflicts,
            )
        self.crash_point("users")
        if not (refresh and not has_shared):
            reply = self._end(
                keys=[offset_key, self._k("pending", topic, partition), tid_key],
                args=[exp, str(int(nxt)), tid],
            )
            self._raise(reply, where, expected, topic_id)
        return clock

    def _write_users(
        self,
        field: str,
        mark: str,
        topic_id: str,
        states: Mapping[str, bytes],
        recs: Mapping[str, bytes],
        ttls: str,
        guards: Mapping[str, bytes],
    ) -> list[str]:
        """Step 2; returns the users whose guard failed (nothing of theirs written)."""
        users = list(states) + [u for u in recs if u not in states]
        if not users:
            return []
        calls = []
        for u in users:
            state, rec = states.get(u), recs.get(u)
            keys = [self._k("user", u), self._k("recs", u), self._k("done", u)]
            args: list[Any] = [
                field,
                mark,
                topic_id,
                guards.get(u, b"*") if state is not None else "*",
                str(COUNT_AT),
                ttls,
                "0" if state is None else "1",
                state or b"",
                "0" if rec is None else "1",
                rec or b"",
            ]
            calls.append((keys, args))
        replies = self._run_users(calls)
        return [u for u, r in zip(users, replies, strict=True) if int(r) == 0]

    def _run_users(self, calls: list[tuple[list[str], list[Any]]]) -> list[Any]:
        """One pipelined EVALSHA per user, one round trip per master.

        Each call is safe to repeat (a user written once reports 2 the second time), so
        a call that met a node without the script (restarted, or a replica promoted) or a
        slot that moved (MOVED, ASK) is made again on its own, after loading the script,
        through the cluster client, which follows redirections.
        """
        replies = self._pipelined(calls)
        redo = [
            i
            for i, r in enumerate(replies)
            if isinstance(r, redis.exceptions.NoScriptError | redis.exceptions.AskError)
        ]
        if redo:
            if any(isinstance(replies[i], redis.exceptions.NoScriptError) for i in redo):
                self.client.execute_command("SCRIPT LOAD", _USER_LUA)  # to every primary
            for i in redo:
                keys, args = calls[i]
                replies[i] = self.client.execute_command(
                    "EVALSHA", _USER_SHA, len(keys), *keys, *args
                )
        for r in replies:
            if isinstance(r, Exception):
                raise r
        return replies

    def _pipelined(self, calls: list[tuple[list[str], list[Any]]]) -> list[Any]:
        # Each call names its node: redis-py's cluster pipeline would otherwise ask the
        # server for the keys of every EVALSHA (COMMAND GETKEYS), a round trip per user.
        cluster: Any = self.client
        node_of, slot_of = cluster.nodes_manager.get_node_from_slot, cluster.keyslot
        pipe: Any = self.client.pipeline(transaction=False)
        for keys, args in calls:
            pipe.execute_command(
                "EVALSHA",
                _USER_SHA,
                len(keys),
                *keys,
                *args,
                target_nodes=node_of(slot_of(keys[0])),
            )
        return list(pipe.execute(raise_on_error=False))

    @staticmethod
    def _raise(reply: list[Any], where: str, expected: int | None, topic_id: str | None) -> None:
        status, value = int(reply[0]), reply[1] if len(reply) > 1 else b""
        if status == 3:
            raise LogReplaced(
                f"{where}: the stored offsets now refer to topic id "
                f"{_text(value) or 'none'}, not {topic_id}; the log was "
                "replaced and the offsets rebased: check the topic again"
            )
        if status == 0:
            stored = _text(value)
            raise StaleOffset(
                f"{where}: expected stored offset "
                f"{'none' if expected is None else expected}, found {stored or 'none'}; "
                "another consumer owns this partition now, so drop the batch and re-read "
                "the offset after the next assignment",
                int(stored) if stored else None,
            )


def _unreachable(exc: Exception) -> bool:
    """Whether a failure to make the cluster client may pass (nodes down, a cluster still
    forming: "All slots are not covered"), rather than a URL or ACL the cluster will never
    accept (a node without cluster mode, a database number, NOPERM for CLUSTER SLOTS)."""
    if isinstance(exc, (redis.ConnectionError, redis.TimeoutError)):
        return True
    refusals = ("not enabled", "NOPERM", "permission", "querystring")
    return not any(r in str(exc) for r in refusals)


class ClusterUnreachable(MetarecError, redis.ConnectionError):
    """No node of the cluster answered when the store was made (a transient error: the
    services wait for the cluster as for any Redis outage)."""


#: Quick retries the cluster client makes itself, for answers that come at once (a
#: refused connection to a failed master, ``CLUSTERDOWN`` while a cluster forms or fails
#: over): about a second in all, before the services' outage policy takes over.
CLIENT_RETRIES: Final = 4


class _OutageVisibleCluster(RedisCluster):  # type: ignore[type-arg]
    """A cluster client that does not retry a timeout itself. Its default retries (10,
    each waiting out the socket timeout) rode out a stalled master for 50 s without a
    word; a timeout now reaches the services' outage policy at once, which logs it,
    keeps ``/readyz`` honest and retries (the client re-reads the slots meanwhile)."""

    ERRORS_ALLOW_RETRY = cast(
        Any,
        (
            redis.ConnectionError,
            redis.exceptions.ClusterDownError,
            redis.exceptions.SlotNotCoveredError,
        ),
    )

    def pipeline(self, transaction: Any = None, shard_hint: Any = None) -> Any:
        """A pipeline that gives up after one socket timeout.

        redis-py's cluster pipeline retries a timed-out pipeline with the client's
        retries, and first re-sends each command that timed out on its own, each with
        those retries again: a stalled master held a batch of 20 users for minutes
        without a word. Here a pipeline is sent once, and once it has spent a socket
        timeout the re-sends fail at once; the outage policy, which logs, retries the
        whole call. Redirections (``MOVED``, ``ASK``) are still followed. The store's
        client serves one thread, so lending the pipeline a retry policy is safe.
        """
        client_retry: Retry = self.retry  # type: ignore[has-type]
        self.retry = Retry(NoBackoff(), 0)
        try:
            pipe = super().pipeline(transaction=transaction, shard_hint=shard_hint)
        finally:
            self.retry = client_retry
        execute, resend = pipe.execute, pipe.parent_execute_command
        started = [0.0]

        def execute_timed(raise_on_error: bool = True) -> Any:
            started[0] = time.monotonic()
            return execute(raise_on_error)

        def resend_in_time(*args: Any, **kwargs: Any) -> Any:
            if time.monotonic() - started[0] >= SOCKET_TIMEOUT_S:
                raise redis.TimeoutError(
                    f"the pipeline waited out its {SOCKET_TIMEOUT_S:g} s socket timeout"
                )
            return resend(*args, **kwargs)

        pipe.execute = execute_timed
        pipe.parent_execute_command = resend_in_time
        return pipe


class ClusterStore(RedisStore):
    """:class:`~metarec.services.store.RedisStore` on a Redis Cluster: the same methods and
    guarantees, with the cluster key layout and the batch commit in steps.

    Parameters
    ----------
    client
        A cluster client (``RedisCluster``, bytes in and out).
    prefix, chunk_bytes, keep_models
        As for :class:`~metarec.services.store.RedisStore`; the prefix may not hold ``{`` or ``}``,
        which would change the slots the layout relies on.

    Examples
    --------
    ``RedisStore.connect("redis+cluster://node:7000")`` makes one (it asks that node for
    the cluster's slots at once); its lists are read at :func:`cluster_key`'s keys:

    >>> cluster_key("metarec:", ("recs", "alice"))  # store.recs_key("alice")
    'metarec:recs:{u:alice}'
    """

    def __init__(
        self, client: RedisCluster[bytes], prefix: str = DEFAULT_PREFIX, **kwargs: Any
    ) -> None:
        if "{" in prefix or "}" in prefix:
            raise ConfigError(
                f"METAREC_KEY_PREFIX {prefix!r} holds a brace; on a Redis "
                "Cluster braces choose the keys' slots: use a prefix without "
                "'{' and '}'"
            )
        # The store calls the commands both clients share; typing it as the single-server
        # client keeps one store API for its callers.
        super().__init__(cast("redis.Redis[bytes]", client), prefix, **kwargs)
        self.cluster_client: Any = client
        self.steps = ClusterCommit(self.client, self.key)

    @staticmethod
    def _connection_kwargs(client: Any) -> dict[str, Any]:
        return dict(client.get_connection_kwargs())

    @classmethod
    def connect_cluster(cls, url: str, prefix: str = DEFAULT_PREFIX, **kwargs: Any) -> ClusterStore:
        """A store on a cluster client for a ``redis+cluster://`` (``rediss+cluster://``)
        URL naming one node; the client finds the others.

        The client asks the node for the cluster's slots at once, so an unreachable
        cluster fails here, as :class:`ClusterUnreachable` naming the setting: a connection
        error, which the services retry like any outage (:mod:`metarec.services.outage`) before
        giving up, and a :class:`~metarec.errors.MetarecError` for one-shot commands.
        """
        scheme, sep, rest = url.partition("://")
        try:
            client: RedisCluster[bytes] = _OutageVisibleCluster.from_url(
                scheme.partition("+")[0] + sep + rest,
                socket_timeout=SOCKET_TIMEOUT_S,
                socket_connect_timeout=SOCKET_TIMEOUT_S,
                retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), CLIENT_RETRIES),
            )
        except (redis.RedisError, RedisClusterException) as exc:
            if (
                isinstance(exc, redis.AuthenticationError)
                or "WRONGPASS" in str(exc)
                or "NOAUTH" in str(exc)
            ):
                raise ConfigError(
                    f"the Redis Cluster refused the credentials of METAREC_REDIS_URL: {exc}"
                ) from None
            text = f"{type(exc).__name__}: {str(exc)[:200]}"
            if not _unreachable(exc):  # waiting would not help: the URL or the ACL is wrong
                raise ConfigError(
                    f"METAREC_REDIS_URL does not name a Redis Cluster this client may use: {text}"
                ) from None
            raise ClusterUnreachable(
                f"the Redis Cluster at METAREC_REDIS_URL did not answer: {text}"
            ) from None
        return cls(client, prefix, **kwargs)

    def key(self, *parts: object) -> str:
        """The full key for ``parts`` in the cluster layout (:func:`cluster_key`)."""
        return cluster_key(self.prefix, parts)

    _k = key

    def load_users(self, users: Sequence[str]) -> tuple[list[bytes | None], list[list[str] | None]]:
        """States and profiles of ``users``, one round trip per node holding any."""
        if not users:
            return [], []
        raw = self.cluster_client.mget_nonatomic(
            [self._k("user", u) for u in users] + [self._k("profile", u) for u in users]
        )
        n = len(users)
        profiles = [None if p is None else [str(f) for f in json.loads(p)] for p in raw[n:]]
        return list(raw[:n]), profiles

    def applied_offsets(
        self, topic: str, partition: int, users: Sequence[str], topic_id: str | None
    ) -> dict[str, int]:
        return self.steps.marks(topic, partition, users, topic_id)

    def rebase_offsets(
        self, topic: str, seen_id: str | None, new_id: str, offsets: Mapping[int, int | None]
    ) -> bool:
        return self.steps.rebase(topic, seen_id, new_id, offsets)

    def commit_batch(
        self,
        topic: str,
        partition: int,
        expected_offset: int | None,
        next_offset: int,
        *,
        states: Mapping[str, bytes],
        recs: Mapping[str, bytes],
        recs_ttl_s: int,
        partials: PartialSums | None,
        events: int = 0,
        trending: Sequence[Mapping[int, float]] = (),
        channels: Sequence[Channel] = (),
        guards: Mapping[str, bytes] | None = None,
        skip_conflicts: bool = False,
        topic_id: str | None = None,
        state_ttl_s: int = 0,
    ) -> int:
        """:meth:`RedisStore.commit_batch` in the three steps of the module docstring.

        What differs from a single Redis: a failed guard writes the other users (each
        with its applied offset) before :class:`~metarec.errors.UserConflict` is raised,
        and :class:`~metarec.errors.PendingBatch` says that an earlier writer's batch must
        be finished first.
        """
        head, trend_args, part_args = self._encode_shared(
            topic,
            partition,
            expected_offset,
            next_offset,
            recs_ttl_s,
            partials,
            events,
            trending,
            channels,
            state_ttl_s,
        )
        shared = [
            str(len(channels)),
            str(len(part_args) // 2),
            str(int(events)),
            *head,
            *trend_args,
            *part_args,
        ]
        return self.steps.commit(
            topic,
            partition,
            expected_offset,
            next_offset,
            states=states,
            recs=recs,
            recs_ttl_s=recs_ttl_s,
            guards=guards or {},
            skip_conflicts=skip_conflicts,
            topic_id=topic_id,
            shared=shared,
            channel_keys=[self._k("trend", c.name) for c in channels],
            state_ttl_s=state_ttl_s,
        )
