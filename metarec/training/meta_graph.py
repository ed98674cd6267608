"""The TensorFlow side of meta-training: parameters, one vectorized step, and export.

Kept apart from :mod:`metarec.training.trainer` so that the rest of metarec (and the
consumer) never imports TensorFlow. The forward pass mirrors :mod:`metarec.core.adaptation`
and :mod:`metarec.core.learner`'s scoring operation for operation;
``tests/training/test_trainer.py`` checks that the exported numpy model scores exactly like
the graph did.

The step is a pure function of (parameters, Adam state, window constants, batch), with
every shape left open, so TensorFlow traces it once per process and configuration rather
than once per training run: the aggregator and ``metarec eval`` retrain every few thousand
events, and a trace costs seconds.
"""

from __future__ import annotations

import dataclasses
import functools
import queue
import threading
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from metarec.core.model import HISTORY_BUCKETS, MetaModel
from metarec.core.neighbors import VOTERS
from metarec.core.window import TrainingData
from metarec.training.tensorflow_import import import_tensorflow

import_tensorflow()  # before `import tensorflow`: its start-up lines become log records
import tensorflow as tf  # noqa: E402

if TYPE_CHECKING:
    from metarec.training.trainer import MetaTrainer, TrainingBatches

__all__ = ["MetaGraph"]

F32 = npt.NDArray[np.float32]
#: The most score cells (examples times items) one chunk of a judged loss holds.
JUDGED_CELLS = 16_000_000
_MASKED = -1e9
_EPS = 1e-6
#: Starting weight of the neighbour votes (votes of 20 recent items are a few units).
_KNN_INIT = 0.5
#: Initial scale of new embeddings: small, so a fresh model starts near popularity ranking.
_INIT_SCALE = 0.05


def _rows_by_name(names: list[str], old_names: list[str], old: F32, fresh: F32) -> F32:
    """``fresh`` with the rows whose name also appears in ``old_names`` copied from ``old``."""
    out = fresh.copy()
    index = {n: i for i, n in enumerate(old_names)}
    pairs = [(i, index[n]) for i, n in enumerate(names) if n in index]
    if pairs:
        new_rows, old_rows = (np.asarray(p) for p in zip(*pairs, strict=True))
        out[new_rows] = old[old_rows]
    return out


#: Adam's moment decays and epsilon (Keras' defaults).
_BETA1, _BETA2, _ADAM_EPS = 0.9, 0.999, 1e-7
#: Names of the parameters each variant trains (the others stay at their initial value).
_META_PARAMS = (
    "emb",
    "ctx",
    "bias",
    "g_emb",
    "g_ctx",
    "g_bias",
    "theta0",
    "u_feat",
    "hist_map",
    "age",
    "log_step",
    "log_prox",
    "trend",
    "domain_map",
    "knn_age",
    "knn_weights",
    "user_w",
    "bias_w",
)
_PLAIN_PARAMS = (
    "emb",
    "bias",
    "free_users",
    "trend",
    "knn_age",
    "knn_weights",
    "user_w",
    "bias_w",
)
_ALL_PARAMS = (*_META_PARAMS, "free_users")


