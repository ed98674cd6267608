"""Riding out a Redis outage: retry with capped backoff, log it once, give up past a limit.

Why retrying whole store calls is safe for the consumer: every
:class:`~metarec.services.store.RedisStore` call it makes is idempotent or fenced. A batch commit
whose reply was lost is refused when it is sent again (the stored offset has moved on), and
the consumer reads that as "already written"; a registration returns the same indices; a
read is a read. Two of the aggregator's calls are not fenced, and a lost reply costs what
docs/OPERATIONS.md says (one cycle's partial sums, or one model published twice). So a call
that failed on a dropped connection, a timeout, a restarting server (``LOADING``) or a
failover (``READONLY`` from a demoted primary) is simply made again, after a pause that
doubles up to a cap.

What an operator sees: one ERROR line when the outage starts, one WARNING line when Redis
answers again (with how long it took and how many calls were retried), and, if it lasts
longer than the configured limit, :class:`RedisUnavailable`, which the entry point turns
into one CRITICAL line and a non-zero exit. While a call is retried the process does
nothing else: the consumer stops fetching (librdkafka's prefetch is bounded), so memory
stays flat.

>>> import logging
>>> calls = []
>>> def flaky() -> str:
...     calls.append(1)
...     if len(calls) < 3:
...         raise redis.ConnectionError("Connection refused")
...     return "ok"
>>> outage = Outage("redis", give_up_s=10, log=logging.getLogger("doc"), sleep=lambda s: None)
>>> outage.call(flaky), len(calls), outage.retried
('ok', 3, 2)
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, TypeVar, cast

import redis

from metarec.errors import MetarecError
from metarec.services.store import RedisStore

if TYPE_CHECKING:
    from metarec.config import Settings
    from metarec.services.metrics import Metrics

__all__ = [
    "TRANSIENT_REDIS_ERRORS",
    "Outage",
    "RedisUnavailable",
    "redis_outage",
    "retrying",
    "retrying_store",
]

T = TypeVar("T")

#: Errors that a later attempt can cure: the connection (refused, reset, timed out), a
#: server loading its data after a restart, a primary demoted in a failover, a server at
#: its ``maxmemory`` under ``noeviction`` (``OOM``: keys expiring or an operator frees
#: memory), and on a Redis Cluster a master down or failing over (``CLUSTERDOWN``,
#: ``MASTERDOWN``), slots moving (``TRYAGAIN``, redirections past the client's limit) or
#: not yet covered.
#: Authentication and permission errors are not among them: they need an operator, and
#: fail at start.
TRANSIENT_REDIS_ERRORS: Final = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.exceptions.BusyLoadingError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.OutOfMemoryError,  # type: ignore[attr-defined]  # newer than types-redis
    redis.exceptions.TryAgainError,
    redis.exceptions.ClusterError,
    redis.exceptions.SlotNotCoveredError,
)
#: First pause and largest pause between attempts, in seconds.
BASE_DELAY_S: Final = 0.05
MAX_DELAY_S: Final = 2.0


class RedisUnavailable(MetarecError):
    """Redis did not answer for longer than the retry limit."""


class Stopped(MetarecError):
    """The process was asked to stop while it waited for Redis."""


class Outage:
    """Retries calls to one dependency and reports each outage once.

    Parameters
    ----------
    what
        The dependency's name in log lines ("redis").
    setting
        The setting that says where it is, named when giving up.
    give_up_s
        How long one outage may last before :class:`RedisUnavailable` is raised.
    log
        Where the outage's start, end and end of patience are reported.
    should_stop
        Polled between attempts; when it says True, :class:`Stopped` is raised (a SIGTERM
        during an outage ends the process at once: nothing was written, nothing is lost).
    on_wait
        Called between attempts: the process is alive and waiting on purpose (its liveness
        probe must not have it restarted, which would not bring Redis back).
    on_retry, on_outage
        Called for each failed call that will be retried, and once per outage (metrics).
    sleep, clock
        Injected for tests.
    """

    def __init__(
        self,
        what: str,
        give_up_s: float,
        log: logging.Logger,
        *,
        setting: str = "METAREC_REDIS_URL",
        should_stop: Callable[[], bool] = lambda: False,
        on_wait: Callable[[], None] = lambda: None,
        on_retry: Callable[[], None] = lambda: None,
        on_outage: Callable[[], None] = lambda: None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.what = what
        self.setting = setting
        self.give_up_s = give_up_s
        self.log = log
        self.should_stop = should_stop
        self.on_wait = on_wait
        self.on_retry = on_retry
        self.on_outage = on_outage
        self._sleep = sleep
        self._clock = clock
        self._since: float | None = None
        self._attempt = 0
        self.retried = 0  # calls retried, over the process's life
        self.outages = 0  # outages seen, over the process's life
        self._rng = random.Random()

    @property
    def down(self) -> bool:
        """Whether the dependency is in an outage now (its last call failed)."""
        return self._since is not None

    def call(self, fn: Callable[[], T]) -> T:
        """``fn()``, made again after each transient failure until it works or time is up."""
        while True:
            try:
                result = fn()
            except TRANSIENT_REDIS_ERRORS as exc:
                self._failed(exc)
                continue
            if self._since is not None:
                self.log.warning(
                    f"{self.what} answers again",
                    extra={
                        "dependency": self.what,
                        "outage_s": round(self._clock() - self._since, 3),
                        "attempts": self._attempt,
                    },
                )
                self._since = None
                self._attempt = 0
            return result

    def _failed(self, exc: Exception) -> None:
        now = self._clock()
        if self._since is None:
            self._since = now
            self.outages += 1
            self.on_outage()
            self.log.error(
                f"{self.what} unavailable; retrying",
                extra={
                    "dependency": self.what,
                    "error": _describe(exc),
                    "give_up_after_s": self.give_up_s,
                },
            )
        elapsed = now - self._since
        if elapsed > self.give_up_s:  # the caller logs it, once, and exits
            raise RedisUnavailable(
                f"{self.what} at {self.setting} did not answer for "
                f"{elapsed:.1f} s "
                f"(limit {self.give_up_s:g} s): {_describe(exc)}"
            ) from None
        self._attempt += 1
        self.retried += 1
        self.on_retry()
        delay = min(MAX_DELAY_S, BASE_DELAY_S * 2 ** min(self._attempt, 16))
        deadline = now + delay * (0.5 + self._rng.random() / 2)
        while self._clock() < deadline:
            if self.should_stop():
                raise Stopped(f"stopped while waiting for {self.what}")
            self.on_wait()
            self._sleep(min(0.1, max(0.0, deadline - self._clock())))


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc)[:200]}"


class _Retrying:
    def __init__(self, target: object, outage: Outage) -> None:
        self._target = target
        self._outage = outage

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._target, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            return self._outage.call(lambda: attr(*args, **kwargs))

        return call


def retrying(target: T, outage: Outage) -> T:
    """``target`` with every method call made through ``outage.call``.

    Only for objects whose every method is safe to call again (the store is: see the
    module docstring).
    """
    return cast(T, _Retrying(target, outage))


def redis_outage(
    settings: Settings,
    log: logging.Logger,
    metrics: Metrics,
    *,
    should_stop: Callable[[], bool],
    on_wait: Callable[[], None],
) -> Outage:
    """A service's Redis outage policy: ``METAREC_REDIS_RETRY_S``, counted in its metrics."""
    return Outage(
        "redis",
        settings.redis_retry_s,
        log,
        should_stop=should_stop,
        on_wait=on_wait,
        on_retry=metrics.redis_errors.inc,
        on_outage=metrics.redis_outages.inc,
    )


def retrying_store(settings: Settings, outage: Outage) -> RedisStore:
    """The settings' store, every call of it retried through ``outage``; connecting too,
    since a cluster client connects when it is made."""
    return retrying(
        outage.call(lambda: RedisStore.connect(settings.redis_url, settings.key_prefix)), outage
    )
