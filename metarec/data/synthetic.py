"""A seeded synthetic event stream with the situations metarec is built for.

MovieLens has one domain, few cold items and no known ground truth, so the scenarios that
the design targets (new items, new users with profiles, users who move between domains,
drifting and abruptly changing tastes) need a stream whose facts are known. This generator
draws one from a latent-factor choice model:

* each domain ``g`` has items with latent vectors ``v_i``, an intrinsic Zipf popularity
  ``p_i`` and an arrival time (half the catalogue exists at the start, the rest arrives
  over the stream, so cold items keep appearing);
* each user has a base taste ``z_u``; their taste in domain ``g`` is ``θ_ug = M_g z_u``, a
  per-domain linear map, so what a user likes in one domain predicts the other linearly;
* in a session a user picks items without replacement by a softmax over
  ``v_i·θ_ug / temperature + w·log p_i + novelty`` among the items that have arrived and
  that they have not consumed (Gumbel top-k, which is exactly sequential softmax
  sampling without replacement);
* a pick is a ``like`` with a probability that grows with the affinity ``v_i·θ_ug``,
  occasionally a ``dislike`` when the affinity is low, else a ``click``;
* ``z_u`` drifts as a random walk between sessions; optionally, at a known time, an abrupt
  change happens: either a share of users jump to a fresh ``z_u`` (``change_kind="users"``)
  or, for everyone at once, the items already in the catalogue swap latent vectors and
  popularity within their domain (``change_kind="catalog"``: what is popular and what
  appeals to whom is reshuffled while ids and metadata stay, so every user's preferences
  over those items move and a model's learned item vectors and biases go stale);
* a share of users move from their home domain to another one part-way through their
  history.

Item features (domain, ``topic:k`` tags, a price band) and user profile features
(``interest:k``, an age band, the sign-up domain, and a region that carries no signal) are
noisy functions of the latent vectors, so a model can learn from them. Everything that was
injected is in :attr:`Dataset.scenario`; :func:`generate_with_truth` also returns the latent
vectors for oracle checks.

>>> ds = generate(SyntheticConfig.small(), seed=1)
>>> len(ds.events) > 3000, sorted({e.domain for e in ds.events})
(True, ['books', 'movies', 'music'])
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass

import numpy as np
import numpy.typing as npt

from metarec.core.events import Event, ItemRecord, UserRecord
from metarec.data.dataset import Dataset
from metarec.errors import ConfigError

__all__ = ["SyntheticConfig", "SyntheticTruth", "generate", "generate_with_truth"]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

DAY_MS = 86_400_000
#: 2020-09-13: a fixed epoch keeps the stream reproducible and its timestamps plausible.
START_MS = 1_600_000_000_000
#: Every session ends at least an hour before the stream does.
LAST_SESSION_MARGIN_MS = 3_600_000
#: Mean gap between two events of one session: a minute and a half of browsing.
SESSION_GAP_MS = 90_000.0
#: Spread (log-normal sigma) of events per user: with 1.0 the median user has 60% of the
#: mean number of events and the top 1% six times the mean: a long tail, as in real logs.
ACTIVITY_SIGMA = 1.0
#: Share of users who are there from the first week; the rest arrive over the stream.
INITIAL_USER_FRACTION = 0.3
INITIAL_USER_DAYS = 7.0
#: How fast a new item's launch boost fades (e-folding time in days).
NOVELTY_DAYS = 14.0
#: Topic tags per item, and the noise on the item-topic scores they are the top of, so
#: tags inform about the latent vector without revealing it.
TOPICS_PER_ITEM = 2
TOPIC_NOISE = 0.5
#: Interest tags in a profile, and how sharply the like probability rises with affinity.
PROFILE_INTERESTS = 2
LIKE_SHARPNESS = 4.0
#: Picks below this affinity (half a standard deviation above a random item's) may be
#: disliked: the user tried something that turned out not to suit them.
DISLIKE_BELOW = 0.5
#: Age bands of the synthetic profile, drawn from a latent direction plus noise.
AGE_BANDS: tuple[str, ...] = ("age:18-24", "age:25-34", "age:35-49", "age:50+")
PRICE_BANDS: tuple[str, ...] = ("price:low", "price:mid", "price:high")
#: What an abrupt change does (see :class:`SyntheticConfig`).
CHANGE_KINDS: tuple[str, ...] = ("users", "catalog")
N_REGIONS = 8
#: A move happens between 30% and 70% of the way through a user's sessions, so that both
#: domains have events to learn and to score.
MOVE_WINDOW = (0.3, 0.7)


@dataclass(frozen=True)
class SyntheticConfig:
    """The knobs of the synthetic stream; the defaults give ~35k events in ~1 s.

    Parameters
    ----------
    name
        The dataset's name.
    domains
        Domain names; items are split evenly across them and each user has a home domain.
    n_users
        Number of users; each is given at least one event (unless no item exists yet).
    n_items
        Total number of items over all domains.
    dim
        Latent dimension of tastes and items.
    n_topics
        Size of the ``topic:k`` and ``interest:k`` vocabularies (directions in latent space).
    mean_events_per_user
        Mean of the log-normal number of events per user (before the catalogue caps it).
    max_events_per_user
        Cap on one user's events.
    mean_session_length
        Mean number of events in a session (geometric).
    duration_days
        Time covered by the stream.
    zipf_exponent
        Skew of intrinsic popularity: item of popularity rank ``r`` has weight ``r**-a``.
    popularity_weight
        Weight of ``log p_i`` in the choice logit (1 follows the Zipf law; 0 ignores it).
    temperature
        Divides the affinity in the choice logit: lower means choices follow taste more.
    novelty_boost
        Logit bonus of a just-arrived item, fading with a 14-day e-folding time.
    initial_item_fraction
        Share of each domain's items present at the start; the rest arrive uniformly.
    drift_per_day
        Standard deviation per day of the random walk of each taste coordinate (unit scale).
    change_at
        Fraction of the stream's time at which an abrupt taste change happens, or None.
    change_fraction
        Share of the users active on both sides of the change whose taste is redrawn
        (``change_kind="users"``).
    change_kind
        ``"users"``: the change redraws individual users' tastes; ``"catalog"``: it
        permutes the latent vectors and popularity of each domain's items that exist by
        then, which moves every user's preferences at once.
    cross_domain_fraction
        Share of all users who move to another domain (only users with two sessions or
        more can, so fewer move if there are not enough of them).
    domain_shift
        Distance of the per-domain maps ``M_g = I + shift·N(0, 1/dim)`` from the identity:
        0 means the same taste everywhere, larger means transfer needs learning.
    profile_rate
        Share of users with profile features.
    profile_noise
        Noise on the latent taste that the ``interest:k`` and age features are drawn from.
    like_threshold
        Affinity at which a pick is a like with probability 1/2. Affinity has unit variance
        over random items; picks average about 2 at the default temperature, so 1.75 makes
        about half the events likes, as 4-5 star ratings are in MovieLens.
    dislike_rate
        Probability that a pick below affinity 0.5 that is not a like is a dislike.

    Examples
    --------
    >>> SyntheticConfig().n_users, SyntheticConfig.small().n_users
    (3000, 400)
    """

    name: str = "synthetic"
    domains: tuple[str, ...] = ("books", "movies", "music")
    n_users: int = 3000
    n_items: int = 3000
    dim: int = 8
    n_topics: int = 16
    mean_events_per_user: float = 12.0
    max_events_per_user: int = 300
    mean_session_length: float = 5.0
    duration_days: float = 180.0
    zipf_exponent: float = 1.0
    popularity_weight: float = 1.0
    temperature: float = 0.3
    novelty_boost: float = 1.5
    initial_item_fraction: float = 0.5
    drift_per_day: float = 0.02
    change_at: float | None = 0.6
    change_fraction: float = 0.3
    change_kind: str = "users"
    cross_domain_fraction: float = 0.15
    domain_shift: float = 0.5
    profile_rate: float = 0.8
    profile_noise: float = 0.5
    like_threshold: float = 1.75
    dislike_rate: float = 0.3

    def __post_init__(self) -> None:
        if not self.domains or len(set(self.domains)) != len(self.domains):
            raise ConfigError(f"domains must be distinct names, got {self.domains!r}")
        if any(not d or d.strip() != d for d in self.domains):
            raise ConfigError(f"domain names must be non-empty ids, got {self.domains!r}")
        if self.n_users < 1 or self.dim < 1 or self.n_topics < TOPICS_PER_ITEM:
            raise ConfigError(
                f"need n_users >= 1, dim >= 1, n_topics >= {TOPICS_PER_ITEM}; got "
                f"{self.n_users}, {self.dim}, {self.n_topics}"
            )
        if self.n_items < len(self.domains):
            raise ConfigError(f"n_items ({self.n_items}) must be at least one per domain")
        positive = (
            "mean_events_per_user",
            "max_events_per_user",
            "mean_session_length",
            "duration_days",
            "temperature",
        )
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.mean_session_length < 1:
            raise ConfigError(f"mean_session_length must be >= 1, got {self.mean_session_length}")
        fractions = (
            "initial_item_fraction",
            "change_fraction",
            "cross_domain_fraction",
            "profile_rate",
            "dislike_rate",
        )
        for name in fractions:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        if self.change_at is not None and not 0.0 < self.change_at < 1.0:
            raise ConfigError(f"change_at must be in (0, 1) or None, got {self.change_at!r}")
        if self.change_kind not in CHANGE_KINDS:
            raise ConfigError(
                f"change_kind must be one of {CHANGE_KINDS}, got {self.change_kind!r}"
            )
        non_negative = (
            "zipf_exponent",
            "popularity_weight",
            "novelty_boost",
            "drift_per_day",
            "domain_shift",
            "profile_noise",
        )
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)!r}")

    @classmethod
    def small(cls) -> SyntheticConfig:
        """A ~4k-event preset for tests and doctests (generated in well under a second).

        Examples
        --------
        >>> SyntheticConfig.small().name
        'synthetic-small'
        """
        return cls(
            name="synthetic-small",
            n_users=400,
            n_items=600,
            mean_events_per_user=10.0,
            max_events_per_user=150,
        )


@dataclass(frozen=True)
class SyntheticTruth:
    """The latent state a stream was drawn from, for oracle baselines and tests.

    ``user_latent[k]`` is user ``user_ids[k]``'s base taste ``z_u`` at arrival (before drift
    and any abrupt change); their taste in domain ``g`` is ``domain_maps[g] @ z_u``.
    ``item_vectors[k]`` (before any catalogue change) and ``item_log_popularity[k]`` belong
    to item ``item_ids[k]``.

    Examples
    --------
    >>> _, truth = generate_with_truth(SyntheticConfig.small(), seed=0)
    >>> truth.item_vectors.shape == (len(truth.item_ids), SyntheticConfig.small().dim)
    True
    """

    user_ids: list[str]
    user_latent: FloatArray
    item_ids: list[str]
    item_domains: list[str]
    item_vectors: FloatArray
    item_log_popularity: FloatArray
    domain_maps: dict[str, FloatArray]

    def taste(self, user: str, domain: str) -> FloatArray:
        """A user's taste vector in a domain at arrival: ``M_domain @ z_user``."""
        out: FloatArray = self.domain_maps[domain] @ self.user_latent[self.user_ids.index(user)]
        return out


