"""The Redis state store: everything the consumer and the aggregator keep in Redis.

Why one class: the atomic-offset rule (a batch's effects and its partition's
next offset are one unit that checks the stored offset first) can only be kept if every
write goes through code that knows the whole key layout. The multi-key operations are Lua
scripts (run with EVALSHA), so each is one round trip and atomic; their inputs are checked
in Python first, so that a script never fails half-way (Redis does not roll a script back).

On a Redis Cluster a script may only touch keys of one slot, so
:class:`metarec.services.cluster_store.ClusterStore` (what :meth:`RedisStore.connect` returns for a
``redis+cluster://`` URL) keeps the same methods with hash-tagged keys and writes a batch
in idempotent steps instead of one unit; this module's single-Redis path is unaffected.

Key layout (every key starts with the prefix, default ``metarec:``; see docs/REDIS_KEYS.md):

=================================  ==========  ===============================================
key                                type        value
=================================  ==========  ===============================================
``recs:{user}``                    string      the list apps read (JSON, the contract); TTL
``user:{user}``                    string      the user's state blob (``UserState.to_bytes``)
``profile:{user}``                 string      profile features, JSON list of strings
``items:index``                    hash        item id → dense index 0..n-1
``items:next``                     string      number of items registered (next index)
``items:meta``                     hash        index → JSON ``{"item","domain","features"}``
``trend:{channel}``                hash        item index → scaled trending count of a channel
``trend:meta``                     hash        ``clock`` (events applied), ``ref:{channel}``
``offset:{topic}:{partition}``     string      the partition's next offset to process
``topic-id:{topic}``               string      the Kafka topic id those offsets refer to
``partials:{topic}:{partition}``   hash        ``w:{row}`` = Σw, ``s:{row}:{j}`` = Σ w·δ_j
``partials:index``                 set         names of the partial-sum hashes not yet taken
``model:seq``                      string      last allocated model version
``model:current``                  string      the version readers should load
``model:versions``                 zset        published versions still kept
``model:{v}:meta``                 string      JSON: version, created_ms, n_chunks, size, sha256
``model:{v}:chunk:{i}``            string      bytes of chunk ``i`` of version ``v``
``consumer:{group}:{member}``      string      a consumer's heartbeat JSON, with a TTL
``consumers:{group}``              zset        member → expiry (ms) of its last heartbeat
``aggregate:request``              string      why a consumer or operator asked for a cycle
=================================  ==========  ===============================================

Floats go through ``HINCRBYFLOAT``, which stores 17 digits *after the decimal point*: sums
keep ~15 significant digits for magnitudes above 1e-3, and amounts below 1e-17 vanish. The
trending counts are kept scaled by ``2^((clock - ref)/h)`` (as in :mod:`metarec.core.trending`),
so fresh counts are ≥ their weight and the floor is immaterial; the commit script advances
the shared event clock by the batch's size and scales the batch's increments itself, so
consumers never disagree about the clock.
Scripts start with ``#!lua`` (Redis ≥ 7 / Valkey): under ``maxmemory`` a script is then
refused before its first write rather than stopped after some of them.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import redis

from metarec.config import CLUSTER_SCHEMES
from metarec.core.events import ItemRecord, UserRecord
from metarec.core.reptile import PartialSums
from metarec.core.trending import Channel, Trending
from metarec.core.user_state import COUNT_AT
from metarec.errors import (
    ConfigError,
    LogReplaced,
    MetarecError,
    ModelError,
    StaleOffset,
    UserConflict,
)

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_KEEP_MODELS",
    "DEFAULT_PREFIX",
    "RedisStore",
    "plain_key",
]

DEFAULT_PREFIX: Final = "metarec:"
#: Chunk size of stored models: Redis strings may hold 512 MB, but one 8 MiB value keeps a
#: single command from blocking the server (and the network buffers) for long.
DEFAULT_CHUNK_BYTES: Final = 8 * 1024 * 1024
#: Model versions kept after a publish: the current one plus two a slow reader may still load.
DEFAULT_KEEP_MODELS: Final = 3
#: Longest a single Redis call may take before it fails (and is retried by the caller).
SOCKET_TIMEOUT_S: Final = 5.0
#: Catalog rows fetched per HMGET; one call for any realistic delta, bounded for a cold start.
_HMGET_CHUNK: Final = 50_000

I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]
CatalogRow = tuple[int, str, str, tuple[str, ...]]

# KEYS: offset, trend:meta, partials, partials:index, then one trend:{channel} hash per
#       trending channel, the state keys, the recs keys, and last topic-id:{topic}.
# ARGV: expected ('' = none stored), next, 'RECS_TTL/STATE_TTL' (seconds, 0 = none),
#       #channels, #states, #recs, #partials, events (the clock's advance), the byte
#       offset of a state's event count, '1' to skip users whose guard fails ('0': refuse
#       the whole unit), then per channel: its name, half-life and number of (item,
#       weight) pairs; then state values, their guards ('*' = unchecked, '' = no state may
#       be stored, else the 4 count bytes the stored state must have), recs values, the
#       state number each list belongs to (0: none), every channel's pairs in channel
#       order, partial (field, inc) pairs, and last the topic id the offsets must refer to
#       ('' = unchecked).
# Replies {1, clock, skipped state numbers...} when applied, {0, stored offset} when
# fenced, {2, conflicting state numbers...} when a guard failed and skipping is off,
# {3, stored topic id} when the offsets were rebased onto a new log meanwhile.
# Nothing is written until the offset and guard checks have passed. A channel whose
# factor would pass 2^60 is rebased first (its counts multiplied down, its reference
# moved to the clock), inside the same unit.
# The trending part of a batch's commit, shared with the cluster's first step
# (metarec.services.cluster_store): advance the shared clock by the batch's events; per channel
# (its name, half-life and number of pairs at ARGV[arg0 + 3c ..], its hash at
# KEYS[key0 + c]) rebase the counts first if the channel's factor would pass 2^60, then
# add the pairs that start at ARGV[a], scaled to the clock. Returns the clock and the
# ARGV position after the last pair.
TRENDING_LUA: Final = """
local function add_trending(meta, key0, arg0, nc, a, events)
  local clock = redis.call('HINCRBY', KEYS[meta], 'clock', events)
  for c = 1, nc do
    local name = 'ref:' .. ARGV[arg0 + 3 * c]
    local h = tonumber(ARGV[arg0 + 1 + 3 * c])
    local np = tonumber(ARGV[arg0 + 2 + 3 * c])
    if np > 0 then
      local ref = tonumber(redis.call('HGET', KEYS[meta], name) or clock)
      if (clock - ref) / h > 60 then
        local shrink = 2 ^ (-(clock - ref) / h)
        local flat = redis.call('HGETALL', KEYS[key0 + c])
        for i = 2, #flat, 2 do
          redis.call('HSET', KEYS[key0 + c], flat[i - 1],
                     string.format('%.17g', tonumber(flat[i]) * shrink))
        end
        ref = clock
      end
      redis.call('HSET', KEYS[meta], name, ref)
      local factor = 2 ^ ((clock - ref) / h)
      for i = 1, np do
        redis.call('HINCRBYFLOAT', KEYS[key0 + c], ARGV[a + 2 * i - 1],
                   string.format('%.17g', tonumber(ARGV[a + 2 * i]) * factor))
      end
      a = a + 2 * np
    end
  end
  return clock, a
