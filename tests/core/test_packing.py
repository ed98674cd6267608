"""Bit fields and varints: every run of values reads back exactly; short input is refused."""

from __future__ import annotations

import numpy as np
import pytest

from metarec.core.packing import (
    bit_lengths,
    pack_bits,
    read_varints,
    unpack_bits,
    unzigzag,
    varints,
    zigzag,
)


def test_runs_of_bit_fields_and_varints_read_back_exactly() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        counts = rng.integers(0, 12, int(rng.integers(1, 30)))
        values = rng.integers(0, 2 ** int(rng.integers(1, 56)), int(counts.sum()), dtype=np.uint64)
        widths = np.array(
            [
                int(bit_lengths(values[lo : lo + c]).max(initial=1))
                for lo, c in zip(np.cumsum(counts) - counts, counts, strict=True)
            ]
        )
        packed = pack_bits(values, counts, widths)
        assert [len(p) for p in packed] == (-(-counts * widths // 8)).tolist()
        assert np.array_equal(unpack_bits(packed, counts, widths), values)
        assert np.array_equal(read_varints(varints(values, counts), counts), values)


def test_zigzag_keeps_small_magnitudes_small_and_inverts() -> None:
    signed = np.array([0, -1, 1, -2, 2**62, -(2**63)], np.int64)
    assert zigzag(signed).view(np.uint64)[:4].tolist() == [0, 1, 2, 3]
    assert np.array_equal(unzigzag(zigzag(signed).view(np.uint64)), signed)


def test_short_input_is_refused() -> None:
    counts = np.array([3])
    runs = varints(np.array([1, 300, 70_000], np.uint64), counts)
    with pytest.raises(ValueError, match="truncated"):
        read_varints([runs[0][:-1]], counts)
    packed = pack_bits(np.array([1, 2, 3], np.uint64), counts, np.array([20]))
    with pytest.raises(ValueError, match="truncated"):
        unpack_bits([packed[0][:-2]], counts, np.array([20]))