@dataclass
class _Domain:
    """One domain's catalogue, items sorted by arrival so the ones present are a prefix."""

    name: str
    ids: list[str]
    vectors: FloatArray
    log_pop: FloatArray
    arrival: IntArray
    #: Vectors and popularity from the abrupt catalogue change on (the same if none).
    vectors_after: FloatArray
    log_pop_after: FloatArray


def _end_ms(cfg: SyntheticConfig) -> int:
    return START_MS + int(cfg.duration_days * DAY_MS)


def _unit_rows(x: FloatArray) -> FloatArray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    out: FloatArray = x / np.maximum(norms, 1e-12)
    return out


def _make_domains(
    cfg: SyntheticConfig, rng: np.random.Generator, topics: FloatArray, price_dir: FloatArray
) -> tuple[list[_Domain], list[ItemRecord]]:
    start, end = START_MS, _end_ms(cfg)
    n_dom = len(cfg.domains)
    domains: list[_Domain] = []
    records: list[ItemRecord] = []
    for g, name in enumerate(cfg.domains):
        n = cfg.n_items // n_dom + (1 if g < cfg.n_items % n_dom else 0)
        # Unit-variance affinity: with v ~ N(0, I/dim) and |θ|² ≈ dim, θ·v ~ N(0, 1).
        vectors = rng.normal(size=(n, cfg.dim)) / math.sqrt(cfg.dim)
        ranks = rng.permutation(n) + 1
        log_pop = -cfg.zipf_exponent * np.log(ranks.astype(np.float64))
        n_initial = round(cfg.initial_item_fraction * n)
        arrival = np.full(n, start, dtype=np.int64)
        arrival[n_initial:] = np.sort(rng.integers(start + 1, end, size=n - n_initial))
        topic_scores = _unit_rows(vectors) @ topics.T + TOPIC_NOISE * rng.normal(
            size=(n, topics.shape[0])
        )
        top_topics = np.argsort(-topic_scores, axis=1)[:, :TOPICS_PER_ITEM]
        price_score = vectors @ price_dir * math.sqrt(cfg.dim) + rng.normal(size=n)
        price_band = np.searchsorted(np.quantile(price_score, [1 / 3, 2 / 3]), price_score)
        ids = [f"{name}-{k}" for k in range(n)]
        for k in range(n):
            features = (
                f"domain:{name}",
                *(f"topic:{t}" for t in sorted(top_topics[k].tolist())),
                PRICE_BANDS[int(price_band[k])],
            )
            records.append(ItemRecord(ids[k], name, features, int(arrival[k])))
        domains.append(_Domain(name, ids, vectors, log_pop, arrival, vectors, log_pop))
    return domains, records


