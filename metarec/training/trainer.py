"""Meta-training in TensorFlow: learn how to adapt, from a window of recent events.

Users are tasks. Each training example is one event of one user: the events before it (the
last ``history_length``) are the *support*, it and the next few events are the *query*. The
prior ``θ0(u)`` is computed from the user's profile and support history exactly as the
consumer computes it (:func:`metarec.core.adaptation.prior`), the inner loop takes the
consumer's pairwise Meta-SGD steps on the newest support events, and the outer loss is a
full softmax over the catalog on the query items, with the user's consumed items masked
out and the trending prior in the logits. Gradients flow through the inner loop into the
embeddings, biases, feature mappings, ``θ0``, the history mapping, the step sizes and the
proximal strength. Examples are vectorized over a batch of users, so the same code runs
well on a GPU; TensorFlow places it on one when it sees one.

Once training stops, the weights of the score's parts per history bucket are refitted
on the held-out users with everything else frozen (:mod:`metarec.training.calibration`);
the model keeps the factors (``blend_scales``) so the next training starts from what the
loss learned.

With ``meta=False`` (the ablation) the same trainer learns only item embeddings and biases,
against a free vector per user (plain matrix factorization with the same loss): no prior,
no mappings, fixed step sizes.

The result is a :class:`~metarec.core.model.MetaModel` of numpy arrays: serving never needs
TensorFlow.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from metarec.config import DEFAULT_RETRAIN_EVENTS, DEFAULT_TOP_K
from metarec.core.adaptation import user_keys
from metarec.core.model import BLEND_PARTS, HISTORY_BUCKETS, MetaModel, history_buckets
from metarec.core.neighbors import N_NEIGHBORS, VOTERS, ItemNeighbors
from metarec.core.trending import CHANNELS, Channel
from metarec.core.window import TrainingData
from metarec.training.calibration import calibrate_blend

if TYPE_CHECKING:
    from metarec.training.meta_graph import MetaGraph

__all__ = ["MetaTrainer", "TrainingBatches", "trend_snapshots"]

log = logging.getLogger(__name__)

I64 = npt.NDArray[np.int64]
F32 = npt.NDArray[np.float32]

#: Most prefixes of the window whose neighbours the training examples vote with (see
#: TrainingBatches), and the memory their neighbour lists may take.
MAX_KNN_SNAPSHOTS = 32
KNN_SNAPSHOT_BYTES = 400_000_000
#: A window with fewer held-out users or events than these trains without validation.
MIN_VALIDATION_USERS = 10
MIN_VALIDATION_EVENTS = 200
#: Held-out examples that judge a training run (two forward passes of a batch).
VALIDATION_EXAMPLES = 2048
#: Held-out examples of one user that judge a training floor (the newest ones).
JUDGED_PER_USER = 4
#: Held-out examples per history bucket that calibrate the blend, and the most score
#: cells (examples times items) one bucket's calibration may hold per part.
CALIBRATION_EXAMPLES = 256
CALIBRATION_PER_USER = 4
CALIBRATION_CELLS = 16_000_000
#: How much more often an event that enters a new domain is drawn as a training example.
SWITCH_WEIGHT = 10.0
#: Logit given to consumed items so that softmax ignores them without producing NaNs.
_MASKED = -1e9


def trend_snapshots(
    items: I64,
    weights: F32,
    first: npt.NDArray[np.bool_],
    n_items: int,
    channels: Sequence[Channel],
    every: int,
) -> F32:
    """Trending counts (:mod:`metarec.core.trending`) before every ``every``-th event of a window.

    The clock is the event's position: ``snapshots[k, s]`` holds channel ``s``'s counts of
    the positive events before position ``k·every`` (for a newcomers' channel, only those
    ``first`` among their user's events), read at that clock, so the counts just before
    event ``q`` are about ``snapshots[q // every, s] · 2^(-(q - (q // every)·every) / H_s)``
    (the events since the snapshot are left out).
    """
    n_snap = max(1, (len(items) + every - 1) // every)
    h = np.asarray([c.half_life for c in channels], np.float64)
    snaps = np.zeros((n_snap, h.size, n_items), np.float32)
    pop = np.zeros((h.size, n_items))
    positive = np.asarray(weights) > 0
    counted = [positive & first if c.first_only else positive for c in channels]
    for k in range(n_snap):
        snaps[k] = pop
        lo, hi = k * every, min((k + 1) * every, len(items))
        # One tick per event, as a consumer applying them one by one: event q counts from
        # clock q + 1, and the next snapshot reads at clock (k + 1)·every.
        pop *= np.exp2(-every / h)[:, None]
        for s in range(h.size):
            q = lo + np.flatnonzero(counted[s][lo:hi])
            np.add.at(pop[s], items[q], np.exp2(-((k + 1) * every - (q + 1)) / h[s]))
    return snaps


@dataclass
class TrainingBatches:
    """Samples training examples from a :class:`TrainingData` window (numpy side).

    Events are regrouped per user in time order once; each batch then picks events
    uniformly and gathers their support history, the query items and the items the user
    had already consumed, all as fixed-shape arrays.

    A share ``holdout`` of the users is kept out of the training examples: their newest
    events are the validation examples that decide when training stops
    (:meth:`MetaTrainer.fit`). Users are the tasks of meta-learning, so unseen users are
    what the model must generalize to. The share is picked by a hash of the user id, so it
    is the same users in every version: a model warm-started from one that trained on them
    would otherwise find them already learned. Their events still count in the trending
    counts and the neighbours, as every event does in serving.

    A user's events that share a timestamp come in no known order: a log of seconds or
    months stores them in whatever order the dump had (MovieLens latest-small sorts a
    same-second burst by movie id). So a held-out example's history ends before the
    first of its user's events with its timestamp, as ``metarec eval`` scores that
    event, and the examples that stop training, calibrate the blend and judge a drift
    read only what serving could have read (on latest-small, held-out histories that ran
    through a burst in id order let the user vector alone hit up to 65% of the next
    items, against 5% in the evaluation, and the blend was weighed for that). Training
    examples read such a run in a fresh random order each time: the burst's items still
    teach what is taken together, the dump's order teaches nothing (cutting training
    histories at the timestamp instead cost MovieLens 100K about 4% of its hit rate).
    """

    data: TrainingData
    history_length: int
    inner_events: int
    query_length: int
    negatives: int
    rng: np.random.Generator
    channels: Sequence[Channel] = CHANNELS
    #: Events between two trending snapshots; raised for big windows and catalogs so the
    #: snapshots stay within about 200 MB.
    snapshot_every: int = 50
    holdout: float = 0.1
    #: Events between two neighbour snapshots: as often as serving gets new neighbours
    #: (every retraining), so an example votes with neighbours as stale as a list's are.
    knn_every: int = DEFAULT_RETRAIN_EVENTS

    def __post_init__(self) -> None:
        d = self.data
        self.order = np.lexsort((np.arange(len(d)), d.users))
        tied = (np.diff(d.users[self.order]) == 0) & (np.diff(d.ts[self.order]) == 0)
        if tied.any():
            # A user's events that share a timestamp, in a fresh random order each time.
            self.order = np.lexsort((self.rng.random(len(d)), d.ts, d.users))
        self.seq_items = d.items[self.order]
        self.seq_weights = d.weights[self.order]
        users_sorted = d.users[self.order]
        starts = np.r_[0, np.flatnonzero(np.diff(users_sorted)) + 1]
        ends = np.r_[starts[1:], len(d)]
        self.user_start = np.zeros(len(d.user_ids), np.int64)
        self.user_end = np.zeros(len(d.user_ids), np.int64)
        self.user_start[users_sorted[starts]] = starts
        self.user_end[users_sorted[starts]] = ends
        # Position of each (time-ordered) event inside the per-user sequence array.
        self.seq_pos = np.empty(len(d), np.int64)
        self.seq_pos[self.order] = np.arange(len(d))
        # Where each event's run of its user's events with the same timestamp starts.
        seq_ts = d.ts[self.order]
        run_starts = np.r_[True, (np.diff(users_sorted) != 0) | (np.diff(seq_ts) != 0)]
        self.same_ts_start = np.maximum.accumulate(np.where(run_starts, np.arange(len(d)), 0))
        # Events where a user enters another domain are what teaches the adaptation mapping
        # M_g; they are rare, so they are drawn more often (only when there are any).
        seq_dom = d.domains[self.order]
        same_user = np.r_[False, np.diff(users_sorted) == 0]
        switch = np.zeros(len(d), bool)
        switch[self.order] = same_user & (seq_dom != np.r_[-1, seq_dom[:-1]])
        held = (user_keys(d.user_ids) % np.uint64(10_000)).astype(np.int64) < round(
            self.holdout * 10_000
        )
        valid = held[d.users]
        # Too few to judge by: no validation, every user trains.
        if valid.sum() < MIN_VALIDATION_EVENTS or held.sum() < MIN_VALIDATION_USERS:
            valid[:] = False
        self.train_idx = np.flatnonzero(~valid)
        self.valid_idx = np.flatnonzero(valid)
        self.switch_p: npt.NDArray[np.float64] | None = None
        if switch[self.train_idx].any():
            w = np.where(switch[self.train_idx], SWITCH_WEIGHT, 1.0)
            self.switch_p = w / w.sum()
        size = len(d) * len(self.channels) * len(d.item_ids) * 4
        self.snapshot_every = max(self.snapshot_every, math.ceil(size / 200e6))
        first = d.first if d.first.size == len(d) else np.zeros(len(d), bool)
        self.snapshots = trend_snapshots(
            d.items, d.weights, first, len(d.item_ids), self.channels, self.snapshot_every
        )
        # The neighbours shipped with the model come from the whole window; each training
        # example votes with neighbours computed from the events before it (the latest of
        # the prefixes of the window that end every knn_every events), as serving votes
        # with those of the last training: neighbours that know what comes next would
        # teach the model to trust them more than serving can, and staler ones less.
        positive = d.weights > 0
        n_items = len(d.item_ids)
        self.neighbors = ItemNeighbors.from_events(d.users[positive], d.items[positive], n_items)
        per_snapshot = max(1, n_items * N_NEIGHBORS * 8)
        count = min(
            MAX_KNN_SNAPSHOTS,
            max(1, KNN_SNAPSHOT_BYTES // per_snapshot),
            max(1, math.ceil(len(d) / max(1, self.knn_every))),
        )
        self.knn_bounds = (np.arange(count) * len(d)) // count
        prefixes = [
            ItemNeighbors.from_events(d.users[:b][positive[:b]], d.items[:b][positive[:b]], n_items)
            for b in self.knn_bounds
        ]
        self.knn_index = np.stack([p.index for p in prefixes])
        self.knn_weight = np.stack([p.weight for p in prefixes])
        self.voters = min(VOTERS, self.history_length)
        fu = [len(f) for f in d.user_features]
        width = max([*fu, 1])
        self.user_feat = np.full((len(d.user_ids), width), -1, np.int64)
        self.user_vocab: dict[str, int] = {}
        for u, feats in enumerate(d.user_features):
            for j, f in enumerate(feats):
                self.user_feat[u, j] = self.user_vocab.setdefault(f, len(self.user_vocab))

    @property
    def has_validation(self) -> bool:
        return bool(self.valid_idx.size)

    def sample(self, batch_size: int) -> dict[str, Any]:
        """One batch of training examples (the arrays the TensorFlow step takes)."""
        pick = (
            self.rng.integers(0, self.train_idx.size, batch_size)
            if self.switch_p is None
            else self.rng.choice(self.train_idx.size, batch_size, p=self.switch_p)
        )
        return self.examples(self.train_idx[pick], before_same_ts=False)

    def validation(self, n: int) -> dict[str, Any]:
        """Up to ``n`` examples of the held-out users, the newest ones: what the model has
        to do next is like what came last (the same examples on every call)."""
        return self.examples(self.valid_idx[-n:])

    def validation_since(self, ts: int, n: int) -> dict[str, Any] | None:
        """Up to ``n`` examples of the held-out users at or after time ``ts``, the newest
        ones, at most :data:`JUDGED_PER_USER` of each user; None when there are none.

        The cap makes a verdict about a period one about its users: on a log where one
        user rates hundreds of items in a session, that session was most of the newest
        held-out events, and a model of the period won by knowing one user's binge."""
        q = self.valid_idx
        return self._newest_per_user(q[self.data.ts[q] >= ts], JUDGED_PER_USER, n)

    def calibration(self, bucket: int, n: int) -> dict[str, Any] | None:
        """Up to ``n`` examples of the held-out users in history ``bucket``, the newest
        ones, at most :data:`CALIBRATION_PER_USER` of each user (a few heavy users would
        otherwise be the whole bucket); None when there are none."""
        q = self.valid_idx
        return self._newest_per_user(q[self.buckets(q) == bucket], CALIBRATION_PER_USER, n)

    def _newest_per_user(self, q: I64, per_user: int, n: int) -> dict[str, Any] | None:
        """The examples of the newest ``n`` of window events ``q`` (in time order) that are
        among their user's newest ``per_user``; None when there are none."""
        newest_first = q[::-1]
        users = self.data.users[newest_first]
        by_user = np.argsort(users, kind="stable")
        sorted_users = users[by_user]
        starts = np.r_[0, np.flatnonzero(np.diff(sorted_users)) + 1]
        sizes = np.diff(np.r_[starts, len(sorted_users)])
        rank = np.empty(len(users), np.int64)
        rank[by_user] = np.arange(len(users)) - np.repeat(starts, sizes)
        picked = np.sort(newest_first[rank < per_user][:n])
        return self.examples(picked) if picked.size else None

    def buckets(self, q: I64, *, before_same_ts: bool = True) -> I64:
        """History bucket of the example of each window event ``q``: how many of the
        ``history_length`` events of its history (:meth:`examples`) are in its domain."""
        d, L = self.data, self.history_length
        pos = self.seq_pos[q]
        if before_same_ts:
            pos = self.same_ts_start[pos]
        hist_idx = pos[:, None] - L + np.arange(L)
        ok = hist_idx >= self.user_start[d.users[q]][:, None]
        items = self.seq_items[np.where(ok, hist_idx, 0)]
        same = ok & (d.item_domains[items] == d.domains[q][:, None])
        return history_buckets(same.sum(1))

    def examples(self, q: I64, *, before_same_ts: bool = True) -> dict[str, Any]:
        """The examples of window events ``q``: held-out ones by default, whose history
        ends before their timestamp; training ones with ``before_same_ts=False``, whose
        history is every event before theirs in the window's order (a same-timestamp run
        in the order drawn for this training)."""
        d, L, Q = self.data, self.history_length, self.query_length
        batch_size = len(q)
        users = d.users[q]
        pos = self.seq_pos[q]
        cut = self.same_ts_start[pos] if before_same_ts else pos
        start = self.user_start[users]
        end = self.user_end[users]
        hist_idx = cut[:, None] - L + np.arange(L)
        hist_ok = hist_idx >= start[:, None]
        hist_idx = np.where(hist_ok, hist_idx, 0)
        hist_items = np.where(hist_ok, self.seq_items[hist_idx], -1)
        hist_w = np.where(hist_ok, self.seq_weights[hist_idx], 0.0).astype(np.float32)
        qry_idx = pos[:, None] + np.arange(Q)
        qry_ok = qry_idx < end[:, None]
        query = np.where(qry_ok, self.seq_items[np.where(qry_ok, qry_idx, 0)], -1)
        lengths = cut - start
        rows = np.repeat(np.arange(batch_size), lengths)
        offs = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        consumed = self.seq_items[np.repeat(start, lengths) + offs]
        snap = q // self.snapshot_every
        age = (q - snap * self.snapshot_every)[:, None]
        half_lives = np.asarray([c.half_life for c in self.channels], np.float64)
        decay = np.exp2(-age / half_lives[None, :])
        neg = self.rng.integers(0, len(d.item_ids), (batch_size, self.inner_events, self.negatives))
        knn_index, knn_value = self._votes(
            q, hist_items[:, -self.voters :], hist_w[:, -self.voters :]
        )
        return {
            "users": users,
            "domains": d.domains[q],
            "profile": self.user_feat[users],
            "hist_items": hist_items,
            "hist_weights": hist_w,
            "query": query,
            "consumed": np.stack([rows, consumed], axis=1),
            "snap": snap,
            "decay": decay.astype(np.float32),
            "negatives": neg,
            "bucket": self.buckets(q, before_same_ts=before_same_ts),
            "knn_index": knn_index,
            "knn_value": knn_value,
        }

    def _votes(self, q: I64, hist: I64, weights: F32) -> tuple[I64, F32]:
        """Neighbour votes of each example's recent items, from the neighbours of the
        window's prefix before example ``q`` (age weights are left to the graph)."""
        snap = np.searchsorted(self.knn_bounds, q, side="right") - 1
        ok = (hist >= 0) & (weights > 0)
        safe = np.where(ok, hist, 0)
        index = np.where(ok[..., None], self.knn_index[snap[:, None], safe], -1)
        value = np.where(ok[..., None], self.knn_weight[snap[:, None], safe], 0.0)
        return index.astype(np.int64), value.astype(np.float32)


@dataclass
class MetaTrainer:
    """Trains a :class:`MetaModel` on a window of events. See the module docstring.

    Hyperparameters keep their constructor names; ``seed`` drives all randomness (NumPy
    sampling and TensorFlow initializers), and with ``deterministic`` TensorFlow's op
    determinism makes seeded runs repeat exactly.
    """

    dim: int = 32
    history_length: int = 50
    pool_decays: tuple[float, ...] = (0.02, 0.5)
    inner_events: int = 5
    query_length: int = 3
    negatives: int = 4
    batch_size: int = 1024
    #: How long to train is decided on held-out users (see TrainingBatches): their query
    #: loss is checked every ``check_every`` steps, and training stops after ``patience``
    #: checks without a new best (the best parameters are kept), or at ``max_steps``. How
    #: much training a window can take differs by stream and grows with the window.
    check_every: int = 5
    patience: int = 3
    max_steps: int = 400
    holdout: float = 0.1
    #: Without enough held-out users (a tiny window): ``epochs`` passes over the window, at
    #: least ``min_steps``.
    epochs: float = 0.5
    min_steps: int = 25
    learning_rate: float = 0.02
    l2: float = 1e-5
    blend: float = 10.0
    cold_item_rate: float = 0.1
    channels: tuple[Channel, ...] = CHANNELS
    step_init: float = 0.05
    #: Events between two retrainings of the service (see TrainingBatches.knn_every).
    retrain_events: int = DEFAULT_RETRAIN_EVENTS
    meta: bool = True
    #: The list length of the HR@top_k a training floor's verdict reports beside its loss.
    top_k: int = DEFAULT_TOP_K
    seed: int = 0
    deterministic: bool = True
    #: Called after every training step: a service's liveness (``/healthz``) stays green
    #: through a long training, and goes red if a step hangs.
    on_step: Callable[[], None] | None = field(default=None, compare=False, repr=False)

    def fit(
        self,
        data: TrainingData,
        init: MetaModel | None = None,
        version: int = 1,
        *,
        judge_since: int | None = None,
    ) -> MetaModel:
        """Train on ``data`` (warm-starting from ``init`` if given); returns a new model.

        With ``judge_since`` (a time, epoch ms), the trained model's loss and HR@``top_k``
        on the newest held-out examples at or after it are recorded too
        (``info["judged_loss"]``, ``info["judged_hr"]``, None when there are none), over
        the items of the events since then: two models of windows that start at different
        times, each reading its own users' histories, compared on the same events and the
        same items.
        """
        from metarec.training.meta_graph import MetaGraph
        from metarec.training.tensorflow_import import import_tensorflow

        tf = import_tensorflow()

        if self.deterministic:
            tf.config.experimental.enable_op_determinism()
        tf.random.set_seed(self.seed)
        rng = np.random.default_rng([self.seed, version])
        device = "GPU:0" if tf.config.list_physical_devices("GPU") else "CPU:0"
        started = time.perf_counter()
        batches = TrainingBatches(
            data,
            self.history_length,
            self.inner_events,
            self.query_length,
            self.negatives,
            rng,
            self.channels,
            holdout=self.holdout,
            knn_every=self.retrain_events,
        )
        with tf.device(device):
            graph = MetaGraph(self, data, batches, init, rng)
            held_out = batches.validation(VALIDATION_EXAMPLES) if batches.has_validation else {}
            if batches.has_validation:
                loss, steps = graph.train_until_best(
                    batches,
                    held_out,
                    self.max_steps,
                    self.check_every,
                    self.patience,
                )
            else:
                steps = int(
                    min(
                        self.max_steps,
                        max(self.min_steps, math.ceil(self.epochs * len(data) / self.batch_size)),
                    )
                )
                loss = graph.train(batches, steps)
            model = graph.export(version)
            judged: tuple[float | None, npt.NDArray[np.int8]] = (None, np.zeros(0, np.int8))
            if judge_since is not None:
                recent = batches.validation_since(judge_since, VALIDATION_EXAMPLES)
                period = np.unique(data.items[data.ts >= judge_since])
                if recent is not None:
                    judged = graph.judge(recent, period, self.top_k)
            calibrated = time.perf_counter()
            if self.meta and batches.has_validation:
                model = model.with_blend_scales(self._calibrate(graph, batches))
            calibration_seconds = time.perf_counter() - calibrated
        elapsed = time.perf_counter() - started
        model.info.update(
            {
                "device": device,
                "steps": steps,
                "loss": loss,
                "validated": batches.has_validation,
                "events": len(data),
                # The span of the window trained on (event times, epoch ms).
                "first_ts": int(data.ts.min()) if len(data) else None,
                "last_ts": int(data.ts.max()) if len(data) else None,
                "seconds": round(elapsed, 3),
                "seed": self.seed,
            }
        )
        if judge_since is not None:
            counted = judged[1][judged[1] >= 0]
            model.info["judged_loss"] = judged[0]
            model.info["judged_hr"] = float(counted.mean()) if counted.size else None
        model.info["blend_scales"] = np.round(model.blend_scales, 4).tolist()
        model.info["calibration_seconds"] = round(calibration_seconds, 3)
        log.info(
            "meta-training done",
            extra={
                "device": device,
                "steps": steps,
                "loss": round(loss, 4),
                "events": len(data),
                "seconds": round(elapsed, 2),
                "version": version,
                "meta": self.meta,
                "blend_scales": model.info["blend_scales"],
            },
        )
        return model

    def _calibrate(self, graph: MetaGraph, batches: TrainingBatches) -> F32:
        """Blend factors per history bucket, refitted on held-out users' next items
        (:mod:`metarec.training.calibration`)."""
        n_items = max(1, len(batches.data.item_ids))
        n = max(1, min(CALIBRATION_EXAMPLES, CALIBRATION_CELLS // n_items))
        scales = np.ones((HISTORY_BUCKETS, len(BLEND_PARTS)), np.float32)
        for c in range(HISTORY_BUCKETS):
            examples = batches.calibration(c, n)
            if examples is not None:
                scales[c] = calibrate_blend(*graph.score_parts(examples))
        return scales