end
"""
# SET, with an expiry in seconds when ``ttl`` > 0; and the 'A/B' pair of TTLs a commit
# passes in one argument (lists', states').
PUT_LUA: Final = """
local function put(key, value, ttl)
  if ttl > 0 then
    redis.call('SET', key, value, 'EX', ttl)
  else
    redis.call('SET', key, value)
  end
end
local function ttls(arg)
  local a, b = string.match(arg, '^(%d+)/(%d+)$')
  return tonumber(a), tonumber(b)
end
"""
_COMMIT_LUA: Final = (
    "#!lua"
    + TRENDING_LUA
    + PUT_LUA
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
local nc, ns, nr = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local nq, events = tonumber(ARGV[7]), tonumber(ARGV[8])
local at, skip = tonumber(ARGV[9]), ARGV[10] == '1'
local a = 10 + 3 * nc
local skipped, conflicts = {}, {}
for i = 1, ns do
  local guard = ARGV[a + ns + i]
  if guard ~= '*' and redis.call('GETRANGE', KEYS[4 + nc + i], at, at + 3) ~= guard then
    skipped[i] = true
    conflicts[#conflicts + 1] = i
  end
end
if #conflicts > 0 and not skip then
  local out = {2}
  for i = 1, #conflicts do out[i + 1] = conflicts[i] end
  return out
end
local ttl, sttl = ttls(ARGV[3])
for i = 1, ns do
  if not skipped[i] then put(KEYS[4 + nc + i], ARGV[a + i], sttl) end
end
a = a + 2 * ns
for i = 1, nr do
  local owner = tonumber(ARGV[a + nr + i])
  if owner == 0 or not skipped[owner] then
    put(KEYS[4 + nc + ns + i], ARGV[a + i], ttl)
  end
end
a = a + 2 * nr
local clock
clock, a = add_trending(2, 4, 8, nc, a, events)
for i = 1, nq do redis.call('HINCRBYFLOAT', KEYS[3], ARGV[a + 2 * i - 1], ARGV[a + 2 * i]) end
if nq > 0 then redis.call('SADD', KEYS[4], KEYS[3]) end
redis.call('SET', KEYS[1], ARGV[2])
local out = {1, clock}
for i = 1, #conflicts do out[i + 2] = conflicts[i] end
return out
"""
)

# KEYS: topic-id:{topic}, then the offset keys of the topic's partitions. ARGV: the id the
# caller saw stored ('' = none), the topic's id now, then each partition's offset to go on
# from ('' = leave it). Replies {1} or {0, stored id} when another member got there first.
_REBASE_LUA: Final = """#!lua
local stored = redis.call('GET', KEYS[1]) or ''
if stored ~= ARGV[1] then return {0, stored} end
redis.call('SET', KEYS[1], ARGV[2])
for i = 2, #KEYS do
  if ARGV[i + 1] ~= '' then redis.call('SET', KEYS[i], ARGV[i + 1]) end
end
return {1}
"""

# KEYS: group-generation:{group}. ARGV: the generation the caller saw. Replies the
# generation now, one more than seen when the caller moved it.
_ADVANCE_GENERATION_LUA: Final = """#!lua
local now = tonumber(redis.call('GET', KEYS[1]) or '0')
if now == tonumber(ARGV[1]) then now = redis.call('INCR', KEYS[1]) end
return now
"""

# KEYS: items:index, items:next, items:meta. ARGV: overwrite ('1' = replace the meta of
# known items), then n ids, then their n meta JSON strings. Replies the n indices.
_REGISTER_LUA: Final = """#!lua
local n = (#ARGV - 1) / 2
local out = {}
for i = 1, n do
  local idx = redis.call('HGET', KEYS[1], ARGV[1 + i])
  if not idx then
    idx = redis.call('INCR', KEYS[2]) - 1
    redis.call('HSET', KEYS[1], ARGV[1 + i], idx)
    redis.call('HSETNX', KEYS[3], idx, ARGV[1 + n + i])
  elseif ARGV[1] == '1' then
    redis.call('HSET', KEYS[3], idx, ARGV[1 + n + i])
  end
  out[i] = tonumber(idx)
end
return out
"""