def _user_timestamps(
    cfg: SyntheticConfig, rng: np.random.Generator, arrival: int
) -> tuple[IntArray, IntArray]:
    """Event times of one user (non-decreasing) and the session index of each event."""
    mu = math.log(cfg.mean_events_per_user) - ACTIVITY_SIGMA**2 / 2
    n = int(min(cfg.max_events_per_user, max(1, round(rng.lognormal(mu, ACTIVITY_SIGMA)))))
    lengths: list[int] = []
    while sum(lengths) < n:
        lengths.append(int(rng.geometric(1.0 / cfg.mean_session_length)))
    lengths[-1] -= sum(lengths) - n
    session = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
    first = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    gaps = rng.exponential(SESSION_GAP_MS, size=n)
    gaps[first] = 0.0
    within = np.cumsum(gaps) - np.repeat(np.cumsum(gaps)[first], lengths)
    durations = within[np.cumsum(lengths) - 1] + SESSION_GAP_MS  # each session, plus a pause
    # Sessions must not overlap (a move or a change happens between two of them), and all
    # must end by the end of the stream: draw start points in the time left over once the
    # sessions' own durations are set aside, then push each one past the ones before it.
    room = _end_ms(cfg) - LAST_SESSION_MARGIN_MS - arrival
    total = float(durations.sum())
    if total > room / 2:  # a very heavy user arriving late: browse faster
        scale = room / 2 / total
        within, durations, total = within * scale, durations * scale, total * scale
    free = np.sort(rng.uniform(0.0, room - total, size=len(lengths)))
    starts = arrival + free + np.concatenate(([0.0], np.cumsum(durations)[:-1]))
    return (np.repeat(starts, lengths) + within).astype(np.int64), session


