"""The baselines metarec is judged against, all in the prequential harness's protocol.

Each class implements :class:`~metarec.recommender.Recommender` on dense indices: it scores
items ``0 .. n_items-1`` and learns from one :class:`~metarec.recommender.Interaction` at a
time. The harness owns the candidate set and the exclusion of consumed items, so none of
these excludes anything itself. State grows geometrically with the indices it sees,
so a recommender needs no catalog size up front.

Dislikes (negative weights) carry no "consumed this" signal for the counting baselines and
are skipped there; BPR-MF turns them into a pairwise loss that pushes the item down.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from metarec.popularity import ALL_DOMAINS, RecencyPopularity
from metarec.recommender import Interaction

__all__ = [
    "DAY_MS",
    "ItemKNN",
    "OnlineBPRMF",
    "Popularity",
    "RecentPopularity",
]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

DAY_MS = 24 * 3600 * 1000
#: A week: long enough to smooth daily cycles, short enough to follow what is trending.
DEFAULT_HALF_LIFE_MS = 7 * DAY_MS
_INITIAL = 64


def _grow(arr: FloatArray, n: int) -> FloatArray:
    """``arr`` with at least ``n`` rows (zero-filled), doubling so growth is amortized O(1)."""
    if n <= arr.shape[0]:
        return arr
    out = np.zeros((max(n, 2 * arr.shape[0]), *arr.shape[1:]), dtype=arr.dtype)
    out[: arr.shape[0]] = arr
    return out


def _head(values: FloatArray, n_items: int) -> FloatArray:
    """A new float64 array of ``values[:n_items]``, zero-padded past the known items."""
    out = np.zeros(n_items)
    m = min(n_items, values.shape[0])
    out[:m] = values[:m]
    return out


class Popularity:
    """Global popularity: the number of positive events per item, over all domains and time.

    Parameters
    ----------
    seed
        Unused (the method is deterministic); kept so every baseline has the same factory.

    Examples
    --------
    >>> pop = Popularity()
    >>> for item in (1, 1, 0):
    ...     pop.learn_one(Interaction(user=0, item=item, ts=0))
    >>> pop.score(user=5, ts=0, domain=0, n_items=3).tolist()
    [1.0, 2.0, 0.0]
    """

    def __init__(self, seed: int = 0):
        self.seed = seed
        self._counts: FloatArray = np.zeros(_INITIAL)

    def score(self, user: int, ts: int, domain: int, n_items: int) -> FloatArray:
        return _head(self._counts, n_items)

    def learn_one(self, x: Interaction) -> None:
        if x.weight <= 0:
            return
        self._counts = _grow(self._counts, x.item + 1)
        self._counts[x.item] += 1.0


class RecentPopularity:
    """Recency-decayed popularity of each item in the event's domain.

    Parameters
    ----------
    half_life_ms
        Half-life of an event's contribution (default: 7 days).
    per_domain
        Rank by the popularity within the scored event's domain (True) or over all domains.
    seed
        Unused (deterministic); kept for a uniform factory signature.

    Examples
    --------
    >>> rp = RecentPopularity(half_life_ms=1000)
    >>> rp.learn_one(Interaction(user=0, item=0, ts=0))
    >>> rp.learn_one(Interaction(user=1, item=1, ts=1000))
    >>> rp.score(user=2, ts=1000, domain=0, n_items=2).tolist()
    [0.5, 1.0]
    """

    def __init__(
        self, half_life_ms: float = DEFAULT_HALF_LIFE_MS, per_domain: bool = True, seed: int = 0
    ):
        self.half_life_ms = half_life_ms
        self.per_domain = per_domain
        self.seed = seed
        self._pop = RecencyPopularity(half_life_ms)

    def score(self, user: int, ts: int, domain: int, n_items: int) -> FloatArray:
        return self._pop.scores(domain if self.per_domain else ALL_DOMAINS, ts, n_items)

    def learn_one(self, x: Interaction) -> None:
        if x.weight > 0:
            self._pop.learn_one(x.item, x.domain, x.ts)


class OnlineBPRMF:
    """Matrix factorization trained online with BPR: one SGD pass per event.

    Score ``V u + b``. Each event is contrasted with ``n_negatives`` items drawn uniformly
    from the catalog seen so far; a dislike (negative weight) swaps the roles, pushing the
    item below the sampled ones. New users start at the zero vector, so before their first
    update they are ranked by item bias alone; item vectors start small and random so that
    the first user updates have a direction.

    By default every event takes the same step whatever its type: the biases are then a
    recency-weighted popularity, and doubling the step on likes makes that estimate noisier
    (HR@10 at a user's first event on ml-100k drops from 0.44 to 0.32 with ``weighted``).

    Parameters
    ----------
    n_factors
        Latent size ``d``.
    n_negatives
        Negatives sampled per event.
    lr
        SGD step size.
    l2
        L2 penalty applied to the touched parameters at each step.
    init_std
        Standard deviation of new item vectors.
    weighted
        Scale each step by ``|weight|`` of the event type instead of using its sign only.
    seed
        Seeds the private generator (item initialization and negative sampling).

    Examples
    --------
    >>> mf = OnlineBPRMF(n_factors=4, seed=0)
    >>> for item in (0, 1, 2, 0):
    ...     mf.learn_one(Interaction(user=0, item=item, ts=0))
    >>> mf.score(user=7, ts=0, domain=0, n_items=3).shape
    (3,)
    """

    def __init__(
        self,
        n_factors: int = 32,
        n_negatives: int = 8,
        lr: float = 0.05,
        l2: float = 0.01,
        init_std: float = 0.1,
        weighted: bool = False,
        seed: int = 0,
    ):
        self.n_factors = n_factors
        self.n_negatives = n_negatives
        self.lr = lr
        self.l2 = l2
        self.init_std = init_std
        self.weighted = weighted
        self.seed = seed
        self._rng = np.random.default_rng(seed)
        self._users: FloatArray = np.zeros((_INITIAL, n_factors))
        self._items: FloatArray = np.zeros((0, n_factors))
        self._bias: FloatArray = np.zeros(0)
        self._n_seen = 0

    def score(self, user: int, ts: int, domain: int, n_items: int) -> FloatArray:
        m = min(n_items, self._n_seen)
        out = np.zeros(n_items)
        if m:
            u = self._users[user] if user < self._users.shape[0] else np.zeros(self.n_factors)
            np.add(self._items[:m] @ u, self._bias[:m], out=out[:m])
        return out

    def learn_one(self, x: Interaction) -> None:
        self._add_items(x.item + 1)
        self._users = _grow(self._users, x.user + 1)
        negs = self._rng.integers(0, self._n_seen, size=self.n_negatives)
        negs = negs[negs != x.item]
        if negs.size == 0 or x.weight == 0:
            return
        sign = 1.0 if x.weight > 0 else -1.0
        step = abs(x.weight) if self.weighted else 1.0
        u = self._users[x.user].copy()
        vp = self._items[x.item].copy()
        vn = self._items[negs]
        diff = vp - vn
        margin = sign * (diff @ u + self._bias[x.item] - self._bias[negs])
        # -d/dmargin of -log σ(margin) = σ(-margin), with the sign folded back in.
        g = sign * step / (1.0 + np.exp(margin))
        lr, l2 = self.lr, self.l2
        self._users[x.user] += lr * (g @ diff - l2 * u)
        self._items[x.item] += lr * (g.sum() * u - l2 * vp)
        np.add.at(self._items, negs, -lr * (g[:, None] * u + l2 * vn))
        self._bias[x.item] += lr * (g.sum() - l2 * self._bias[x.item])
        np.add.at(self._bias, negs, -lr * (g + l2 * self._bias[negs]))

    def _add_items(self, n: int) -> None:
        """Initialize item rows up to index ``n-1`` the first time they are seen."""
        if n <= self._n_seen:
            return
        if n > self._items.shape[0]:
            cap = max(n, 2 * self._items.shape[0], _INITIAL)
            items = np.zeros((cap, self.n_factors))
            items[: self._n_seen] = self._items[: self._n_seen]
            bias = np.zeros(cap)
            bias[: self._n_seen] = self._bias[: self._n_seen]
            self._items, self._bias = items, bias
        self._items[self._n_seen : n] = self._rng.normal(
            0.0, self.init_std, size=(n - self._n_seen, self.n_factors)
        )
        self._n_seen = n


class ItemKNN:
    """Online item-to-item kNN over co-consumption, scored from the user's recent items.

    ``C[i, j]`` counts users who consumed both ``i`` and ``j``; ``n_i`` counts users who
    consumed ``i``; similarity is the cosine ``C_ij / sqrt(n_i n_j)``. A user's score is
    ``Σ_h decay^age(h) · cos(h, ·) + pop_weight · log(1 + p)`` over their last ``n_recent``
    distinct items ``h`` (age 0 = most recent), with ``p`` the recency-decayed popularity;
    the popularity term ranks items for users with no history and breaks ties.

    Only a user's first positive event on an item updates the counts (a repeat is not new
    co-consumption). ``C`` is a dense float32 matrix: ``4·n²`` bytes, about 3.6 GB at 30,000
    items, which is the practical limit of this baseline.

    Parameters
    ----------
    n_recent
        How many of the user's most recent items vote.
    decay
        Weight factor per step of age.
    pop_weight
        Weight of ``log(1 + decayed popularity)``.
    half_life_ms
        Half-life of the popularity term.
    capacity
        Initial item capacity; pass the catalog size when known to avoid regrowing ``C``.
    seed
        Unused (deterministic); kept for a uniform factory signature.

    Examples
    --------
    >>> knn = ItemKNN()
    >>> for user, item in [(0, 0), (0, 1), (1, 0), (1, 1), (2, 2)]:
    ...     knn.learn_one(Interaction(user=user, item=item, ts=0))
    >>> knn.learn_one(Interaction(user=3, item=0, ts=0))
    >>> s = knn.score(user=3, ts=0, domain=0, n_items=3)
    >>> bool(s[1] > s[2])
    True
    """

    def __init__(
        self,
        n_recent: int = 20,
        decay: float = 0.9,
        pop_weight: float = 0.1,
        half_life_ms: float = DEFAULT_HALF_LIFE_MS,
        capacity: int = _INITIAL,
        seed: int = 0,
    ):
        self.n_recent = n_recent
        self.decay = decay
        self.pop_weight = pop_weight
        self.half_life_ms = half_life_ms
        self.capacity = capacity
        self.seed = seed
        self._co = np.zeros((max(1, capacity), max(1, capacity)), dtype=np.float32)
        self._n: FloatArray = np.zeros(max(1, capacity))
        self._pop = RecencyPopularity(half_life_ms)
        # Per user: every distinct item consumed, in order (a growable buffer and its length).
        self._hist: dict[int, tuple[IntArray, int]] = {}
        self._age_weights = decay ** np.arange(n_recent, dtype=np.float64)

    def score(self, user: int, ts: int, domain: int, n_items: int) -> FloatArray:
        out = self._pop.scores(ALL_DOMAINS, ts, n_items)
        np.log1p(out, out=out)
        out *= self.pop_weight
        buf, length = self._hist.get(user, (np.zeros(0, dtype=np.int64), 0))
        m = min(n_items, self._n.shape[0])
        if length and m:
            recent = buf[max(0, length - self.n_recent) : length][::-1]
            w = self._age_weights[: recent.size] / np.sqrt(self._n[recent])
            votes = w @ self._co[recent, :m]
            out[:m] += votes / np.sqrt(np.maximum(self._n[:m], 1.0))
        return out

    def learn_one(self, x: Interaction) -> None:
        if x.weight <= 0:
            return
        self._pop.learn_one(x.item, 0, x.ts)
        i = x.item
        buf, length = self._hist.get(x.user, (np.zeros(8, dtype=np.int64), 0))
        past = buf[:length]
        if np.any(past == i):
            return
        self._ensure(i + 1)
        self._co[i, past] += 1.0
        self._co[past, i] += 1.0
        self._n[i] += 1.0
        if length == buf.shape[0]:
            buf = np.concatenate([buf, np.zeros_like(buf)])
        buf[length] = i
        self._hist[x.user] = (buf, length + 1)

    def _ensure(self, n: int) -> None:
        cap = self._co.shape[0]
        if n <= cap:
            return
        # Growing by half (not doubling) bounds the overshoot of a matrix that is O(n²).
        new = max(n, cap + cap // 2 + 1)
        co = np.zeros((new, new), dtype=np.float32)
        co[:cap, :cap] = self._co
        self._co = co
        self._n = _grow(self._n, new)
