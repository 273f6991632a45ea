"""A support as the layers keep it in memory: no int32 index per trained value.

Whole-row supports keep their row ids only (ROWS). Element supports of linear layers take the smaller of two forms:
- BITMASK: one bit per coordinate of the weight; values follow the flat order of the set bits. Costs
  1 / (8 * density) bytes per trained value: 0.21 at density 0.6, 0.42 at 0.3.
- BLOCKED: the low 16 bits of each flat coordinate (2 bytes) and, per block of 2^16 coordinates, where its values
  start (int32): 2 bytes and a little per trained value, for sparse supports (below ~6% density).
Either is expanded to flat coordinates one layer at a time, once in that layer's forward and once in its backward,
and freed there. On the CPU a bitmask is expanded by numpy (`unpackbits`, then `flatnonzero`): with it "fold" took
1.01-1.18x the time of "fold int32" in `benchmarks/strategies.py`, against 1.2-1.45x with `torch.nonzero`. On an
accelerator it is expanded by `nonzero_static` (no host sync).
Element supports of embeddings, and all element supports with `CPLConfig(index_storage="int32")`, keep plain flat
coordinates (FLAT, int32; int64 beyond 2^31 coordinates): an embedding's delta is looked up per token, which needs
the coordinates themselves.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from .support import Support, expand_rows, index_dtype

FLAT, BITMASK, BLOCKED, ROWS = "flat", "bitmask", "blocked", "rows"
BLOCK_BITS = 16


class PackedSupport(NamedTuple):
    """`codes`: flat coordinates (FLAT), bits (BITMASK), low 16 bits (BLOCKED) or row ids (ROWS); `starts`: where
    each block's values start (BLOCKED only, else empty)."""

    form: str
    codes: torch.Tensor
    starts: torch.Tensor
    shape: tuple[int, ...]
    output_dim: int = 0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.codes.numel() * self.codes.element_size() + self.starts.numel() * self.starts.element_size()


def packed_bytes(count: int, numel: int) -> dict[str, int]:
    """Bytes each form would take for `count` coordinates of a weight of `numel` coordinates."""
    return {BITMASK: math.ceil(numel / 8), BLOCKED: 2 * count + 4 * (math.ceil(numel / 2**BLOCK_BITS) + 1)}


def pack(support: Support, form: str | None = None) -> PackedSupport:
    """The in-memory form of a support: its rows, else `form`, by default the smaller of BITMASK and BLOCKED."""
    device, shape, numel = support.indices.device, support.shape, math.prod(support.shape)
    none = torch.zeros(0, dtype=torch.int32, device=device)
    if support.rows is not None:
        return PackedSupport(ROWS, support.rows.to(torch.int64, copy=True), none, shape, support.output_dim)
    indices = support.indices.to(torch.int64)
    if form is None:
        sizes = packed_bytes(indices.numel(), numel)
        form = BITMASK if sizes[BITMASK] <= sizes[BLOCKED] else BLOCKED
    if form == FLAT:
        return PackedSupport(FLAT, indices.to(index_dtype(numel), copy=True), none, shape)
    if form == BITMASK:
        mask = torch.zeros(math.ceil(numel / 8) * 8, dtype=torch.bool, device=device)
        mask[indices] = True
        weights = 1 << torch.arange(8, dtype=torch.int32, device=device)
        codes = (mask.view(-1, 8).to(torch.int32) * weights).sum(dim=1).to(torch.uint8)
        return PackedSupport(BITMASK, codes, none, shape)
    boundaries = torch.arange(0, math.ceil(numel / 2**BLOCK_BITS) + 1, device=device) << BLOCK_BITS
    starts = torch.searchsorted(indices, boundaries).to(torch.int32)
    low = (indices & (2**BLOCK_BITS - 1)).to(torch.int32)
    codes = torch.where(low >= 2**15, low - 2**BLOCK_BITS, low).to(torch.int16)  # uint16 kept in an int16
    return PackedSupport(BLOCKED, codes, starts, shape)


def to_support(packed: PackedSupport) -> Support:
    rows = packed.codes if packed.form == ROWS else None
    return Support(tuple(packed.shape), positions(packed), rows, packed.output_dim)


def mask(packed: PackedSupport) -> torch.Tensor:
    """Boolean mask over the flat weight (BITMASK form only)."""
    if packed.codes.device.type == "cpu":
        return torch.from_numpy(_cpu_bits(packed))
    bits = (packed.codes.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8, device=packed.codes.device)) & 1
    return bits.view(-1)[: packed.numel].bool()


def _cpu_bits(packed: PackedSupport) -> np.ndarray:
    """The unpacked bits of a bitmask on the CPU, as numpy bools (0/1 bytes: a valid bool view)."""
    return np.unpackbits(packed.codes.numpy(), bitorder="little", count=packed.numel).view(np.bool_)


def positions(packed: PackedSupport, count: int | None = None) -> torch.Tensor:
    """Sorted flat int64 coordinates. Given the `count` (the values' length), a bitmask on an accelerator expands
    without a host sync (`nonzero_static`)."""
    if packed.form == FLAT:
        return packed.codes.to(torch.int64)
    if packed.form == ROWS:
        return expand_rows(packed.codes, packed.shape, packed.output_dim)
    if packed.form == BITMASK:
        if packed.codes.device.type == "cpu":
            return torch.from_numpy(np.flatnonzero(_cpu_bits(packed)).astype(np.int64, copy=False))
        bits = mask(packed)
        if count is not None:
            return torch.nonzero_static(bits, size=count).squeeze(1)
        return torch.nonzero(bits).squeeze(1)
    counts = (packed.starts[1:] - packed.starts[:-1]).to(torch.int64)
    blocks = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
    return (blocks << BLOCK_BITS) + (packed.codes.to(torch.int64) & (2**BLOCK_BITS - 1))


def expanded(packed: PackedSupport, count: int | None = None) -> PackedSupport:
    """The same support as FLAT coordinates (int64), to expand a compact form once for several uses."""
    if packed.form == FLAT:
        return packed
    return PackedSupport(FLAT, positions(packed, count), packed.starts[:0], packed.shape, packed.output_dim)


def size(packed: PackedSupport) -> int:
    """Number of support coordinates (the values' length), without expanding a bitmask's positions."""
    if packed.form == FLAT:
        return packed.codes.numel()
    if packed.form == ROWS:
        return packed.codes.numel() * packed.shape[1 - packed.output_dim]
    if packed.form == BLOCKED:
        return int(packed.starts[-1]) if packed.starts.numel() else 0
    return int(mask(packed).sum())


def add_into(dense: torch.Tensor, packed: PackedSupport, values: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """dense += alpha * delta, in place on the flat view of a weight-shaped tensor."""
    where = positions(packed, values.numel())
    dense.view(-1).index_add_(0, where, values.detach().to(dense.device, dense.dtype), alpha=alpha)
    return dense


def take(dense: torch.Tensor, packed: PackedSupport) -> torch.Tensor:
    """The values of `dense` at the support, in the support's order."""
    return torch.index_select(dense.reshape(-1), 0, positions(packed))