def _profile(
    cfg: SyntheticConfig,
    rng: np.random.Generator,
    taste: FloatArray,
    topics: FloatArray,
    age_dir: FloatArray,
    home: str,
) -> tuple[str, ...]:
    if rng.random() >= cfg.profile_rate:
        return ()
    noisy = taste / max(float(np.linalg.norm(taste)), 1e-12) + cfg.profile_noise * rng.normal(
        size=taste.shape
    ) / math.sqrt(cfg.dim)
    interests = np.argsort(-(topics @ noisy))[:PROFILE_INTERESTS]
    age_score = float(age_dir @ taste) / math.sqrt(cfg.dim) + cfg.profile_noise * rng.normal()
    age = AGE_BANDS[int(np.searchsorted([-0.6, 0.0, 0.6], age_score))]
    region = int(rng.integers(N_REGIONS))
    return (
        *(f"interest:{t}" for t in sorted(interests.tolist())),
        age,
        f"signup:{home}",
        f"region:{region}",
    )


def _event_types(cfg: SyntheticConfig, rng: np.random.Generator, affinity: FloatArray) -> list[str]:
    n = affinity.shape[0]
    p_like = 1.0 / (1.0 + np.exp(-LIKE_SHARPNESS * (affinity - cfg.like_threshold)))
    like = rng.random(size=n) < p_like
    dislike = ~like & (affinity < DISLIKE_BELOW) & (rng.random(size=n) < cfg.dislike_rate)
    return [
        "like" if lk else "dislike" if dk else "click"
        for lk, dk in zip(like.tolist(), dislike.tolist(), strict=True)
    ]


