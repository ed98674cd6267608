"""What is popular now, at several time scales, with time counted in events.

Each scale ``s`` keeps an exponentially decayed count per item,
``p_s(i) = Σ_e w_e · 2^(-(clock - clock_e) / H_s)``, where ``clock`` is the number of
events the system has applied and ``H_s`` a half-life in events. Counting time in events
rather than in milliseconds is what makes one set of defaults fit every stream: a service
with a thousand events a second and a dataset with a thousand ratings a year trend at the
same pace per event, and stretching a stream's timestamps changes nothing. Which scale
matters (the last hour's hits, the season's, all the stream's) differs between streams;
the model learns its weight on each (:mod:`metarec.training.trainer`), per user history length.

Besides what everyone takes, one channel counts only what users take among their first
:data:`FIRST_EVENTS` events: where a service shows newcomers a sign-up set or a landing
page, that is what the next newcomer will take, and the model learns how much a user with
no history (or a short one) follows it.

Decaying every item on every event would cost O(items) per event, so counts are kept
*scaled* by ``2^((clock_e - ref_s)/H_s)`` against a per-scale reference, and a read
multiplies by ``2^(-(clock - ref_s)/H_s)``; a scale is rebased (one O(items) pass) only
when its factor passes ``2^MAX_EXPONENT``. The consumers keep the same scaled counts in
Redis (:mod:`metarec.services.store`), with the clock advanced atomically by every batch commit.

>>> t = Trending([Channel("fast", 1), Channel("slow", 1000), Channel("new", 1000, True)])
>>> t.learn_many([0, 0, 1], first=[True, False, False])   # three events: clock 3
3
>>> t.learn_many([2])                                       # one more: clock 4
4
>>> [[round(float(c), 3) for c in row] for row in t.counts(3)]  # fast forgets, slow keeps
[[1.0, 0.5, 1.0], [1.999, 0.999, 1.0], [0.999, 0.0, 0.0]]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from metarec.errors import ModelError

__all__ = ["CHANNELS", "FIRST_EVENTS", "MAX_EXPONENT", "Channel", "Trending"]

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Channel:
    """One trending count: its name (in Redis keys), half-life in events, and whether it
    counts only users' first :data:`FIRST_EVENTS` events."""

    name: str
    half_life: float
    first_only: bool = False


#: A user's events that count as their first ones (for the newcomers' channel).
FIRST_EVENTS = 3
#: The channels: everyone's events at half-lives a decade apart, from "the last few hundred
#: events" to "most of a 200k-event training window", and newcomers' events at the
#: longest. The model weighs them.
CHANNELS: tuple[Channel, ...] = (
    Channel("1000", 1_000),
    Channel("10000", 10_000),
    Channel("100000", 100_000),
    Channel("first-100000", 100_000, first_only=True),
)
#: Rebase a scale once its factor would pass 2^60: float64 keeps 15 significant digits of
#: every count far inside its range, and a scale is rebased only every 60 half-lives.
MAX_EXPONENT = 60.0
_INITIAL_ITEMS = 64


