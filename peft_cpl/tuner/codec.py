"""Compact, checked on-disk form of a sparse support: one uint8 record per module.

A record is a fixed header (magic, scheme, weight shape, count, CRC32 of the index payload and of the values) and a
payload encoding the sorted flat coordinates with the smallest of:

- EMPTY / FULL: no payload;
- BITMASK: one bit per coordinate of the weight (best above ~20% density);
- RICE: gaps between positions Golomb-Rice coded (k low bits each in one stream, the unary high parts in another),
  within ~0.1 bit of the entropy bound log2(C(n, count)) for an unstructured support;
  with k = floor(log2(n/count)) it is never above 2 + log2(n/count) bits per coordinate (the Elias-Fano bound),
  whatever the distribution, so clustered supports are covered too;
and three flags: COMPLEMENT (encode the absent coordinates instead, for very dense supports), ROWS (the support is
whole rows: encode row ids over `shape[0]` instead of coordinates) and COLUMNS (whole output columns of a weight
stored (in, out), as transformers' Conv1D: column ids over `shape[1]`). Whether a support is rows is the `Support`'s
own say, never inferred from its coordinates.

Everything is a plain function on tensors so the codec is tested on its own (see tests/test_codec.py).
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from .support import Support, expand_rows

MAGIC = b"CPLI"
VERSION = 1
SCHEME_EMPTY, SCHEME_FULL, SCHEME_BITMASK, SCHEME_RICE = 0, 1, 2, 3
FLAG_COMPLEMENT, FLAG_ROWS, FLAG_COLUMNS = 1, 2, 4
_PREFIX = struct.Struct("<4sBBBBI")  # magic, version, scheme, flags, low_bits, ndim
_SUFFIX = struct.Struct("<qII")  # count, index crc, values crc


class CorruptRecordError(ValueError):
    """An index record that cannot be decoded (truncated, altered, or not a CPL record)."""


@dataclass(frozen=True)
class SupportRecord:
    """What a decoded record says about the module it belongs to."""

    support: Support
    values_crc: int


def tensor_crc32(tensor: torch.Tensor) -> int:
    """CRC32 of a tensor's raw bytes (any dtype), for detecting altered files."""
    data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
    return zlib.crc32(data.tobytes()) & 0xFFFFFFFF


def encode_support(support: Support, values: torch.Tensor) -> torch.Tensor:
    """Encode a support as a uint8 record (values are only checksummed)."""
    shape = support.shape
    positions = support.indices.detach().to("cpu", torch.int64).numpy()
    flags, universe = 0, math.prod(shape)
    if support.rows is not None:
        positions = support.rows.detach().to("cpu", torch.int64).numpy()
        flags, universe = (FLAG_ROWS, shape[0]) if support.output_dim == 0 else (FLAG_COLUMNS, shape[1])
    if len(positions) and (positions[0] < 0 or positions[-1] >= universe or np.any(np.diff(positions) <= 0)):
        raise ValueError(f"support positions must be sorted, unique and in [0, {universe}) for shape {shape}")
    if 2 * len(positions) > universe:
        present = np.ones(universe, dtype=bool)
        present[positions] = False
        positions, flags = np.flatnonzero(present), flags | FLAG_COMPLEMENT
    scheme, low_bits, payload = _encode_positions(positions, universe)
    if flags & FLAG_COMPLEMENT and scheme == SCHEME_EMPTY:
        scheme, flags = SCHEME_FULL, flags & ~FLAG_COMPLEMENT
    header = _PREFIX.pack(MAGIC, VERSION, scheme, flags, low_bits, len(shape))
    header += struct.pack(f"<{len(shape)}q", *shape)
    header += _SUFFIX.pack(support.size, zlib.crc32(payload) & 0xFFFFFFFF, tensor_crc32(values))
    return torch.frombuffer(bytearray(header + payload), dtype=torch.uint8)


