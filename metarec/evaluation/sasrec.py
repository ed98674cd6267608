"""SASRec: self-attentive sequential recommendation, a baseline refitted on the past.

Kang & McAuley (ICDM 2018) encode a user's recent items with causal self-attention and
score every item by the dot product of the last position's output with the item
embeddings. It is what a team would try today as "a sequence model", so metarec is judged
against it too. This implementation follows the paper's architecture (learned positional
embeddings, pre-normalised blocks of one-head causal attention and a ReLU feed-forward
layer, dropout, item embeddings shared between input and output) and trains with a
softmax over the true next item and shared uniform negatives, which later work found far
stronger than the paper's one negative per position (Klenitskiy & Vasilev, RecSys 2023).

Like :class:`~metarec.evaluation.baselines.EASE` it is refitted every ``refit_every``
learned events on everything learned so far (warm-started from the last fit; items new
since then start from small random vectors), and between fits it scores with the user's
current sequence, so a user's newest items count at once. Training runs in TensorFlow;
scoring is a numpy forward pass of one sequence, so the object holds numpy arrays only
(it pickles, and nothing of TensorFlow outlives a fit). Items learned since the last fit
have no embedding yet and, like items EASE never fitted, are ranked by global popularity
below every fitted item's score difference; a user with no positive event yet gets
first-event popularity (:class:`~metarec.evaluation.baselines.FirstPop`), as EASE's
newcomers do.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Any

import numpy as np
import numpy.typing as npt

from metarec.errors import ConfigError
from metarec.evaluation.baselines import FirstPop, tie_breaker
from metarec.evaluation.recommender import Interaction

__all__ = ["SASRec"]

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]

#: Added to masked attention logits (not -inf: a row with every key masked stays finite).
_MASKED = -1e9
_LN_EPS = 1e-6
_INITIAL = 64
#: Negatives are drawn in proportion to popularity to this power (word2vec's 0.75: the
#: popular items a model must tell apart are drawn often, the tail still now and then).
SAMPLING_POWER = 0.75


class SASRec:
    """Self-attentive sequential recommendation, refitted every ``refit_every`` events.

    Parameters
    ----------
    dim
        Embedding size.
    blocks
        Self-attention blocks.
    max_len
        Most recent items the encoder reads (training splits longer sequences into
        windows of this length).
    dropout
        Dropout rate while training.
    negatives
        Uniform negatives shared by a training batch, against which each position's true
        next item is scored by softmax.
    learning_rate, batch_size
        Adam's step size and the windows per step.
    epochs
        Passes over the learned sequences per fit (at least ``min_steps`` steps).
    min_steps
        Fewest steps of one fit.
    refit_every
        Learned events between two fits; the first fit happens after this many.
    seed
        Seeds initialisation, batches, negatives and dropout.

    Examples
    --------
    >>> rec = SASRec(dim=8, blocks=1, max_len=4, refit_every=40, min_steps=30, seed=0)
    >>> for t in range(40):
    ...     rec.learn_one(Interaction(user=t % 4, item=(t // 4) % 5, ts=t))
    >>> rec.fits, rec.score(user=0, ts=40, domain=0, n_items=5).shape
    (1, (5,))
    """

    def __init__(
        self,
        dim: int = 64,
        blocks: int = 2,
        max_len: int = 50,
        dropout: float = 0.2,
        negatives: int = 1024,
        learning_rate: float = 1e-3,
        batch_size: int = 128,
        epochs: float = 10.0,
        min_steps: int = 100,
        refit_every: int = 10_000,
        seed: int = 0,
    ):
        if min(dim, blocks, max_len, negatives, batch_size, refit_every) < 1:
            raise ConfigError(
                "dim, blocks, max_len, negatives, batch_size and refit_every must be >= 1"
            )
        if not 0.0 <= dropout < 1.0 or epochs <= 0 or learning_rate <= 0 or min_steps < 0:
            raise ConfigError("dropout must be in [0, 1); epochs and learning_rate > 0")
        self.dim = dim
        self.blocks = blocks
        self.max_len = max_len
        self.dropout = dropout
        self.negatives = negatives
        self.learning_rate = learning_rate
        self.batch_size = batch_size
        self.epochs = epochs
        self.min_steps = min_steps
        self.refit_every = refit_every
        self.seed = seed
        #: Fits so far, and the seconds each took.
        self.fits = 0
        self.fit_seconds: list[float] = []
        self._rng = np.random.default_rng(seed)
        self._first_pop = FirstPop()
        self._counts: F64 = np.zeros(_INITIAL)
        self._n_known = 0
        self._n_learned = 0
        # Per user: their positive items in order (a growable buffer and its length).
        self._hist: dict[int, tuple[I64, int]] = {}
        self._params: dict[str, F32] = {}
        self._n_fitted = 0  # items with an embedding: indices 0 .. _n_fitted-1
        # The encoded sequence of each user since the last fit (cleared by a fit).
        self._cache: dict[int, F32] = {}

    # -- Recommender protocol -------------------------------------------------------------

    def score(self, user: int, ts: int, domain: int, n_items: int) -> F64:
        hist = self._hist.get(user)
        out = tie_breaker(self._counts, self._first_pop, user, ts, domain, n_items, hist is None)
        if hist is None or not self._params:
            return out
        state = self._cache.get(user)
        if state is None:
            buf, length = hist
            state = self._cache[user] = self._encode(buf[max(0, length - self.max_len) : length])
        k = min(n_items, self._n_fitted)
        out[:k] += self._params["item"][1 : k + 1] @ state
        return out

    def learn_one(self, x: Interaction) -> None:
        self._n_learned += 1
        if x.weight > 0:
            self._first_pop.learn_one(x)
            if x.item >= self._counts.size:
                grown = np.zeros(max(x.item + 1, 2 * self._counts.size))
                grown[: self._counts.size] = self._counts
                self._counts = grown
            self._counts[x.item] += 1.0
            self._n_known = max(self._n_known, x.item + 1)
            buf, length = self._hist.get(x.user, (np.zeros(8, np.int64), 0))
            if length == buf.size:
                buf = np.concatenate([buf, np.zeros_like(buf)])
            buf[length] = x.item
            self._hist[x.user] = (buf, length + 1)
            self._cache.pop(x.user, None)
        if self._n_learned % self.refit_every == 0:
            self._fit()

    # -- training -----------------------------------------------------------------------

    def _windows(self) -> tuple[I64, I64]:
        """Every learned sequence cut into windows of ``max_len`` inputs and their next
        items, right-aligned, as item index + 1 (0 pads)."""
        inputs, targets = [], []
        length = self.max_len
        for buf, n in self._hist.values():
            seq = buf[:n] + 1
            for end in range(n - 1, 0, -length):
                start = max(0, end - length)
                window = np.zeros(length, np.int64)
                nxt = np.zeros(length, np.int64)
                window[length - (end - start) :] = seq[start:end]
                nxt[length - (end - start) :] = seq[start + 1 : end + 1]
                inputs.append(window)
                targets.append(nxt)
        if not inputs:
            return np.zeros((0, length), np.int64), np.zeros((0, length), np.int64)
        return np.stack(inputs), np.stack(targets)

    def _initial(self, n_items: int) -> dict[str, F32]:
        """Parameters for ``n_items`` items, the last fit's kept where they exist."""
        d, rng = self.dim, self._rng

        def normal(*shape: int) -> F32:
            return (rng.standard_normal(shape) / math.sqrt(d)).astype(np.float32)

        fresh: dict[str, F32] = {
            "item": normal(n_items + 1, d),
            "pos": normal(self.max_len, d),
            "final_g": np.ones(d, np.float32),
            "final_b": np.zeros(d, np.float32),
        }
        fresh["item"][0] = 0.0
        for b in range(self.blocks):
            for name in ("q", "k", "v", "w1", "w2"):
                fresh[f"{name}{b}"] = normal(d, d)
            for name in ("b1", "b2", "ln1_b", "ln2_b"):
                fresh[f"{name}{b}"] = np.zeros(d, np.float32)
            fresh[f"ln1_g{b}"] = np.ones(d, np.float32)
            fresh[f"ln2_g{b}"] = np.ones(d, np.float32)
        if self._params:
            old = self._params["item"]
            fresh["item"][: old.shape[0]] = old
            fresh.update({k: v for k, v in self._params.items() if k != "item"})
        return fresh

    def _fit(self) -> None:
        inputs, targets = self._windows()
        if not len(inputs):
            return
        from metarec.training.tensorflow_import import import_tensorflow

        tf = import_tensorflow()
        started = time.perf_counter()
        n_items = self._n_known
        params = self._initial(n_items)
        state = {k: tf.constant(v) for k, v in params.items()}
        zeros = {k: tf.zeros_like(v) for k, v in state.items()}
        moments = (zeros, dict(zeros))
        step_fn = _train_step(self.blocks, self.dim, self.dropout)
        steps = max(self.min_steps, math.ceil(self.epochs * len(inputs) / self.batch_size))
        tf_seed = self.seed * 1_000_003 + self.fits
        lr = tf.constant(self.learning_rate, tf.float32)
        # Negatives are drawn in proportion to popularity^SAMPLING_POWER, and every
        # logit is corrected by the log of its expected count (sampled softmax), so the
        # loss estimates the full softmax over the catalogue.
        weight = self._counts[:n_items] ** SAMPLING_POWER + 1e-3
        sample_p = weight / weight.sum()
        log_q = np.zeros(n_items + 1, np.float32)
        log_q[1:] = np.log(self.negatives * sample_p)
        log_q_t = tf.constant(log_q)
        for t in range(1, steps + 1):
            pick = self._rng.integers(0, len(inputs), min(self.batch_size, len(inputs)))
            negs = 1 + self._rng.choice(n_items, self.negatives, p=sample_p)
            state, m, v, _ = step_fn(
                state,
                *moments,
                tf.constant(inputs[pick]),
                tf.constant(targets[pick]),
                tf.constant(negs),
                tf.constant(float(t)),
                lr,
                tf.constant([tf_seed, t], tf.int64),
                log_q_t,
            )
            moments = (m, v)
        self._params = {k: v.numpy() for k, v in state.items()}
        self._n_fitted = n_items
        self._cache.clear()
        self.fits += 1
        self.fit_seconds.append(round(time.perf_counter() - started, 3))

    # -- scoring ------------------------------------------------------------------------

    def _encode(self, items: I64) -> F32:
        """The encoder's output at the newest of ``items`` (numpy, no dropout)."""
        p, d, length = self._params, self.dim, self.max_len
        seq = np.zeros(length, np.int64)
        # Items learned since the fit have no embedding: they read as padding.
        known = np.where(items < self._n_fitted, items + 1, 0)[-length:]
        seq[length - known.size :] = known
        mask = (seq > 0).astype(np.float32)[:, None]
        x = (p["item"][seq] * math.sqrt(d) + p["pos"]) * mask
        causal = np.tril(np.ones((length, length), bool)) & (seq > 0)[None, :]
        for b in range(self.blocks):
            h = _layer_norm(x, p[f"ln1_g{b}"], p[f"ln1_b{b}"])
            att = (h @ p[f"q{b}"]) @ (h @ p[f"k{b}"]).T / math.sqrt(d)
            att = np.where(causal, att, _MASKED)
            att = np.exp(att - att.max(axis=1, keepdims=True))
            att /= att.sum(axis=1, keepdims=True)
            x = (x + att @ (h @ p[f"v{b}"])) * mask
            h = _layer_norm(x, p[f"ln2_g{b}"], p[f"ln2_b{b}"])
            ffn = np.maximum(h @ p[f"w1{b}"] + p[f"b1{b}"], 0.0) @ p[f"w2{b}"] + p[f"b2{b}"]
            x = (x + ffn) * mask
        out: F32 = _layer_norm(x[-1:], p["final_g"], p["final_b"])[0].astype(np.float32)
        return out


def _layer_norm(x: F32, gain: F32, bias: F32) -> F32:
    mean = x.mean(axis=-1, keepdims=True)
    var = x.var(axis=-1, keepdims=True)
    out: F32 = (x - mean) / np.sqrt(var + _LN_EPS) * gain + bias
    return out


def _tf_encoder(blocks: int, dim: int, dropout: float) -> Any:
    """The encoder in TensorFlow: ``encode(params, inputs, seed)`` is every position's
    output, ``(batch, length, dim)``; with dropout 0 it is :meth:`SASRec._encode`'s."""
    from metarec.training.tensorflow_import import import_tensorflow

    tf = import_tensorflow()

    def norm(x: Any, gain: Any, bias: Any) -> Any:
        mean, var = tf.nn.moments(x, axes=[-1], keepdims=True)
        return (x - mean) / tf.sqrt(var + _LN_EPS) * gain + bias

    def drop(x: Any, seed: Any, k: int) -> Any:
        if dropout == 0.0:
            return x
        return tf.nn.experimental.stateless_dropout(
            x, dropout, seed=seed + tf.constant([0, 7919 * k], tf.int64)
        )

    def encode(p: dict[str, Any], inputs: Any, seed: Any) -> Any:
        length = tf.shape(inputs)[1]
        mask = tf.cast(inputs > 0, tf.float32)[..., None]
        x = tf.gather(p["item"], inputs) * math.sqrt(dim) + p["pos"][None, :length]
        x = drop(x, seed, 0) * mask
        causal = (
            tf.linalg.band_part(tf.ones([length, length]), -1, 0)[None]
            * tf.cast(inputs > 0, tf.float32)[:, None, :]
        )
        for b in range(blocks):
            h = norm(x, p[f"ln1_g{b}"], p[f"ln1_b{b}"])
            att = tf.matmul(h @ p[f"q{b}"], h @ p[f"k{b}"], transpose_b=True) / math.sqrt(dim)
            att = tf.where(causal > 0, att, _MASKED)
            att = drop(tf.nn.softmax(att, axis=-1), seed, 1 + 3 * b)
            x = (x + drop(att @ (h @ p[f"v{b}"]), seed, 2 + 3 * b)) * mask
            h = norm(x, p[f"ln2_g{b}"], p[f"ln2_b{b}"])
            ffn = tf.nn.relu(h @ p[f"w1{b}"] + p[f"b1{b}"]) @ p[f"w2{b}"] + p[f"b2{b}"]
            x = (x + drop(ffn, seed, 3 + 3 * b)) * mask
        return norm(x, p["final_g"], p["final_b"])

    return encode


@functools.cache
def _train_step(blocks: int, dim: int, dropout: float) -> Any:
    """One Adam step of the softmax loss, traced once per process and shape."""
    from metarec.training.tensorflow_import import import_tensorflow

    tf = import_tensorflow()
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    encode = _tf_encoder(blocks, dim, dropout)

    def loss_of(
        p: dict[str, Any], inputs: Any, targets: Any, negs: Any, seed: Any, log_q: Any
    ) -> Any:
        out = encode(p, inputs, seed)
        pos = tf.reduce_sum(out * tf.gather(p["item"], targets), axis=-1, keepdims=True)
        pos -= tf.gather(log_q, targets)[..., None]
        neg = tf.einsum("bld,nd->bln", out, tf.gather(p["item"], negs)) - tf.gather(log_q, negs)
        neg = tf.where(negs[None, None, :] == targets[..., None], _MASKED, neg)
        logits = tf.concat([pos, neg], axis=-1)
        nll = tf.reduce_logsumexp(logits, axis=-1) - logits[..., 0]
        valid = tf.cast(targets > 0, tf.float32)
        return tf.reduce_sum(nll * valid) / tf.maximum(tf.reduce_sum(valid), 1.0)

    def step(
        p: dict[str, Any],
        m: dict[str, Any],
        v: dict[str, Any],
        inputs: Any,
        targets: Any,
        negs: Any,
        t: Any,
        lr: Any,
        seed: Any,
        log_q: Any,
    ) -> Any:
        with tf.GradientTape() as tape:
            tape.watch(list(p.values()))
            loss = loss_of(p, inputs, targets, negs, seed, log_q)
        grads = tape.gradient(loss, p)
        new, new_m, new_v = {}, {}, {}
        for k, value in p.items():
            g = tf.convert_to_tensor(grads[k])
            new_m[k] = beta1 * m[k] + (1 - beta1) * g
            new_v[k] = beta2 * v[k] + (1 - beta2) * tf.square(g)
            step_k = lr * (new_m[k] / (1 - beta1**t)) / (tf.sqrt(new_v[k] / (1 - beta2**t)) + eps)
            new[k] = value - step_k
        # Padding stays zero, so it adds nothing to any position.
        new["item"] = tf.concat([tf.zeros_like(new["item"][:1]), new["item"][1:]], axis=0)
        return new, new_m, new_v, loss

    names = _param_names(blocks)
    params = {k: tf.TensorSpec(None, tf.float32) for k in names}
    ints = tf.TensorSpec(None, tf.int64)
    scalar = tf.TensorSpec(None, tf.float32)
    signature = [params, params, params, ints, ints, ints, scalar, scalar, ints, scalar]
    return tf.function(step, input_signature=signature)


def _param_names(blocks: int) -> list[str]:
    """Every parameter's name (the traced step's signature)."""
    per_block = ("q", "k", "v", "w1", "w2", "b1", "b2", "ln1_g", "ln1_b", "ln2_g", "ln2_b")
    return ["item", "pos", "final_g", "final_b"] + [
        f"{name}{b}" for b in range(blocks) for name in per_block
    ]
