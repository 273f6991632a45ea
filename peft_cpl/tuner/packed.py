"""A support as the layers keep it in memory: no int32 index per trained value.

Whole-row supports keep their row ids only (ROWS). Element supports of linear layers take one of two forms, by
density (`default_form`):
- BITMASK, from density 1/4 up: one bit per coordinate of the weight; values follow the flat order of the set bits.
  Costs 1 / (8 * density) bytes per trained value: 0.5 at density 0.25, 0.42 at 0.3, 0.21 at 0.6.
- BLOCKED, below density 1/4: the low 16 bits of each flat coordinate (2 bytes, kept as two uint8, a dtype that
  DDP's collectives broadcast) and, per block of 2^16 coordinates, where its values start (int32): 2 bytes and a
  little per trained value.
Either is expanded to flat coordinates one layer at a time, once in that layer's forward and once in its backward,
and freed there. The threshold is a trade of memory for time: a bitmask is smaller from density 1/16, but expanding
it reads every coordinate of the weight (numpy `unpackbits`, then `flatnonzero`, on the CPU), while a blocked
support expands at the cost of an int32 -> int64 copy (numpy `repeat` on the CPU); at 10% density the bitmask made
"fold" 1.09-1.18x slower than an int32 index in `benchmarks/strategies.py`. From 1/4 up the bitmask costs at most
0.5 bytes per value, what the 12.5 (AdamW) and 6.5 (AdamW8bit) bytes-per-value budgets of the fused step leave for
the index. On an accelerator both expand without a host sync (`nonzero_static`, `repeat_interleave` with its size).
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
    """`codes`: flat coordinates (FLAT), bits (BITMASK), low 16 bits as byte pairs (BLOCKED) or row ids (ROWS);
    `starts`: where each block's values start (BLOCKED only, else empty)."""

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


BITMASK_FROM_DENSITY = 0.25


def default_form(count: int, numel: int) -> str:
    """The compact form of an element support of `count` coordinates in a weight of `numel` (see the module doc)."""
    return BITMASK if count >= BITMASK_FROM_DENSITY * numel else BLOCKED


def pack(support: Support, form: str | None = None) -> PackedSupport:
    """The in-memory form of a support: its rows, else `form`, by default `default_form`'s."""
    device, shape, numel = support.indices.device, support.shape, math.prod(support.shape)
    none = torch.zeros(0, dtype=torch.int32, device=device)
    if support.rows is not None:
        return PackedSupport(ROWS, support.rows.to(torch.int64, copy=True), none, shape, support.output_dim)
    indices = support.indices.to(torch.int64)
    if form is None:
        form = default_form(indices.numel(), numel)
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
    low = indices & (2**BLOCK_BITS - 1)
    # each 16-bit offset as two bytes, low byte first: collectives (gloo, NCCL) broadcast uint8 buffers, not int16
    codes = torch.stack([low & 0xFF, low >> 8], dim=1).to(torch.uint8).view(-1)
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
    if packed.codes.device.type == "cpu":
        return _blocked_positions_numpy(packed)
    return _blocked_positions_torch(packed, size(packed) if count is None else count)


def _blocked_positions_numpy(packed: PackedSupport) -> torch.Tensor:
    """On the CPU: "fold" with it runs at the int32 index's speed (`benchmarks/results/strategies_forms.txt`)."""
    starts = packed.starts.numpy()
    high = np.repeat(np.arange(starts.size - 1, dtype=np.int64) << BLOCK_BITS, np.diff(starts))
    high += packed.codes.numpy().view("<u2")
    return torch.from_numpy(high)


def _blocked_positions_torch(packed: PackedSupport, count: int) -> torch.Tensor:
    counts = (packed.starts[1:] - packed.starts[:-1]).to(torch.int64)
    blocks = torch.arange(counts.numel(), device=counts.device) << BLOCK_BITS
    high = torch.repeat_interleave(blocks, counts, output_size=count)
    pairs = packed.codes.view(-1, 2).to(torch.int64)
    return high + pairs[:, 0] + (pairs[:, 1] << 8)


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
