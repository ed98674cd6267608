"""Recency-decayed item popularity per domain, updated in O(1) per event.

The decayed count of item ``i`` at time ``t`` is ``p_i(t) = Σ_e w_e · 2^(-(t - ts_e)/h)``
over the events ``e`` on ``i``, with half-life ``h``. Decaying every item on every event
would cost O(n_items) per event, so the counts are kept in a *scaled* space instead: an
event adds ``w · 2^((ts - t_ref)/h)`` for a fixed reference time ``t_ref``, and a read
multiplies by ``2^(-(t - t_ref)/h)``. Only when the scale factor grows past
:data:`MAX_EXPONENT` halvings are the stored counts rescaled to a new ``t_ref`` (one
O(n_items) pass per ``MAX_EXPONENT`` half-lives of stream time), which keeps everything
far inside float64 range over any time span.

This is the wall-clock popularity of the ``recent_pop`` and ``itemknn`` baselines. metarec
itself counts time in events (:mod:`metarec.core.trending`).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from metarec.errors import ModelError

__all__ = ["ALL_DOMAINS", "MAX_EXPONENT", "RecencyPopularity"]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

#: Pass as ``domain`` to read the popularity summed over every domain.
ALL_DOMAINS = -1
#: Rescale once an increment would be multiplied by more than 2^64: float64 holds 2^1023,
#: so counts stay exact to ~1e-16 relative while rescaling happens only every 64 half-lives.
MAX_EXPONENT = 64.0
#: Initial number of item slots; capacity doubles when an item index exceeds it.
_INITIAL_ITEMS = 64


class RecencyPopularity:
    """Exponentially decayed item counts per domain, with constant-time updates.

    Parameters
    ----------
    half_life_ms
        Time after which an event counts half as much, in milliseconds.
    n_items
        Initial item capacity (a hint; it grows as larger item indices arrive).
    n_domains
        Initial domain capacity (also grows).

    Examples
    --------
    >>> pop = RecencyPopularity(half_life_ms=1000)
    >>> pop.learn_one(item=2, domain=0, ts=0)
    >>> pop.learn_one(item=0, domain=1, ts=1000, weight=2.0)
    >>> pop.scores(domain=ALL_DOMAINS, ts=1000, n_items=3).tolist()
    [2.0, 0.0, 0.5]
    >>> pop.scores(domain=0, ts=2000, n_items=3).tolist()
    [0.0, 0.0, 0.25]
    """

    def __init__(self, half_life_ms: float, n_items: int = _INITIAL_ITEMS, n_domains: int = 1):
        if not half_life_ms > 0:
            raise ValueError(f"half_life_ms must be positive, got {half_life_ms!r}")
        self.half_life_ms = float(half_life_ms)
        self.n_items = int(n_items)
        self.n_domains = int(n_domains)
        # Row d holds domain d; the last row holds the sum over all domains, so that the
        # all-domain read costs the same as a single-domain read.
        self._counts = np.zeros((max(1, self.n_domains) + 1, max(1, self.n_items)))
        self._t_ref: int | None = None

    # -- updates -----------------------------------------------------------------------

    def learn_one(self, item: int, domain: int, ts: int, weight: float = 1.0) -> None:
        """Add one event of ``weight`` on ``item`` in ``domain`` at time ``ts`` (ms)."""
        if item < 0 or domain < 0:
            raise ValueError(f"item and domain must be >= 0, got item={item}, domain={domain}")
        self._ensure(item + 1, domain + 1)
        scale = self._scale_for(ts, ts)
        inc = weight * scale
        self._counts[domain, item] += inc
        self._counts[-1, item] += inc

    def learn_many(
        self,
        items: npt.ArrayLike,
        domains: npt.ArrayLike,
        ts: npt.ArrayLike,
        weights: npt.ArrayLike | None = None,
    ) -> None:
        """Add a batch of events at once (the consumer's batches): learn_one, vectorized."""
        it = np.asarray(items, dtype=np.int64).ravel()
        dm = np.asarray(domains, dtype=np.int64).ravel()
        tt = np.asarray(ts, dtype=np.int64).ravel()
        w = np.ones(it.shape) if weights is None else np.asarray(weights, dtype=np.float64).ravel()
        if not it.size == dm.size == tt.size == w.size:
            raise ValueError(
                f"items, domains, ts and weights differ in length: "
                f"{it.size}, {dm.size}, {tt.size}, {w.size}"
            )
        if it.size == 0:
            return
        if it.min() < 0 or dm.min() < 0:
            raise ValueError("items and domains must be >= 0")
        self._ensure(int(it.max()) + 1, int(dm.max()) + 1)
        self._scale_for(int(tt.min()), int(tt.max()))
        assert self._t_ref is not None
        inc = w * np.exp2((tt - self._t_ref) / self.half_life_ms)
        np.add.at(self._counts, (dm, it), inc)
        np.add.at(self._counts[-1], it, inc)

    # -- reads -------------------------------------------------------------------------

    def scores(self, domain: int, ts: int, n_items: int) -> FloatArray:
        """Decayed counts of items ``0 .. n_items-1`` at time ``ts``; a new array.

        ``domain`` may be :data:`ALL_DOMAINS`; an unknown domain or item scores 0.
        """
        out = np.zeros(n_items)
        if self._t_ref is None:
            return out
        if domain == ALL_DOMAINS:
            row = self._counts[-1]
        elif 0 <= domain < self._counts.shape[0] - 1:
            row = self._counts[domain]
        elif domain >= 0:
            return out
        else:
            raise ValueError(f"domain must be >= 0 or ALL_DOMAINS, got {domain}")
        m = min(n_items, row.shape[0])
        np.multiply(row[:m], np.exp2(-(ts - self._t_ref) / self.half_life_ms), out=out[:m])
        return out

    # -- persistence -------------------------------------------------------------------

    def to_arrays(self) -> dict[str, npt.NDArray[np.generic]]:
        """Plain-numpy state, e.g. for ``np.savez`` or a Redis blob; see :meth:`from_arrays`."""
        t_ref = -1 if self._t_ref is None else self._t_ref
        return {
            "counts": self._counts[:-1, : self.n_items].copy(),
            "t_ref": np.array(t_ref, dtype=np.int64),
            "has_ref": np.array(self._t_ref is not None),
            "half_life_ms": np.array(self.half_life_ms),
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, npt.NDArray[np.generic]]) -> RecencyPopularity:
        """Rebuild the structure saved by :meth:`to_arrays`."""
        try:
            counts = np.asarray(arrays["counts"], dtype=np.float64)
            half_life = float(np.asarray(arrays["half_life_ms"]))
            has_ref = bool(np.asarray(arrays["has_ref"]))
            t_ref = int(np.asarray(arrays["t_ref"]))
        except KeyError as exc:
            raise ModelError(
                f"popularity state lacks the array {exc.args[0]!r}; save it with to_arrays()"
            ) from None
        if counts.ndim != 2:
            raise ModelError(f"popularity counts must be 2-D (domains, items), got {counts.shape}")
        pop = cls(half_life, n_items=counts.shape[1], n_domains=counts.shape[0])
        pop._counts[:-1, : counts.shape[1]] = counts
        pop._counts[-1, : counts.shape[1]] = counts.sum(axis=0)
        pop._t_ref = t_ref if has_ref else None
        return pop

    # -- internals ---------------------------------------------------------------------

    def _ensure(self, n_items: int, n_domains: int) -> None:
        """Grow capacity (items doubling, so amortized O(1)) and the logical sizes."""
        rows, cols = self._counts.shape
        new_rows = max(rows, n_domains + 1)
        new_cols = cols if n_items <= cols else max(n_items, 2 * cols)
        if (new_rows, new_cols) != (rows, cols):
            grown = np.zeros((new_rows, new_cols))
            grown[: rows - 1, :cols] = self._counts[:-1]
            grown[-1, :cols] = self._counts[-1]
            self._counts = grown
        self.n_items = max(self.n_items, n_items)
        self.n_domains = max(self.n_domains, n_domains)

    def _scale_for(self, ts_min: int, ts_max: int) -> float:
        """Make ``t_ref`` valid for ``[ts_min, ts_max]`` and return the factor for ``ts_max``.

        ``t_ref`` only moves forward, and only when ``ts_max`` runs more than
        :data:`MAX_EXPONENT` half-lives past it; older events get factors below 1, which
        merely lose relative precision as their true contribution fades.
        """
        if self._t_ref is None:
            self._t_ref = ts_min
        exponent = (ts_max - self._t_ref) / self.half_life_ms
        if exponent > MAX_EXPONENT:
            self._counts *= np.exp2(-exponent)
            self._t_ref = ts_max
            exponent = 0.0
        return float(np.exp2(exponent))
