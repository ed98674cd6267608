"""Meta-training: the numpy side of batching, the graph's agreement with serving, seeds."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from metarec.core.adaptation import UserBatch, adapt, prior
from metarec.core.catalog import Catalog
from metarec.core.model import HISTORY_BUCKETS
from metarec.core.trending import Channel, Trending
from metarec.core.window import TrainingData
from metarec.training.trainer import (
    CALIBRATION_PER_USER,
    JUDGED_PER_USER,
    SWITCH_WEIGHT,
    MetaTrainer,
    TrainingBatches,
    trend_snapshots,
)
from tests.training_data import tiny_training_data

# Processes, brokers or training: left out of `make test-fast`.
pytestmark = pytest.mark.slow

tf = pytest.importorskip("tensorflow")


_data = tiny_training_data


def test_trend_snapshots_are_the_learners_trending_counts_one_event_at_a_time() -> None:
    rng = np.random.default_rng(0)
    items = rng.integers(0, 5, 50)
    weights = np.where(rng.random(50) < 0.2, -1.0, 1.0).astype(np.float32)
    first = rng.random(50) < 0.3
    channels = (Channel("3", 3.0), Channel("30", 30.0), Channel("new", 30.0, True))
    snaps = trend_snapshots(items, weights, first, 5, channels, every=10)
    trend = Trending(channels)
    for k in range(5):
        np.testing.assert_allclose(snaps[k], trend.counts(5), rtol=1e-5, atol=1e-6)
        for q in range(10 * k, 10 * k + 10):
            trend.learn_many([items[q]], [weights[q]], [first[q]])


def test_batches_gather_support_query_and_consumed_items_of_the_same_user() -> None:
    data = _data()
    b = TrainingBatches(
        data,
        history_length=5,
        inner_events=2,
        query_length=3,
        negatives=2,
        rng=np.random.default_rng(0),
    )
    batch = b.sample(64)
    for row in range(64):
        user = batch["users"][row]
        own = data.items[data.users == user]
        hist = batch["hist_items"][row]
        hist = hist[hist >= 0]
        n_before = len(batch["consumed"][batch["consumed"][:, 0] == row])
        # The support is the newest part of what the user consumed before the query.
        np.testing.assert_array_equal(hist, own[:n_before][-5:])
        query = batch["query"][row]
        np.testing.assert_array_equal(query[query >= 0], own[n_before : n_before + 3])


def _same_second_data() -> TrainingData:
    """User 0 takes item 0, then items 1, 2 and 3 in one second, then item 4."""
    return dataclasses.replace(
        _data(n_events=40, n_users=1, n_items=8),
        items=np.r_[0, 1, 2, 3, 4, np.arange(35) % 8].astype(np.int64),
        ts=np.r_[0, 1000, 1000, 1000, 2000, 3000 + np.arange(35)].astype(np.int64),
    )


def _histories(batch: dict[str, np.ndarray]) -> list[list[int]]:
    return [[int(i) for i in row if i >= 0] for row in batch["hist_items"]]


def test_held_out_examples_read_only_the_history_before_their_timestamp() -> None:
    # The second's three events come in no known order, so a held-out example of any of
    # them reads item 0 alone, as the list it was scored against did.
    b = TrainingBatches(_same_second_data(), 4, 1, 1, 1, np.random.default_rng(0))
    q = np.arange(5)
    held_out = b.examples(q)
    hist = _histories(held_out)
    assert hist[:4] == [[], [0], [0], [0]]
    assert hist[4][0] == 0 and sorted(hist[4]) == [0, 1, 2, 3]  # the second in any order
    pairs = held_out["consumed"]
    assert [pairs[pairs[:, 0] == r, 1].tolist() for r in q] == hist
    assert held_out["bucket"].tolist() == b.buckets(q).tolist() == [0, 1, 1, 1, 3]
    assert held_out["query"][:, 0].tolist() == [0, 1, 2, 3, 4]


def test_training_examples_read_a_same_timestamp_run_in_a_fresh_random_order() -> None:
    orders = set()
    for seed in range(8):
        b = TrainingBatches(_same_second_data(), 4, 1, 1, 1, np.random.default_rng(seed))
        train = b.examples(np.arange(5), before_same_ts=False)
        hist = _histories(train)
        # The second's events follow item 0 one after another in some order, each
        # example reading those before it; item 4 follows the whole second.
        run = sorted([1, 2, 3], key=lambda item: len(hist[item]))
        assert [hist[item] for item in run] == [[0], [0, run[0]], [0, run[0], run[1]]]
        assert hist[0] == [] and sorted(hist[4]) == [0, 1, 2, 3]
        assert train["bucket"][run].tolist() == [1, 2, 2]
        orders.add(tuple(run))
    assert len(orders) > 1  # not the dump's order every time


def test_a_window_with_one_event_per_timestamp_keeps_its_order() -> None:
    data = _data()
    a = TrainingBatches(data, 6, 2, 3, 2, np.random.default_rng(0))
    b = TrainingBatches(data, 6, 2, 3, 2, np.random.default_rng(1))
    np.testing.assert_array_equal(a.order, np.lexsort((np.arange(len(data)), data.users)))
    np.testing.assert_array_equal(a.order, b.order)


def _graph(meta: bool = True, seed: int = 0):  # type: ignore[no-untyped-def]
    from metarec.training.meta_graph import MetaGraph

    data = _data()
    cfg = MetaTrainer(
        dim=8,
        history_length=6,
        inner_events=3,
        batch_size=32,
        negatives=2,
        meta=meta,
        seed=seed,
        cold_item_rate=0.0,
    )
    rng = np.random.default_rng(seed)
    batches = TrainingBatches(
        data, cfg.history_length, cfg.inner_events, cfg.query_length, cfg.negatives, rng
    )
    return MetaGraph(cfg, data, batches, None, rng), batches, data


def test_exported_model_serves_exactly_what_the_graph_trained() -> None:
    graph, batches, data = _graph()
    graph.train(batches, 20)
    model = graph.export(version=3)
    catalog = Catalog()
    for item, feats in zip(data.item_ids, data.item_features, strict=True):
        catalog.add(item, features=feats)
    tables = model.item_tables(catalog)
    raw = batches.sample(16)
    own = (graph.count / (graph.count + graph.cfg.blend)).astype(np.float32)
    raw["own_weight"] = own
    b = {k: tf.constant(v) for k, v in raw.items()}
    vec_tf, bias_tf, ctx_tf = (t.numpy() for t in graph.item_tables(b["own_weight"]))
    np.testing.assert_allclose(tables.vectors, vec_tf, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(tables.bias, bias_tf, rtol=1e-4, atol=1e-5)
    users = UserBatch(
        np.zeros((16, 8), np.float32),
        raw["hist_items"],
        raw["hist_weights"],
        raw["domains"],
        model.profile_vectors([data.user_features[u] for u in raw["users"]]),
    )
    theta0 = prior(model, tables, users)
    theta0_tf = graph._prior(b, tf.constant(ctx_tf)).numpy()
    np.testing.assert_allclose(theta0, theta0_tf, rtol=1e-4, atol=1e-5)
    # The inner loop: the graph's unrolled steps are the consumer's adapt(), event by event.
    delta = np.zeros_like(theta0)
    for j in range(3):
        col = -3 + j
        pos = raw["hist_items"][:, col]
        ok = pos >= 0
        stepped = adapt(
            model,
            tables,
            theta0,
            delta,
            np.maximum(pos, 0),
            raw["hist_weights"][:, col],
            raw["negatives"][:, j, :],
        )
        delta = np.where(ok[:, None], stepped, delta)
    delta_tf = graph._inner_loop(
        b, tf.constant(theta0_tf), tf.constant(vec_tf), tf.constant(bias_tf)
    ).numpy()
    np.testing.assert_allclose(delta, delta_tf, rtol=1e-3, atol=1e-5)


def test_training_lowers_the_query_loss() -> None:
    graph, batches, _ = _graph()
    first = graph.train(batches, 3)
    later = graph.train(batches, 150)
    assert later < first


def test_seeded_fits_repeat_exactly_and_log_the_device() -> None:
    data = _data()
    trainer = MetaTrainer(
        dim=8, history_length=6, inner_events=2, batch_size=32, max_steps=15, seed=3
    )
    a = trainer.fit(data)
    b = trainer.fit(data)
    np.testing.assert_array_equal(a.item_emb, b.item_emb)
    np.testing.assert_array_equal(a.step, b.step)
    assert a.info["device"] in {"CPU:0", "GPU:0"}
    c = MetaTrainer(
        dim=8, history_length=6, inner_events=2, batch_size=32, max_steps=15, seed=4
    ).fit(data)
    assert not np.array_equal(a.item_emb, c.item_emb)


def test_warm_start_keeps_items_by_id_and_ablation_has_no_mappings() -> None:
    data = _data()
    trainer = MetaTrainer(dim=8, history_length=6, inner_events=2, batch_size=32, max_steps=5)
    first = trainer.fit(data)
    second = MetaTrainer(
        dim=8, history_length=6, inner_events=2, batch_size=32, max_steps=1, learning_rate=1e-9
    ).fit(data, init=first, version=2)
    np.testing.assert_allclose(second.item_emb, first.item_emb, atol=1e-5)
    assert second.version == 2
    plain = MetaTrainer(dim=8, history_length=6, batch_size=32, max_steps=5, meta=False).fit(data)
    assert not plain.meta and plain.feat_emb.size == 0 and not plain.theta0.any()
    assert np.allclose(plain.step, plain.step[0])


def _domain_data(domains: list[int]) -> TrainingData:
    n = len(domains)
    return TrainingData(
        users=np.zeros(n, np.int64),
        items=np.arange(n, dtype=np.int64),
        ts=np.arange(n, dtype=np.int64),
        weights=np.ones(n, np.float32),
        domains=np.asarray(domains, np.int64),
        item_ids=[f"i{j}" for j in range(n)],
        item_features=[() for _ in range(n)],
        item_domains=np.asarray(domains, np.int64),
        user_ids=["u"],
        user_features=[()],
        domain_names=["a", "b"],
    )


def test_domain_switches_are_drawn_more_often() -> None:
    b = TrainingBatches(_domain_data([0] * 9 + [1]), 4, 1, 1, 1, np.random.default_rng(0))
    assert b.switch_p is not None
    assert b.switch_p[9] == SWITCH_WEIGHT * b.switch_p[0]


def test_one_domain_keeps_uniform_sampling() -> None:
    assert (
        TrainingBatches(_domain_data([0] * 10), 4, 1, 1, 1, np.random.default_rng(0)).switch_p
        is None
    )


def test_held_out_users_never_train_and_are_the_same_in_every_version() -> None:
    data = _data(n_events=3000, n_users=300)
    a = TrainingBatches(data, 6, 2, 3, 2, np.random.default_rng(0), holdout=0.2)
    b = TrainingBatches(data, 6, 2, 3, 2, np.random.default_rng(1), holdout=0.2)
    assert a.has_validation
    np.testing.assert_array_equal(a.valid_idx, b.valid_idx)
    held = set(data.users[a.valid_idx].tolist())
    assert 30 < len(held) < 90
    trained = set(a.sample(4096)["users"].tolist())
    assert not trained & held
    val = a.validation(500)
    # The newest events of the held-out users.
    assert set(val["users"].tolist()) <= held and len(val["users"]) == 500
    assert a.valid_idx[-500:].tolist() == sorted(a.valid_idx[-500:].tolist())


def test_calibration_examples_are_held_out_users_of_the_bucket_at_most_a_few_each() -> None:
    data = _data(n_events=3000, n_users=300)
    b = TrainingBatches(data, 6, 2, 3, 2, np.random.default_rng(0), holdout=0.2)
    held = set(data.users[b.valid_idx].tolist())
    seen = 0
    for bucket in range(HISTORY_BUCKETS):
        ex = b.calibration(bucket, 100)
        if ex is None:
            continue
        seen += 1
        assert set(ex["users"].tolist()) <= held
        assert (ex["bucket"] == bucket).all() and len(ex["users"]) <= 100
        assert np.bincount(ex["users"]).max() <= CALIBRATION_PER_USER
    assert seen >= 3


def test_the_judged_examples_are_each_held_out_users_newest_events_since_a_time() -> None:
    data = _data(n_events=3000, n_users=300)
    b = TrainingBatches(data, 6, 2, 3, 2, np.random.default_rng(0), holdout=0.2)
    since = int(data.ts[2000])
    late = b.valid_idx[data.ts[b.valid_idx] >= since]
    ex = b.validation_since(since, 10_000)
    assert ex is not None
    # Each held-out user's newest JUDGED_PER_USER events of the period, in time order.
    same_user_later = [((late > q) & (data.users[late] == data.users[q])).sum() for q in late]
    expected = [
        q for q, later in zip(late, same_user_later, strict=True) if later < JUDGED_PER_USER
    ]
    assert 0 < len(expected) < late.size  # some user had more than the cap
    assert ex["users"].tolist() == data.users[expected].tolist()
    assert np.bincount(ex["users"]).max() == JUDGED_PER_USER
    newest = b.validation_since(since, 5)
    assert newest is not None and newest["users"].tolist() == data.users[expected[-5:]].tolist()
    assert b.validation_since(int(data.ts.max()) + 1, 10) is None


def test_one_users_binge_is_a_few_of_the_judged_examples_not_most() -> None:
    data = _data(n_events=3000, n_users=300)
    b = TrainingBatches(data, 6, 2, 3, 2, np.random.default_rng(0), holdout=0.2)
    binger = int(data.users[b.valid_idx[0]])
    data.users[2500:] = binger  # the newest 500 events: one held-out user's session
    b = TrainingBatches(data, 6, 2, 3, 2, np.random.default_rng(0), holdout=0.2)
    ex = b.validation_since(int(data.ts[2000]), 10_000)
    assert ex is not None
    assert (ex["users"] == binger).sum() == JUDGED_PER_USER < len(ex["users"]) / 4


def test_score_parts_add_up_to_the_logits_the_graph_trains_on() -> None:
    graph, batches, _ = _graph()
    graph.train(batches, 10)
    examples = batches.examples(np.arange(40, 104))
    parts, consumed, _ = graph.score_parts(examples)
    logits = parts.sum(0).astype(np.float64)
    logits[consumed] = -np.inf
    lse = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
    losses = []
    for col in range(examples["query"].shape[1]):
        target = examples["query"][:, col]
        ok = (target >= 0) & ~consumed[np.arange(len(target)), np.maximum(target, 0)]
        rows = np.flatnonzero(ok)
        losses.extend(lse[rows] - logits[rows, target[rows]])
    assert np.mean(losses) == pytest.approx(graph.validation_loss(examples), rel=1e-4)


def test_a_judgement_is_a_softmax_and_a_top_k_over_the_given_items_alone() -> None:
    """Models of windows that start at different times know catalogs of different sizes:
    the verdict between them scores both over the same items."""
    graph, batches, data = _graph()
    graph.train(batches, 10)
    examples = batches.examples(np.arange(40, 104))
    parts, consumed, target = graph.score_parts(examples)
    items = np.arange(0, len(data.item_ids), 2)  # half the catalog
    logits = parts.sum(0).astype(np.float64)[:, items]
    logits[consumed[:, items]] = -np.inf
    column = {int(item): c for c, item in enumerate(items)}
    counted = [(e, column[int(t)]) for e, t in enumerate(target) if int(t) in column]
    assert 0 < len(counted) < len(target)  # targets outside the items do not count
    losses = [np.logaddexp.reduce(logits[e]) - logits[e, c] for e, c in counted]
    ranks = [int((logits[e] > logits[e, c]).sum()) for e, c in counted]
    loss, hits = graph.judge(examples, items, k=3)
    assert loss == pytest.approx(np.mean(losses), rel=1e-6)
    rank_of = {e: rank for (e, _), rank in zip(counted, ranks, strict=True)}
    assert hits.tolist() == [
        int(rank_of[e] < 3) if e in rank_of else -1 for e in range(len(target))
    ]
    assert 0 < (hits == 1).sum() < len(counted)
    loss, hits = graph.judge(examples, np.array([], np.int64), k=3)
    assert loss is None and (hits == -1).all()


def test_a_fit_calibrates_the_blend_and_the_next_fit_starts_from_the_trained_weights() -> None:
    from metarec.training.meta_graph import MetaGraph

    data = _data(n_events=4000, n_users=400)
    trainer = MetaTrainer(dim=8, history_length=6, inner_events=2, batch_size=64, max_steps=30)
    model = trainer.fit(data)
    assert model.info["blend_scales"] == np.round(model.blend_scales, 4).tolist()
    assert not np.allclose(model.blend_scales, 1.0)
    rng = np.random.default_rng(0)
    batches = TrainingBatches(data, 6, 2, trainer.query_length, trainer.negatives, rng)
    graph = MetaGraph(trainer, data, batches, model, rng)
    trained = model.with_blend_scales(np.ones_like(model.blend_scales))
    for param, name in (("knn_weights", "knn_weights"), ("user_w", "user_weights")):
        np.testing.assert_allclose(graph.params[param].numpy(), getattr(trained, name), rtol=1e-5)
    ablation = MetaTrainer(
        dim=8, history_length=6, inner_events=2, batch_size=64, max_steps=30, meta=False
    ).fit(data)
    assert (ablation.blend_scales == 1.0).all()


def test_training_stops_when_held_out_users_stop_improving() -> None:
    data = _data(n_events=4000, n_users=400)
    trainer = MetaTrainer(
        dim=8,
        history_length=6,
        inner_events=2,
        batch_size=64,
        check_every=5,
        patience=2,
        max_steps=300,
        learning_rate=0.1,
    )
    model = trainer.fit(data)
    assert model.info["validated"]
    assert 0 < model.info["steps"] < 300  # it stopped on its own, at a best checkpoint
    assert model.info["steps"] % 5 == 0
    few = MetaTrainer(
        dim=8, history_length=6, inner_events=2, batch_size=64, min_steps=7, max_steps=7
    ).fit(_data(n_events=300, n_users=20))
    assert not few.info["validated"] and few.info["steps"] == 7


def test_a_fit_in_a_fresh_process_writes_only_json_lines() -> None:
    """TensorFlow's C++ start-up lines would break one-JSON-object-per-line logs."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = (
        "from metarec.logs import configure_logging\n"
        "configure_logging('INFO', service='t')\n"
        "from tests.training_data import tiny_training_data\n"
        "from metarec.training.trainer import MetaTrainer\n"
        "MetaTrainer(dim=8, history_length=6, inner_events=2, batch_size=32,"
        " max_steps=3).fit(tiny_training_data())\n"
        "import logging; logging.getLogger('t').info('fitted')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).resolve().parents[2],
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert json.loads(lines[-1])["msg"] == "fitted"
    for line in lines:
        try:
            json.loads(line)
        except json.JSONDecodeError:
            pytest.fail(f"not a JSON line on stderr: {line!r}")


def test_every_training_step_reports_progress() -> None:
    """What keeps the aggregator's liveness probe green through a long cycle."""
    ticks: list[int] = []
    model = MetaTrainer(
        dim=8,
        history_length=6,
        inner_events=2,
        batch_size=32,
        max_steps=7,
        on_step=lambda: ticks.append(1),
    ).fit(_data())
    assert len(ticks) >= model.info["steps"] > 0  # steps: those that reached the best
