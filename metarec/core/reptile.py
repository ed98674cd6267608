"""Folding the users' adapted vectors back into the meta-model (the seed's average, as Reptile).

Consumers keep, per partition and per domain, ``Σ w_u (θ_u − θ0(u))`` and ``Σ w_u`` for the
users they adapted (:class:`PartialSums`). The aggregator adds the partitions up and moves
the per-domain initialization towards the average adapted user::

    θ0[g] ← θ0[g] + ε · Σ w_u (θ_u − θ0(u)) / Σ w_u

With ``ε = 1`` this is the seed's plain average ``θ_meta = (1/K) Σ θ_i``; smaller ``ε`` is
Reptile's damped step. The cost is O(partitions × domains), not O(users).

>>> import numpy as np
>>> p = PartialSums.zeros(n_domains=1, dim=2)
>>> p.add(np.array([0, 0]), np.array([[1.0, 0.0], [3.0, 2.0]]), np.array([1.0, 1.0]))
>>> reptile_update(np.zeros((1, 2), np.float32), [p], epsilon=1.0).tolist()
[[2.0, 1.0]]
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = ["PartialSums", "reptile_update"]

F64 = npt.NDArray[np.float64]


@dataclass
class PartialSums:
    """Per-domain weighted sums of users' offsets from their prior, and of the weights."""

    sums: F64
    weights: F64

    @classmethod
    def zeros(cls, n_domains: int, dim: int) -> PartialSums:
        return cls(np.zeros((n_domains, dim)), np.zeros(n_domains))

    def add(self, domains: npt.ArrayLike, offsets: npt.ArrayLike, weights: npt.ArrayLike) -> None:
        """Accumulate ``w·(θ_u − θ0(u))`` for a batch of adapted users."""
        dom = np.asarray(domains, np.int64)
        w = np.asarray(weights, np.float64)
        self._grow(int(dom.max()) + 1 if dom.size else 0)
        np.add.at(self.sums, dom, w[:, None] * np.asarray(offsets, np.float64))
        np.add.at(self.weights, dom, w)

    def merge(self, other: PartialSums) -> PartialSums:
        """The sum of two partial sums (for example of two partitions)."""
        out = PartialSums(self.sums.copy(), self.weights.copy())
        out._grow(len(other.weights))
        out.sums[: len(other.weights)] += other.sums
        out.weights[: len(other.weights)] += other.weights
        return out

    def _grow(self, n_domains: int) -> None:
        extra = n_domains - len(self.weights)
        if extra > 0:
            self.sums = np.vstack([self.sums, np.zeros((extra, self.sums.shape[1]))])
            self.weights = np.concatenate([self.weights, np.zeros(extra)])

    def to_bytes(self) -> bytes:
        """Compact little-endian encoding: domains, dim, then weights and sums as float64."""
        header = np.array([len(self.weights), self.sums.shape[1]], "<i8").tobytes()
        return header + self.weights.astype("<f8").tobytes() + self.sums.astype("<f8").tobytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> PartialSums:
        n, dim = (int(x) for x in np.frombuffer(data[:16], "<i8"))
        body = np.frombuffer(data[16:], "<f8")
        if body.size != n + n * dim:
            raise ValueError(f"partial sums blob holds {body.size} numbers, expected {n + n * dim}")
        return cls(sums=body[n:].reshape(n, dim).copy(), weights=body[:n].copy())


def reptile_update(
    theta0: npt.NDArray[np.floating], partials: Iterable[PartialSums], epsilon: float = 1.0
) -> npt.NDArray[np.float32]:
    """The new per-domain initialization after folding in ``partials`` (see module doc).

    Domains that no user touched keep their row unchanged.
    """
    if not 0.0 < epsilon <= 1.0:
        raise ValueError(f"epsilon must be in (0, 1], got {epsilon}")
    dim = theta0.shape[1]
    total = PartialSums.zeros(theta0.shape[0], dim)
    for part in partials:
        total = total.merge(part)
    out = np.asarray(theta0, np.float64).copy()
    n = min(len(out), len(total.weights))
    seen = np.flatnonzero(total.weights[:n] > 0)
    out[seen] += epsilon * total.sums[seen] / total.weights[seen, None]
    return out.astype(np.float32)
