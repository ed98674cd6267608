"""What is popular now, at several time scales, with time counted in events.

Each scale ``s`` keeps an exponentially decayed count per item,
``p_s(i) = Σ_e w_e · 2^(-(clock - clock_e) / H_s)``, where ``clock`` is the number of
events the system has applied and ``H_s`` a half-life in events. Counting time in events
rather than in milliseconds is what makes one set of defaults fit every stream: a service
with a thousand events a second and a dataset with a thousand ratings a year trend at the
same pace per event, and stretching a stream's timestamps changes nothing. Which scale
matters (the last hour's hits, the season's, all the stream's) differs between streams;
the model learns its weight on each (:mod:`metarec.training`), per user history length.

Decaying every item on every event would cost O(items) per event, so counts are kept
*scaled* by ``2^((clock_e - ref_s)/H_s)`` against a per-scale reference, and a read
multiplies by ``2^(-(clock - ref_s)/H_s)``; a scale is rebased (one O(items) pass) only
when its factor passes ``2^MAX_EXPONENT``. The consumers keep the same scaled counts in
Redis (:mod:`metarec.store`), with the clock advanced atomically by every batch commit.

>>> t = Trending(half_lives=(1, 1000))
>>> t.learn_many([0, 0, 1])          # three events: clock 3
3
>>> t.learn_many([2])                # one more: clock 4
4
>>> t.counts(3).round(3).tolist()    # the 1-event scale forgets fast, the long one does not
[[1.0, 0.5, 1.0], [1.999, 0.999, 1.0]]
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from metarec.errors import ModelError

__all__ = ["HALF_LIVES", "MAX_EXPONENT", "Trending"]

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]

#: Half-lives of the trending scales, in events: a decade apart, from "the last few hundred
#: events" to "most of a 200k-event training window". The model weighs them.
HALF_LIVES: tuple[int, ...] = (1_000, 10_000, 100_000)
#: Rebase a scale once its factor would pass 2^60: float64 keeps 15 significant digits of
#: every count far inside its range, and a scale is rebased only every 60 half-lives.
MAX_EXPONENT = 60.0
_INITIAL_ITEMS = 64


class Trending:
    """Decayed item counts at several half-lives on an event clock.

    Parameters
    ----------
    half_lives
        Half-life of each scale, in events.
    n_items
        Initial item capacity (grows as larger indices arrive).
    """

    def __init__(self, half_lives: Sequence[float] = HALF_LIVES,
                 n_items: int = _INITIAL_ITEMS) -> None:
        h = np.asarray(half_lives, np.float64)
        if h.ndim != 1 or not h.size or not np.all(h > 0):
            raise ValueError(f"half_lives must be positive numbers, got {list(half_lives)}")
        self.half_lives = tuple(float(x) for x in h)
        self._h = h
        self.clock = 0
        self._ref = np.zeros(h.size, np.int64)
        self._counts = np.zeros((h.size, max(1, n_items)))
        self.n_items = 0

    @property
    def n_scales(self) -> int:
        return int(self._h.size)

    def learn_many(self, items: npt.ArrayLike, weights: npt.ArrayLike | None = None) -> int:
        """Apply a batch of events: the clock moves past all of them, then each adds its
        weight (1 by default; 0 or less adds nothing) at the new clock. Returns the clock.

        All events of one batch share a tick, in the consumer as in ``metarec eval``.
        """
        it = np.asarray(items, np.int64).ravel()
        w = np.ones(it.size) if weights is None else np.asarray(weights, np.float64).ravel()
        if w.size != it.size:
            raise ValueError(f"{it.size} items but {w.size} weights")
        self.clock += int(it.size)
        keep = w > 0
        if keep.any():
            self.add(it[keep], w[keep], self.clock)
        return self.clock

    def add(self, items: npt.ArrayLike, weights: npt.ArrayLike, at: int) -> None:
        """Add ``weights`` to ``items`` at clock ``at`` (no tick; see :meth:`learn_many`)."""
        it = np.asarray(items, np.int64).ravel()
        w = np.asarray(weights, np.float64).ravel()
        if it.size == 0:
            return
        if it.min() < 0:
            raise ValueError("item indices must be >= 0")
        self._grow(int(it.max()) + 1)
        self._rebase_if_needed(at)
        scale = np.exp2((at - self._ref) / self._h)
        for s in range(self.n_scales):
            np.add.at(self._counts[s], it, w * scale[s])

    def counts(self, n_items: int) -> F64:
        """Decayed counts of items ``0 .. n_items-1`` at the current clock: ``(scales, n)``."""
        out = np.zeros((self.n_scales, n_items))
        m = min(n_items, self._counts.shape[1])
        factor = np.exp2(-(self.clock - self._ref) / self._h)
        np.multiply(self._counts[:, :m], factor[:, None], out=out[:, :m])
        return out

    def features(self, n_items: int) -> F32:
        """``log(1 + count)`` per scale: the inputs of the trending term of the score."""
        return np.log1p(self.counts(n_items)).astype(np.float32)

    # -- the shared form (Redis) --------------------------------------------------------

    def to_arrays(self) -> dict[str, npt.NDArray[np.generic]]:
        """Plain arrays: scaled counts, references, clock, half-lives."""
        return {"counts": self._counts[:, : self.n_items].copy(), "ref": self._ref.copy(),
                "clock": np.array(self.clock, np.int64), "half_lives": self._h.copy()}

    @classmethod
    def from_arrays(cls, arrays: dict[str, npt.NDArray[np.generic]]) -> Trending:
        """Rebuild what :meth:`to_arrays` (or the Redis store) gave."""
        try:
            counts = np.asarray(arrays["counts"], np.float64)
            half_lives = np.asarray(arrays["half_lives"], np.float64)
            out = cls(half_lives.tolist(), n_items=max(1, counts.shape[1]))
            out._ref = np.asarray(arrays["ref"], np.int64).copy()
            out.clock = int(np.asarray(arrays["clock"]))
        except KeyError as exc:
            raise ModelError(f"trending state lacks {exc.args[0]!r}") from None
        if counts.shape[0] != out.n_scales or out._ref.shape != (out.n_scales,):
            raise ModelError(f"trending state has {counts.shape[0]} count rows and "
                             f"{out._ref.size} references for {out.n_scales} scales")
        out._counts[:, : counts.shape[1]] = counts
        out.n_items = counts.shape[1]
        return out

    # -- internals ------------------------------------------------------------------------

    def _grow(self, n: int) -> None:
        self.n_items = max(self.n_items, n)
        cap = self._counts.shape[1]
        if n > cap:
            grown = np.zeros((self.n_scales, max(n, 2 * cap)))
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