# KEYS: partials:index, then the partial-sum hashes to take. Replies their HGETALLs.
_TAKE_LUA: Final = """#!lua
local out = {}
for i = 2, #KEYS do
  out[i - 1] = redis.call('HGETALL', KEYS[i])
  redis.call('DEL', KEYS[i])
  redis.call('SREM', KEYS[1], KEYS[i])
end
return out
"""

# KEYS: model:current, model:seq, model:versions. ARGV: version, versions to keep.
# Replies {1, pruned versions...} or {0, current} when the version is not newer.
_FLIP_LUA: Final = """#!lua
local v = tonumber(ARGV[1])
local cur = redis.call('GET', KEYS[1])
if cur and tonumber(cur) >= v then return {0, tonumber(cur)} end
redis.call('SET', KEYS[1], ARGV[1])
local seq = redis.call('GET', KEYS[2])
if not seq or tonumber(seq) < v then redis.call('SET', KEYS[2], ARGV[1]) end
redis.call('ZADD', KEYS[3], v, ARGV[1])
local keep = tonumber(ARGV[2])
local old = redis.call('ZRANGE', KEYS[3], 0, -(keep + 1))
if #old > 0 then redis.call('ZREMRANGEBYRANK', KEYS[3], 0, -(keep + 1)) end
local out = {1}
for i = 1, #old do out[i + 1] = tonumber(old[i]) end
return out
"""


def _num(value: float, what: str) -> str:
    """A float as text HINCRBYFLOAT parses exactly (shortest round-trip repr)."""
    x = float(value)
    if not math.isfinite(x):
        raise ValueError(f"{what} must be finite, got {x!r}")
    return repr(x)


def _offset_arg(offset: int | None) -> str:
    return "" if offset is None else str(int(offset))


