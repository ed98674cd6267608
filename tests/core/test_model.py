"""The model artifact: feature blending, profiles, persistence."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from metarec.core.catalog import Catalog
from metarec.core.model import BLEND_PARTS, HISTORY_BUCKETS, MetaModel
from metarec.errors import ModelError


def _model_with_items() -> MetaModel:
    m = MetaModel.initial(2, history_length=4)
    m.item_ids = ["a", "b"]
    m.item_emb = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    m.item_ctx = m.item_emb.copy()
    m.item_bias = np.array([1.0, 2.0], np.float32)
    m.item_count = np.array([10.0, 0.0], np.float32)
    m.item_features = ["f1", "f2"]
    m.feat_emb = np.array([[0.0, 4.0], [2.0, 0.0]], np.float32)
    m.feat_ctx = m.feat_emb.copy()
    m.feat_bias = np.array([0.0, 4.0], np.float32)
    m.blend = 10.0
    return m


def test_blend_of_learned_embedding_and_feature_mapping() -> None:
    m = _model_with_items()
    cat = Catalog()
    cat.add("a", features=("f1",))
    cat.add("b", features=("f1", "f2"))
    cat.add("new", features=("f2", "unknown"))
    t = m.item_tables(cat)
    # a: n=10, c=10 -> half own, half G(f1)
    np.testing.assert_allclose(t.vectors[0], [0.5, 2.0])
    np.testing.assert_allclose(t.bias[0], 0.5)
    # b: never counted -> all features: mean(G[f1], G[f2])
    np.testing.assert_allclose(t.vectors[1], [1.0, 2.0])
    # a brand-new item is scored from its known features alone
    np.testing.assert_allclose(t.vectors[2], [2.0, 0.0])
    np.testing.assert_allclose(t.bias[2], 4.0)


def test_without_meta_items_unknown_to_the_model_are_zero() -> None:
    m = _model_with_items()
    m.meta = False
    cat = Catalog()
    cat.add("b")
    cat.add("new", features=("f2",))
    t = m.item_tables(cat)
    np.testing.assert_allclose(t.vectors, [[0.0, 1.0], [0.0, 0.0]])


def test_profile_vectors_average_known_features() -> None:
    m = MetaModel.initial(2)
    m.user_features = ["g:F", "age:18-24"]
    m.user_feat = np.array([[1.0, 0.0], [0.0, 3.0]], np.float32)
    got = m.profile_vectors([("g:F", "age:18-24"), ("zzz",), ()])
    np.testing.assert_allclose(got, [[0.5, 1.5], [0.0, 0.0], [0.0, 0.0]])


def test_save_load_round_trip_keeps_every_array() -> None:
    m = _model_with_items().with_version(7)
    m.info["device"] = "CPU:0"
    back = MetaModel.from_bytes(m.to_bytes())
    assert back.version == 7 and back.item_ids == ["a", "b"] and back.info == m.info
    for name in (
        "item_emb",
        "feat_emb",
        "theta0",
        "hist_map",
        "age_logits",
        "step",
        "user_weights",
    ):
        np.testing.assert_array_equal(getattr(back, name), getattr(m, name))


def test_corrupt_artifact_is_a_model_error() -> None:
    with pytest.raises(ModelError):
        MetaModel.from_bytes(b"not a model")


def test_100k_item_artifact_round_trips() -> None:
    rng = np.random.default_rng(0)
    m = MetaModel.initial(32)
    n = 100_000
    m.item_ids = [f"item-{i}" for i in range(n)]
    m.item_emb = rng.standard_normal((n, 32)).astype(np.float32)
    m.item_ctx = rng.standard_normal((n, 32)).astype(np.float32)
    m.item_bias = np.zeros(n, np.float32)
    m.item_count = np.ones(n, np.float32)
    back = MetaModel.from_bytes(m.to_bytes())
    assert back.item_index("item-99999") == 99_999
    np.testing.assert_array_equal(back.item_emb, m.item_emb)


def _artifact(model: MetaModel, fmt: int, drop: tuple[str, ...] = ()) -> bytes:
    """``model`` saved as an artifact of format ``fmt`` without the arrays ``drop``."""
    import io
    import json

    with np.load(io.BytesIO(model.to_bytes()), allow_pickle=False) as z:
        arrays = {name: z[name] for name in z.files if name not in drop}
    header = json.loads(arrays["header"].tobytes().decode()) | {"format": fmt}
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def test_a_format_3_artifact_loads_and_scores_as_it_did() -> None:
    m = MetaModel.initial(4, history_length=5)
    old = MetaModel.from_bytes(
        _artifact(m, 3, drop=("user_weights", "bias_weights", "blend_scales"))
    )
    # Format 3 weighed the user vector and the item bias by 1 at every history length.
    assert old.user_weights.tolist() == [1.0] * 7 == old.bias_weights.tolist()
    with pytest.raises(ModelError, match="format 2, this code reads formats 3, 4, 5"):
        MetaModel.from_bytes(_artifact(m, 2))


def test_a_format_4_artifact_loads_uncalibrated_and_scores_as_it_did() -> None:
    m = _weighted(MetaModel.initial(4, history_length=5))
    old = MetaModel.from_bytes(_artifact(m, 4, drop=("blend_scales",)))
    assert old.blend_scales.shape == (HISTORY_BUCKETS, len(BLEND_PARTS))
    assert (old.blend_scales == 1).all()
    np.testing.assert_array_equal(old.knn_weights, m.knn_weights)
    np.testing.assert_array_equal(old.trend_weights, m.trend_weights)


def _weighted(m: MetaModel) -> MetaModel:
    """``m`` with distinct weights for every part and bucket."""
    rng = np.random.default_rng(3)
    return replace(
        m,
        user_weights=rng.uniform(0.5, 2, HISTORY_BUCKETS).astype(np.float32),
        bias_weights=rng.uniform(0.5, 2, HISTORY_BUCKETS).astype(np.float32),
        trend_weights=rng.uniform(0.5, 2, m.trend_weights.shape).astype(np.float32),
        knn_weights=rng.uniform(0.5, 2, HISTORY_BUCKETS).astype(np.float32),
    )


def test_blend_scales_rescale_each_part_per_bucket_and_ones_give_back_the_trained_weights() -> None:
    m = _weighted(MetaModel.initial(4, history_length=5))
    scales = np.ones((HISTORY_BUCKETS, len(BLEND_PARTS)), np.float32)
    scales[2] = [0.5, 1.0, 2.0, 4.0]
    calibrated = m.with_blend_scales(scales)
    assert calibrated.user_weights[2] == pytest.approx(0.5 * m.user_weights[2])
    assert calibrated.bias_weights[2] == pytest.approx(m.bias_weights[2])
    np.testing.assert_allclose(calibrated.trend_weights[2], 2 * m.trend_weights[2])
    assert calibrated.knn_weights[2] == pytest.approx(4 * m.knn_weights[2])
    np.testing.assert_array_equal(calibrated.knn_weights[3], m.knn_weights[3])
    back = MetaModel.from_bytes(calibrated.to_bytes())  # the factors travel with the model
    np.testing.assert_array_equal(back.blend_scales, scales)
    trained = back.with_blend_scales(np.ones_like(scales))
    for name in ("user_weights", "bias_weights", "trend_weights", "knn_weights"):
        np.testing.assert_allclose(getattr(trained, name), getattr(m, name), rtol=1e-6)
