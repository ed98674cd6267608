"""The baselines metarec is judged against, all in the prequential harness's protocol.

Each class implements :class:`~metarec.evaluation.recommender.Recommender` on dense indices:
it scores items ``0 .. n_items-1`` and learns from one
:class:`~metarec.evaluation.recommender.Interaction` at a time. The harness owns the
candidate set and the exclusion of consumed items, so none of these excludes anything
itself. State grows geometrically with the indices it sees, so a recommender needs no
catalog size up front.

Dislikes (negative weights) carry no "consumed this" signal for the counting baselines and
EASE, and are skipped there; BPR-MF turns them into a pairwise loss that pushes the item down.
"""

from __future__ import annotations

import time

import numpy as np
import numpy.typing as npt

from metarec.core.popularity import ALL_DOMAINS, RecencyPopularity
from metarec.errors import ConfigError
from metarec.evaluation.recommender import Interaction

__all__ = [
    "DAY_MS",
    "EASE",
    "FirstPop",
    "ItemKNN",
    "OnlineBPRMF",
    "Popularity",
    "RecentPopularity",
    "tie_breaker",
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


class FirstPop:
    """First-event popularity: how many users chose each item among their first positive events.

    A user's positive events are numbered 1, 2, ... in arrival order; only those numbered
    ``1 .. first_events`` count, and an item counts once per user even if repeated there.
    This is what a new user tends to start with, which global popularity (dominated by
    long histories) ranks poorly. Every user gets the same scores.

    Parameters
    ----------
    first_events
        How many of each user's first positive events vote.
    seed
        Unused (deterministic); kept for a uniform factory signature.

    Examples
    --------
    >>> fp = FirstPop(first_events=1)
    >>> for user, item in [(0, 2), (0, 1), (1, 2), (2, 0)]:
    ...     fp.learn_one(Interaction(user=user, item=item, ts=0))
    >>> fp.score(user=5, ts=0, domain=0, n_items=3).tolist()
    [1.0, 0.0, 2.0]
    """

    def __init__(self, first_events: int = 3, seed: int = 0):
        if first_events < 1:
            raise ConfigError(f"first_events must be >= 1, got {first_events}")
        self.first_events = first_events
        self.seed = seed
        self._counts: FloatArray = np.zeros(_INITIAL)
        self._n_positive: dict[int, int] = {}
        # Items already counted for users still inside their first events; dropped after.
        self._window: dict[int, set[int]] = {}

    def score(self, user: int, ts: int, domain: int, n_items: int) -> FloatArray:
        return _head(self._counts, n_items)

    def learn_one(self, x: Interaction) -> None:
        if x.weight <= 0:
            return
        n = self._n_positive.get(x.user, 0)
        if n >= self.first_events:
            return
        self._n_positive[x.user] = n + 1
        chosen = self._window.setdefault(x.user, set())
        if x.item not in chosen:
            chosen.add(x.item)
            self._counts = _grow(self._counts, x.item + 1)
            self._counts[x.item] += 1.0
        if n + 1 == self.first_events:
            del self._window[x.user]


#: Scale of the fallback terms under EASE's scores: far below any score difference that
#: means something, so they only order items EASE leaves tied (mostly at zero).
_TIE_SCALE = 1e-6
#: Cut-off of the HR used to choose λ: the harness reports HR@10.
_VALIDATION_K = 10
#: Cells of one dense block of user rows (32 MiB of float64): bounds the memory of building
#: the Gram matrix and of the validation scores independently of the number of users.
_BLOCK_CELLS = 1 << 22
_NO_ROW = -1


def tie_breaker(
    counts: FloatArray,
    first_pop: FirstPop,
    user: int,
    ts: int,
    domain: int,
    n_items: int,
    newcomer: bool,
) -> FloatArray:
    """What a periodically refitted model (EASE, SASRec) adds under its scores: global
    popularity, scaled down so that it orders only the items the model leaves tied; for a
    ``newcomer`` (no positive event yet), first-event popularity with global popularity
    breaking its ties, scaled the same way: what a deployment would show a new user."""
    out = _head(counts, n_items)
    np.log1p(out, out=out)
    if newcomer:
        # First-event counts are integers and the popularity term lies in [0, 1).
        if n_items:
            out /= 1.0 + out.max()
        out += first_pop.score(user, ts, domain, n_items)
    out *= _TIE_SCALE
    return out


class EASE:
    """EASE (Steck 2019): a closed-form item-item model, refitted periodically on the past.

    ``X`` is the binary user × item matrix of positive events learned so far (a repeat counts
    once), ``G = XᵀX``, ``P = (G + λI)⁻¹`` and ``B = I − P·diag(1/diag(P))`` (so
    ``diag(B) = 0``). A user with history row ``x_u`` is scored ``x_u B``, with ``x_u`` the
    user's current row, including items learned since the last fit; items absent from
    the last fit have no row or column in ``B`` and get nothing from it.

    The model is refitted after every ``refit_every`` learned events (dislikes included in
    the count), on everything learned so far. λ is chosen from ``lambdas`` on the past
    alone: every user with at least two distinct items holds out their most recent new
    item, ``B`` is fitted on the rest, and the λ with the best HR@10 of the held-out items
    (the user's other items excluded) wins, ties going to the larger λ. The choice costs
    an eigendecomposition, three times a fit's inversion, so it is made at the first refit
    and again whenever the past has doubled since the last choice; the other refits keep
    the last λ. The λ of every refit is appended to ``lambdas_chosen``.

    Fallbacks: ``1e-6 · log1p(global count)`` is added to every score so that items EASE
    leaves tied (at zero: before the first fit, unknown to ``B``, or unrelated to the
    user's items) are ranked by global popularity. A user with no positive event yet is
    ranked by :class:`FirstPop` (first-event popularity), with global popularity breaking
    its ties, scaled down the same way: that is what a deployment would show a new user,
    and it gives the score at a user's first event a meaning.

    Parameters
    ----------
    lambdas
        Grid of the L2 regularization λ, all positive.
    refit_every
        Learned events between two fits; the first fit happens after this many.
    max_items
        Most items in one fit: the most consumed ones (by distinct users), ties to the lower
        index. The others get no row or column in ``B``.
    first_events
        ``first_events`` of the :class:`FirstPop` fallback.
    seed
        Unused (deterministic); kept for a uniform factory signature.

    Examples
    --------
    >>> ease = EASE(refit_every=8, lambdas=(1.0, 10.0))
    >>> for user, items in [(0, (0, 1)), (1, (0, 1)), (2, (0, 1)), (3, (2, 3))]:
    ...     for item in items:
    ...         ease.learn_one(Interaction(user=user, item=item, ts=0))
    >>> ease.lambdas_chosen
    [10.0]
    >>> ease.learn_one(Interaction(user=9, item=0, ts=0))
    >>> s = ease.score(user=9, ts=0, domain=0, n_items=4)
    >>> bool(s[1] > max(s[2], s[3]))
    True
    """

    def __init__(
        self,
        lambdas: tuple[float, ...] = (10, 30, 100, 300, 1000, 3000),
        refit_every: int = 10_000,
        max_items: int = 5000,
        first_events: int = 3,
        seed: int = 0,
    ):
        if not lambdas or min(lambdas) <= 0:
            raise ConfigError(
                f"lambdas must be a non-empty grid of positive values, got {lambdas!r}"
            )
        if refit_every < 1:
            raise ConfigError(f"refit_every must be >= 1, got {refit_every}")
        if max_items < 1:
            raise ConfigError(f"max_items must be >= 1, got {max_items}")
        self.lambdas = tuple(lambdas)
        self.refit_every = refit_every
        self.max_items = max_items
        self.first_events = first_events
        self.seed = seed
        #: λ chosen at each refit, in order, and the seconds each refit took.
        self.lambdas_chosen: list[float] = []
        self.fit_seconds: list[float] = []
        self._chosen_at = 0  # events learned when λ was last chosen
        self._first_pop = FirstPop(first_events)
        self._counts: FloatArray = np.zeros(_INITIAL)  # positive events per item
        self._n_known = 0  # items seen so far: indices 0 .. _n_known-1
        self._n_learned = 0
        # Per user: the distinct items, as a set and as a growable buffer in order of
        # first consumption (the order tells the held-out item of the validation).
        self._seen: dict[int, set[int]] = {}
        self._hist: dict[int, tuple[IntArray, int]] = {}
        self._weights: FloatArray = np.zeros((0, 0))  # B, on the items of the last fit
        self._fit_items: IntArray = np.zeros(0, dtype=np.int64)  # item of each row of B
        self._row_of: IntArray = np.zeros(0, dtype=np.int64)  # item -> row of B or _NO_ROW

    def score(self, user: int, ts: int, domain: int, n_items: int) -> FloatArray:
        hist = self._hist.get(user)
        out = tie_breaker(self._counts, self._first_pop, user, ts, domain, n_items, hist is None)
        if hist is None or self._fit_items.size == 0:
            return out
        buf, length = hist
        items = buf[:length]
        rows = self._row_of[items[items < self._row_of.size]]
        rows = rows[rows != _NO_ROW]
        if rows.size:
            votes = self._weights[rows].sum(axis=0)
            inside = self._fit_items < n_items
            out[self._fit_items[inside]] += votes[inside]
        return out

    def learn_one(self, x: Interaction) -> None:
        self._n_learned += 1
        if x.weight > 0:
            self._first_pop.learn_one(x)
            self._counts = _grow(self._counts, x.item + 1)
            self._counts[x.item] += 1.0
            self._n_known = max(self._n_known, x.item + 1)
            seen = self._seen.setdefault(x.user, set())
            if x.item not in seen:
                seen.add(x.item)
                buf, length = self._hist.get(x.user, (np.zeros(8, dtype=np.int64), 0))
                if length == buf.shape[0]:
                    buf = np.concatenate([buf, np.zeros_like(buf)])
                buf[length] = x.item
                self._hist[x.user] = (buf, length + 1)
        if self._n_learned % self.refit_every == 0:
            self._refit()

    def _refit(self) -> None:
        """Fit ``B`` on all of the past, with λ chosen again when the past has doubled."""
        histories = [buf[:length] for buf, length in self._hist.values()]
        if not histories:
            return
        started = time.perf_counter()
        users_per_item = np.bincount(np.concatenate(histories), minlength=self._n_known)
        # A fit inverts a dense n × n matrix, O(n³) time and O(n²) memory: capping n keeps a
        # refit within seconds. The rarely consumed items left out carry little signal.
        ranked = np.argsort(-users_per_item, kind="stable")[: self.max_items]
        fit_items = np.sort(ranked[users_per_item[ranked] > 0]).astype(np.int64)
        m = fit_items.size
        row_of = np.full(self._n_known, _NO_ROW, dtype=np.int64)
        row_of[fit_items] = np.arange(m)
        rows = [r[r != _NO_ROW] for r in (row_of[h] for h in histories)]
        gram = _gram(rows, m)
        if not self.lambdas_chosen or self._n_learned >= 2 * self._chosen_at:
            lam = self._validated_lambda(gram, histories, rows, row_of)
            self._chosen_at = self._n_learned
        else:
            lam = self.lambdas_chosen[-1]
        self.lambdas_chosen.append(lam)
        self._weights = _ease_weights(gram, lam)
        self._fit_items = fit_items
        self._row_of = row_of
        self.fit_seconds.append(round(time.perf_counter() - started, 3))

    def _validated_lambda(
        self, gram: FloatArray, histories: list[IntArray], rows: list[IntArray], row_of: IntArray
    ) -> float:
        """λ chosen on a leave-last-out split of the past (see the class docstring)."""
        # Users whose most recent new item is in the fit hold it out. Users whose held-out
        # item is not in the fit miss it whatever λ, so they are left out.
        held: list[int] = []
        rest: list[IntArray] = []
        for h, r in zip(histories, rows, strict=True):
            if h.size >= 2 and row_of[h[-1]] != _NO_ROW:
                held.append(int(r[-1]))
                rest.append(r[:-1])
        train = gram.copy()
        if held:
            target = np.array(held, dtype=np.int64)
            lens = np.array([r.size for r in rest])
            a = np.repeat(target, lens)
            b = np.concatenate(rest)
            np.subtract.at(train, (a, b), 1.0)
            np.subtract.at(train, (b, a), 1.0)
            np.subtract.at(train, (target, target), 1.0)
        return self._choose_lambda(train, rest, held)

    def _choose_lambda(self, train: FloatArray, rest: list[IntArray], held: list[int]) -> float:
        """The λ of the grid with the best HR@10 of ``held`` given ``rest``; ties: larger λ."""
        grid = sorted(float(lam) for lam in self.lambdas)
        hits = np.zeros(len(grid))
        if held:
            m = train.shape[0]
            # One eigendecomposition serves every λ: P(λ) = Q diag(1/(s + λ)) Qᵀ.
            eigvals, eigvecs = np.linalg.eigh(train)
            squares = eigvecs**2
            step = max(1, _BLOCK_CELLS // m)
            for start in range(0, len(held), step):
                x = _dense(rest[start : start + step], m)
                target = np.array(held[start : start + step], dtype=np.int64)
                xq = x @ eigvecs
                for j, lam in enumerate(grid):
                    w = 1.0 / (eigvals + lam)
                    # x B = x − (x P) diag(1/diag(P)), without forming P.
                    scores = x - ((xq * w) @ eigvecs.T) / (squares @ w)
                    scores[x > 0] = -np.inf
                    true = scores[np.arange(target.size), target][:, None]
                    greater = np.count_nonzero(scores > true, axis=1)
                    ties = np.count_nonzero(scores == true, axis=1)  # the true item included
                    hits[j] += float(np.sum(np.clip(_VALIDATION_K - greater, 0, ties) / ties))
        best = 0
        for j in range(1, len(grid)):
            # A relative tolerance: equal hit counts can differ in the last bits.
            if hits[j] >= hits[best] - 1e-9 * max(1.0, hits[best]):
                best = j
        return grid[best]


def _dense(rows: list[IntArray], m: int) -> FloatArray:
    """The binary matrix whose row ``u`` has ones at the columns ``rows[u]``."""
    x = np.zeros((len(rows), m))
    lens = [r.size for r in rows]
    if sum(lens):
        x[np.repeat(np.arange(len(rows)), lens), np.concatenate(rows)] = 1.0
    return x


def _gram(rows: list[IntArray], m: int) -> FloatArray:
    """``XᵀX`` of the binary matrix of ``rows``, built a block of users at a time."""
    gram = np.zeros((m, m))
    rows = [r for r in rows if r.size]
    step = max(1, _BLOCK_CELLS // max(m, 1))
    for start in range(0, len(rows), step):
        x = _dense(rows[start : start + step], m)
        gram += x.T @ x
    return gram


def _ease_weights(gram: FloatArray, lam: float) -> FloatArray:
    """EASE's ``B = I − P·diag(1/diag(P))`` with ``P = (G + λI)⁻¹``."""
    regularized = gram + lam * np.eye(gram.shape[0])
    p = np.linalg.inv(regularized)
    weights = p / -np.diag(p)
    np.fill_diagonal(weights, 0.0)
    return weights
