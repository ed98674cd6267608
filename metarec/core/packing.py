"""Compact integer encodings for runs of values, a whole batch of runs at a time.

A batch of user states is encoded in one pass: each state's values form a *run* (``counts``
says how many values each run has, laid end to end), and every function here handles all
runs with a few numpy calls instead of a loop per run. Two encodings: fixed-width bit
fields (:func:`pack_bits`; the width chosen per run) and LEB128 varints (:func:`varints`),
with zig-zag for signed values.

>>> import numpy as np
>>> counts = np.array([2, 1])
>>> values = np.array([5, 300, 7], np.uint64)
>>> packed = pack_bits(values, counts, np.array([9, 3]))
>>> [len(run) for run in packed], unpack_bits(packed, counts, np.array([9, 3])).tolist()
([3, 1], [5, 300, 7])
>>> read_varints(varints(values, counts), counts).tolist()
[5, 300, 7]
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

__all__ = [
    "bit_lengths",
    "bounds",
    "pack_bits",
    "read_varint",
    "read_varints",
    "row_max",
    "starts",
    "unpack_bits",
    "unzigzag",
    "unzigzag_int",
    "varint",
    "varints",
    "zigzag",
]


def starts(counts: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """Where each of consecutive runs of ``counts`` starts."""
    out = np.zeros(counts.size, np.int64)
    np.cumsum(counts[:-1], out=out[1:])
    return out


def bounds(sizes: npt.NDArray[np.int64]) -> list[int]:
    """Where consecutive runs of ``sizes`` start, and where the last ends."""
    out = np.zeros(sizes.size + 1, np.int64)
    np.cumsum(sizes, out=out[1:])
    bounds: list[int] = out.tolist()
    return bounds


def row_max(
    values: npt.NDArray[np.uint64], counts: npt.NDArray[np.int64], n: int
) -> npt.NDArray[np.uint64]:
    """The largest of each row's run of ``values`` (0 for an empty row)."""
    out = np.zeros(n, np.uint64)
    full = counts > 0
    if full.any():
        out[full] = np.maximum.reduceat(values, starts(counts)[full])
    return out


def bit_lengths(values: npt.NDArray[np.uint64]) -> npt.NDArray[np.int64]:
    """Bits each value needs (at least 1; one more than needed for a few values past
    2**53, where float64 rounds up, which only widens the field)."""
    bits: npt.NDArray[np.int64] = np.frexp(values.astype(np.float64))[1].astype(np.int64)
    return np.maximum(bits, 1)