class MetaGraph:
    """Parameters and the training loop for one :meth:`MetaTrainer.fit` call."""

    def __init__(
        self,
        cfg: MetaTrainer,
        data: TrainingData,
        batches: TrainingBatches,
        init: MetaModel | None,
        rng: np.random.Generator,
    ) -> None:
        self.cfg = cfg
        self.data = data
        self.rng = rng
        d, n = cfg.dim, len(data.item_ids)
        self.item_ids = list(data.item_ids)
        feats = sorted({f for fs in data.item_features for f in fs})
        self.item_vocab = feats
        fidx = {f: i for i, f in enumerate(feats)}
        rows, cols = [], []
        for i, fs in enumerate(data.item_features):
            for f in fs:
                rows.append(i)
                cols.append(fidx[f])
        self.feat_rows = tf.constant(np.asarray(rows, np.int64))
        self.feat_cols = tf.constant(np.asarray(cols, np.int64))
        self.feat_count = tf.constant(
            np.maximum(np.bincount(np.asarray(rows, np.int64), minlength=n), 1).astype(np.float32)[
                :, None
            ]
        )
        self.has_feat = tf.constant(
            (np.bincount(np.asarray(rows, np.int64), minlength=n) > 0).astype(np.float32)
        )
        self.count = np.bincount(data.items, minlength=n).astype(np.float32)
        self.user_vocab = sorted(batches.user_vocab, key=batches.user_vocab.__getitem__)
        self.domains = list(data.domain_names) or ["default"]
        self.snapshots = tf.constant(batches.snapshots)

        def normal(shape: tuple[int, ...]) -> F32:
            return (_INIT_SCALE * rng.standard_normal(shape)).astype(np.float32)

        emb, ctx, bias = normal((n, d)), normal((n, d)), np.zeros(n, np.float32)
        g_emb, g_ctx, g_bias = (
            normal((len(feats), d)),
            normal((len(feats), d)),
            np.zeros(len(feats), np.float32),
        )
        theta0 = np.zeros((len(self.domains), d), np.float32)
        u_feat = np.zeros((len(self.user_vocab) + 1, d), np.float32)
        # One pool per time scale: a slow one for taste, fast ones for the current session.
        decays = np.asarray(cfg.pool_decays, np.float32)
        hist_map = np.stack([np.eye(d, dtype=np.float32)] * len(decays))
        age = (-decays[:, None] * np.arange(cfg.history_length)).astype(np.float32)
        log_step = np.full(d, np.log(cfg.step_init), np.float32)
        domain_map = np.stack([np.eye(d, dtype=np.float32)] * len(self.domains))
        log_prox = np.float32(np.log(0.1))
        # Start as one equal blend of the trending scales for everyone; training finds which
        # scale each history length follows.
        n_channels = len(cfg.channels)
        trend = np.full((HISTORY_BUCKETS, n_channels), 1.0 / n_channels, np.float32)
        # Neighbour votes: the item-kNN baseline's decay of 0.9 per step of age to start.
        self.voters = batches.voters
        knn_age = (np.log(0.9) * np.arange(VOTERS)).astype(np.float32)
        knn_weights = np.full(HISTORY_BUCKETS, _KNN_INIT, np.float32)
        user_w = np.ones(HISTORY_BUCKETS, np.float32)
        bias_w = np.ones(HISTORY_BUCKETS, np.float32)
        if init is not None:  # warm-start from the weights the loss learned
            init = init.with_blend_scales(np.ones_like(init.blend_scales))
        if init is not None and init.dim == d and init.age_logits.shape == age.shape:
            emb = _rows_by_name(self.item_ids, init.item_ids, init.item_emb, emb)
            ctx = _rows_by_name(self.item_ids, init.item_ids, init.item_ctx, ctx)
            bias = _rows_by_name(
                self.item_ids, init.item_ids, init.item_bias[:, None], bias[:, None]
            )[:, 0]
            if init.meta and cfg.meta:
                g_emb = _rows_by_name(feats, init.item_features, init.feat_emb, g_emb)
                g_ctx = _rows_by_name(feats, init.item_features, init.feat_ctx, g_ctx)
                g_bias = _rows_by_name(
                    feats, init.item_features, init.feat_bias[:, None], g_bias[:, None]
                )[:, 0]
                theta0 = _rows_by_name(self.domains, init.domains, init.theta0, theta0)
                u_feat[:-1] = _rows_by_name(
                    self.user_vocab, init.user_features, init.user_feat, u_feat[:-1]
                )
                hist_map, age = init.hist_map.copy(), init.age_logits.copy()
                flat = _rows_by_name(
                    self.domains,
                    init.domains,
                    init.domain_map.reshape(len(init.domains), -1),
                    domain_map.reshape(len(self.domains), -1),
                )
                domain_map = flat.reshape(domain_map.shape)
                log_step = np.log(np.maximum(init.step, 1e-6)).astype(np.float32)
                log_prox = np.float32(np.log(max(init.prox, 1e-6)))
            if init.trend_weights.shape == trend.shape:
                trend = init.trend_weights.copy()
            if init.knn_age_logits.shape == knn_age.shape:
                knn_age, knn_weights = init.knn_age_logits.copy(), init.knn_weights.copy()
            user_w, bias_w = init.user_weights.copy(), init.bias_weights.copy()
        self.neighbors = batches.neighbors
        self.params: dict[str, tf.Tensor] = {
            name: tf.constant(value)
            for name, value in {
                "emb": emb,
                "ctx": ctx,
                "bias": bias,
                "g_emb": g_emb,
                "g_ctx": g_ctx,
                "g_bias": g_bias,
                "theta0": theta0,
                "u_feat": u_feat,
                "hist_map": hist_map,
                "age": age,
                "log_step": log_step,
                "log_prox": log_prox,
                "trend": trend,
                "domain_map": domain_map,
                "knn_age": knn_age,
                "knn_weights": knn_weights,
                "user_w": user_w,
                "bias_w": bias_w,
                "free_users": normal((len(data.user_ids), d)),
            }.items()
        }
        self.names = _META_PARAMS if cfg.meta else _PLAIN_PARAMS
        self.adam_m = {k: tf.zeros_like(self.params[k]) for k in self.names}
        self.adam_v = {k: tf.zeros_like(self.params[k]) for k in self.names}
        self.adam_t = 0
        self.consts = {
            "feat_rows": self.feat_rows,
            "feat_cols": self.feat_cols,
            "feat_count": self.feat_count,
            "snapshots": self.snapshots,
        }
        self._step = _step_function(_Shape.of(cfg, self.voters))
        self._loss = _loss_function(_Shape.of(cfg, self.voters))

    # -- forward (for checks against the numpy side) --------------------------------------

    def item_tables(self, own_weight: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """Serving vectors, biases and context vectors (the blend of model.item_tables)."""
        return _item_tables(_Shape.of(self.cfg, self.voters), self.params, self.consts, own_weight)

    def _prior(self, b: dict[str, tf.Tensor], context: tf.Tensor) -> tf.Tensor:
        return _prior(_Shape.of(self.cfg, self.voters), self.params, b, context)

    def _inner_loop(
        self, b: dict[str, tf.Tensor], theta0: tf.Tensor, vectors: tf.Tensor, bias: tf.Tensor
    ) -> tf.Tensor:
        return _inner_loop(_Shape.of(self.cfg, self.voters), self.params, b, theta0, vectors, bias)

    # -- loop and export ----------------------------------------------------------------

    def _own_weight(self) -> F32:
        """Blend weight of each item's own embedding, with some items made cold on purpose.

        Treating a random share of items as never seen trains the feature mapping to stand
        on its own, which is what a brand-new item will need.
        """
        w = self.count / (self.count + self.cfg.blend)
        cold = self.rng.random(len(w)) < self.cfg.cold_item_rate
        return np.where(cold, 0.0, w).astype(np.float32)

    def validation_loss(self, examples: dict[str, Any]) -> float:
        """Mean query loss of ``examples`` under the current parameters (in batches)."""
        n = len(examples["users"])
        total, weight = 0.0, 0.0
        own = self.count / (self.count + self.cfg.blend)  # no item made cold on purpose
        for lo in range(0, n, self.cfg.batch_size):
            part = _slice_examples(examples, lo, lo + self.cfg.batch_size)
            part["own_weight"] = own.astype(np.float32)
            b = {k: tf.constant(v) for k, v in part.items()}
            loss, count = self._loss(self.params, self.consts, b)
            total += float(loss) * float(count)
            weight += float(count)
        return total / max(weight, 1.0)

    def judge(
        self, examples: dict[str, Any], items: npt.NDArray[np.int64], k: int
    ) -> tuple[float | None, npt.NDArray[np.int8]]:
        """Each example's next item scored among ``items`` alone (the catalog's indices),
        less what its user had consumed: the mean softmax loss (None if no example
        counts) and, per example, whether the item is in the top ``k`` (1), not (0), or
        does not count (-1: a repeat, or an item outside ``items``).

        Two models of windows that start at different times know catalogs of different
        sizes, and a softmax over fewer items has a lower loss for that alone: judged
        over the same items, they compare, example by example.
        """
        n = len(examples["users"])
        chunk = max(1, JUDGED_CELLS // max(1, len(self.item_ids)))
        column = np.full(len(self.item_ids), -1, np.int64)
        column[items] = np.arange(len(items))
        hits = np.full(n, -1, np.int8)
        loss, counted = 0.0, 0
        for lo in range(0, n, chunk):
            parts, consumed, target = self.score_parts(_slice_examples(examples, lo, lo + chunk))
            logits = parts.sum(axis=0, dtype=np.float64)[:, items]
            logits[consumed[:, items]] = -np.inf
            at = np.where(target >= 0, column[np.maximum(target, 0)], -1)
            ok = at >= 0
            if not ok.any():
                continue
            rows = logits[ok]
            scored = rows[np.arange(len(rows)), at[ok]]
            top = rows.max(axis=1, keepdims=True)
            lse = top[:, 0] + np.log(np.exp(rows - top).sum(axis=1))
            loss += float((lse - scored).sum())
            hits[lo + np.flatnonzero(ok)] = (rows > scored[:, None]).sum(axis=1) < k
            counted += int(ok.sum())
        return (loss / counted if counted else None), hits

    def train_until_best(
        self,
        batches: TrainingBatches,
        validation: dict[str, Any],
        max_steps: int,
        check_every: int,
        patience: int,
    ) -> tuple[float, int]:
        """Train while the held-out loss improves; keep the best parameters.

        Returns that loss and the steps that reached it.
        """
        best_loss, best_step = self.validation_loss(validation), 0
        best = dict(self.params)  # tensors are immutable: a shallow copy is a snapshot
        steps, since_best = 0, 0
        while steps < max_steps and since_best < patience:
            chunk = min(check_every, max_steps - steps)
            self.train(batches, chunk)
            steps += chunk
            loss = self.validation_loss(validation)
            if loss < best_loss:
                best_loss, best_step, best, since_best = loss, steps, dict(self.params), 0
            else:
                since_best += 1
        self.params = best
        return best_loss, best_step

    def train(self, batches: TrainingBatches, steps: int) -> float:
        """``steps`` Adam steps; returns the mean query loss of the last tenth of them.

        The next batch is sampled (numpy) in a thread while TensorFlow runs the step, which
        releases the interpreter lock.
        """

        def sample() -> dict[str, tf.Tensor]:
            raw: dict[str, Any] = batches.sample(self.cfg.batch_size)
            raw["own_weight"] = self._own_weight()
            return {k: tf.constant(v) for k, v in raw.items()}

        ahead: queue.Queue[dict[str, tf.Tensor]] = queue.Queue(maxsize=1)

        def produce() -> None:
            for _ in range(steps):
                ahead.put(sample())

        worker = threading.Thread(target=produce, daemon=True)
        worker.start()
        losses: list[float] = []
        lr = tf.constant(self.cfg.learning_rate, tf.float32)
        for _ in range(steps):
            b = ahead.get()
            self.adam_t += 1
            trained = {k: self.params[k] for k in self.names}
            new, self.adam_m, self.adam_v, loss = self._step(
                trained,
                self.adam_m,
                self.adam_v,
                tf.constant(self.adam_t, tf.float32),
                lr,
                {k: v for k, v in self.params.items() if k not in self.names},
                self.consts,
                b,
            )
            self.params.update(new)
            losses.append(float(loss))
            if self.cfg.on_step is not None:
                self.cfg.on_step()
        worker.join()
        tail = losses[-max(1, len(losses) // 10) :]
        return float(np.mean(tail))

    def score_parts(
        self, examples: dict[str, Any]
    ) -> tuple[F32, npt.NDArray[np.bool_], npt.NDArray[np.int64]]:
        """Each part of the score for ``examples`` over the whole catalog, ``(4, B,
        n_items)`` (BLEND_PARTS' order, weighted as serving weighs them), which items each
        example's user had consumed (left out of the list), and each example's next item
        (-1 where it repeats a consumed one)."""
        own = (self.count / (self.count + self.cfg.blend)).astype(np.float32)
        b = {k: tf.constant(v) for k, v in examples.items()}
        b["own_weight"] = tf.constant(own)
        parts = _parts_function(_Shape.of(self.cfg, self.voters))(self.params, self.consts, b)
        out: F32 = np.stack([t.numpy() for t in parts])
        consumed = np.zeros(out.shape[1:], bool)
        consumed[examples["consumed"][:, 0], examples["consumed"][:, 1]] = True
        target = examples["query"][:, 0].astype(np.int64)
        ok = target >= 0
        ok[ok] = ~consumed[np.flatnonzero(ok), target[ok]]
        return out, consumed, np.where(ok, target, -1)

    def export(self, version: int) -> MetaModel:
        cfg = self.cfg
        meta = cfg.meta
        p = {k: v.numpy() for k, v in self.params.items()}
        d = cfg.dim
        empty = np.zeros((0, d), np.float32)
        return MetaModel(
            version=version,
            item_ids=self.item_ids,
            item_features=self.item_vocab if meta else [],
            user_features=self.user_vocab if meta else [],
            domains=self.domains,
            item_emb=p["emb"],
            item_bias=p["bias"],
            item_ctx=p["ctx"] if meta else np.zeros_like(p["emb"]),
            item_count=self.count,
            feat_emb=p["g_emb"] if meta else empty,
            feat_bias=p["g_bias"] if meta else np.zeros(0, np.float32),
            feat_ctx=p["g_ctx"] if meta else empty,
            theta0=p["theta0"] if meta else np.zeros((len(self.domains), d), np.float32),
            user_feat=p["u_feat"][:-1] if meta else empty,
            hist_map=p["hist_map"] if meta else np.zeros_like(p["hist_map"]),
            age_logits=p["age"],
            step=np.exp(p["log_step"]) if meta else np.full(d, cfg.step_init, np.float32),
            domain_map=p["domain_map"],
            prox=float(np.exp(p["log_prox"])) if meta else 0.1,
            trend_weights=p["trend"] if meta else np.tile(p["trend"][:1], (HISTORY_BUCKETS, 1)),
            knn_index=self.neighbors.index,
            knn_weight=self.neighbors.weight,
            knn_age_logits=p["knn_age"],
            knn_weights=p["knn_weights"]
            if meta
            else np.full(HISTORY_BUCKETS, p["knn_weights"][0], np.float32),
            user_weights=p["user_w"]
            if meta
            else np.full(HISTORY_BUCKETS, p["user_w"][0], np.float32),
            bias_weights=p["bias_w"]
            if meta
            else np.full(HISTORY_BUCKETS, p["bias_w"][0], np.float32),
            inner_steps=1,
            negatives=cfg.negatives,
            blend=cfg.blend,
            meta=meta,
        )


# --- the pure step, traced once per process and configuration ----------------------------


@dataclasses.dataclass(frozen=True)
class _Shape:
    """What the traced step's Python control flow depends on (everything else is data)."""

    meta: bool
    pools: int
    inner_events: int
    negatives: int
    l2: float
    voters: int

    @classmethod
    def of(cls, cfg: MetaTrainer, voters: int) -> _Shape:
        return cls(cfg.meta, len(cfg.pool_decays), cfg.inner_events, cfg.negatives, cfg.l2, voters)


def _any_spec(dtype: tf.DType = tf.float32) -> tf.TensorSpec:
    return tf.TensorSpec(None, dtype)


_BATCH_SPEC = {
    "users": tf.int64,
    "domains": tf.int64,
    "profile": tf.int64,
    "hist_items": tf.int64,
    "hist_weights": tf.float32,
    "query": tf.int64,
    "consumed": tf.int64,
    "snap": tf.int64,
    "decay": tf.float32,
    "negatives": tf.int64,
    "own_weight": tf.float32,
    "bucket": tf.int64,
    "knn_index": tf.int64,
    "knn_value": tf.float32,
}
_CONST_SPEC = {
    "feat_rows": tf.int64,
    "feat_cols": tf.int64,
    "feat_count": tf.float32,
    "snapshots": tf.float32,
}


@functools.cache
def _step_function(shape: _Shape) -> Any:
    """One Adam step on the query loss, as a traced TensorFlow function."""
    names = _META_PARAMS if shape.meta else _PLAIN_PARAMS
    frozen = [k for k in _ALL_PARAMS if k not in names]
    trained_spec = {k: _any_spec() for k in names}
    signature = [
        trained_spec,
        trained_spec,
        trained_spec,
        _any_spec(),
        _any_spec(),
        {k: _any_spec() for k in frozen},
        {k: _any_spec(v) for k, v in _CONST_SPEC.items()},
        {k: _any_spec(v) for k, v in _BATCH_SPEC.items()},
    ]

    def step(
        trained: dict[str, tf.Tensor],
        m: dict[str, tf.Tensor],
        v: dict[str, tf.Tensor],
        t: tf.Tensor,
        lr: tf.Tensor,
        fixed: dict[str, tf.Tensor],
        consts: dict[str, tf.Tensor],
        b: dict[str, tf.Tensor],
    ) -> tuple[Any, Any, Any, tf.Tensor]:
        with tf.GradientTape() as tape:
            tape.watch(list(trained.values()))
            p = {**fixed, **trained}
            nll, reg, _ = _query_loss(shape, p, consts, b)
            loss = nll + reg
        grads = tape.gradient(loss, trained)
        new, new_m, new_v = {}, {}, {}
        for k, value in trained.items():
            g = tf.convert_to_tensor(grads[k])
            new_m[k] = _BETA1 * m[k] + (1 - _BETA1) * g
            new_v[k] = _BETA2 * v[k] + (1 - _BETA2) * tf.square(g)
            m_hat = new_m[k] / (1 - _BETA1**t)
            v_hat = new_v[k] / (1 - _BETA2**t)
            new[k] = value - lr * m_hat / (tf.sqrt(v_hat) + _ADAM_EPS)
        return new, new_m, new_v, nll

    return tf.function(step, input_signature=signature)


def _forward_signature() -> list[Any]:
    """Input specs of a forward pass: every parameter, the window constants, a batch."""
    return [
        {k: _any_spec() for k in _ALL_PARAMS},
        {k: _any_spec(v) for k, v in _CONST_SPEC.items()},
        {k: _any_spec(v) for k, v in _BATCH_SPEC.items()},
    ]


@functools.cache
def _loss_function(shape: _Shape) -> Any:
    """The query loss of a batch and how many query items it counted, traced once."""

    def loss(
        p: dict[str, tf.Tensor], consts: dict[str, tf.Tensor], b: dict[str, tf.Tensor]
    ) -> tuple[tf.Tensor, tf.Tensor]:
        nll, _, count = _query_loss(shape, p, consts, b)
        return nll, count

    return tf.function(loss, input_signature=_forward_signature())


@functools.cache
def _parts_function(shape: _Shape) -> Any:
    """The score's parts of a batch (:func:`_score_parts`), traced once."""

    def parts(
        p: dict[str, tf.Tensor], consts: dict[str, tf.Tensor], b: dict[str, tf.Tensor]
    ) -> list[tf.Tensor]:
        return _score_parts(shape, p, consts, b)[2]

    return tf.function(parts, input_signature=_forward_signature())


def _slice_examples(examples: dict[str, Any], lo: int, hi: int) -> dict[str, Any]:
    """Rows ``lo .. hi-1`` of a batch of examples (``consumed`` holds (row, item) pairs)."""
    out = {k: v[lo:hi] for k, v in examples.items() if k != "consumed"}
    pairs = examples["consumed"]
    keep = (pairs[:, 0] >= lo) & (pairs[:, 0] < hi)
    out["consumed"] = pairs[keep] - np.array([lo, 0])
    return out


def _item_tables(
    shape: _Shape, p: dict[str, tf.Tensor], c: dict[str, tf.Tensor], own_weight: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Serving vectors, biases and context vectors (the blend of model.item_tables)."""
    if not shape.meta:
        return p["emb"], p["bias"], p["ctx"]
    n = tf.shape(p["emb"], out_type=tf.int64)[0]
    w = own_weight[:, None]

    def mean(table: tf.Tensor) -> tf.Tensor:
        summed = tf.math.unsorted_segment_sum(tf.gather(table, c["feat_cols"]), c["feat_rows"], n)
        return summed / c["feat_count"]

    vectors = w * p["emb"] + (1 - w) * mean(p["g_emb"])
    context = w * p["ctx"] + (1 - w) * mean(p["g_ctx"])
    g_bias = tf.squeeze(mean(p["g_bias"][:, None]), 1)
    bias = own_weight * p["bias"] + (1 - own_weight) * g_bias
    return vectors, bias, context


def _prior(
    shape: _Shape, p: dict[str, tf.Tensor], b: dict[str, tf.Tensor], context: tf.Tensor
) -> tf.Tensor:
    items = b["hist_items"]
    valid = tf.cast(items >= 0, tf.float32)
    ctx = tf.gather(context, tf.maximum(items, 0))
    age_weight = tf.exp(tf.reverse(p["age"], [1]))
    hist_w = b["hist_weights"] * valid
    pooled = 0.0
    for k in range(shape.pools):
        w = hist_w * age_weight[k]
        pool = tf.einsum("bl,bld->bd", w, ctx) / (
            tf.reduce_sum(tf.abs(w), axis=1, keepdims=True) + _EPS
        )
        pooled += pool @ p["hist_map"][k]
    prof_idx = b["profile"]
    prof_ok = tf.cast(prof_idx >= 0, tf.float32)
    n_vocab = tf.shape(p["u_feat"], out_type=tf.int64)[0] - 1
    prof_idx = tf.where(prof_idx >= 0, prof_idx, n_vocab)
    prof = tf.reduce_sum(tf.gather(p["u_feat"], prof_idx) * prof_ok[..., None], 1)
    prof = prof / tf.maximum(tf.reduce_sum(prof_ok, 1, keepdims=True), 1.0)
    mapped = tf.einsum("bd,bde->be", pooled, tf.gather(p["domain_map"], b["domains"]))
    return tf.gather(p["theta0"], b["domains"]) + mapped + prof


def _inner_loop(
    shape: _Shape,
    p: dict[str, tf.Tensor],
    b: dict[str, tf.Tensor],
    theta0: tf.Tensor,
    vectors: tf.Tensor,
    bias: tf.Tensor,
) -> tf.Tensor:
    """The consumer's pairwise Meta-SGD steps over the newest support events."""
    step, prox = tf.exp(p["log_step"]), tf.exp(p["log_prox"])
    delta = tf.zeros_like(theta0)
    s = shape.inner_events
    for j in range(s):
        pos = b["hist_items"][:, -s + j]
        ok = tf.cast(pos >= 0, tf.float32)[:, None]
        pos = tf.maximum(pos, 0)
        weight = b["hist_weights"][:, -s + j]
        neg = b["negatives"][:, j, :]
        dv = tf.gather(vectors, pos)[:, None, :] - tf.gather(vectors, neg)
        db = tf.gather(bias, pos)[:, None] - tf.gather(bias, neg)
        sign = tf.where(weight < 0, -1.0, 1.0)[:, None]
        z = sign * (tf.einsum("bd,bnd->bn", theta0 + delta, dv) + db)
        coeff = -tf.abs(weight)[:, None] * sign * tf.sigmoid(-z)
        grad = tf.einsum("bn,bnd->bd", coeff, dv) / float(shape.negatives) + prox * delta
        delta = delta - ok * step * grad
    return delta


def _votes(
    shape: _Shape, p: dict[str, tf.Tensor], b: dict[str, tf.Tensor], n: tf.Tensor
) -> tf.Tensor:
    """Dense ``(B, n_items)`` neighbour votes (metarec.core.neighbors), with learned age
    weights: the consumer's :func:`metarec.core.neighbors.votes` in TensorFlow."""
    age = tf.exp(tf.reverse(p["knn_age"][: shape.voters], [0]))
    index = b["knn_index"]
    value = tf.where(index >= 0, b["knn_value"] * age[None, :, None], 0.0)
    rows = tf.shape(index, out_type=tf.int64)[0]
    flat = tf.range(rows)[:, None, None] * n + tf.maximum(index, 0)
    summed = tf.math.unsorted_segment_sum(tf.reshape(value, [-1]), tf.reshape(flat, [-1]), rows * n)
    return tf.reshape(summed, tf.stack([rows, n]))


def _score_parts(
    shape: _Shape, p: dict[str, tf.Tensor], c: dict[str, tf.Tensor], b: dict[str, tf.Tensor]
) -> tuple[tf.Tensor, tf.Tensor, list[tf.Tensor]]:
    """The user vectors, the item vectors, and the score's parts over the whole catalog,
    each ``(B, n_items)`` with its weight for the example's history bucket: the adapted
    user vector, the item bias, the trending prior and the neighbours' votes (the order of
    :data:`metarec.core.model.BLEND_PARTS`)."""
    vectors, bias, context = _item_tables(shape, p, c, b["own_weight"])
    if shape.meta:
        theta0 = _prior(shape, p, b, context)
        theta = theta0 + _inner_loop(shape, p, b, theta0, vectors, bias)
        bucket = b["bucket"]
    else:
        theta = tf.gather(p["free_users"], b["users"])
        bucket = tf.zeros_like(b["bucket"])  # the ablation: one weight set for everyone
    pop = tf.gather(c["snapshots"], b["snap"]) * b["decay"][:, :, None]
    beta = tf.gather(p["trend"], bucket)
    n = tf.shape(vectors, out_type=tf.int64)[0]
    parts = [
        tf.gather(p["user_w"], bucket)[:, None] * (theta @ tf.transpose(vectors)),
        tf.gather(p["bias_w"], bucket)[:, None] * bias[None, :],
        tf.einsum("bs,bsn->bn", beta, tf.math.log1p(pop)),
        tf.gather(p["knn_weights"], bucket)[:, None] * _votes(shape, p, b, n),
    ]
    return theta, vectors, parts


def _query_loss(
    shape: _Shape, p: dict[str, tf.Tensor], c: dict[str, tf.Tensor], b: dict[str, tf.Tensor]
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Softmax loss of the query items over the whole catalog, the L2 penalty, and how
    many query items were counted."""
    theta, vectors, parts = _score_parts(shape, p, c, b)
    logits = tf.add_n(parts)
    masked = tf.fill(tf.shape(b["consumed"])[:1], tf.constant(_MASKED, tf.float32))
    logits = tf.tensor_scatter_nd_update(logits, b["consumed"], masked)
    lse = tf.reduce_logsumexp(logits, axis=1, keepdims=True)
    query = b["query"]
    target = tf.gather(logits, tf.maximum(query, 0), batch_dims=1)
    # A repeat of a consumed item is masked like the rest: it is not a target.
    ok = tf.cast((query >= 0) & (target > _MASKED / 2), tf.float32)
    count = tf.reduce_sum(ok)
    nll = tf.reduce_sum((lse - target) * ok) / tf.maximum(count, 1.0)
    reg = shape.l2 * (
        tf.reduce_sum(tf.square(theta))
        + tf.reduce_sum(tf.square(tf.gather(vectors, tf.maximum(query, 0))))
    )
    return nll, reg, count
