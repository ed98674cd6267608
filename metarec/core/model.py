"""The meta-model: the shared parameters every user's adaptation starts from.

A :class:`MetaModel` is plain numpy arrays plus the id vocabularies they are indexed by, so
the consumer loads and serves it without TensorFlow. It holds

* item embeddings ``E``, biases ``b``, context vectors ``C`` and how many interactions each
  item had in training (``item_count``);
* the item feature mapping ``G`` (embedding, bias and context per feature): an item's
  serving vector blends its own embedding with the mean of its feature vectors,
  ``v_i = (n_i e_i + c G(x_i)) / (n_i + c)``, so cold items are recommendable from features;
* the user prior ``θ0(u) = θ0[g] + M_g·Σ_p A_p·pool_p(h_u) + mean(W_u[x_u])``: a
  per-domain initialization, recency-weighted pools of the context vectors of the user's
  recent items in every domain (one pool per time scale ``p``, each with learned weights by
  age) mapped by ``A_p`` into one user vector, which the per-domain *adaptation mapping*
  ``M_g`` carries into domain ``g`` (so what a user did in one domain informs their first
  events in another), and the user's profile features;
* Meta-SGD per-dimension step sizes ``α``, the proximal strength ``λ``, and the weights
  ``β[c, s]`` of the trending prior in the score: one per trending channel ``s``
  (:mod:`metarec.core.trending`) and per *history bucket* ``c`` of the user (how many events
  their history holds in the domain they act in: 0, 1, 2-3, 4-7, ..., see
  :func:`history_buckets`), so the model
  learns which popularity a brand-new user follows and how much an established one still
  does;
* every item's nearest items by co-consumption in the training window
  (:mod:`metarec.core.neighbors`), whose votes from the user's recent items enter the score with
  learned age weights and a learned weight per history bucket ``γ[c]``;
* the factors by which blend calibration (:mod:`metarec.training.calibration`) rescaled
  each part's weight per bucket after training (``blend_scales``; the weights above
  include them).

With ``meta=False`` the same structure describes the ablation: no mappings, ``θ0 = 0`` and
fixed step sizes.

>>> m = MetaModel.initial(dim=4, seed=0)
>>> m.version, m.dim, m.history_length
(0, 4, 50)
>>> import io
>>> buf = io.BytesIO(); m.save(buf); _ = buf.seek(0)
>>> MetaModel.load(buf).theta0.shape
(1, 4)
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

import numpy as np
import numpy.typing as npt

from metarec.core.catalog import Catalog
from metarec.core.neighbors import N_NEIGHBORS, VOTERS, ItemNeighbors
from metarec.core.trending import CHANNELS
from metarec.errors import ModelError

__all__ = [
    "BLEND_PARTS",
    "FORMAT_VERSION",
    "HISTORY_BUCKETS",
    "ItemTables",
    "MetaModel",
    "history_buckets",
]

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]

#: Bumped when the artifact layout changes; loading an artifact of another format fails
#: loudly instead of serving garbage, except the older formats listed in READS.
FORMAT_VERSION = 5
#: History buckets of the per-user weights: 0, 1, 2-3, 4-7, 8-15, 16-31 and 32+ events.
HISTORY_BUCKETS = 7
#: The parts of a list's score, in the order of ``blend_scales``' columns.
BLEND_PARTS = ("user", "bias", "trend", "knn")
#: Formats this code reads, and the arrays each lacks (they load as ones, which scores as
#: that format did): format 3 weighed the user vector and the item bias by 1 whatever the
#: history length; format 4 had no blend calibration.
READS: dict[int, tuple[str, ...]] = {
    5: (),
    4: ("blend_scales",),
    3: ("user_weights", "bias_weights", "blend_scales"),
}
_MISSING_SHAPES = {
    "user_weights": (HISTORY_BUCKETS,),
    "bias_weights": (HISTORY_BUCKETS,),
    "blend_scales": (HISTORY_BUCKETS, len(BLEND_PARTS)),
}

_ARRAYS = (
    "item_emb",
    "item_bias",
    "item_ctx",
    "item_count",
    "feat_emb",
    "feat_bias",
    "feat_ctx",
    "theta0",
    "user_feat",
    "hist_map",
    "age_logits",
    "step",
    "domain_map",
    "trend_weights",
    "knn_index",
    "knn_weight",
    "knn_age_logits",
    "knn_weights",
    "user_weights",
    "bias_weights",
    "blend_scales",
)


def history_buckets(n_events: npt.ArrayLike) -> I64:
    """Bucket of each history length: 0, 1, 2-3, 4-7, ... (its bit length), capped.

    >>> history_buckets([0, 1, 2, 3, 4, 7, 8, 50]).tolist()
    [0, 1, 2, 2, 3, 3, 4, 6]
    """
    n = np.maximum(np.asarray(n_events, np.int64), 0)
    bits = np.floor(np.log2(np.maximum(n, 1))).astype(np.int64) + 1
    out: I64 = np.minimum(np.where(n > 0, bits, 0), HISTORY_BUCKETS - 1)
    return out


@dataclass(frozen=True)
class ItemTables:
    """What serving needs per catalog item, derived from a model and a catalog.

    ``vectors`` score items (``V θ + bias``); ``context`` is what a user's history pools;
    ``neighbors`` are each item's nearest items, in catalog indices. Rows follow the
    catalog's indices, including items the model has never seen (they get their feature
    mapping alone, and no neighbours).
    """

    vectors: F32
    bias: F32
    context: F32
    neighbors: ItemNeighbors | None = None

    def __len__(self) -> int:
        return int(self.vectors.shape[0])

    def extend(self, more: ItemTables) -> ItemTables:
        """These rows followed by ``more``'s (for items added to the catalog since)."""
        nb = None
        if self.neighbors is not None and more.neighbors is not None:
            a, b = self.neighbors, more.neighbors
            nb = ItemNeighbors(np.vstack([a.index, b.index]), np.vstack([a.weight, b.weight]))
        return ItemTables(
            np.vstack([self.vectors, more.vectors]),
            np.concatenate([self.bias, more.bias]),
            np.vstack([self.context, more.context]),
            nb,
        )


