"""The TensorFlow side of meta-training: variables, one vectorized step, and export.

Kept apart from :mod:`metarec.training` so that the rest of metarec (and the consumer)
never imports TensorFlow. The forward pass mirrors :mod:`metarec.adaptation` and
:mod:`metarec.ranking` operation for operation; ``tests/test_meta_graph.py`` checks that the
exported numpy model scores exactly like the graph did.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import tensorflow as tf

from metarec.model import HISTORY_BUCKETS, MetaModel
from metarec.window import TrainingData

if TYPE_CHECKING:
    from metarec.training import MetaTrainer, TrainingBatches

__all__ = ["MetaGraph"]

F32 = npt.NDArray[np.float32]
_MASKED = -1e9
_EPS = 1e-6
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


class MetaGraph:
    """Variables and the training step for one :meth:`MetaTrainer.fit` call."""

    def __init__(self, cfg: MetaTrainer, data: TrainingData, batches: TrainingBatches,
                 init: MetaModel | None, rng: np.random.Generator) -> None:
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
            np.maximum(np.bincount(np.asarray(rows, np.int64), minlength=n), 1)
            .astype(np.float32)[:, None])
        self.has_feat = tf.constant(
            (np.bincount(np.asarray(rows, np.int64), minlength=n) > 0).astype(np.float32))
        self.count = np.bincount(data.items, minlength=n).astype(np.float32)
        self.user_vocab = sorted(batches.user_vocab, key=batches.user_vocab.__getitem__)
        self.domains = list(data.domain_names) or ["default"]
        self.snapshots = tf.constant(batches.snapshots)

        def normal(shape: tuple[int, ...]) -> F32:
            return (_INIT_SCALE * rng.standard_normal(shape)).astype(np.float32)

        emb, ctx, bias = normal((n, d)), normal((n, d)), np.zeros(n, np.float32)
        g_emb, g_ctx, g_bias = normal((len(feats), d)), normal((len(feats), d)), \
            np.zeros(len(feats), np.float32)
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
        n_scales = len(cfg.half_lives)
        trend = np.full((HISTORY_BUCKETS, n_scales), 1.0 / n_scales, np.float32)
        if init is not None and init.dim == d and init.age_logits.shape == age.shape:
            emb = _rows_by_name(self.item_ids, init.item_ids, init.item_emb, emb)
            ctx = _rows_by_name(self.item_ids, init.item_ids, init.item_ctx, ctx)
            bias = _rows_by_name(self.item_ids, init.item_ids, init.item_bias[:, None],
                                 bias[:, None])[:, 0]
            if init.meta and cfg.meta:
                g_emb = _rows_by_name(feats, init.item_features, init.feat_emb, g_emb)
                g_ctx = _rows_by_name(feats, init.item_features, init.feat_ctx, g_ctx)
                g_bias = _rows_by_name(feats, init.item_features, init.feat_bias[:, None],
                                       g_bias[:, None])[:, 0]
                theta0 = _rows_by_name(self.domains, init.domains, init.theta0, theta0)
                u_feat[:-1] = _rows_by_name(self.user_vocab, init.user_features,
                                            init.user_feat, u_feat[:-1])
                hist_map, age = init.hist_map.copy(), init.age_logits.copy()
                flat = _rows_by_name(self.domains, init.domains,
                                     init.domain_map.reshape(len(init.domains), -1),
                                     domain_map.reshape(len(self.domains), -1))
                domain_map = flat.reshape(domain_map.shape)
                log_step = np.log(np.maximum(init.step, 1e-6)).astype(np.float32)
                log_prox = np.float32(np.log(max(init.prox, 1e-6)))
            if init.trend_weights.shape == trend.shape:
                trend = init.trend_weights.copy()
        var = tf.Variable
        self.emb, self.ctx, self.bias = var(emb), var(ctx), var(bias)
        self.g_emb, self.g_ctx, self.g_bias = var(g_emb), var(g_ctx), var(g_bias)
        self.theta0, self.u_feat, self.hist_map = var(theta0), var(u_feat), var(hist_map)
        self.age, self.log_step = var(age), var(log_step)
        self.domain_map = var(domain_map)
        self.log_prox, self.trend = var(log_prox), var(trend)
        self.free_users = var(normal((len(data.user_ids), d)))
        if cfg.meta:
            self.trainable = [self.emb, self.ctx, self.bias, self.g_emb, self.g_ctx,
                              self.g_bias, self.theta0, self.u_feat, self.hist_map, self.age,
                              self.log_step, self.log_prox, self.trend, self.domain_map]
        else:
            self.trainable = [self.emb, self.bias, self.free_users, self.trend]
        self.optimizer = tf.keras.optimizers.Adam(cfg.learning_rate)
        spec = tf.TensorSpec
        signature = {
            "users": spec([None], tf.int64), "domains": spec([None], tf.int64),
            "profile": spec([None, None], tf.int64), "hist_items": spec([None, None], tf.int64),
            "hist_weights": spec([None, None], tf.float32), "query": spec([None, None], tf.int64),
            "consumed": spec([None, 2], tf.int64), "snap": spec([None], tf.int64),
            "decay": spec([None, None], tf.float32),
            "negatives": spec([None, None, None], tf.int64),
            "own_weight": spec([None], tf.float32), "bucket": spec([None], tf.int64),
        }
        self._step = tf.function(self._train_step, input_signature=[signature])

    # -- forward ------------------------------------------------------------------------

    def item_tables(self, own_weight: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """Serving vectors, biases and context vectors (the blend of model.item_tables)."""
        if not self.cfg.meta:
            return self.emb, self.bias, self.ctx
        n = len(self.item_ids)
        w = own_weight[:, None]

        def mean(table: tf.Variable) -> tf.Tensor:
            summed = tf.math.unsorted_segment_sum(tf.gather(table, self.feat_cols),
                                                  self.feat_rows, n)
            return summed / self.feat_count

        vectors = w * self.emb + (1 - w) * mean(self.g_emb)
        context = w * self.ctx + (1 - w) * mean(self.g_ctx)
        g_bias = tf.squeeze(mean(self.g_bias[:, None]), 1)
        bias = own_weight * self.bias + (1 - own_weight) * g_bias
        return vectors, bias, context

    def _prior(self, b: dict[str, tf.Tensor], context: tf.Tensor) -> tf.Tensor:
        items = b["hist_items"]
        valid = tf.cast(items >= 0, tf.float32)
        ctx = tf.gather(context, tf.maximum(items, 0))
        age_weight = tf.exp(tf.reverse(self.age, [1]))
        hist_w = b["hist_weights"] * valid
        pooled = 0.0
        for p in range(len(self.cfg.pool_decays)):
            w = hist_w * age_weight[p]
            pool = tf.einsum("bl,bld->bd", w, ctx) / (
                tf.reduce_sum(tf.abs(w), axis=1, keepdims=True) + _EPS)
            pooled += pool @ self.hist_map[p]
        prof_idx = b["profile"]
        prof_ok = tf.cast(prof_idx >= 0, tf.float32)
        prof_idx = tf.where(prof_idx >= 0, prof_idx, len(self.user_vocab))
        prof = tf.reduce_sum(tf.gather(self.u_feat, prof_idx) * prof_ok[..., None], 1)
        prof = prof / tf.maximum(tf.reduce_sum(prof_ok, 1, keepdims=True), 1.0)
        mapped = tf.einsum("bd,bde->be", pooled, tf.gather(self.domain_map, b["domains"]))
        return tf.gather(self.theta0, b["domains"]) + mapped + prof

    def _inner_loop(self, b: dict[str, tf.Tensor], theta0: tf.Tensor, vectors: tf.Tensor,
                    bias: tf.Tensor) -> tf.Tensor:
        """The consumer's pairwise Meta-SGD steps over the newest support events."""
        step, prox = tf.exp(self.log_step), tf.exp(self.log_prox)
        delta = tf.zeros_like(theta0)
        s = self.cfg.inner_events
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
            grad = tf.einsum("bn,bnd->bd", coeff, dv) / float(self.cfg.negatives) + prox * delta
            delta = delta - ok * step * grad
        return delta

    def _train_step(self, b: dict[str, tf.Tensor]) -> tf.Tensor:
        with tf.GradientTape() as tape:
            vectors, bias, context = self.item_tables(b["own_weight"])
            if self.cfg.meta:
                theta0 = self._prior(b, context)
                theta = theta0 + self._inner_loop(b, theta0, vectors, bias)
            else:
                theta = tf.gather(self.free_users, b["users"])
            # The trending prior, weighted per history bucket (the ablation: one weight set).
            pop = tf.gather(self.snapshots, b["snap"]) * b["decay"][:, :, None]
            bucket = b["bucket"] if self.cfg.meta else tf.zeros_like(b["bucket"])
            beta = tf.gather(self.trend, bucket)
            logits = theta @ tf.transpose(vectors) + bias + tf.einsum(
                "bs,bsn->bn", beta, tf.math.log1p(pop))
            masked = tf.fill(tf.shape(b["consumed"])[:1], tf.constant(_MASKED, tf.float32))
            logits = tf.tensor_scatter_nd_update(logits, b["consumed"], masked)
            lse = tf.reduce_logsumexp(logits, axis=1, keepdims=True)
            query = b["query"]
            target = tf.gather(logits, tf.maximum(query, 0), batch_dims=1)
            # A repeat of a consumed item is masked like the rest: it is not a target.
            ok = tf.cast((query >= 0) & (target > _MASKED / 2), tf.float32)
            nll = tf.reduce_sum((lse - target) * ok) / tf.maximum(tf.reduce_sum(ok), 1.0)
            reg = self.cfg.l2 * (tf.reduce_sum(tf.square(theta)) + tf.reduce_sum(
                tf.square(tf.gather(vectors, tf.maximum(query, 0)))))
            loss = nll + reg
        grads = tape.gradient(loss, self.trainable)
        self.optimizer.apply_gradients(zip(grads, self.trainable, strict=True))
        return nll

    # -- loop and export ----------------------------------------------------------------

    def _own_weight(self) -> F32:
        """Blend weight of each item's own embedding, with some items made cold on purpose.

        Treating a random share of items as never seen trains the feature mapping to stand
        on its own, which is what a brand-new item will need.
        """
        w = self.count / (self.count + self.cfg.blend)
        cold = self.rng.random(len(w)) < self.cfg.cold_item_rate
        return np.where(cold, 0.0, w).astype(np.float32)

    def train(self, batches: TrainingBatches, steps: int) -> float:
        losses: list[float] = []
        for _ in range(steps):
            raw: dict[str, Any] = batches.sample(self.cfg.batch_size)
            raw["own_weight"] = self._own_weight()
            b = {k: tf.constant(v) for k, v in raw.items()}
            losses.append(float(self._step(b)))
        tail = losses[-max(1, len(losses) // 10):]
        return float(np.mean(tail))

    def export(self, version: int) -> MetaModel:
        cfg = self.cfg
        meta = cfg.meta
        d = cfg.dim
        empty = np.zeros((0, d), np.float32)
        return MetaModel(
            version=version,
            item_ids=self.item_ids,
            item_features=self.item_vocab if meta else [],
            user_features=self.user_vocab if meta else [],
            domains=self.domains,
            item_emb=self.emb.numpy(), item_bias=self.bias.numpy(),
            item_ctx=self.ctx.numpy() if meta else np.zeros_like(self.emb.numpy()),
            item_count=self.count,
            feat_emb=self.g_emb.numpy() if meta else empty,
            feat_bias=self.g_bias.numpy() if meta else np.zeros(0, np.float32),
            feat_ctx=self.g_ctx.numpy() if meta else empty,
            theta0=self.theta0.numpy() if meta else np.zeros((len(self.domains), d),
                                                                np.float32),
            user_feat=self.u_feat.numpy()[:-1] if meta else empty,
            hist_map=self.hist_map.numpy() if meta else np.zeros_like(self.hist_map.numpy()),
            age_logits=self.age.numpy(),
            step=np.exp(self.log_step.numpy()) if meta else np.full(d, cfg.step_init,
                                                                    np.float32),
            domain_map=self.domain_map.numpy(),
            prox=float(np.exp(self.log_prox.numpy())) if meta else 0.1,
            trend_weights=self.trend.numpy() if meta else np.tile(self.trend.numpy()[:1],
                                                                  (HISTORY_BUCKETS, 1)),
            inner_steps=1, negatives=cfg.negatives, blend=cfg.blend, meta=meta,
        )