@dataclass
class _Users:
    """Who the users are and when they act, drawn before any item is picked."""

    ids: list[str]
    arrival: IntArray
    latent: FloatArray
    home: IntArray
    records: list[UserRecord]
    times: list[tuple[IntArray, IntArray]]  # per user: event times, session of each event


def _make_users(
    cfg: SyntheticConfig,
    rng: np.random.Generator,
    maps: dict[str, FloatArray],
    topics: FloatArray,
    age_dir: FloatArray,
) -> _Users:
    start, end = START_MS, _end_ms(cfg)
    n_initial = round(INITIAL_USER_FRACTION * cfg.n_users)
    arrival = np.sort(
        np.concatenate(
            (
                rng.uniform(start, start + INITIAL_USER_DAYS * DAY_MS, size=n_initial),
                rng.uniform(start, end - DAY_MS, size=cfg.n_users - n_initial),
            )
        )
    ).astype(np.int64)
    latent = rng.normal(size=(cfg.n_users, cfg.dim))
    home = rng.integers(len(cfg.domains), size=cfg.n_users).astype(np.int64)
    ids = [f"u{k}" for k in range(cfg.n_users)]
    records = []
    for k in range(cfg.n_users):
        domain = cfg.domains[home[k]]
        features = _profile(cfg, rng, maps[domain] @ latent[k], topics, age_dir, domain)
        records.append(UserRecord(ids[k], features, int(arrival[k])))
    times = [_user_timestamps(cfg, rng, int(arrival[k])) for k in range(cfg.n_users)]
    return _Users(ids, arrival, latent, home, records, times)


def _plan_moves(
    cfg: SyntheticConfig, rng: np.random.Generator, users: _Users
) -> dict[int, tuple[int, int]]:
    """Users who move domain: user -> (their first session in the new domain, new domain)."""
    n_dom = len(cfg.domains)
    if n_dom < 2 or cfg.cross_domain_fraction == 0:
        return {}
    eligible = [k for k, (_, session) in enumerate(users.times) if session[-1] >= 1]
    n_move = min(len(eligible), round(cfg.cross_domain_fraction * cfg.n_users))
    moves: dict[int, tuple[int, int]] = {}
    for k in sorted(rng.choice(eligible, size=n_move, replace=False).tolist()):
        n_sessions = int(users.times[k][1][-1]) + 1
        lo = max(1, math.ceil(MOVE_WINDOW[0] * n_sessions))
        hi = max(lo, min(n_sessions - 1, math.floor(MOVE_WINDOW[1] * n_sessions)))
        target = (int(users.home[k]) + 1 + int(rng.integers(n_dom - 1))) % n_dom
        moves[k] = (int(rng.integers(lo, hi + 1)), target)
    return moves