def _dump(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _text(raw: bytes | str) -> str:
    return raw.decode("utf-8") if isinstance(raw, bytes) else raw


def plain_key(prefix: str, parts: Sequence[object]) -> str:
    """The key of ``parts`` under ``prefix`` on a single Redis (docs/REDIS_KEYS.md).

    >>> plain_key("metarec:", ("recs", "alice"))
    'metarec:recs:alice'
    """
    return prefix + ":".join(str(p) for p in parts)


class RedisStore:
    """Every key metarec keeps in Redis, with atomic batch commits fenced by offsets.

    Parameters
    ----------
    client
        A client made by the caller, e.g. ``redis.Redis.from_url(url)``; it must return
        bytes (``decode_responses`` off), because states and models are binary.
    prefix
        Prepended to every key, so that several deployments or tests share one Redis.
    chunk_bytes
        Largest model chunk stored under one key.
    keep_models
        Model versions kept after a publish (the current one included).

    Examples
    --------
    >>> import redis
    >>> store = RedisStore(redis.Redis.from_url("redis://127.0.0.1:6379/0"), prefix="demo:")
    >>> store.recs_key("u1")
    'demo:recs:u1'
    >>> store.commit_batch("metarec.events", 0, None, 10,  # doctest: +SKIP
    ...                    states={"u1": b"state"}, recs={"u1": b'{"user":"u1"}'},
    ...                    recs_ttl_s=0, partials=None)
    >>> store.offsets("metarec.events", [0, 1])  # doctest: +SKIP
    {0: 10, 1: None}
    >>> store.commit_batch("metarec.events", 0, None, 20, states={}, recs={},  # doctest: +SKIP
    ...                    recs_ttl_s=0, partials=None)
    Traceback (most recent call last):
    metarec.errors.StaleOffset: ...
    """

    def __init__(
        self,
        client: redis.Redis[bytes],
        prefix: str = DEFAULT_PREFIX,
        *,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        keep_models: int = DEFAULT_KEEP_MODELS,
    ) -> None:
        if self._connection_kwargs(client).get("decode_responses"):
            raise ConfigError(
                "the Redis client decodes responses to str; create it without "
                "decode_responses=True (states and models are bytes)"
            )
        if chunk_bytes < 1 or keep_models < 1:
            raise ValueError(
                f"chunk_bytes and keep_models must be >= 1, got {chunk_bytes} and {keep_models}"
            )
        self.client = client
        self.prefix = prefix
        self.chunk_bytes = chunk_bytes
        self.keep_models = keep_models
        self._commit = client.register_script(_COMMIT_LUA)
        self._register = client.register_script(_REGISTER_LUA)
        self._take = client.register_script(_TAKE_LUA)
        self._flip = client.register_script(_FLIP_LUA)
        self._rebase = client.register_script(_REBASE_LUA)
        self._advance_generation = client.register_script(_ADVANCE_GENERATION_LUA)

    @staticmethod
    def _connection_kwargs(client: Any) -> dict[str, Any]:
        return dict(client.connection_pool.connection_kwargs)

    @classmethod
    def connect(cls, url: str, prefix: str = DEFAULT_PREFIX, **kwargs: Any) -> RedisStore:
        """A store on a new client for ``url`` with explicit timeouts: a stalled server
        fails a call after :data:`SOCKET_TIMEOUT_S` instead of hanging it, so that the
        caller's retry policy (:mod:`metarec.services.outage`) decides what happens next.

        A ``redis+cluster://`` or ``rediss+cluster://`` URL names one node of a Redis
        Cluster: the store is then a :class:`metarec.services.cluster_store.ClusterStore`, with the
        same methods and guarantees (docs/REDIS_KEYS.md, "Redis Cluster").
        """
        scheme = url.partition("://")[0]
        if scheme in CLUSTER_SCHEMES:
            # Imported here: the cluster store is a subclass of this one.
            from metarec.services.cluster_store import ClusterStore

            return ClusterStore.connect_cluster(url, prefix, **kwargs)
        client = redis.Redis.from_url(
            url,
            socket_timeout=SOCKET_TIMEOUT_S,
            socket_connect_timeout=SOCKET_TIMEOUT_S,
            health_check_interval=30,
        )
        return cls(client, prefix, **kwargs)

    def check_access(self) -> None:
        """Fail now, not at the first batch, if Redis refuses this client: authentication,
        or an ACL that does not cover the key prefix or the commands the store needs.

        Raises :class:`~metarec.errors.ConfigError` naming ``METAREC_REDIS_URL`` (or the
        prefix) and the cause; a connection error is left to the caller's retry policy.
        """
        # Names no topic or user can have (control characters are refused in both), and
        # this process's own: members starting together must not trip over each other.
        topic = probe = f"\x01access-check-{uuid.uuid4().hex}"
        try:
            self.client.ping()
            self.client.set(self._k("offset", topic, 0), b"0", px=10_000)
            partials = PartialSums.zeros(1, 1)
            partials.weights[0] = 1.0  # so that the probe writes a partial sum too
            self.commit_batch(
                topic,
                0,
                0,
                0,
                states={probe: b"probe"},
                recs={probe: b"{}"},
                recs_ttl_s=10,
                partials=partials,
                guards={probe: b""},
                skip_conflicts=True,
            )
            self.client.delete(
                self._k("offset", topic, 0),
                self._k("user", probe),
                self._k("recs", probe),
                self._k("partials", topic, 0),
            )
            self.client.srem(self._k("partials", "index"), self._k("partials", topic, 0))
        except redis.AuthenticationError as exc:
            raise ConfigError(
                f"Redis refused the credentials of METAREC_REDIS_URL: {exc}; "
                "check the user and password"
            ) from None
        except redis.exceptions.NoPermissionError as exc:
            raise ConfigError(
                f"Redis's ACL refuses the METAREC_REDIS_URL user keys under "
                f"the prefix {self.prefix!r} (METAREC_KEY_PREFIX) or a command "
                f"metarec needs: {exc}; allow ~{self.prefix}* and GET, SET, "
                "MGET, EVALSHA, SCRIPT, HSET, HINCRBYFLOAT..."
            ) from None
        except redis.ResponseError as exc:
            if "NOAUTH" in str(exc) or "WRONGPASS" in str(exc):
                raise ConfigError(
                    f"Redis needs credentials that METAREC_REDIS_URL does not give: {exc}"
                ) from None
            raise

    def key(self, *parts: object) -> str:
        """The full key for ``parts`` under this store's prefix (``key("a", 1)`` → ``…a:1``)."""
        return plain_key(self.prefix, parts)

    _k = key

    def recs_key(self, user: str) -> str:
        """The key apps GET for ``user``'s list."""
        return self._k("recs", user)

    def fallback_key(self, domain: str) -> str:
        """The key of ``domain``'s fallback list: what apps show a user without a list."""
        return self._k("fallback", domain)

    def withdrawn_key(self) -> str:
        """The set of withdrawn item ids (item records with ``"available": false``)."""
        return self._k("withdrawn")

    def withdrawn_version_key(self) -> str:
        """A counter that moves on whenever the withdrawn set changes: readers keep the
        set and read it again only then."""
        return self._k("withdrawn", "version")

    def set_availability(self, available: Mapping[str, bool]) -> bool:
        """Withdraw (False) or restore (True) items; True if that changed the withdrawn
        set, in which case its version moves on after the change."""
        gone = [item for item, ok in available.items() if not ok]
        back = [item for item, ok in available.items() if ok]
        pipe = self.client.pipeline(transaction=False)
        if gone:
            pipe.sadd(self.withdrawn_key(), *gone)
        if back:
            pipe.srem(self.withdrawn_key(), *back)
        changed = any(pipe.execute()) if gone or back else False
        if changed:
            self.client.incr(self.withdrawn_version_key())
        return changed

    def withdrawn_version(self) -> int:
        raw = self.client.get(self.withdrawn_version_key())
        return 0 if raw is None else int(raw)

    def withdrawn_items(self) -> tuple[int, set[str]]:
        """The withdrawn set's version, then the set (read after it: a change in between
        shows as a newer version next time)."""
        pipe = self.client.pipeline(transaction=False)
        pipe.get(self.withdrawn_version_key())
        pipe.smembers(self.withdrawn_key())
        version, members = pipe.execute()
        return (0 if version is None else int(version)), {m.decode() for m in members}

    def global_fallback_key(self) -> str:
        """The key of the fallback of every domain together, for a domain without one
        (no ``:`` after it, so no domain's key can be it)."""
        return self._k("fallback")

    def write_fallbacks(
        self, records: Mapping[str, bytes], everywhere: bytes | None = None
    ) -> None:
        """Replace the fallback lists of the given domains, and the global one if given
        (one pipelined round trip).

        Plain SETs, outside the batch commit: each consumer writes the same ranking of a
        newcomer's list as it sees it, every few seconds, and the last write wins.
        """
        if not records and everywhere is None:
            return
        pipe = self.client.pipeline(transaction=False)
        for domain, value in records.items():
            pipe.set(self.fallback_key(domain), value)
        if everywhere is not None:
            pipe.set(self.global_fallback_key(), everywhere)
        pipe.execute()

    def delete_user(self, user: str) -> bool:
        """Delete ``user``'s state and list (not the profile); True if there was anything."""
        return bool(self.client.delete(self._k("user", user), self.recs_key(user)))

    def applied_offsets(
        self, topic: str, partition: int, users: Sequence[str], topic_id: str | None
    ) -> dict[str, int]:
        """Per user, the offset of ``topic[partition]`` up to which the user's events are
        already in the stored state, where that can differ from the partition's offset.

        Read it *after* the states: a write landing between the two reads then fails its
        guard. On a single Redis a batch is one atomic unit with its offset, so every user
        has what the offset says and this is empty; a Redis Cluster writes users one by one
        (:class:`metarec.services.cluster_store.ClusterStore`), so a batch consumed again after a
        crash must skip the events below a user's mark.
        """
        return {}

    # -- the atomic batch commit -----------------------------------------------------

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
        """Write a batch's effects and move the partition's offset, all or nothing.

        The write happens only if the stored ``offset:{topic}:{partition}`` equals
        ``expected_offset`` (None: no offset stored yet); otherwise nothing changes and
        :class:`~metarec.errors.StaleOffset` is raised, which fences off a zombie consumer
        whose partition was reassigned. ``next_offset == expected_offset`` is a *refresh*:
        rewriting states or lists (e.g. after a model change) without consuming anything.

        ``events`` advances the shared trending clock (the batch's size); ``trending``
        holds, for each of ``channels`` (:mod:`metarec.core.trending`), the item index → weight
        the batch adds to it at the new clock.

        ``guards`` protects users' states from a concurrent writer: for each user in it,
        the state is written only if the stored one still has the event count it had when
        loaded (:func:`metarec.core.user_state.count_guard` of the loaded state; ``b""``: none
        was stored). The offset fences a partition; the guard fences a user whose events
        arrive on two partitions at once. When a guard fails, the whole unit is refused
        with :class:`~metarec.errors.UserConflict` (redo the batch from the stored states),
        or, with ``skip_conflicts`` (a refresh, which applies no events), only that user's
        state and list are left out.

        ``topic_id`` is the Kafka topic id the caller's offsets refer to: if the stored
        offsets were rebased onto a new log meanwhile (:meth:`rebase_offsets`), nothing is
        written and :class:`~metarec.errors.LogReplaced` is raised.

        ``recs_ttl_s`` and ``state_ttl_s`` (0: none) expire the lists and states written,
        so that users who stop coming back free their memory.

        Returns
        -------
        int
            The trending clock after the commit (other consumers may have moved it too).
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
        partials_key = self._k("partials", topic, partition)
        keys = [
            self._k("offset", topic, partition),
            self._k("trend", "meta"),
            partials_key,
            self._k("partials", "index"),
        ]
        keys += [self._k("trend", c.name) for c in channels]
        keys += [self._k("user", u) for u in states]
        keys += [self._k("recs", u) for u in recs]
        guards = guards or {}
        number = {u: i for i, u in enumerate(states, 1)}
        args: list[str | bytes] = [
            "" if expected_offset is None else str(int(expected_offset)),
            str(int(next_offset)),
            f"{int(recs_ttl_s)}/{int(state_ttl_s)}",
            str(len(channels)),
            str(len(states)),
            str(len(recs)),
            str(len(part_args) // 2),
            str(int(events)),
            str(COUNT_AT),
            "1" if skip_conflicts else "0",
            *head,
        ]
        args += states.values()
        args += [guards.get(u, b"*") for u in states]
        args += recs.values()
        args += [str(number.get(u, 0)) for u in recs]
        args += trend_args
        args += part_args
        keys.append(self._k("topic-id", topic))
        args.append(topic_id or "")
        status, value, *rest = self._commit(keys=keys, args=args)
        if status == 3:
            raise LogReplaced(
                f"{topic}: the stored offsets now refer to topic id "
                f"{_text(value) or 'none'}, not {topic_id}; the log was "
                "replaced and the offsets rebased: check the topic again"
            )
        if status == 2:
            names = list(states)
            users = [names[int(i) - 1] for i in (value, *rest)]
            raise UserConflict(
                f"{topic}[{partition}]: {len(users)} users changed since they were loaded "
                f"(first: {users[0]!r}); their events arrive on more than one partition. "
                "Nothing was written; redo the batch from the stored states",
                users,
            )
        if status == 0:
            stored = _text(value)
            raise StaleOffset(
                f"{topic}[{partition}]: expected stored offset "
                f"{'none' if expected_offset is None else expected_offset}, found "
                f"{stored or 'none'}; another consumer owns this partition now, so drop the "
                "batch and re-read the offset after the next assignment",
                int(stored) if stored else None,
            )
        return int(value)

    def _encode_shared(
        self,
        topic: str,
        partition: int,
        expected_offset: int | None,
        next_offset: int,
        recs_ttl_s: int,
        partials: PartialSums | None,
        events: int,
        trending: Sequence[Mapping[int, float]],
        channels: Sequence[Channel],
        state_ttl_s: int = 0,
    ) -> tuple[list[str], list[str], list[str]]:
        """Check a commit's inputs and encode its shared effects for a script: the
        channels' (name, half-life, pairs) triples, their (item, weight) pairs and the
        partial sums' (field, value) pairs. Raises ValueError before anything is sent."""
        if expected_offset is not None and next_offset < expected_offset:
            raise ValueError(
                f"next_offset {next_offset} is before expected_offset "
                f"{expected_offset} of {topic}[{partition}]"
            )
        if next_offset < 0 or recs_ttl_s < 0 or state_ttl_s < 0 or events < 0:
            raise ValueError(
                f"next_offset ({next_offset}), recs_ttl_s ({recs_ttl_s}), "
                f"state_ttl_s ({state_ttl_s}) and events ({events}) must be >= 0"
            )
        if len(trending) != len(channels):
            raise ValueError(
                f"{len(trending)} trending increments for {len(channels)} "
                "channels; pass one mapping per channel"
            )
        head: list[str] = []
        trend_args: list[str] = []
        for channel, incs in zip(channels, trending, strict=True):
            head += (channel.name, _num(channel.half_life, "half-life"), str(len(incs)))
            if not channel.half_life > 0:
                raise ValueError(f"channel {channel.name!r} needs a positive half-life")
            for item, inc in incs.items():
                if int(item) < 0:
                    raise ValueError(f"trending item index must be >= 0, got {item}")
                trend_args += (str(int(item)), _num(inc, f"trending weight of item {item}"))
        part_args = [] if partials is None else self._partial_fields(partials)
        return head, trend_args, part_args

    @staticmethod
    def _partial_fields(partials: PartialSums) -> list[str]:
        """Field/value pairs of the rows that carry anything."""
        out: list[str] = []
        for row in range(len(partials.weights)):
            w, sums = partials.weights[row], partials.sums[row]
            if w == 0 and not np.any(sums):
                continue
            out += (f"w:{row}", _num(w, f"partial weight of row {row}"))
            for j, s in enumerate(sums.tolist()):
                out += (f"s:{row}:{j}", _num(s, f"partial sum [{row}, {j}]"))
        return out

    def offsets(self, topic: str, partitions: Sequence[int]) -> dict[int, int | None]:
        """The stored next offsets of ``partitions`` (None: nothing committed yet)."""
        if not partitions:
            return {}
        raw = self.client.mget([self._k("offset", topic, p) for p in partitions])
        return {p: None if v is None else int(v) for p, v in zip(partitions, raw, strict=True)}

    def topic_id(self, topic: str) -> str | None:
        """The id of the topic log the stored offsets of ``topic`` refer to (None: unset)."""
        raw = self.client.get(self._k("topic-id", topic))
        return None if raw is None else _text(raw)

    def rebase_offsets(
        self, topic: str, seen_id: str | None, new_id: str, offsets: Mapping[int, int | None]
    ) -> bool:
        """Point the stored offsets of ``topic`` at a new log, atomically and once.

        A recreated topic (or a broker that lost its data) starts its offsets again, so the
        stored ones mean nothing there. ``offsets`` gives each partition's offset to go on
        from in the log ``new_id`` (None: leave it); ``seen_id`` is the id the caller
        found stored. Returns False, changing nothing, when the stored id is no longer
        ``seen_id``: another consumer rebased first.
        """
        parts = sorted(offsets)
        keys = [self._k("topic-id", topic)] + [self._k("offset", topic, p) for p in parts]
        args = [seen_id or "", new_id] + [_offset_arg(offsets[p]) for p in parts]
        status, *_ = self._rebase(keys=keys, args=args)
        return bool(status == 1)

    # -- users -----------------------------------------------------------------------

    def load_users(self, users: Sequence[str]) -> tuple[list[bytes | None], list[list[str] | None]]:
        """States and profiles of ``users`` in one MGET (None where there is none)."""
        if not users:
            return [], []
        raw = self.client.mget(
            [self._k("user", u) for u in users] + [self._k("profile", u) for u in users]
        )
        n = len(users)
        profiles = [None if p is None else [str(f) for f in json.loads(p)] for p in raw[n:]]
        return list(raw[:n]), profiles

    def set_profiles(self, records: Sequence[UserRecord]) -> None:
        """Store users' profile features (the users topic), one pipelined round trip."""
        pipe = self.client.pipeline(transaction=False)
        for rec in records:
            pipe.set(self._k("profile", rec.user), _dump(list(rec.features)))
        pipe.execute()

    def read_recs(self, user: str) -> dict[str, Any] | None:
        """A user's list as apps see it (for tests and the demo)."""
        raw = self.client.get(self.recs_key(user))
        return None if raw is None else dict(json.loads(raw))

    # -- item registry ---------------------------------------------------------------

    def item_indices(self, items: Sequence[str], domains: Sequence[str]) -> I64:
        """Dense indices of ``items``, registering new ones, in one atomic round trip.

        Idempotent and safe across processes. A new item gets the meta record
        ``{"item", "domain", "features": []}``; a known item's meta is left as it is.
        """
        if len(items) != len(domains):
            raise ValueError(f"{len(items)} items but {len(domains)} domains")
        metas = [
            _dump({"item": i, "domain": d, "features": []})
            for i, d in zip(items, domains, strict=True)
        ]
        return self._register_items("0", items, metas)

    def describe_items(self, records: Sequence[ItemRecord]) -> I64:
        """Register items if needed and store their domain and features (overwriting)."""
        metas = [
            _dump({"item": r.item, "domain": r.domain, "features": list(r.features)})
            for r in records
        ]
        return self._register_items("1", [r.item for r in records], metas)

    def _register_items(self, overwrite: str, items: Sequence[str], metas: list[bytes]) -> I64:
        if not items:
            return np.zeros(0, np.int64)
        keys = [self._k("items", "index"), self._k("items", "next"), self._k("items", "meta")]
        out = self._register(keys=keys, args=[overwrite, *items, *metas])
        return np.asarray(out, dtype=np.int64)

    def catalog_size(self) -> int:
        """How many items are registered (indices are 0 .. size-1)."""
        raw = self.client.get(self._k("items", "next"))
        return 0 if raw is None else int(raw)

    def catalog_since(self, start: int) -> list[CatalogRow]:
        """``(index, item, domain, features)`` of every item with index >= ``start``.

        A consumer keeps its in-memory catalog in step by calling this with its current
        size; rows come in index order, so appending them keeps the indices equal.
        """
        end = self.catalog_size()
        rows: list[CatalogRow] = []
        meta_key = self._k("items", "meta")
        for lo in range(max(0, start), end, _HMGET_CHUNK):
            idx = range(lo, min(end, lo + _HMGET_CHUNK))
            fields = [str(i) for i in idx]
            for i, raw in zip(idx, self.client.hmget(meta_key, fields), strict=True):
                if raw is None:
                    raise MetarecError(
                        f"item index {i} has no record in {meta_key}; the "
                        "registry was damaged (evicted keys?); rebuild it"
                    )
                meta = json.loads(raw)
                rows.append(
                    (
                        i,
                        str(meta["item"]),
                        str(meta["domain"]),
                        tuple(str(f) for f in meta["features"]),
                    )
                )
        return rows

    # -- trending ----------------------------------------------------------------------

    def trending(self, n_items: int, channels: Sequence[Channel]) -> Trending:
        """The shared trending counts of items ``0 .. n_items-1`` (one MULTI round trip)."""
        pipe = self.client.pipeline(transaction=True)
        pipe.hgetall(self._k("trend", "meta"))
        for c in channels:
            pipe.hgetall(self._k("trend", c.name))
        meta, *tables = pipe.execute()
        fields = {_text(k): int(float(v)) for k, v in meta.items()}
        clock = fields.get("clock", 0)
        counts = np.zeros((len(channels), n_items))
        for s, table in enumerate(tables):
            if table:
                idx = np.array([int(k) for k in table], dtype=np.int64)
                vals = np.array(list(table.values())).astype(np.float64)
                keep = idx < n_items
                counts[s, idx[keep]] = vals[keep]
        refs = np.array([fields.get(f"ref:{c.name}", clock) for c in channels], np.int64)
        return Trending.from_arrays(
            {"counts": counts, "ref": refs, "clock": np.array(clock)}, channels
        )

    # -- partial sums ----------------------------------------------------------------

    def take_partials(self, topic: str, dim: int | None = None) -> list[PartialSums]:
        """Read and reset the partial sums of every partition of ``topic``, atomically.

        One :class:`PartialSums` per partition that has any, in partition order. Rows are
        domain rows; ``dim`` is inferred from the stored fields unless given (give it when
        a partition may hold weights only).
        """
        index_key = self._k("partials", "index")
        head = self._k("partials", topic) + ":"
        keys: list[tuple[int, str]] = []
        for member in self.client.smembers(index_key):
            name = _text(member)
            if name.startswith(head) and name[len(head) :].isdigit():
                keys.append((int(name[len(head) :]), name))
        if not keys:
            return []
        keys.sort()
        tables = self._take(keys=[index_key] + [k for _, k in keys])
        return [self._parse_partials(flat, dim) for flat in tables if flat]

    @staticmethod
    def _parse_partials(flat: list[bytes], dim: int | None) -> PartialSums:
        weights: dict[int, float] = {}
        sums: dict[tuple[int, int], float] = {}
        for field, value in zip(flat[::2], flat[1::2], strict=True):
            kind, *pos = _text(field).split(":")
            if kind == "w":
                weights[int(pos[0])] = float(value)
            else:
                sums[int(pos[0]), int(pos[1])] = float(value)
        rows = 1 + max([*weights, *(r for r, _ in sums)])
        width = 1 + max((j for _, j in sums), default=-1) if dim is None else dim
        out = PartialSums.zeros(rows, width)
        for r, w in weights.items():
            out.weights[r] = w
        for (r, j), s in sums.items():
            if j >= width:
                raise ValueError(f"stored partial sums have dimension > {width}")
            out.sums[r, j] = s
        return out

    # -- model versions --------------------------------------------------------------

    def publish_model(
        self, blob: bytes, version: int | None = None, history: Mapping[str, object] | None = None
    ) -> int:
        """Store a model and make it current; returns its version.

        Chunks and meta are written first and ``model:current`` flips last, so a reader
        never sees half a model. Versions beyond the newest ``keep_models`` are deleted,
        except a pinned one. ``history`` joins the meta: where the version comes from
        (``parent``, ``reason``), what it was trained on and how well (``model list``).
        """
        if version is None:
            version = int(self.client.incr(self._k("model", "seq")))
        else:
            current = self.current_model_version()
            if (
                version < 1
                or (current is not None and version <= current)
                or self.client.exists(self._k("model", version, "meta"))
            ):
                raise ValueError(
                    f"model version {version} must be >= 1, newer than the "
                    f"current {current} and not yet stored; pass None to "
                    "allocate one"
                )
        step = self.chunk_bytes
        chunks = [blob[i : i + step] for i in range(0, len(blob), step)] or [b""]
        meta = {
            "version": version,
            "created_ms": int(time.time() * 1000),
            "n_chunks": len(chunks),
            "size": len(blob),
            "sha256": hashlib.sha256(blob).hexdigest(),
            **(history or {}),
        }
        pipe = self.client.pipeline(transaction=False)
        for i, chunk in enumerate(chunks):
            pipe.set(self._k("model", version, "chunk", i), chunk)
        pipe.set(self._k("model", version, "meta"), _dump(meta))
        pipe.execute()
        reply = self._flip(
            keys=[
                self._k("model", "current"),
                self._k("model", "seq"),
                self._k("model", "versions"),
            ],
            args=[str(version), str(self.keep_models)],
        )
        if reply[0] == 0:
            if reply[1] != version:  # an equal version's keys are the winner's, not ours
                self._delete_models([version])
            raise ValueError(
                f"model version {version} lost the race to version {reply[1]}, "
                "published meanwhile; publish again with version=None"
            )
        self._delete_models([int(v) for v in reply[1:]])
        return version

    def _delete_models(self, versions: Sequence[int]) -> None:
        """Delete versions' chunks and meta in one DEL (meta last in the list); a pinned
        version is kept, and stays listed."""
        pinned = self.pinned_model_version()
        if pinned is not None and pinned in versions:
            self.client.zadd(self._k("model", "versions"), {str(pinned): pinned})
            versions = [v for v in versions if v != pinned]
        if not versions:
            return
        metas = self.client.mget([self._k("model", v, "meta") for v in versions])
        doomed: list[str] = []
        for v, raw in zip(versions, metas, strict=True):
            n = 0 if raw is None else int(json.loads(raw)["n_chunks"])
            doomed += [self._k("model", v, "chunk", i) for i in range(n)]
            doomed.append(self._k("model", v, "meta"))
        self.client.delete(*doomed)

    def current_model_version(self) -> int | None:
        """The newest published version (None before the first publish): what the
        aggregator trains on from, and what consumers serve unless a version is pinned."""
        raw = self.client.get(self._k("model", "current"))
        return None if raw is None else int(raw)

    def served_model_version(self) -> int | None:
        """The version consumers load: the pinned one if any, else the current one."""
        pipe = self.client.pipeline(transaction=False)
        pipe.get(self._k("model", "pinned"))
        pipe.get(self._k("model", "current"))
        pinned, current = pipe.execute()
        raw = pinned if pinned is not None else current
        return None if raw is None else int(raw)

    def pinned_model_version(self) -> int | None:
        raw = self.client.get(self._k("model", "pinned"))
        return None if raw is None else int(raw)

    def pin_model(self, version: int | None) -> None:
        """Serve ``version`` whatever is published after it (None: unpin). Raises
        :class:`ModelError` for a version that is not stored."""
        if version is None:
            self.client.delete(self._k("model", "pinned"))
            return
        if not self.client.exists(self._k("model", version, "meta")):
            raise ModelError(f"model version {version} is not stored (pruned, or never published)")
        self.client.set(self._k("model", "pinned"), str(version))

    def model_meta(self, version: int) -> dict[str, Any] | None:
        """What is recorded of ``version`` (size, time, history), or None if not stored."""
        raw = self.client.get(self._k("model", version, "meta"))
        return None if raw is None else dict(json.loads(raw))

    def model_created_ms(self, version: int) -> int | None:
        """When ``version`` was published (epoch ms), or None if it is not stored."""
        raw = self.client.get(self._k("model", version, "meta"))
        return None if raw is None else int(json.loads(raw)["created_ms"])

    def load_model_blob(self, version: int) -> bytes:
        """The bytes of model ``version``, checked against its size and sha256."""
        raw = self.client.get(self._k("model", version, "meta"))
        if raw is None:
            raise ModelError(
                f"model version {version} is not stored (pruned, or never "
                "published); load current_model_version() instead"
            )
        meta = json.loads(raw)
        chunks = self.client.mget(
            [self._k("model", version, "chunk", i) for i in range(int(meta["n_chunks"]))]
        )
        missing = [i for i, c in enumerate(chunks) if c is None]
        if missing:
            raise ModelError(
                f"model version {version} lacks chunks {missing}; it was pruned "
                "while loading or damaged; load the current version again"
            )
        blob = b"".join(c for c in chunks if c is not None)
        if len(blob) != meta["size"] or hashlib.sha256(blob).hexdigest() != meta["sha256"]:
            raise ModelError(
                f"model version {version} is corrupt (size or sha256 differs "
                "from its meta); republish it"
            )
        return blob

    # -- heartbeats ------------------------------------------------------------------

    def request_aggregation(
        self, reason: str, ttl_s: int = 3600, since_ts: int | None = None
    ) -> None:
        """Ask the aggregator for a cycle now (``aggregate:request`` holds the reason).

        ``since_ts`` dates a change of regime: from now on the aggregator trains only on
        events from then on (``aggregate:floor`` keeps the latest such date).
        """
        pipe = self.client.pipeline(transaction=False)
        pipe.set(self.key("aggregate", "request"), reason.encode("utf-8"), ex=ttl_s)
        if since_ts is not None:
            # GT: consumers reporting one change at slightly different times keep the latest.
            pipe.zadd(self.key("aggregate", "floor"), {"since": since_ts}, gt=True)
        pipe.execute()

    def training_floor(self) -> int | None:
        """The start of the current regime (see :meth:`request_aggregation`), or None."""
        score = self.client.zscore(self.key("aggregate", "floor"), "since")
        return None if score is None else int(score)

    def clear_training_floor(self, floor: int) -> None:
        """Forget the floor ``floor`` (a retraining found no new regime behind it); a later
        floor reported meanwhile stays."""
        self.client.zremrangebyscore(self.key("aggregate", "floor"), floor, floor)

    def aggregation_request(self) -> str | None:
        """The pending request's reason, or None."""
        raw = self.client.get(self.key("aggregate", "request"))
        return None if raw is None else bytes(raw).decode("utf-8", "replace")

    def clear_aggregation_request(self) -> None:
        self.client.delete(self.key("aggregate", "request"))

    # -- the group's generation ------------------------------------------------------

    def group_generation(self, group: str) -> int:
        """How many times ``group``'s members moved to a new Kafka group (0: never)."""
        raw = self.client.get(self._k("group-generation", group))
        return 0 if raw is None else int(raw)

    def advance_group_generation(self, group: str, seen: int) -> int:
        """Move ``group`` to its next generation if it is still at ``seen`` (members that
        find the group stuck at once move it one step, not one each); returns the
        generation now."""
        return int(self._advance_generation(keys=[self._k("group-generation", group)], args=[seen]))

    def heartbeat(self, group: str, member: str, payload: Mapping[str, Any], ttl_s: int) -> None:
        """Record a consumer's stats; they vanish ``ttl_s`` seconds after its last beat."""
        if ttl_s < 1:
            raise ValueError(f"ttl_s must be >= 1, got {ttl_s}")
        now_ms = int(time.time() * 1000)
        members = self._k("consumers", group)
        pipe = self.client.pipeline(transaction=False)
        pipe.set(self._k("consumer", group, member), _dump(dict(payload)), ex=ttl_s)
        pipe.zadd(members, {member: now_ms + ttl_s * 1000})
        pipe.zremrangebyscore(members, "-inf", now_ms)
        pipe.execute()

    def heartbeats(self, group: str) -> dict[str, dict[str, Any]]:
        """The live heartbeats of ``group``'s members, by member name."""
        names = [_text(m) for m in self.client.zrange(self._k("consumers", group), 0, -1)]
        if not names:
            return {}
        raw = self.client.mget([self._k("consumer", group, m) for m in names])
        return {m: dict(json.loads(v)) for m, v in zip(names, raw, strict=True) if v is not None}