@dataclass
class MetaModel:
    """Shared parameters of metarec, as numpy arrays. See the module docstring."""

    version: int
    item_ids: list[str]
    item_features: list[str]
    user_features: list[str]
    domains: list[str]
    item_emb: F32
    item_bias: F32
    item_ctx: F32
    item_count: F32
    feat_emb: F32
    feat_bias: F32
    feat_ctx: F32
    theta0: F32
    user_feat: F32
    hist_map: F32
    age_logits: F32
    step: F32
    domain_map: F32
    trend_weights: F32
    knn_index: npt.NDArray[np.int32]
    knn_weight: F32
    knn_age_logits: F32
    knn_weights: F32
    user_weights: F32
    bias_weights: F32
    #: Factors that blend calibration (:mod:`metarec.training.calibration`) applied to the
    #: trained weights of each part (columns: BLEND_PARTS) per history bucket. The weights
    #: above already include them; training divides them out to warm-start from what
    #: the loss learned.
    blend_scales: F32 = field(
        default_factory=lambda: np.ones((HISTORY_BUCKETS, len(BLEND_PARTS)), np.float32)
    )
    prox: float = 0.1
    inner_steps: int = 1
    negatives: int = 4
    blend: float = 10.0
    meta: bool = True
    info: dict[str, Any] = field(default_factory=dict)
    _item_index: dict[str, int] | None = field(default=None, repr=False, compare=False)
    _vocab_index: dict[str, dict[str, int]] = field(default_factory=dict, repr=False, compare=False)

    # -- construction ---------------------------------------------------------------

    @classmethod
    def initial(
        cls,
        dim: int = 32,
        *,
        history_length: int = 50,
        pools: int = 2,
        trend_channels: int = len(CHANNELS),
        domains: Sequence[str] = ("default",),
        step: float = 0.05,
        meta: bool = True,
        seed: int = 0,
    ) -> MetaModel:
        """A model that knows no items yet: the starting point of the first training."""
        if dim < 1 or history_length < 1:
            raise ModelError(
                f"dim and history_length must be positive, got {dim}, {history_length}"
            )
        rng = np.random.default_rng(seed)
        z = np.zeros
        return cls(
            version=0,
            item_ids=[],
            item_features=[],
            user_features=[],
            domains=list(domains),
            item_emb=z((0, dim), np.float32),
            item_bias=z(0, np.float32),
            item_ctx=z((0, dim), np.float32),
            item_count=z(0, np.float32),
            feat_emb=z((0, dim), np.float32),
            feat_bias=z(0, np.float32),
            feat_ctx=z((0, dim), np.float32),
            theta0=z((len(domains), dim), np.float32),
            user_feat=z((0, dim), np.float32),
            hist_map=np.stack(
                [np.eye(dim) + 0.01 * rng.standard_normal((dim, dim)) for _ in range(pools)]
            ).astype(np.float32)
            if meta
            else z((pools, dim, dim), np.float32),
            age_logits=z((pools, history_length), np.float32),
            step=np.full(dim, step, np.float32),
            meta=meta,
            domain_map=np.stack([np.eye(dim, dtype=np.float32)] * len(domains)),
            trend_weights=z((HISTORY_BUCKETS, trend_channels), np.float32),
            knn_index=z((0, N_NEIGHBORS), np.int32),
            knn_weight=z((0, N_NEIGHBORS), np.float32),
            knn_age_logits=z(VOTERS, np.float32),
            knn_weights=z(HISTORY_BUCKETS, np.float32),
            user_weights=np.ones(HISTORY_BUCKETS, np.float32),
            bias_weights=np.ones(HISTORY_BUCKETS, np.float32),
        )

    @property
    def dim(self) -> int:
        return int(self.theta0.shape[1])

    @property
    def history_length(self) -> int:
        return int(self.age_logits.shape[1])

    def item_index(self, item: str) -> int:
        """Row of ``item`` in the item arrays, or -1 if the model has not learned it."""
        if self._item_index is None:
            self._item_index = {name: i for i, name in enumerate(self.item_ids)}
        return self._item_index.get(item, -1)

    @property
    def trend_channels(self) -> int:
        return int(self.trend_weights.shape[1])

    def with_blend_scales(self, scales: npt.ArrayLike) -> MetaModel:
        """This model with the parts' weights rescaled by ``scales`` (per bucket and part,
        BLEND_PARTS' order) instead of the current ``blend_scales``; ones give the weights
        training learned."""
        new = np.asarray(scales, np.float32).reshape(self.blend_scales.shape)
        ratio = new / self.blend_scales
        return replace(
            self,
            user_weights=(self.user_weights * ratio[:, 0]).astype(np.float32),
            bias_weights=(self.bias_weights * ratio[:, 1]).astype(np.float32),
            trend_weights=(self.trend_weights * ratio[:, 2:3]).astype(np.float32),
            knn_weights=(self.knn_weights * ratio[:, 3]).astype(np.float32),
            blend_scales=new,
            _item_index=self._item_index,
            _vocab_index=self._vocab_index,
        )

    def with_version(self, version: int) -> MetaModel:
        return replace(
            self, version=version, _item_index=self._item_index, _vocab_index=self._vocab_index
        )

    # -- serving tables ---------------------------------------------------------------

    def feature_matrix(
        self,
        features: Sequence[Iterable[str]],
        kind: str,
    ) -> tuple[I64, I64]:
        """CSR (row pointer, column) of feature strings against the ``"item"`` or ``"user"``
        feature vocabulary; unknown features drop."""
        index = self._vocab_index.get(kind)
        if index is None:  # built once per model: the consumer asks for every batch
            vocab = self.item_features if kind == "item" else self.user_features
            index = self._vocab_index[kind] = {name: i for i, name in enumerate(vocab)}
        ptr = [0]
        cols: list[int] = []
        for feats in features:
            cols.extend(j for j in (index.get(f, -1) for f in feats) if j >= 0)
            ptr.append(len(cols))
        return np.asarray(ptr, np.int64), np.asarray(cols, np.int64)

    def _feature_mean(self, table: F32, ptr: I64, cols: I64) -> F32:
        """Mean of ``table`` rows over each CSR row; zero for rows with no known feature."""
        n = len(ptr) - 1
        out = np.zeros((n, *table.shape[1:]), np.float32)
        counts = np.diff(ptr)
        if len(cols):
            rows = np.repeat(np.arange(n), counts)
            np.add.at(out, rows, table[cols])
            out[counts > 0] /= counts[counts > 0].reshape(-1, *([1] * (table.ndim - 1)))
        return out

    def item_tables(self, catalog: Catalog, start: int = 0) -> ItemTables:
        """Serving vectors for the items ``start ..`` of ``catalog``.

        Learned and feature parts are blended; a consumer whose catalog grew computes just
        the new rows and appends them.
        """
        n = len(catalog) - start
        rows = np.fromiter(
            (self.item_index(catalog.item_id(i)) for i in range(start, len(catalog))), np.int64, n
        )
        known = rows >= 0
        count = np.zeros(n, np.float32)
        count[known] = self.item_count[rows[known]]
        emb: F32 = np.zeros((n, self.dim), np.float32)
        bias: F32 = np.zeros(n, np.float32)
        ctx: F32 = np.zeros((n, self.dim), np.float32)
        emb[known] = self.item_emb[rows[known]]
        bias[known] = self.item_bias[rows[known]]
        ctx[known] = self.item_ctx[rows[known]]
        if self.meta:
            ptr, cols = self.feature_matrix(catalog.features[start:], "item")
            w_own = (count / (count + self.blend))[:, None]
            emb = (w_own * emb + (1 - w_own) * self._feature_mean(self.feat_emb, ptr, cols)).astype(
                np.float32
            )
            ctx = (w_own * ctx + (1 - w_own) * self._feature_mean(self.feat_ctx, ptr, cols)).astype(
                np.float32
            )
            bias = (
                w_own[:, 0] * bias
                + (1 - w_own[:, 0]) * self._feature_mean(self.feat_bias, ptr, cols)
            ).astype(np.float32)
        return ItemTables(emb, bias, ctx, self._neighbors(catalog, rows))

    def _neighbors(self, catalog: Catalog, rows: I64) -> ItemNeighbors:
        """The model's neighbour lists of the catalog items at ``rows`` (model rows, -1:
        unknown), with the neighbours renumbered into catalog indices."""
        out = ItemNeighbors.empty(len(rows), self.knn_index.shape[1])
        known = rows >= 0
        if not known.any() or not len(self.knn_index):
            return out
        to_catalog = np.fromiter(
            (catalog.get(item) for item in self.item_ids), np.int64, len(self.item_ids)
        )
        model_nb = self.knn_index[rows[known]]
        mapped = np.where(model_nb >= 0, to_catalog[np.maximum(model_nb, 0)], -1)
        out.index[known] = mapped
        out.weight[known] = np.where(mapped >= 0, self.knn_weight[rows[known]], 0.0)
        return out

    def profile_vectors(self, profiles: Sequence[Iterable[str]]) -> F32:
        """The profile term ``mean(W_u[x_u])`` for each user's feature strings."""
        if not self.meta or not len(self.user_features):
            return np.zeros((len(profiles), self.dim), np.float32)
        ptr, cols = self.feature_matrix(profiles, "user")
        return self._feature_mean(self.user_feat, ptr, cols)

    def domain_index(self, domain: str) -> int:
        """Row of θ0 for ``domain``; unknown domains share row 0 (the first domain)."""
        try:
            return self.domains.index(domain)
        except ValueError:
            return 0

    # -- persistence ------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        self.save(buf)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> MetaModel:
        return cls.load(io.BytesIO(data))

    def save(self, file: str | Path | IO[bytes]) -> None:
        """Write the artifact: one uncompressed ``.npz`` (fast to load, no pickle)."""
        header = {
            "format": FORMAT_VERSION,
            "version": self.version,
            "prox": self.prox,
            "inner_steps": self.inner_steps,
            "negatives": self.negatives,
            "blend": self.blend,
            "meta": self.meta,
            "info": self.info,
            "domains": self.domains,
            "item_features": self.item_features,
            "user_features": self.user_features,
        }
        arrays = {name: getattr(self, name) for name in _ARRAYS}
        ids = np.asarray(self.item_ids, dtype=np.str_) if self.item_ids else np.zeros(0, "U1")
        np.savez(
            file,
            header=np.frombuffer(json.dumps(header).encode(), np.uint8),
            item_ids=ids,
            **arrays,
        )

    @classmethod
    def load(cls, file: str | Path | IO[bytes]) -> MetaModel:
        """Read an artifact written by :meth:`save`; raises :class:`ModelError` if unusable."""
        try:
            with np.load(file, allow_pickle=False) as z:
                header = json.loads(z["header"].tobytes().decode())
                missing = READS.get(header.get("format", -1))
                if missing is None:
                    raise ModelError(
                        f"model artifact has format {header.get('format')}, "
                        f"this code reads formats {', '.join(map(str, sorted(READS)))}"
                    )
                arrays = {name: z[name] for name in _ARRAYS if name not in missing}
                arrays |= {name: np.ones(_MISSING_SHAPES[name], np.float32) for name in missing}
                ids = [str(s) for s in z["item_ids"].tolist()]
        except (OSError, KeyError, ValueError) as exc:
            raise ModelError(f"cannot read model artifact: {exc}") from exc
        return cls(
            version=int(header["version"]),
            item_ids=ids,
            item_features=list(header["item_features"]),
            user_features=list(header["user_features"]),
            domains=list(header["domains"]),
            prox=float(header["prox"]),
            inner_steps=int(header["inner_steps"]),
            negatives=int(header["negatives"]),
            blend=float(header["blend"]),
            meta=bool(header["meta"]),
            info=dict(header.get("info", {})),
            **arrays,
        )