def _plan_change(
    cfg: SyntheticConfig, rng: np.random.Generator, users: _Users, domains: list[_Domain]
) -> tuple[int | None, set[int]]:
    """The abrupt change: its time, and the users active on both sides whom it reaches.

    A catalogue change reaches all of them, and permutes the items' vectors here.
    """
    if cfg.change_at is None:
        return None, set()
    change_ts = START_MS + int(cfg.change_at * (_end_ms(cfg) - START_MS))
    spanning = [k for k, (ts, _) in enumerate(users.times) if ts[0] < change_ts <= ts[-1]]
    if cfg.change_kind == "catalog":
        for dom in domains:
            present = np.flatnonzero(dom.arrival < change_ts)
            moved = rng.permutation(present)
            dom.vectors_after, dom.log_pop_after = dom.vectors.copy(), dom.log_pop.copy()
            dom.vectors_after[present] = dom.vectors[moved]
            dom.log_pop_after[present] = dom.log_pop[moved]
        return change_ts, set(spanning)
    n_change = round(cfg.change_fraction * len(spanning))
    return change_ts, set(rng.choice(spanning, size=n_change, replace=False).tolist())


def _user_rows(
    cfg: SyntheticConfig,
    rng: np.random.Generator,
    k: int,
    users: _Users,
    domains: list[_Domain],
    maps: dict[str, FloatArray],
    move: tuple[int, int] | None,
    change_ts: int | None,
) -> list[tuple[int, int, str, str, str]]:
    """One user's events as (ts, user index, item, type, domain), picked segment by segment.

    ``change_ts`` is the abrupt change if it reaches this user, else None: a fresh taste
    for a ``"users"`` change, the items' new vectors for a ``"catalog"`` one.
    """
    ts, session = users.times[k]
    domain = np.full(ts.shape, users.home[k])
    if move is not None:
        domain[session >= move[0]] = move[1]
    after = ts >= change_ts if change_ts is not None else np.zeros(ts.shape, dtype=bool)
    # A segment is a run of events with one taste and one domain: a session, split at the
    # abrupt change so that the recorded change time is exact.
    cut = (
        np.flatnonzero((np.diff(session) != 0) | (np.diff(domain) != 0) | (np.diff(after) != 0)) + 1
    )
    z = users.latent[k].copy()
    last_ts = int(users.arrival[k])
    consumed: dict[int, list[int]] = {}
    rows: list[tuple[int, int, str, str, str]] = []
    for a, b in itertools.pairwise([0, *cut.tolist(), len(ts)]):
        t0 = int(ts[a])
        if cfg.drift_per_day > 0:
            z += rng.normal(size=cfg.dim) * cfg.drift_per_day * math.sqrt((t0 - last_ts) / DAY_MS)
        catalog_changed = cfg.change_kind == "catalog" and bool(after[a])
        if after[a] and (a == 0 or not after[a - 1]) and not catalog_changed:
            z = rng.normal(size=cfg.dim)
        last_ts = t0
        g = int(domain[a])
        dom = domains[g]
        m = int(np.searchsorted(dom.arrival, t0, side="right"))  # items that exist by now
        seen = consumed.setdefault(g, [])
        n_pick = min(b - a, m - len(seen))
        if n_pick <= 0:
            continue
        vectors, log_pop = (
            (dom.vectors_after, dom.log_pop_after)
            if catalog_changed
            else (dom.vectors, dom.log_pop)
        )
        affinity = vectors[:m] @ (maps[dom.name] @ z)
        launch_age = (t0 - dom.arrival[:m]) / (NOVELTY_DAYS * DAY_MS)
        logits = (
            affinity / cfg.temperature
            + cfg.popularity_weight * log_pop[:m]
            + cfg.novelty_boost * np.exp(-launch_age)
        )
        logits[seen] = -np.inf
        # Gumbel top-k: the same law as drawing from the softmax one item at a time.
        noisy = logits + rng.gumbel(size=m)
        top = np.argpartition(-noisy, n_pick - 1)[:n_pick]
        picks = top[np.argsort(-noisy[top], kind="stable")].tolist()
        seen.extend(picks)
        types = _event_types(cfg, rng, affinity[picks])
        rows.extend(
            (int(ts[a + j]), k, dom.ids[idx], etype, dom.name)
            for j, (idx, etype) in enumerate(zip(picks, types, strict=True))
        )
    return rows