class Trending:
    """Decayed item counts of several channels on an event clock.

    Parameters
    ----------
    channels
        The counts kept (half-lives in events, and which events each counts).
    n_items
        Initial item capacity (grows as larger indices arrive).
    """

    def __init__(
        self, channels: Sequence[Channel] = CHANNELS, n_items: int = _INITIAL_ITEMS
    ) -> None:
        h = np.asarray([c.half_life for c in channels], np.float64)
        if h.ndim != 1 or not h.size or not np.all(h > 0):
            raise ValueError(f"half-lives must be positive numbers, got {h.tolist()}")
        self.channels = tuple(channels)
        self._h = h
        self._first = np.array([c.first_only for c in channels])
        self.clock = 0
        self._ref = np.zeros(h.size, np.int64)
        self._counts = np.zeros((h.size, max(1, n_items)))
        self.n_items = 0

    @property
    def n_channels(self) -> int:
        return int(self._h.size)

    def increments(
        self,
        items: npt.ArrayLike,
        weights: npt.ArrayLike | None = None,
        first: npt.ArrayLike | None = None,
    ) -> list[dict[int, float]]:
        """What a batch adds to each channel: item → summed weight (positive weights only;
        ``first`` marks the events among their user's first ones)."""
        it = np.asarray(items, np.int64).ravel()
        w = np.ones(it.size) if weights is None else np.asarray(weights, np.float64).ravel()
        f = np.zeros(it.size, bool) if first is None else np.asarray(first, bool).ravel()
        if not w.size == f.size == it.size:
            raise ValueError(f"{it.size} items, {w.size} weights, {f.size} first flags")
        if it.size and it.min() < 0:
            raise ValueError("item indices must be >= 0")
        out: list[dict[int, float]] = []
        for only_first in self._first:
            keep = (w > 0) & (f if only_first else True)
            sums: dict[int, float] = {}
            for item, value in zip(it[keep].tolist(), w[keep].tolist(), strict=True):
                sums[item] = sums.get(item, 0.0) + value
            out.append(sums)
        return out

    def learn_many(
        self,
        items: npt.ArrayLike,
        weights: npt.ArrayLike | None = None,
        first: npt.ArrayLike | None = None,
    ) -> int:
        """Apply a batch of events: the clock moves past all of them, then each channel
        adds its :meth:`increments` at the new clock. Returns the clock.

        All events of one batch share a tick, in the consumer as in ``metarec eval``.
        """
        incs = self.increments(items, weights, first)
        self.clock += int(np.asarray(items).size)
        self.add(incs, self.clock)
        return self.clock

    def add(self, increments: Sequence[dict[int, float]], at: int) -> None:
        """Add each channel's ``item → weight`` at clock ``at`` (no tick: see
        :meth:`learn_many`)."""
        if not any(increments):
            return
        self._grow(1 + max(max(inc) for inc in increments if inc))
        self._rebase_if_needed(at)
        scale = np.exp2((at - self._ref) / self._h)
        for s, inc in enumerate(increments):
            if inc:
                idx = np.fromiter(inc.keys(), np.int64, len(inc))
                val = np.fromiter(inc.values(), np.float64, len(inc))
                self._counts[s, idx] += val * scale[s]

    def counts(self, n_items: int) -> F64:
        """Decayed counts of items ``0 .. n_items-1`` at the current clock: ``(scales, n)``."""
        out = np.zeros((self.n_channels, n_items))
        m = min(n_items, self._counts.shape[1])
        factor = np.exp2(-(self.clock - self._ref) / self._h)
        np.multiply(self._counts[:, :m], factor[:, None], out=out[:, :m])
        return out

    def features(self, n_items: int) -> F32:
        """``log(1 + count)`` per scale: the inputs of the trending term of the score."""
        return np.log1p(self.counts(n_items)).astype(np.float32)

    # -- the shared form (Redis) --------------------------------------------------------

    def to_arrays(self) -> dict[str, npt.NDArray[np.generic]]:
        """Plain arrays: scaled counts, references and the clock (channels not included)."""
        return {
            "counts": self._counts[:, : self.n_items].copy(),
            "ref": self._ref.copy(),
            "clock": np.array(self.clock, np.int64),
        }

    @classmethod
    def from_arrays(
        cls, arrays: dict[str, npt.NDArray[np.generic]], channels: Sequence[Channel] = CHANNELS
    ) -> Trending:
        """Rebuild what :meth:`to_arrays` (or the Redis store) gave, for ``channels``."""
        try:
            counts = np.asarray(arrays["counts"], np.float64)
            out = cls(channels, n_items=max(1, counts.shape[1]))
            out._ref = np.asarray(arrays["ref"], np.int64).copy()
            out.clock = int(np.asarray(arrays["clock"]))
        except KeyError as exc:
            raise ModelError(f"trending state lacks {exc.args[0]!r}") from None
        if counts.shape[0] != out.n_channels or out._ref.shape != (out.n_channels,):
            raise ModelError(
                f"trending state has {counts.shape[0]} count rows and "
                f"{out._ref.size} references for {out.n_channels} channels"
            )
        out._counts[:, : counts.shape[1]] = counts
        out.n_items = counts.shape[1]
        return out

    # -- internals ------------------------------------------------------------------------

    def _grow(self, n: int) -> None:
        self.n_items = max(self.n_items, n)
        cap = self._counts.shape[1]
        if n > cap:
            grown = np.zeros((self.n_channels, max(n, 2 * cap)))
            grown[:, :cap] = self._counts
            self._counts = grown

    def _rebase_if_needed(self, at: int) -> None:
        if not self._counts.any():  # nothing counted yet: any reference will do
            self._ref[:] = at
            return
        over = (at - self._ref) / self._h > MAX_EXPONENT
        for s in np.flatnonzero(over):
            self._counts[s] *= np.exp2(-(at - self._ref[s]) / self._h[s])
            self._ref[s] = at