def decode_support(record: torch.Tensor) -> SupportRecord:
    """Inverse of `encode_support`; raises CorruptRecordError on any inconsistency."""
    blob = record.detach().to("cpu", torch.uint8).contiguous().numpy().tobytes()
    if len(blob) < _PREFIX.size:
        raise CorruptRecordError("record is shorter than its header")
    magic, version, scheme, flags, low_bits, ndim = _PREFIX.unpack_from(blob, 0)
    if magic != MAGIC or version != VERSION or scheme > SCHEME_RICE or ndim > 8:
        raise CorruptRecordError("record header is not a CPL index record of a known version")
    offset = _PREFIX.size
    if len(blob) < offset + 8 * ndim + _SUFFIX.size:
        raise CorruptRecordError("record is shorter than its header")
    shape = struct.unpack_from(f"<{ndim}q", blob, offset)
    offset += 8 * ndim
    count, index_crc, values_crc = _SUFFIX.unpack_from(blob, offset)
    payload = blob[offset + _SUFFIX.size :]
    if zlib.crc32(payload) & 0xFFFFFFFF != index_crc:
        raise CorruptRecordError("index payload checksum mismatch (file altered or truncated)")
    numel = math.prod(shape)
    if min(shape, default=1) < 0 or not 0 <= count <= numel:
        raise CorruptRecordError(f"record claims {count} coordinates in a weight of shape {tuple(shape)}")
    output_dim = 0 if flags & FLAG_ROWS else 1 if flags & FLAG_COLUMNS else None
    if output_dim is not None and (len(shape) != 2 or (flags & FLAG_ROWS and flags & FLAG_COLUMNS)):
        raise CorruptRecordError("record declares whole rows of a weight that cannot have them")
    if output_dim is None:
        universe, units = numel, count
    else:
        row_length = shape[1 - output_dim]
        if row_length == 0 or count % row_length:
            raise CorruptRecordError(f"record declares whole rows but {count} coordinates")
        universe, units = shape[output_dim], count // row_length
    stored = universe - units if flags & FLAG_COMPLEMENT else units
    positions = _decode_positions(scheme, low_bits, payload, universe, stored)
    if flags & FLAG_COMPLEMENT:
        present = np.ones(universe, dtype=bool)
        present[positions] = False
        positions = np.flatnonzero(present)
    positions = torch.from_numpy(np.ascontiguousarray(positions, dtype=np.int64))
    if output_dim is None:
        support = Support(tuple(shape), positions)
    else:
        support = Support(tuple(shape), expand_rows(positions, tuple(shape), output_dim), positions, output_dim)
    if support.size != count:
        raise CorruptRecordError(f"record decodes to {support.size} coordinates but declares {count}")
    return SupportRecord(support=support, values_crc=values_crc)


def _encode_positions(positions: np.ndarray, universe: int) -> tuple[int, int, bytes]:
    count = len(positions)
    if count == 0:
        return SCHEME_EMPTY, 0, b""
    if count == universe:
        return SCHEME_FULL, 0, b""
    positions = positions.astype(np.int64)
    gaps = np.diff(positions, prepend=-1) - 1
    rice_bits, rice_bytes = _best_rice_parameter(gaps, universe)
    if _ceil8(universe) <= rice_bytes:
        mask = np.zeros(universe, dtype=np.uint8)
        mask[positions] = 1
        return SCHEME_BITMASK, 0, _pack(mask)
    high = gaps >> rice_bits
    unary = np.ones(int(high.sum()) + count, dtype=np.uint8)
    unary[np.cumsum(high + 1) - 1] = 0
    return SCHEME_RICE, rice_bits, _pack(_low_bits(gaps, rice_bits)) + _pack(unary)


def _best_rice_parameter(gaps: np.ndarray, universe: int) -> tuple[int, int]:
    """Rice parameter minimising the payload; returns (k, bytes). The range includes floor(log2(n/count))."""
    centre = int(math.log2(universe / len(gaps)))
    best = None
    for bits in range(max(0, centre - 3), centre + 2):
        size = _ceil8(len(gaps) * bits) + _ceil8(int((gaps >> bits).sum()) + len(gaps))
        if best is None or size < best[1]:
            best = (bits, size)
    return best


def _low_bits(numbers: np.ndarray, bits: int) -> np.ndarray:
    return ((numbers[:, None] >> np.arange(bits, dtype=np.int64)) & 1).astype(np.uint8).reshape(-1)


def _unpack_low_bits(raw: np.ndarray, count: int, bits: int) -> np.ndarray:
    if not bits:
        return np.zeros(count, dtype=np.int64)
    unpacked = np.unpackbits(raw, count=count * bits, bitorder="little").reshape(count, bits)
    return (unpacked.astype(np.int64) << np.arange(bits, dtype=np.int64)).sum(axis=1)


def _pack(bits: np.ndarray) -> bytes:
    return np.packbits(bits, bitorder="little").tobytes()


def _decode_positions(scheme: int, low_bits: int, payload: bytes, universe: int, stored: int) -> np.ndarray:
    if scheme == SCHEME_EMPTY:
        return np.zeros(0, dtype=np.int64)
    if scheme == SCHEME_FULL:
        return np.arange(universe, dtype=np.int64)
    if scheme == SCHEME_BITMASK:
        if len(payload) != _ceil8(universe):
            raise CorruptRecordError("bitmask payload has the wrong length")
        bits = np.unpackbits(np.frombuffer(payload, dtype=np.uint8), count=universe, bitorder="little")
        return np.flatnonzero(bits).astype(np.int64)
    raw = np.frombuffer(payload, dtype=np.uint8)
    low_bytes = _ceil8(stored * low_bits)
    low = _unpack_low_bits(raw[:low_bytes], stored, low_bits)
    unary = np.unpackbits(raw[low_bytes:], bitorder="little")
    ends = np.flatnonzero(unary == 0)[:stored]
    if len(ends) != stored or _ceil8(int(ends[-1]) + 1 if stored else 0) != len(raw) - low_bytes:
        raise CorruptRecordError("Rice payload does not match the declared count")
    high = np.diff(ends, prepend=-1) - 1
    positions = np.cumsum((high << low_bits) + low + 1) - 1
    if stored and (positions[-1] >= universe or np.any(np.diff(positions) <= 0)):
        raise CorruptRecordError("decoded positions are out of range or unsorted")
    return positions


def _ceil8(bits: int) -> int:
    return (bits + 7) // 8

