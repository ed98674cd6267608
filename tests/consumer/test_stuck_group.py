"""consumer.stuck_group: a stuck group told apart from a spare member (pure logic)."""

from __future__ import annotations

from consumer.stuck_group import StuckGroup


def test_a_member_owning_nothing_while_nothing_is_applied_finds_the_group_stuck() -> None:
    watch = StuckGroup(after_s=30)
    assert not watch.observe(0, owns=False, waiting=10, applied=0)
    assert not watch.observe(29.9, owns=False, waiting=10, applied=0)
    assert watch.observe(30, owns=False, waiting=10, applied=0)
    assert watch.stuck_for(30) == 30


def test_a_spare_member_is_not_stuck_while_others_apply_events() -> None:
    watch = StuckGroup(after_s=30)
    for t in range(0, 120, 5):
        assert not watch.observe(t, owns=False, waiting=500, applied=t * 10)


def test_owning_a_partition_or_an_empty_topic_clears_the_clock() -> None:
    watch = StuckGroup(after_s=30)
    watch.observe(0, owns=False, waiting=10, applied=0)
    assert not watch.observe(31, owns=True, waiting=10, applied=0)
    assert watch.stuck_for(31) == 0
    assert not watch.observe(40, owns=False, waiting=10, applied=0)  # starts again
    assert not watch.observe(65, owns=False, waiting=0, applied=0)  # nothing waits
    assert not watch.observe(100, owns=False, waiting=10, applied=0)
    assert watch.observe(130, owns=False, waiting=10, applied=0)


def test_a_new_kafka_group_gets_the_whole_time_again() -> None:
    watch = StuckGroup(after_s=30)
    watch.observe(0, owns=False, waiting=10, applied=0)
    assert watch.observe(30, owns=False, waiting=10, applied=0)
    watch.moved(30)
    assert not watch.observe(59, owns=False, waiting=10, applied=0)
    assert watch.observe(60, owns=False, waiting=10, applied=0)