def pack_bits(
    values: npt.NDArray[np.uint64], counts: npt.NDArray[np.int64], bits: npt.NDArray[np.int64]
) -> list[bytes]:
    """Each row's run of ``values``, ``bits[row]`` bits apiece, least significant first,
    padded to whole bytes (at most 56 bits a value)."""
    n = counts.size
    row_bits = counts * bits
    row_bytes = -(-row_bits // 8)
    total = int(row_bytes.sum())
    if not total:
        return [b""] * n
    per_value = np.repeat(bits, counts)
    if per_value.max() > 56:
        raise ValueError("a value wider than 56 bits")
    within = np.arange(values.size) - np.repeat(starts(counts), counts)
    first_bit = np.repeat(8 * starts(row_bytes), counts) + within * per_value
    # Value k's bits, shifted into place, span the 8 bytes from its first byte on; the
    # values' bit ranges never overlap, so adding the bytes up is OR-ing them.
    shifted = values << (first_bit & 7).astype(np.uint64)
    spread = shifted.astype("<u8").view(np.uint8).reshape(-1, 8)
    where = (first_bit >> 3)[:, None] + np.arange(8)
    packed = np.bincount(where.ravel(), weights=spread.ravel(), minlength=total + 8)
    raw = packed[:total].astype(np.uint8).tobytes()
    at = bounds(row_bytes)
    return [raw[at[r] : at[r + 1]] for r in range(n)]


def unpack_bits(
    chunks: Sequence[bytes], counts: npt.NDArray[np.int64], bits: npt.NDArray[np.int64]
) -> npt.NDArray[np.uint64]:
    """The inverse of :func:`pack_bits`: every row's values, concatenated."""
    total = int(counts.sum())
    if not total:
        return np.zeros(0, np.uint64)
    stream = np.frombuffer(b"".join(chunks) + bytes(8), np.uint8)
    sizes = np.fromiter((len(c) for c in chunks), np.int64, len(chunks))
    per_value = np.repeat(bits, counts)
    if per_value.max() > 56:
        raise ValueError("a packed field wider than 56 bits")
    within = np.arange(total) - np.repeat(starts(counts), counts)
    first_bit = np.repeat(8 * starts(sizes), counts) + within * per_value
    if first_bit[-1] + per_value[-1] > 8 * (stream.size - 8):
        raise ValueError("truncated: packed fields end early")
    words = stream[(first_bit >> 3)[:, None] + np.arange(8)].view("<u8").ravel()
    mask = (np.uint64(1) << per_value.astype(np.uint64)) - np.uint64(1)
    out: npt.NDArray[np.uint64] = (words >> (first_bit & 7).astype(np.uint64)) & mask
    return out


def varints(values: npt.NDArray[np.uint64], counts: npt.NDArray[np.int64]) -> list[bytes]:
    """Each row's run of ``values`` as LEB128 varints (7 bits a byte, high bit: more)."""
    n = counts.size
    if not values.size:
        return [b""] * n
    size = (bit_lengths(values) + 6) // 7
    width = int(size.max())
    groups = np.arange(width, dtype=np.uint64) * np.uint64(7)
    sevens = ((values[:, None] >> groups) & np.uint64(0x7F)).astype(np.uint8)
    sevens[np.arange(width) < size[:, None] - 1] |= 0x80
    flat = sevens[np.arange(width) < size[:, None]].tobytes()
    row_bytes = np.bincount(np.repeat(np.arange(n), counts), weights=size, minlength=n)
    at = bounds(row_bytes.astype(np.int64))
    return [flat[at[r] : at[r + 1]] for r in range(n)]


def read_varints(chunks: Sequence[bytes], counts: npt.NDArray[np.int64]) -> npt.NDArray[np.uint64]:
    """The inverse of :func:`varints`; a row whose bytes do not hold exactly its count of
    whole varints is refused (a truncated state ends inside its times)."""
    raw = np.frombuffer(b"".join(chunks), np.uint8)
    sizes = np.fromiter((len(c) for c in chunks), np.int64, len(chunks))
    ends = (raw & 0x80) == 0
    per_row = (
        np.bincount(np.repeat(np.arange(sizes.size), sizes)[ends], minlength=sizes.size)
        if raw.size
        else np.zeros(sizes.size, np.int64)
    )
    last_byte_ends = np.ones(sizes.size, bool)
    full = sizes > 0
    last_byte_ends[full] = ends[np.cumsum(sizes)[full] - 1]
    if not (np.array_equal(per_row, counts) and last_byte_ends.all()):
        raise ValueError("truncated: a run of varints ends early")
    if not raw.size:
        return np.zeros(0, np.uint64)
    end_at = np.flatnonzero(ends)
    begin = np.concatenate(([0], end_at[:-1] + 1))
    k = np.arange(raw.size) - np.repeat(begin, end_at - begin + 1)
    parts = (raw & 0x7F).astype(np.uint64) << (k.astype(np.uint64) * np.uint64(7))
    return np.add.reduceat(parts, begin).astype(np.uint64)


def zigzag(values: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """Signed to unsigned, small magnitudes small (as bits; read as uint64)."""
    return (values << 1) ^ (values >> 63)


def unzigzag(values: npt.NDArray[np.uint64]) -> npt.NDArray[np.int64]:
    one = np.uint64(1)
    return ((values >> one) ^ (np.uint64(0) - (values & one))).view(np.int64)


def unzigzag_int(value: int) -> int:
    return value >> 1 if not value & 1 else -((value + 1) >> 1)


def varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError(f"truncated: a varint runs past {len(data)} bytes")
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("a varint longer than 64 bits")
