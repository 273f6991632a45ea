"""The on-disk support record: exact round trips, compactness, and refusal of damaged records."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from peft_cpl.tuner.codec import (
    FLAG_COLUMNS,
    FLAG_ROWS,
    SCHEME_BITMASK,
    SCHEME_EMPTY,
    SCHEME_FULL,
    SCHEME_RICE,
    CorruptRecordError,
    decode_support,
    encode_support,
)
from peft_cpl.tuner.support import Support, index_dtype

HEADER = 28  # prefix (12) + suffix (16), plus 8 bytes per dimension


def _record_parts(record: torch.Tensor) -> tuple[int, int]:
    return int(record[5]), int(record[6])  # scheme, flags


def encode(indices: torch.Tensor, shape: tuple[int, ...], values: torch.Tensor) -> torch.Tensor:
    return encode_support(Support.of_indices(indices, shape), values)


def _support(numel: int, density: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    count = round(density * numel)
    return torch.sort(torch.randperm(numel, generator=generator)[:count]).values


@settings(max_examples=150, deadline=None)
@given(
    rows=st.integers(1, 97),
    cols=st.integers(1, 131),
    density=st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0)),
    seed=st.integers(0, 2**16),
)
def test_round_trip_is_exact_for_random_supports(rows, cols, density, seed):
    indices = _support(rows * cols, density, seed)
    values = torch.randn(indices.numel())
    record = encode(indices, (rows, cols), values)
    decoded = decode_support(record)
    assert decoded.support.shape == (rows, cols)
    assert decoded.support.indices.dtype == torch.int64 and decoded.support.rows is None
    assert torch.equal(decoded.support.indices.to(torch.int64), indices)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 64), cols=st.integers(1, 64), fraction=st.floats(0.0, 1.0), seed=st.integers(0, 2**16)
)
def test_round_trip_is_exact_for_whole_row_supports(rows, cols, fraction, seed):
    chosen = _support(rows, fraction, seed)
    indices = (chosen[:, None] * cols + torch.arange(cols)).reshape(-1)
    support = Support.of_rows(chosen, (rows, cols))
    assert torch.equal(support.indices, indices)
    record = encode_support(support, torch.zeros(indices.numel()))
    decoded = decode_support(record).support
    assert torch.equal(decoded.indices.to(torch.int64), indices) and torch.equal(decoded.rows, chosen)
    if 0 < chosen.numel() < rows and cols > 1:
        assert _record_parts(record)[1] & FLAG_ROWS
        assert record.numel() <= HEADER + 16 + math.ceil(rows / 8) + 8
    # the same coordinates given as elements stay elements: granularity is the support's, never re-detected
    assert decode_support(encode(indices, (rows, cols), torch.zeros(indices.numel()))).support.rows is None


@settings(max_examples=40, deadline=None)
@given(inputs=st.integers(1, 40), outputs=st.integers(1, 40), fraction=st.floats(0.0, 1.0), seed=st.integers(0, 99))
def test_round_trip_of_whole_output_columns_of_a_conv1d_weight(inputs, outputs, fraction, seed):
    chosen = _support(outputs, fraction, seed)  # Conv1D stores (in, out): output j is column j
    support = Support.of_rows(chosen, (inputs, outputs), output_dim=1)
    columns = (torch.arange(inputs)[:, None] * outputs + chosen).reshape(-1)
    assert torch.equal(support.indices, torch.sort(columns).values)
    record = encode_support(support, torch.zeros(support.size))
    decoded = decode_support(record).support
    assert decoded.output_dim == 1 and torch.equal(decoded.rows, chosen)
    assert torch.equal(decoded.indices, support.indices)
    if 0 < chosen.numel() < outputs and inputs > 1:
        assert _record_parts(record)[1] & FLAG_COLUMNS


@pytest.mark.parametrize("shape", [(7,), (3, 5, 2), (1, 1), (0, 4)])
def test_odd_shapes_round_trip(shape):
    numel = math.prod(shape)
    for density in (0.0, 0.3, 1.0):
        indices = _support(numel, density, 1)
        decoded = decode_support(encode(indices, shape, torch.zeros(indices.numel())))
        assert decoded.support.shape == shape
        assert torch.equal(decoded.support.indices.to(torch.int64), indices)


def test_empty_and_full_supports_take_no_payload():
    empty = encode(torch.zeros(0, dtype=torch.int64), (64, 64), torch.zeros(0))
    full = encode(torch.arange(64 * 64), (64, 64), torch.zeros(64 * 64))
    assert _record_parts(empty)[0] == SCHEME_EMPTY and _record_parts(full)[0] == SCHEME_FULL
    assert empty.numel() == full.numel() == HEADER + 16


def test_int32_int64_boundary():
    """Flat coordinates at and beyond 2^31 survive; the in-memory dtype switches to int64 only when needed."""
    assert index_dtype(2**31) == torch.int32 and index_dtype(2**31 + 1) == torch.int64
    shape = (2**16, 2**15 + 3)  # 2^31 + 196608 coordinates: encoded sparsely, never materialised
    edge = torch.tensor([0, 2**31 - 2, 2**31 - 1, 2**31, 2**31 + 1, math.prod(shape) - 1], dtype=torch.int64)
    decoded = decode_support(encode(edge, shape, torch.zeros(edge.numel())))
    assert decoded.support.indices.dtype == torch.int64
    assert torch.equal(decoded.support.indices, edge)
    small = torch.tensor([0, 2**31 - 1], dtype=torch.int64)
    decoded = decode_support(encode(small, (2**16, 2**15), torch.zeros(2)))
    assert index_dtype(math.prod(decoded.support.shape)) == torch.int32  # what the layer keeps them in
    assert decoded.support.indices.tolist() == [0, 2**31 - 1]


@pytest.mark.parametrize("density", [0.01, 0.03, 0.1, 0.25, 0.5, 0.75, 1.0])
def test_index_bytes_per_coordinate_near_the_entropy_bound(density):
    """Unstructured supports cannot beat log2(C(n, k)) bits; we stay within 0.15 bit of it, and at 0.5 byte or
    less from density 0.25 up (the issue's target is below the information bound under ~20% density)."""
    shape = (576, 1536)
    numel = math.prod(shape)
    indices = _support(numel, density, 7)
    record = encode(indices, shape, torch.zeros(indices.numel()))
    per_coordinate = (record.numel() - HEADER - 16) * 8 / indices.numel()
    p = indices.numel() / numel
    entropy = 0.0 if p in (0.0, 1.0) else -(p * math.log2(p) + (1 - p) * math.log2(1 - p)) * numel / indices.numel()
    assert per_coordinate <= entropy + 0.15
    if density >= 0.25:
        assert per_coordinate <= 4.0


def test_scheme_choice_and_clustered_supports():
    shape = (256, 256)
    sparse = encode(_support(65536, 0.01, 0), shape, torch.zeros(655))
    assert _record_parts(sparse)[0] == SCHEME_RICE
    # a clustered support (two dense blocks far apart) stays within the Elias-Fano bound 2 + log2(n/k) bits
    clustered = torch.cat([torch.arange(100, 1100), torch.arange(60000, 61000)])
    record = encode(clustered, shape, torch.zeros(2000))
    assert torch.equal(decode_support(record).support.indices.to(torch.int64), clustered)
    assert (record.numel() - HEADER - 16) * 8 <= 2000 * (2 + math.log2(65536 / 2000)) + 16
    half = _support(65536, 0.5, 0)
    assert _record_parts(encode(half, shape, torch.zeros(half.numel())))[0] in (SCHEME_BITMASK, SCHEME_RICE)


def test_corruption_is_detected():
    indices = _support(4096, 0.05, 3)
    record = encode(indices, (64, 64), torch.zeros(indices.numel()))
    flipped = record.clone()
    flipped[-3] ^= 0x10
    with pytest.raises(CorruptRecordError, match="checksum"):
        decode_support(flipped)
    with pytest.raises(CorruptRecordError):
        decode_support(record[: len(record) // 2])
    with pytest.raises(CorruptRecordError, match="header"):
        decode_support(torch.zeros(40, dtype=torch.uint8))
    with pytest.raises(CorruptRecordError):
        decode_support(record[:10])


def test_values_checksum_is_recorded():
    indices = torch.tensor([1, 5, 9])
    values = torch.tensor([0.5, -1.0, 2.0])
    record = encode(indices, (4, 4), values)
    other = encode(indices, (4, 4), values + 1e-6)
    assert decode_support(record).values_crc != decode_support(other).values_crc
    assert np.array_equal(record[:-8].numpy(), other[:-8].numpy())  # only the values CRC differs