def generate_with_truth(config: SyntheticConfig, seed: int) -> tuple[Dataset, SyntheticTruth]:
    """Draw a stream and return it with the latent state it was drawn from.

    Parameters
    ----------
    config
        What to generate.
    seed
        Seeds the only random generator used; the same pair gives the same stream.

    Examples
    --------
    >>> ds, truth = generate_with_truth(SyntheticConfig.small(), seed=3)
    >>> len(truth.user_ids) == len(ds.users)
    True
    """
    cfg = config
    rng = np.random.default_rng(seed)
    topics = _unit_rows(rng.normal(size=(cfg.n_topics, cfg.dim)))
    price_dir, age_dir = _unit_rows(rng.normal(size=(2, cfg.dim)))
    scale = cfg.domain_shift / math.sqrt(cfg.dim)
    maps = {g: np.eye(cfg.dim) + scale * rng.normal(size=(cfg.dim, cfg.dim)) for g in cfg.domains}
    domains, item_records = _make_domains(cfg, rng, topics, price_dir)
    users = _make_users(cfg, rng, maps, topics, age_dir)
    moves = _plan_moves(cfg, rng, users)
    change_ts, changed = _plan_change(cfg, rng, users, domains)

    rows: list[tuple[int, int, str, str, str]] = []
    for k in range(cfg.n_users):
        reached = k in changed or cfg.change_kind == "catalog"
        user_change = change_ts if reached else None
        rows.extend(_user_rows(cfg, rng, k, users, domains, maps, moves.get(k), user_change))
    rows.sort(key=lambda row: row[0])  # stable: equal times keep user order
    events: list[Event] = []
    counts = [0] * cfg.n_users
    for t, k, item, etype, domain in rows:
        counts[k] += 1
        user = users.ids[k]
        events.append(Event(user, item, etype, t, domain, f"syn-{user}-{counts[k]}"))

    first_in: dict[tuple[str, str], int] = {}
    for e in events:
        first_in.setdefault((e.user, e.domain), e.ts)
    move_facts = [
        {
            "user": users.ids[k],
            "from": cfg.domains[users.home[k]],
            "to": cfg.domains[target],
            "ts": first_in[(users.ids[k], cfg.domains[target])],
        }
        for k, (_, target) in moves.items()
        if (users.ids[k], cfg.domains[target]) in first_in
    ]
    move_facts.sort(key=lambda fact: (fact["ts"], fact["user"]))
    scenario: dict[str, object] = {
        "generator": "metarec.data.synthetic",
        "seed": seed,
        "config": asdict(cfg),
        "domains": list(cfg.domains),
        "start_ts": START_MS,
        "end_ts": _end_ms(cfg),
        "change_ts": change_ts,
        "changed_users": [users.ids[k] for k in sorted(changed)],
        "moves": move_facts,
    }
    truth = SyntheticTruth(
        user_ids=users.ids,
        user_latent=users.latent,
        item_ids=[i for d in domains for i in d.ids],
        item_domains=[d.name for d in domains for _ in d.ids],
        item_vectors=np.concatenate([d.vectors for d in domains]),
        item_log_popularity=np.concatenate([d.log_pop for d in domains]),
        domain_maps=maps,
    )
    return Dataset(cfg.name, events, item_records, users.records, scenario), truth


def generate(config: SyntheticConfig, seed: int) -> Dataset:
    """Draw a synthetic stream; the same ``config`` and ``seed`` always give the same one.

    Examples
    --------
    >>> a = generate(SyntheticConfig.small(), seed=7)
    >>> b = generate(SyntheticConfig.small(), seed=7)
    >>> a.events == b.events
    True
    >>> all(x.ts <= y.ts for x, y in zip(a.events, a.events[1:]))
    True
    """
    return generate_with_truth(config, seed)[0]
